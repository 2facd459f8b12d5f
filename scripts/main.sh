#!/usr/bin/env bash
# Create/refresh the virtualenv, then run the main job on the built-in simulated corpus:
# corpus -> train tokenizer -> tokenize -> pretrain -> evaluate on held-out recordings -> write ./calm-base
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec calm main "$@"
