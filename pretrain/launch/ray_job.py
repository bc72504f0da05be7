"""Ray job entry point: pretraining on a Ray cluster with Ray Train, Ray Data ingest and failure recovery.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env-json '{...}' -- \\
        python -m pretrain.launch.ray_job --config configs/X.yaml --num-workers 16 \\
            --storage-path s3://bucket/runs --max-failures 3 [--set key=value ...]

(see launch/submit_example.sh). The driver only plans and supervises; this module is its command line, the
checks are `preflight.py`, the Ray Train wiring `ray_train.py`, each worker's loop `ray_worker.py`:

1. preflight, before anything touches a GPU: load and validate the config (`--set` overrides included),
   open every corpus manifest (and check its shards exist), create and write-probe the run directory
   `<storage-path>/<name>` (any fsspec URL, or an absolute path every node reaches), check that an existing
   checkpoint there has the same world size, connect to Ray and check the cluster can ever hold the worker
   group. Any failure exits with code 2 and one clear line (`ray job status` shows FAILED).
2. a Ray Train `TorchTrainer`: `--num-workers` workers (one GPU each, or `--cpus-per-worker` CPUs), each
   running `pretrain.launch.ray_worker.train_loop_per_worker`, i.e. the engine's Trainer fed by its rank of
   the Ray Data stream (data.reader=ray: decoding runs in Ray Data actors on the cluster's CPUs).
   `RunConfig(name, storage_path, FailureConfig(max_failures))`: a dead worker or node restarts the worker
   group, which resumes from the latest checkpoint. Resubmitting with the same name and storage path resumes
   the run too (Ray Train V2 semantics); use a new `--name` for a fresh run.
3. run layout under `<storage-path>/<name>/`: `checkpoints/step_*/` + `checkpoints/latest` (the engine's
   layout: `pretrain convert`, `pretrain train --resume` and the deepspeed launcher read it), `tb/`
   (TensorBoard), `metrics.jsonl`, `config.yaml` (the resolved config), plus Ray Train's own state files.
4. `ray job stop` sends SIGTERM to this driver: it asks the workers to finish the current step, save a
   checkpoint and return (the job needs `RAY_JOB_STOP_WAIT_TIME_S` long enough for one save; the example
   sets 300 s). Progress lines (step, loss, samples/s, ETA) come from rank 0 into `ray job logs`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from pretrain.data.storage import join

from .preflight import PreflightError, check_cluster, describe, plan_job
from .ray_train import build_trainer, stop_flag_class

EXIT_PREFLIGHT = 2


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    from pretrain.config import add_config_arguments

    p = argparse.ArgumentParser(
        prog="python -m pretrain.launch.ray_job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    p.add_argument("--num-workers", type=int, default=1, help="training workers (ranks); default 1")
    p.add_argument(
        "--device",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="gpu: one GPU per worker; cpu: CPU workers (gloo); auto: gpu when the cluster has GPUs",
    )
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per training worker (default 1)"
    )
    p.add_argument(
        "--storage-path",
        default=os.environ.get("PRETRAIN_RAY_STORAGE", "~/pretrain_runs"),
        help="run storage: an fsspec URL (s3://, gs://, ...) or an absolute path every node reaches "
        "(shared FS); the run lives in <storage-path>/<name>. Default $PRETRAIN_RAY_STORAGE or ~/pretrain_runs",
    )
    p.add_argument("--name", default=None, help="run name (default: the config's `name`); same name = resume")
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="worker-group restarts allowed after failures (-1: unlimited; default 3)",
    )
    p.add_argument(
        "--reader",
        choices=("ray", "arrow"),
        default="ray",
        help="data reader of each rank: ray (Ray Data actors, default) or arrow (in the worker process)",
    )
    p.add_argument(
        "--resume-from",
        default=None,
        help="seed a new run from a checkpoint (step dir or root with `latest`, e.g. from the deepspeed "
        "launcher); ignored once the run has its own checkpoints",
    )
    p.add_argument(
        "--skip-resource-check",
        action="store_true",
        help="do not fail when the cluster is too small now (autoscaling clusters)",
    )
    p.add_argument("--check", action="store_true", help="run the preflight checks, print the plan and exit")
    test = p.add_argument_group("testing and audit")
    test.add_argument(
        "--record-keys",
        default=None,
        metavar="DIR",
        help="append each rank's consumed sample keys per step to DIR/keys_rankNNNNN.jsonl (node-local path)",
    )
    test.add_argument(
        "--fail-once",
        default=None,
        metavar="RANK:STEP",
        help="fault injection: worker RANK exits (os._exit(1)) once, when fetching the batch after STEP steps",
    )
    return p


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "pretrain.launch.ray_job"
    try:
        plan = plan_job(args)
    except PreflightError as err:
        print(f"{prog}: preflight failed: {err}", file=sys.stderr, flush=True)
        return EXIT_PREFLIGHT

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    try:
        check_cluster(plan, skip=args.skip_resource_check)
    except PreflightError as err:
        print(f"{prog}: preflight failed: {err}", file=sys.stderr, flush=True)
        return EXIT_PREFLIGHT
    print(describe(plan), flush=True)
    if args.check:
        return 0

    flag = stop_flag_class().remote()
    stopping: dict = {}

    def on_signal(signum, frame):
        if stopping:  # a second signal: give up on the graceful stop
            raise KeyboardInterrupt
        stopping["signal"] = signum
        print(
            f"{prog}: {signal.Signals(signum).name} received: the workers finish their step, save a "
            "checkpoint and stop (signal again to abort without saving)",
            flush=True,
        )
        flag.set.remote()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    from ray.train import TrainingFailedError

    t0 = time.time()
    try:
        result = build_trainer(plan, flag).fit()
    except TrainingFailedError as err:
        print(
            f"{prog}: training failed after {plan.max_failures} restart(s) allowed: {err}\n"
            f"the latest checkpoint (if any) is in {plan.checkpoint_root}; resubmit with the same --name "
            "to resume",
            file=sys.stderr,
            flush=True,
        )
        return 1
    checkpoint = getattr(result, "checkpoint", None)
    metrics = getattr(result, "metrics", None) or {}
    last = join(plan.checkpoint_root, checkpoint.path.rstrip("/").rsplit("/", 1)[-1]) if checkpoint else None
    print(
        f"{prog}: run {plan.name} {'stopped' if stopping else 'finished'} after {time.time() - t0:.0f}s at "
        f"step {metrics.get('step', '?')}; checkpoint {last}; TensorBoard: tensorboard --logdir "
        f"{join(plan.run_dir, 'tb')}",
        flush=True,
    )
    if stopping:
        return 128 + int(stopping["signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
