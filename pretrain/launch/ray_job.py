"""Ray job entry point: pretraining on a Ray cluster with Ray Train, Ray Data ingest and failure recovery.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env-json '{...}' -- \\
        python -m pretrain.launch.ray_job --config configs/X.yaml --num-workers 16 \\
            --storage-path s3://bucket/runs --max-failures 3 [--set key=value ...]

(see launch/submit_example.sh). The driver (this module) only plans and supervises:

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
import hashlib
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

EXIT_PREFLIGHT = 2


class PreflightError(RuntimeError):
    """Bad input found before the worker group starts; the message says what and how to fix it."""


@dataclass
class JobPlan:
    """Everything the driver decided; `worker_config()` is what each worker receives."""

    cfg: object
    name: str
    storage_path: str
    run_dir: str
    checkpoint_root: str
    num_workers: int
    use_gpu: bool | None
    cpus_per_worker: float
    max_failures: int
    resume_from: str | None = None
    record_keys: str | None = None
    fail_once: dict | None = None
    sync_outputs_to: str | None = None
    notes: list[str] = field(default_factory=list)

    def worker_config(self, stop_flag=None) -> dict:
        from pretrain.config import dump_config

        return {
            "config_yaml": dump_config(self.cfg),
            "checkpoint_root": self.checkpoint_root,
            "resume_from": self.resume_from,
            "record_keys": self.record_keys,
            "fail_once": self.fail_once,
            "sync_outputs_to": self.sync_outputs_to,
            "stop_flag": stop_flag,
        }


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


# ------------------------------------------------------------------------------------------ preflight
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _abs_storage(path: str) -> str:
    if path.startswith("file://"):
        path = path[len("file://") :]
    if _is_url(path):
        return path.rstrip("/")
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        raise PreflightError(
            f"--storage-path {path!r} is relative: inside `ray job submit` the working directory is a "
            "temporary copy, so give an absolute path on storage every node reaches, or a URL (s3://...)"
        )
    return os.path.normpath(path)


def _join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def probe_storage(run_dir: str) -> None:
    """Create the run directory and write/read/delete a small file there (fails fast on bad storage)."""
    import fsspec

    probe = _join(run_dir, f".preflight-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = fsspec.core.url_to_fs(run_dir)
        fs.makedirs(path, exist_ok=True)
        _, probe_path = fsspec.core.url_to_fs(probe)
        fs.pipe_file(probe_path, b"ok")
        if fs.cat_file(probe_path) != b"ok":
            raise OSError("read back different bytes")
        fs.rm(probe_path)
    except Exception as err:  # any backend error: missing bucket, no credentials, read-only path, ...
        raise PreflightError(
            f"storage path {run_dir} is not writable: {type(err).__name__}: {err}. Check --storage-path "
            "(an absolute shared path or a reachable URL) and its credentials"
        ) from err


def check_data(cfg) -> None:
    """Every source's manifest opens and names existing shards (pretrain.data.Manifest.load)."""
    if cfg.synthetic.enabled:
        return
    from pretrain.data import Manifest

    for i, source in enumerate(getattr(cfg.data, "sources", [])):
        try:
            Manifest.load(source.uri)
        except Exception as err:
            hint = ""
            if not _is_url(source.uri) and not os.path.isabs(source.uri):
                hint = (
                    " (a relative uri resolves against the job's working-dir copy, where data/ is not "
                    "uploaded: use an absolute shared path or a URL)"
                )
            raise PreflightError(f"data.sources[{i}] ({source.name}): {err}{hint}") from err


def check_world_size(root: str, tag: str, num_workers: int, fix: str) -> None:
    """A ZeRO checkpoint resumes only on the world size that wrote it: fail now, not in every restart."""
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(_join(root, tag, "meta.json"))
    if fs.exists(path):
        meta = json.loads(fs.cat_file(path))
        if meta.get("world_size", num_workers) != num_workers:
            raise PreflightError(
                f"{root}/{tag} was written by {meta['world_size']} ranks and this job asks for "
                f"--num-workers {num_workers}: ZeRO shards cannot be re-split. {fix}"
            )


