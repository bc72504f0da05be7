"""The Ray job's preflight: everything the driver checks and decides before a worker starts.

`plan_job(args)` loads the config, checks every corpus manifest, write-probes the run directory, checks an
existing checkpoint's world size and returns a `JobPlan`; `check_cluster(plan)` checks the cluster can hold
it. Any problem raises `PreflightError` with one line that says what and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field

from pretrain.data import storage
from pretrain.data.storage import join
from pretrain.engine.checkpoint import CheckpointManager


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


def probe_storage(run_dir: str) -> None:
    """Create the run directory and write/read/delete a small file there (fails fast on bad storage)."""
    probe = join(run_dir, f".preflight-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(run_dir)
        storage.write_bytes_atomic(probe, b"ok")
        if storage.read_bytes(probe) != b"ok":
            raise OSError("read back different bytes")
        storage.remove(probe)
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
    saved = CheckpointManager(root).meta(tag).get("world_size", num_workers)
    if saved != num_workers:
        raise PreflightError(
            f"{root}/{tag} was written by {saved} ranks and this job asks for --num-workers {num_workers}: "
            f"ZeRO shards cannot be re-split. {fix}"
        )


def check_existing_checkpoint(checkpoint_root: str, num_workers: int) -> str | None:
    """The tag of an existing checkpoint of this run (it will be resumed), after checking its world size."""
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
    run_dir = join(storage_path, name)
    checkpoint_root = join(run_dir, "checkpoints")
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
            "marker": join(run_dir, f".fail_once_rank{rank}_step{step}"),
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


def describe(plan: JobPlan) -> str:
    device = {None: "auto", True: "GPU", False: "CPU"}[plan.use_gpu]
    lines = [
        f"run {plan.name}: {plan.num_workers} {device} worker(s), max_failures {plan.max_failures}",
        f"  run dir      {plan.run_dir}",
        f"  checkpoints  {plan.checkpoint_root}",
        f"  tensorboard  {join(plan.run_dir, 'tb')}",
        f"  steps        {plan.cfg.schedule.total_steps}, checkpoint every {plan.cfg.checkpoint.every_steps}",
    ]
    if not plan.cfg.synthetic.enabled:
        lines.append(
            f"  data         {', '.join(s.uri for s in plan.cfg.data.sources)} (reader {plan.cfg.data.reader})"
        )
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
