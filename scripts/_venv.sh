# Sourced by scripts/main.sh and scripts/test.sh: create or refresh a virtualenv with everything calm_hf needs.
#   CALM_DEPS=newest (default): ./.venv with the newest versions pyproject.toml allows (what users get)
#   CALM_DEPS=lowest:           ./.venv-lowest with every dependency at its declared lower bound
# Re-installs only when pyproject.toml changed (a hash stamp sits inside the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${CALM_DEPS:-newest}"
case "$DEPS" in
    newest) VENV="${CALM_VENV:-$ROOT/.venv}" ;;
    lowest) VENV="${CALM_VENV:-$ROOT/.venv-lowest}" ;;
    *) echo "CALM_DEPS must be newest or lowest, got $DEPS" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[calm_hf] creating virtualenv in $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.calm_hf_stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-${CALM_EXTRAS:-test}-$DEPS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[calm_hf] installing dependencies into $VENV ($DEPS versions: torch CPU wheel, transformers, datasets, ...)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # torch pinned here (pyproject.toml only asks for torch>=2.13): the CPU wheel first, so no CUDA build is pulled in.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    CONSTRAINTS="$VENV/calm_hf_constraints.txt"
    if [ "$DEPS" = lowest ]; then
        "$VENV/bin/python" "$ROOT/scripts/lowest_constraints.py" ${CALM_EXTRAS:-test} | sed 's/^torch==.*/torch==2.13.0/' > "$CONSTRAINTS"
        "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e "$ROOT[${CALM_EXTRAS:-test}]"
    else
        # eager: an existing venv moves up to the newest allowed versions too, torch stays the CPU wheel
        echo "torch==2.13.0" > "$CONSTRAINTS"
        "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" --upgrade --upgrade-strategy eager \
            -e "$ROOT[${CALM_EXTRAS:-test}]"
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
