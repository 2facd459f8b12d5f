#!/usr/bin/env bash
# The main job with one of the packaged recipes (calm_hf/recipes/main_<preset>.json):
# simulate -> tokenizer -> tokenize -> pretrain -> evaluate -> ./calm-base.
#   bash training/main.sh tiny /tmp/calm-smoke      # seconds
#   bash training/main.sh cpu                       # the default run (13-min pretraining budget, ~17 min on 2 cores)
#   bash training/main.sh paper . --use_cpu         # the paper's sizes (extra flags are passed on)
set -euo pipefail
PRESET="${1:-cpu}"; OUT="${2:-.}"; shift $(( $# > 2 ? 2 : $# ))
exec python -m calm_hf.commands.main --size "$PRESET" --output_dir "$OUT" "$@"