def check_existing_checkpoint(checkpoint_root: str, num_workers: int) -> str | None:
    """The tag of an existing checkpoint of this run (it will be resumed), after checking its world size."""
    from pretrain.engine.checkpoint import CheckpointManager

    tag = CheckpointManager(checkpoint_root).latest()
    if tag is not None:
        check_world_size(
            checkpoint_root,
            tag,
            num_workers,
            "Use the run's world size, or a new --name (optionally --resume-from after `pretrain convert`)",
        )
    return tag


def plan_job(args) -> JobPlan:
    """Config + storage + data checks (no Ray, no torch work). Raises PreflightError."""
    from pretrain.config import ConfigError, load_config

    if args.num_workers < 1:
        raise PreflightError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.cpus_per_worker <= 0:
        raise PreflightError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.max_failures < -1:
        raise PreflightError(f"--max-failures must be >= -1, got {args.max_failures}")
    if not os.path.exists(args.config):
        raise PreflightError(f"config file {args.config} does not exist")
    try:
        base = load_config(args.config, args.overrides)
    except (ConfigError, ValueError, OSError) as err:
        raise PreflightError(f"config error: {err}") from err
    name = args.name or base.name
    if not name or "/" in name:
        raise PreflightError(f"run name {name!r} must be non-empty and contain no '/'")
    storage_path = _abs_storage(args.storage_path)
    run_dir = _join(storage_path, name)
    checkpoint_root = _join(run_dir, "checkpoints")
    remote = _is_url(storage_path)
    # Rank 0 writes TensorBoard/metrics locally; on remote storage they are copied to the run dir.
    tag = hashlib.sha1(run_dir.encode()).hexdigest()[:8]
    output_dir = os.path.join("/tmp", f"pretrain_ray_{os.getuid()}", f"{name}-{tag}") if remote else run_dir
    overrides = [
        *args.overrides,
        f"name={name}",
        f"output_dir={output_dir}",
        f"checkpoint.dir={checkpoint_root}",
    ]
    if not base.synthetic.enabled:
        overrides.append(f"data.reader={args.reader}")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, ValueError) as err:
        raise PreflightError(f"config error: {err}") from err
    notes = []
    if base.checkpoint.dir and base.checkpoint.dir.rstrip("/") != checkpoint_root:
        notes.append(
            f"checkpoint.dir {base.checkpoint.dir} replaced by {checkpoint_root} (the Ray run's storage)"
        )
    if cfg.checkpoint.every_steps == 0:
        notes.append("checkpoint.every_steps is 0: a failure restarts the run from its beginning")
    if cfg.schedule.total_steps < 1:
        raise PreflightError("config error: schedule.total_steps must be >= 1")
    check_data(cfg)
    probe_storage(run_dir)
    existing = check_existing_checkpoint(checkpoint_root, args.num_workers)
    if existing:
        done = int(existing.rsplit("_", 1)[-1])
        end = min(cfg.schedule.total_steps, cfg.schedule.stop_at_step or cfg.schedule.total_steps)
        if done >= end:
            raise PreflightError(
                f"run {run_dir} is already at step {done} (this job would stop at step {end}): raise "
                "schedule.total_steps (or schedule.stop_at_step) to continue it, or pick a new --name"
            )
        notes.append(f"run {run_dir} exists: resuming from checkpoints/{existing}")
    resume_from = args.resume_from
    if resume_from:
        from pretrain.engine.checkpoint import resolve_resume

        try:
            target = resolve_resume(resume_from, checkpoint_root)
        except Exception as err:
            raise PreflightError(f"--resume-from {resume_from}: {err}") from err
        if target is not None and not existing:
            check_world_size(
                *target, args.num_workers, "Consolidate it with `pretrain convert` and init_from it"
            )
    fail_once = None
    if args.fail_once:
        try:
            rank, step = (int(v) for v in args.fail_once.split(":"))
        except ValueError as err:
            raise PreflightError(f"--fail-once expects RANK:STEP, got {args.fail_once!r}") from err
        fail_once = {
            "rank": rank,
            "step": step,
            "marker": _join(run_dir, f".fail_once_rank{rank}_step{step}"),
        }
    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.device]
    return JobPlan(
        cfg=cfg,
        name=name,
        storage_path=storage_path,
        run_dir=run_dir,
        checkpoint_root=checkpoint_root,
        num_workers=args.num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        resume_from=resume_from,
        record_keys=os.path.abspath(args.record_keys) if args.record_keys else None,
        fail_once=fail_once,
        sync_outputs_to=run_dir if remote else None,
        notes=notes,
    )


