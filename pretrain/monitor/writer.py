"""The run's outputs for humans: TensorBoard events, metrics.jsonl and the console progress line (rank 0).

Scalar tags (all under the optimizer step):
    loss/<term>            the objective's loss and every other term it returns (averaged over ranks)
    opt/lr, opt/grad_norm, opt/loss_scale
    perf/samples_per_s (all ranks), perf/samples_per_s_per_device, perf/step_time_s, perf/data_wait_frac,
    perf/mfu (GPU with a known peak only), perf/tflops_per_device
    memory/*               device memory (CUDA) or host RSS (CPU)
    train/skipped_steps    micro-steps skipped for a non-finite loss (cumulative)
    data/<counter>         the stream's bad-sample counters (cumulative, summed over ranks)
Images: `inputs/first_batch` (grid), `dcn/sampling_points` (periodic).

A restarted run replays the steps after its checkpoint: `resume(step)` drops the records of later steps from
metrics.jsonl and hides them in TensorBoard (the event writer is opened with `purge_step`), so each series
holds every step once. Without that call, the first `scalars()` does the same from its own step: a series
never goes backwards. Until one of them decides, TensorBoard events (config text, first images) are held
in memory, so the purge never hides this run's own events.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.data import storage


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Monitor:
    """Does nothing on ranks other than 0; on rank 0 writes TensorBoard, metrics.jsonl and the console."""

    def __init__(
        self,
        output_dir: str,
        enabled: bool,
        tensorboard: bool = True,
        console: bool = True,
        total_steps: int = 0,
        run_name: str = "run",
    ):
        self.enabled = enabled
        self.console = console and enabled
        self.total_steps = total_steps
        self.run_name = run_name
        self.writer = None
        self.metrics = None
        self.t0 = time.time()
        self.first_step: int | None = None
        self._tensorboard = tensorboard and enabled
        self._checked = False  # whether replayed records were purged (by resume() or the first scalars())
        self._pending: list[tuple[str, tuple]] = []  # events before that decision (a few: config, images)
        self.remote = None
        if not enabled:
            return
        if storage.is_remote(output_dir):
            # TensorBoard and the metrics file are written locally and mirrored to the run's URL by flush()
            # and close(); the earlier part of a resumed run's metrics comes back first.
            self.remote = output_dir
            output_dir = os.path.join(tempfile.gettempdir(), "pretrain-monitor", _url_key(output_dir))
            shutil.rmtree(output_dir, ignore_errors=True)
            os.makedirs(output_dir)
            remote_metrics = storage.join(self.remote, "metrics.jsonl")
            if storage.exists(remote_metrics):
                Path(output_dir, "metrics.jsonl").write_bytes(storage.read_bytes(remote_metrics))
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics = open(self.metrics_path, "a")  # noqa: SIM115 - closed in close()

    def resume(self, step: int) -> int:
        """The run continues after `step`: drop every record of a later step (written before the restart)
        from metrics.jsonl and hide them in TensorBoard. Returns how many metrics lines were dropped."""
        return self._purge_from(step + 1, resumed=True)

    def _purge_from(self, first_new: int, resumed: bool = False) -> int:
        """Cut metrics.jsonl at first_new and open the event writer, with `purge_step=first_new` after a
        resume or when an earlier run's records were cut; then write the events held back until now.

        The purge marker also acts on event files that are not here yet: a launcher that keeps the run's
        tb/ elsewhere (Ray: copied next to the checkpoints) puts this file beside the earlier ones."""
        if not self.enabled or self._checked:
            self._checked = True
            return 0
        self._checked = True
        dropped = _truncate_jsonl(self.metrics_path, first_new)
        if dropped:
            self.metrics.close()
            self.metrics = open(self.metrics_path, "a")  # noqa: SIM115 - closed in close()
            self.log(f"dropped {dropped} metrics record(s) of step >= {first_new} written before the restart")
        purge = first_new if (resumed or dropped) else None
        self._open_writer(purge)
        return dropped

    def _open_writer(self, purge_step: int | None) -> None:
        if self._tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=purge_step)
        pending, self._pending = self._pending, []
        for kind, args in pending:
            self._write(kind, *args)

    def _write(self, kind: str, *args) -> None:
        if self.writer is None:
            if self._tensorboard and not self._checked:
                self._pending.append((kind, args))
            return
        if kind == "image":
            self.writer.add_image(*args, dataformats="CHW")
        else:
            getattr(self.writer, f"add_{kind}")(*args)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if not self._checked:
            self._purge_from(step)
        for tag, value in values.items():
            if value is not None:
                self._write("scalar", tag, float(value), step)
        self.metrics.write(
            json.dumps({"step": step, **{k: float(v) for k, v in values.items() if v is not None}}) + "\n"
        )
        self.metrics.flush()

    def image(self, tag: str, image: torch.Tensor | None, step: int) -> None:
        """image: uint8 (3, H, W)."""
        if self.enabled and image is not None:
            self._write("image", tag, image, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._write("text", tag, text, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """One console line: step, loss, lr, samples/s, step time, data wait, ETA."""
        if not self.console:
            return
        if self.first_step is None:
            self.first_step, self.t_first = step, time.time()
        done = step - self.first_step
        rate = done / max(time.time() - self.t_first, 1e-9) if done > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        parts = [
            f"[{self.run_name}] step {step}/{self.total_steps}",
            f"loss {values.get('loss/loss', float('nan')):.4f}",
            f"lr {values.get('opt/lr', 0.0):.3e}",
            f"{values.get('perf/samples_per_s', 0.0):.1f} samples/s",
            f"step {values.get('perf/step_time_s', 0.0):.3f}s",
            f"data {100 * values.get('perf/data_wait_frac', 0.0):.0f}%",
        ]
        if "perf/mfu" in values:
            parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
        parts.append(f"ETA {_fmt_eta(eta) if eta == eta else '?'}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def log(self, message: str) -> None:
        if self.console:
            print(f"[{self.run_name}] {message}", flush=True)

    def flush(self) -> None:
        """Write out buffered events; with a remote output dir, copy metrics.jsonl and tb/ there."""
        if self.writer is not None:
            self.writer.flush()
        if self.metrics is not None:
            self.metrics.flush()
        if self.remote is not None:
            storage.mirror(str(self.out), self.remote)

    def close(self) -> None:
        if self.enabled and self._pending:  # never logged a scalar: write what was held back
            self._checked = True
            self._open_writer(None)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.remote is not None:
            storage.mirror(str(self.out), self.remote)


def _url_key(url: str) -> str:
    import hashlib

    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _truncate_jsonl(path: Path, first_new: int) -> int:
    """Cut metrics.jsonl before its first record with step >= first_new; returns the number of lines cut.

    Records are appended in step order, so everything from that line on was written by the run being
    replaced. A half-written last line (a kill mid-write) is cut too.
    """
    if not path.exists():
        return 0
    offset, cut_at, cut = 0, None, 0
    with open(path, "rb") as f:
        for line in f:
            if cut_at is None:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    step = first_new  # unreadable: cut from here
                if step >= first_new:
                    cut_at = offset
            if cut_at is not None:
                cut += 1
            offset += len(line)
    if cut_at is not None:
        os.truncate(path, cut_at)
    return cut
