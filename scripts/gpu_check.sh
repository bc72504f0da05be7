#!/usr/bin/env bash
# The one prepared device run (issue 16): install .carry/, print the device facts, build the DCNv3 extension
# (and the DCNv4 peer, in parallel), then phases a-d, each with its own timeout and a "phase X: ok/failed (s)"
# line, going on past a failure; all under one deadline (default 530 s). Writes report.md, report.json and
# log.txt into one folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]            # on the GPU machine; OUT_DIR defaults to $OUT, else runs/gpu_check
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]  # on a CPU: the same plumbing, tiny shapes, GPU phases skipped
#   bash scripts/gpu_check.sh --phases a,d         # a subset (a rerun on a warm machine keeps the build)
#
# Phases: install (.carry/ into $GPU_CHECK_WORK/site, default /tmp/gpu_check), facts, build, a (pytest -m gpu),
# b (pretrain bench model), c (pretrain bench dcn), d (pretrain bench train + the H M3I recipe). Budgets and
# what each runs: scripts/gpu_check/run.py and README "Measuring on a GPU". Prepare .carry/ with
# scripts/gpu_carry.sh on a machine with network first.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  # the device image's python3 holds its CUDA torch; here (--dry-run) the project's venv
  if [[ " $* " == *" --dry-run "* ]] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check/run.py --python "$PY" "$@"
