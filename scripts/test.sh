#!/usr/bin/env bash
# The test suite, offline, on the CPU, in the virtualenvs scripts/_venv.sh creates or refreshes.
#   bash scripts/test.sh                  # what CI runs (.ci/run): the full suite with the newest versions the
#                                         # package allows (.venv), then the fast subset with every dependency at
#                                         # its declared lower bound (.venv-lowest)
#   bash scripts/test.sh -m "not slow"    # pytest arguments: only those tests, in .venv (the contributor loop)
#   CALM_DEPS=lowest bash scripts/test.sh -m "not slow"   # the same in .venv-lowest
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run_pytest() {  # run_pytest newest|lowest [pytest args...]
    (
        export CALM_DEPS="$1"
        shift
        source "$HERE/_venv.sh"
        cd "$ROOT"
        echo "[calm_hf] pytest $* with $CALM_DEPS dependencies ($(python -c 'import transformers; print("transformers", transformers.__version__)'))"
        python -m pytest "$@"
    )
}

if [ $# -gt 0 ]; then
    run_pytest "${CALM_DEPS:-newest}" "$@"
else
    run_pytest newest
    run_pytest lowest -m "not slow"
fi
