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
#
# Python: the first `python`/`deepspeed` on PATH that can import the project; when that is not the case and
# the checkout has a .venv, its bin/ is put first on PATH.
#
# Stopping: SIGTERM (what a scheduler sends), SIGINT (Ctrl-C) or SIGHUP to this script is passed to every
# rank of this node as SIGTERM/SIGINT. Each rank finishes its step (the ranks agree on the step), saves a
# checkpoint and exits; this script waits for them and exits with the launcher's status (128 + the signal
# number after a stop, as `pretrain train` itself does). DeepSpeed's own launcher processes are not signalled
# (they would kill the ranks 30 s later, saved or not): they run in their own session, so a signal to this
# script's process group reaches the ranks only through here. Multi-node (pdsh): the signal goes to the
# `deepspeed` runner, which stops the remote launchers (DeepSpeed's behaviour: 30 s to save).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! python -c "import pretrain, deepspeed" 2>/dev/null && [[ -x "$here/../.venv/bin/python" ]]; then
  PATH="$(cd "$here/../.venv/bin" && pwd):$PATH"
  export PATH
fi

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

# The runner in its own session: runner -> deepspeed.launcher.launch -> one process per rank.
setsid deepspeed "${args[@]}" --module pretrain.cli train "$@" &
runner=$!

children() { pgrep -P "$1" 2>/dev/null || true; }
is_launcher() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "deepspeed.launcher.launch"; }

stopping=""
forward() {
  local sig="$1" to="$1" child launchers="" others="" ranks=""
  [[ "$sig" == HUP ]] && to=TERM
  for child in $(children "$runner"); do
    if is_launcher "$child"; then launchers+=" $child"; else others+=" $child"; fi
  done
  for child in $launchers; do ranks+=" $(children "$child")"; done
  ranks="$(echo $ranks)"
  if [[ -n "$ranks" ]]; then  # this node's ranks: they save and exit, the launcher then ends by itself
    echo "deepspeed_train.sh: SIG$sig: asking the ranks ($ranks) to finish the step, save and exit" >&2
    # shellcheck disable=SC2086
    kill -s "$to" $ranks 2>/dev/null || true
  elif [[ -n "$launchers" ]]; then  # no rank started yet: nothing to save, DeepSpeed's launcher stops
    echo "deepspeed_train.sh: SIG$sig before the ranks started: stopping the launcher" >&2
    # shellcheck disable=SC2086
    kill -s "$to" $launchers 2>/dev/null || true
  elif [[ -n "$others" ]]; then  # multi-node (pdsh): the runner's own handler stops the remote launchers
    echo "deepspeed_train.sh: SIG$sig: passing it to the deepspeed runner" >&2
    kill -s "$to" "$runner" 2>/dev/null || true
  else  # the runner is still starting: its whole session
    echo "deepspeed_train.sh: SIG$sig while the deepspeed runner starts: stopping it" >&2
    kill -s "$to" -- "-$runner" 2>/dev/null || kill -s "$to" "$runner" 2>/dev/null || true
  fi
  stopping="SIG$sig"
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# `wait` returns early when a trapped signal arrives: wait again until the runner is gone.
set +e
while kill -0 "$runner" 2>/dev/null; do
  wait "$runner"
done
wait "$runner"
rc=$?
[[ -n "$stopping" ]] && echo "deepspeed_train.sh: stopped on $stopping; the ranks exited, launcher status $rc" >&2
exit "$rc"
