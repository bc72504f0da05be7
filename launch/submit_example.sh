#!/usr/bin/env bash
# Submit a pretraining run to a Ray cluster with `ray job submit` (Ray Train workers + Ray Data ingest).
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit_example.sh --config configs/internimage_h.yaml \
#       --num-workers 64 --storage-path s3://bucket/runs [--name h-m3i-01] [--set key=value ...]
#   launch/submit_example.sh --config configs/my_tiny.yaml --num-workers 2 --device cpu --storage-path /shared/runs
#
# The config's data.sources[*].uri must be reachable from every node (an absolute shared path or a URL):
# relative paths would resolve inside the uploaded working dir, which does not carry data/.
#
# Every argument goes to `python -m pretrain.launch.ray_job` (see its --help): --num-workers, --device
# auto|gpu|cpu, --cpus-per-worker, --storage-path (absolute shared path or s3://, gs://, ...), --name,
# --max-failures, --reader ray|arrow, --resume-from, --check (preflight only).
#
# Environment: RAY_ADDRESS (the head's dashboard, default http://127.0.0.1:8265), RAY_AUTH_TOKEN or
# ~/.ray/auth_token when the cluster uses token auth (the default), SUBMISSION_ID (default: a fresh one),
# WAIT=1 to follow the logs until the job ends (default: return at once and print the commands to follow it).
#
# runtime_env: the repository is uploaded as the working dir (without .venv, .git, data/, runs/, caches:
# corpora and checkpoints live on shared storage, never in the upload); OMP_NUM_THREADS=1 keeps CPU
# threads per rank sane; RAY_JOB_STOP_WAIT_TIME_S gives `ray job stop` time for the final checkpoint
# before Ray sends SIGKILL (Ray's default is 3 s). The cluster's Python env must already have this
# project's dependencies (torch, deepspeed, ray[data,train,default], ...): add "pip"/"uv" to the runtime
# env only for small extras.
set -euo pipefail

cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
SUBMISSION_ID="${SUBMISSION_ID:-pretrain-$(date +%Y%m%d-%H%M%S)-$$}"

RUNTIME_ENV=$(
  cat <<'JSON'
{
  "excludes": ["/.venv/", "/.git/", "/.cache/", "/data/", "/runs/", "/csrc/build/", "*.so", "*.whl", "__pycache__/"],
  "env_vars": {
    "OMP_NUM_THREADS": "1",
    "RAY_JOB_STOP_WAIT_TIME_S": "300",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false"
  }
}
JSON
)

wait_flag=(--no-wait)
[[ "${WAIT:-0}" == "1" ]] && wait_flag=()

ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$SUBMISSION_ID" \
  --working-dir . \
  --runtime-env-json "$RUNTIME_ENV" \
  "${wait_flag[@]}" \
  -- python -m pretrain.launch.ray_job "$@"

if [[ "${WAIT:-0}" != "1" ]]; then
  cat <<EOF
submitted $SUBMISSION_ID
  ray job logs   --address $RAY_ADDRESS -f $SUBMISSION_ID    # progress: step, loss, samples/s, ETA
  ray job status --address $RAY_ADDRESS $SUBMISSION_ID
  ray job stop   --address $RAY_ADDRESS $SUBMISSION_ID       # workers save a checkpoint, then stop
EOF
fi
