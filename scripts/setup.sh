#!/usr/bin/env bash
# Create .venv and install internimage-pretrain with its test extras. Idempotent; safe to re-run.
#
# torch is installed first and then pinned for the rest of the install: resolving a bare `torch`
# requirement from scratch pulls the CUDA build and ~17 nvidia packages. On a GPU machine, install the
# torch build you want first (or set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $TORCH_SPEC numpy 2>&1 | grep -v "is ignored" || true
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "[setup] torch $TORCH_VERSION; installing internimage-pretrain[test]"
"$PY" -m pip install -q -e ".[test]" "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored" || true
"$PY" -c "import pretrain, deepspeed, ray, pyarrow; print('[setup] ok: pretrain', pretrain.__version__)"
