# Sourced by scripts/main.sh and scripts/test.sh: create or refresh ./.venv with everything calm_hf needs.
# Re-installs only when pyproject.toml changed (a hash stamp sits inside the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CALM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[calm_hf] creating virtualenv in $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.calm_hf_stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-${CALM_EXTRAS:-test}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[calm_hf] installing dependencies (torch CPU wheel, transformers, datasets, ...)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # torch pinned here (pyproject.toml only asks for torch>=2.13): the CPU wheel first, so no CUDA build is pulled in.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[${CALM_EXTRAS:-test}]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
