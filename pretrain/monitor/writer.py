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
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


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
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), step)
        self.metrics.write(
            json.dumps({"step": step, **{k: float(v) for k, v in values.items() if v is not None}}) + "\n"
        )
        self.metrics.flush()

    def image(self, tag: str, image: torch.Tensor | None, step: int) -> None:
        """image: uint8 (3, H, W)."""
        if self.enabled and self.writer is not None and image is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

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
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
