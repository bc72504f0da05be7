#!/usr/bin/env bash
# The README's main command: set up, generate the sample corpus, and pretrain the tiny CPU config.
# Arguments go to `pretrain train` (default: --config configs/tiny_cpu.yaml), e.g.
#   bash scripts/quickstart.sh --config configs/tiny_cpu_m3i.yaml --set schedule.total_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ ! -f data/sample/train/manifest.json ]; then
  .venv/bin/pretrain data sample data/sample
fi
[ $# -gt 0 ] || set -- --config configs/tiny_cpu.yaml
.venv/bin/pretrain train "$@"
