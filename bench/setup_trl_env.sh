#!/usr/bin/env bash
# The benchmark's own environment for the TRL comparison (bench/trl_compare.py): TRL is NOT a project
# dependency, so it lives in bench/.venv-trl (git-ignored), with the project installed editable beside it.
# torch==2.13.0 first, so pip keeps the CPU build instead of pulling a CUDA one for trl's torch requirement.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
venv="${TRL_VENV:-$here/.venv-trl}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import trl, infalign; assert trl.__version__ == '1.16.0'" 2>/dev/null; then
  echo "$venv ready (trl $("$venv/bin/python" -c 'import trl; print(trl.__version__)'))"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q trl==1.16.0
"$venv/bin/pip" install -q -e "$repo"
"$venv/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
