#!/usr/bin/env bash
# The main job with a recipe file: simulate -> tokenizer -> tokenize -> pretrain -> evaluate -> ./calm-base.
#   bash training/main.sh tiny /tmp/calm-smoke      # seconds
#   bash training/main.sh cpu                       # the default run (13-min pretraining budget, ~17 min on 2 cores)
#   bash training/main.sh paper . --use_cpu         # the paper's sizes (extra flags are passed on)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRESET="${1:-cpu}"; OUT="${2:-.}"; shift $(( $# > 2 ? 2 : $# ))
exec python -m calm_hf.commands.main --config "$HERE/configs/main_${PRESET}.json" --output_dir "$OUT" "$@"
