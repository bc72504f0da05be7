"""What each Ray Train worker runs: the engine's Trainer, fed by this rank's Ray Data stream.

    train_loop_per_worker(job)      # job: the plain dict built by pretrain.launch.ray_job.JobPlan.worker_config()

Per worker, in order:
1. Ray Train has already created the torch process group (gloo on CPU, nccl on GPU) and set RANK, LOCAL_RANK,
   WORLD_SIZE, MASTER_*; the Trainer only joins it (`pretrain.engine.dist.ensure_process_group`).
2. The resume point is the newer of Ray Train's latest reported checkpoint (`ray.train.get_checkpoint()`, set
   after a worker-group restart or when a job is resubmitted with the same name and storage path) and the
   engine's own `latest` pointer in the run's checkpoint root (a crash between the engine's save and the report
   to Ray loses nothing). Before the first checkpoint an optional `--resume-from` path seeds the run.
3. `RayTrainer` is the engine Trainer. Its `on_checkpoint` hook runs on every rank after each complete
   (collective) save: rank 0 copies TensorBoard/metrics to remote storage, then each rank reports the step
   directory to Ray Train (`CheckpointUploadMode.NO_UPLOAD`: the engine already wrote every rank's DeepSpeed
   shard and data cursor into `<storage>/<name>/checkpoints/step_*`, the layout `pretrain convert` and the
   other launchers read).
4. A watcher thread turns a stop request of the driver (`ray job stop` -> SIGTERM to the driver) into the
   Trainer's own stop-on-signal path: finish the step on every rank, save, report, return.

A thin stream wrapper carries two test/audit hooks: a per-step log of the sample keys each rank consumed,
and a one-time injected worker crash.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from pretrain.config import config_from_yaml_text
from pretrain.data import storage
from pretrain.data.storage import join
from pretrain.engine.checkpoint import CheckpointManager, step_of
from pretrain.engine.trainer import Trainer


# ------------------------------------------------------------------------------------------ stream wrapper
class RankStream:
    """This rank's stream with the optional key log and injected crash.

    Delegates the `BatchStream` contract to the wrapped stream, so the checkpointed cursor is exactly the
    reader's cursor.
    """

    def __init__(self, inner, rank: int, record_dir: str | None = None, fail_once: dict | None = None):
        self.inner = inner
        self.rank = rank
        self.record_dir = record_dir
        self.fail_once = fail_once
        self.trainer: Trainer | None = None  # set by RayTrainer: the step a batch is fetched for

    # the BatchStream contract, delegated
    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def counters(self) -> dict[str, int]:
        return self.inner.counters()

    def info(self) -> dict:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()

    def __iter__(self):  # one epoch; the engine's Trainer starts the next one
        for batch in self.inner:
            self._before_yield(batch)
            yield batch

    def _before_yield(self, batch: dict) -> None:
        step = self.trainer.step if self.trainer is not None else -1
        if self.fail_once and self.rank == self.fail_once["rank"] and step == self.fail_once["step"]:
            _maybe_crash(self.fail_once["marker"], self.rank, step)
        if self.record_dir:
            keys = batch.get("key")
            valid = batch.get("valid")
            if keys is not None:
                flags = valid.tolist() if valid is not None else [True] * len(keys)
                rec = {"step": step, "rank": self.rank, "pid": os.getpid(), "time": time.time()}
                rec["keys"] = [k for k, v in zip(keys, flags) if v]
                os.makedirs(self.record_dir, exist_ok=True)
                with open(os.path.join(self.record_dir, f"keys_rank{self.rank:05d}.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")


def _maybe_crash(marker: str, rank: int, step: int) -> None:
    """Kill this worker process once (a marker file on the run's storage records that it happened)."""
    if storage.exists(marker):
        return
    storage.write_bytes_atomic(marker, f"rank {rank} crashed at step {step}\n".encode())
    print(f"[fault injection] rank {rank}: os._exit(1) before step {step + 1}", flush=True)
    os._exit(1)


# ------------------------------------------------------------------------------------------ trainer
class RayTrainer(Trainer):
    """The engine Trainer; its `on_checkpoint` hook reports every checkpoint to Ray Train."""

    def __init__(self, config, *, job: dict, resume: str | None, stream_factory):
        super().__init__(
            config, stream_factory=stream_factory, resume=resume, on_checkpoint=self._on_checkpoint
        )
        self.job = job

    def _on_checkpoint(self, path: str, step: int) -> None:
        """The engine's hook, on every rank after each complete (collective) save."""
        self.sync_outputs()
        self._report(path)

    def _report(self, path: str) -> None:
        import ray.train

        tag = path.rstrip("/").rsplit("/", 1)[-1]
        storage = ray.train.get_context().get_storage()
        checkpoint = ray.train.Checkpoint(
            path=f"{storage.experiment_fs_path.rstrip('/')}/checkpoints/{tag}",
            filesystem=storage.storage_filesystem,
        )
        metrics = {"step": self.step}
        if self.history:
            metrics.update(
                {
                    k: float(v)
                    for k, v in self.history[-1].items()
                    if isinstance(v, (int, float)) and k != "step"
                }
            )
        # Every rank reports the same directory (each wrote its own shard and cursor into it).
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoints/{tag}",
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )

    def prepare_outputs(self) -> None:
        """Remote storage, rank 0, before the Monitor opens its files: a clean local output dir (nothing
        stale from another run of this name on this node) holding the run's metrics.jsonl so far, which the
        Monitor then appends to. TensorBoard event files need no seeding: every writer makes a new one."""
        remote_dir = self.job.get("sync_outputs_to")
        if not remote_dir:
            return
        local = self.cfg.output_dir
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
        metrics = join(remote_dir, "metrics.jsonl")
        if storage.exists(metrics):
            Path(local, "metrics.jsonl").write_bytes(storage.read_bytes(metrics))

    def sync_outputs(self) -> None:
        """Remote storage: rank 0 copies config.yaml, metrics.jsonl and tb/ next to the checkpoints."""
        remote_dir = self.job.get("sync_outputs_to")
        if not remote_dir or getattr(self, "rank", 0) != 0:
            return
        if self.monitor is not None:
            self.monitor.flush()
            if self.monitor.metrics is not None:
                self.monitor.metrics.flush()
        storage.mirror(self.cfg.output_dir, remote_dir, skip=("checkpoints",))