def check_cluster(plan: JobPlan, skip: bool = False) -> None:
    """Decide GPU/CPU from the cluster (--device auto) and check the worker group can be placed at all."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    if plan.use_gpu is None:
        plan.use_gpu = gpus > 0
    data = plan.cfg.data
    data_cpus = 0.0
    if not plan.cfg.synthetic.enabled and getattr(data, "reader", "arrow") == "ray":
        data_cpus = max(1, data.num_workers) * data.ray_num_cpus * plan.num_workers
    need_cpus = plan.cpus_per_worker * plan.num_workers + data_cpus
    problems = []
    if plan.use_gpu and gpus < plan.num_workers:
        problems.append(
            f"{plan.num_workers} GPU workers need {plan.num_workers} GPUs, the cluster has {gpus:g}"
        )
    if cpus < need_cpus:
        problems.append(
            f"{plan.num_workers} workers x {plan.cpus_per_worker:g} CPUs + {data_cpus:g} CPUs of Ray Data "
            f"decode actors (data.num_workers x data.ray_num_cpus per rank) need {need_cpus:g} CPUs, the "
            f"cluster has {cpus:g}"
        )
    if problems and not skip:
        raise PreflightError(
            "the cluster cannot hold this job: " + "; ".join(problems) + " (lower --num-workers, "
            "--cpus-per-worker or data.ray_num_cpus; on an autoscaling cluster pass --skip-resource-check)"
        )
    if not plan.use_gpu and plan.cfg.engine.dist_backend == "nccl":
        raise PreflightError(
            "config error: engine.dist_backend is nccl but the workers are CPU-only (use gloo)"
        )
    if plan.use_gpu and plan.cfg.engine.dist_backend == "gloo":
        plan.notes.append("engine.dist_backend is gloo on GPU workers: nccl is much faster")


# ------------------------------------------------------------------------------------------ Ray objects
def _stop_flag_class():
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        """Set by the driver on SIGTERM/SIGINT; polled by every worker (pretrain.launch.ray_worker)."""

        def __init__(self):
            self.value = False

        def set(self) -> None:
            self.value = True

        def is_set(self) -> bool:
            return self.value

    return StopFlag


def build_trainer(plan: JobPlan, stop_flag=None):
    """The Ray Train TorchTrainer of this plan."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_worker import train_loop_per_worker

    backend = plan.cfg.engine.dist_backend
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # Ray Train's print patch tees every print of a worker through logging: each progress line showed
        # up twice in `ray job logs`.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    }
    if not plan.use_gpu:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    for key in ("TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED"):
        if key in os.environ:
            env[key] = os.environ[key]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.worker_config(stop_flag),
        torch_config=TorchConfig(backend=None if backend == "auto" else backend),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=bool(plan.use_gpu),
            resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=plan.max_failures),
            # The engine prunes old step directories itself (checkpoint.keep); Ray keeps its records only.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": env},
        ),
    )


def describe(plan: JobPlan) -> str:
    device = {None: "auto", True: "GPU", False: "CPU"}[plan.use_gpu]
    lines = [
        f"run {plan.name}: {plan.num_workers} {device} worker(s), max_failures {plan.max_failures}",
        f"  run dir      {plan.run_dir}",
        f"  checkpoints  {plan.checkpoint_root}",
        f"  tensorboard  {_join(plan.run_dir, 'tb')}",
        f"  steps        {plan.cfg.schedule.total_steps}, checkpoint every {plan.cfg.checkpoint.every_steps}",
    ]
    if not plan.cfg.synthetic.enabled:
        lines.append(
            f"  data         {', '.join(s.uri for s in plan.cfg.data.sources)} (reader {plan.cfg.data.reader})"
        )
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


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

    flag = _stop_flag_class().remote()
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
    last = _join(plan.checkpoint_root, checkpoint.path.rstrip("/").rsplit("/", 1)[-1]) if checkpoint else None
    print(
        f"{prog}: run {plan.name} {'stopped' if stopping else 'finished'} after {time.time() - t0:.0f}s at "
        f"step {metrics.get('step', '?')}; checkpoint {last}; TensorBoard: tensorboard --logdir "
        f"{_join(plan.run_dir, 'tb')}",
        flush=True,
    )
    if stopping:
        return 128 + int(stopping["signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
