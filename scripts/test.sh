#!/usr/bin/env bash
# Create/refresh the virtualenv, then run the default test suite (offline, CPU).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
