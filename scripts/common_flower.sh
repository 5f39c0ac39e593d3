# Helpers of the Flower start scripts (sourced, not run): the Flower environment's python, and the helpers of
# scripts/common.sh (without its search for OpenFL's fx).
PATCHSVDD_WITHOUT_FX=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# This project's Flower environment (make flower-install) first, else a python on PATH that has flwr.
patchsvdd_require_flower() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -x "$repo/.venv-flower/bin/python" ]; then PATCHSVDD_FLOWER_PY="$repo/.venv-flower/bin/python"
  elif command -v python3 >/dev/null 2>&1 && python3 -c "import flwr" >/dev/null 2>&1; then
    PATCHSVDD_FLOWER_PY="$(command -v python3)"
  else echo "Flower not found: run 'make flower-install' (a Python 3.11-3.13 environment with flwr 1.42)" >&2; exit 2
  fi
}

patchsvdd_require_flower