class StopWatcher(threading.Thread):
    """Polls the driver's stop flag (an actor) and forwards a stop request to the trainer."""

    def __init__(self, flag, trainer: RayTrainer, interval_s: float = 1.0):
        super().__init__(name="pretrain-stop-watcher", daemon=True)
        self.flag, self.trainer, self.interval_s = flag, trainer, interval_s
        self._done = threading.Event()

    def run(self) -> None:
        import ray

        while not self._done.wait(self.interval_s):
            try:
                if ray.get(self.flag.is_set.remote(), timeout=30):
                    self.trainer.request_stop()
                    return
            except Exception:  # the driver is going away: the job is ending anyway
                continue

    def stop(self) -> None:
        self._done.set()


# ------------------------------------------------------------------------------------------ entry point
def resume_target(checkpoint_root: str, ray_checkpoint, resume_from: str | None) -> str | None:
    """The step directory to resume from (see the module docstring), or None to start fresh."""
    tags = []
    if ray_checkpoint is not None:
        tags.append(ray_checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    latest = CheckpointManager(checkpoint_root).latest()
    if latest:
        tags.append(latest)
    tags = [t for t in tags if step_of(t) >= 0]
    if tags:
        return join(checkpoint_root, max(tags, key=step_of))
    return resume_from


def train_loop_per_worker(job: dict) -> None:
    import ray.data
    import ray.train

    from pretrain.engine.streams import build_default_stream

    cfg = config_from_yaml_text(job["config_yaml"])
    # Ray Data's per-dataset progress bars (one set per rank) drown the trainer's progress lines in
    # `ray job logs`; the trainer reports data wait time and throughput itself.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    resume = resume_target(job["checkpoint_root"], ray.train.get_checkpoint(), job.get("resume_from"))
    if rank == 0:
        print(
            f"[{cfg.name}] Ray Train worker group of {ctx.get_world_size()}: "
            + (f"resuming from {resume}" if resume else "starting fresh"),
            flush=True,
        )
    trainer: RayTrainer | None = None

    def stream_factory(c, r, w):  # called inside trainer.setup(), after `trainer` is bound below
        s = RankStream(build_default_stream(c, r, w), r, job.get("record_keys"), job.get("fail_once"))
        s.trainer = trainer
        return s

    trainer = RayTrainer(cfg, job=job, resume=resume, stream_factory=stream_factory)
    if rank == 0:
        trainer.prepare_outputs()
    watcher = StopWatcher(job["stop_flag"], trainer) if job.get("stop_flag") is not None else None
    if watcher is not None:
        watcher.start()
    try:
        summary = trainer.fit()
    finally:
        if watcher is not None:
            watcher.stop()
    trainer.sync_outputs()
    if rank == 0:
        print(
            f"[{cfg.name}] worker group done at step {summary['step']} ({summary['reason']}); "
            f"last checkpoint {summary['checkpoint']}",
            flush=True,
        )
