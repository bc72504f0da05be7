#!/usr/bin/env bash
# Train under the DeepSpeed launcher: all GPUs of this node, or every node of a hostfile.
#
#   launch/deepspeed_train.sh --config configs/internimage_h.yaml [--set key=value ...] [--resume auto]
#   HOSTFILE=launch/hostfile NUM_GPUS=8 launch/deepspeed_train.sh --config ...     # multi-node (ssh/pdsh)
#   NUM_GPUS=2 launch/deepspeed_train.sh --config configs/tiny_cpu.yaml           # CPU: 2 ranks on gloo
#
# Every argument is passed to `pretrain train`. The launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for each
# rank; the trainer only joins that process group (`--no_local_rank`: the rank comes from the environment).
# Environment: HOSTFILE (see launch/hostfile.example), NUM_GPUS (ranks per node; default: all devices),
# NUM_NODES, MASTER_ADDR, MASTER_PORT (default 29500), INCLUDE (e.g. "host1:0,1@host2:0"), DS_LAUNCH_ARGS
# (anything else for `deepspeed`).
set -euo pipefail

# Unset, every CPU rank spawns one OpenMP thread per core and the ranks fight over them (~40x slower on CPU);
# GPU ranks do not need more than a few for the data path.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${INCLUDE:-}" ]] && args+=(--include "$INCLUDE")
# shellcheck disable=SC2206
[[ -n "${DS_LAUNCH_ARGS:-}" ]] && args+=(${DS_LAUNCH_ARGS})

exec deepspeed "${args[@]}" --module pretrain.cli train "$@"
