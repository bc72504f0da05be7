"""Throughput, MFU and memory: what a step costs and how close it runs to the hardware's peak.

MFU = (training FLOPs per sample x samples/s per device) / peak dense FLOP/s of the device at the training
precision. Training FLOPs per sample come from `pretrain.models.flops.count_flops(...).train_flops` (3x the
forward; activation recomputation is *not* counted, as MFU is defined on model FLOPs).
"""

from __future__ import annotations

import resource
import time

import torch

# Peak dense (no sparsity) tensor-core TFLOP/s per device, from the vendors' datasheets. bf16 and fp16 are
# equal on these parts; "fp32" is the plain FP32 (non-TF32) rate. Matched by substring of the CUDA device
# name, first match wins, so more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2500.0, "fp16": 2500.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}),
    ("B100", {"bf16": 1750.0, "fp16": 1750.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H800", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4}),
]


def peak_tflops(device_name: str | None = None, precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of one device at `precision`, or None (CPU, or a device not in the table)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def train_flops_per_sample(model: torch.nn.Module, image_size: int) -> float | None:
    """Model FLOPs of one training sample (forward + backward), or None when they cannot be counted."""
    try:
        from pretrain.models.flops import count_flops
    except ImportError:
        return None
    try:
        return float(count_flops(model, image_size).train_flops)
    except Exception:  # a model the counter does not know (custom objective towers)
        return None


def memory_stats() -> dict[str, float]:
    """Device memory in GiB (CUDA peak allocated/reserved), or the host's peak RSS on CPU."""
    gib = 1024**3
    if torch.cuda.is_available():
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / gib,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / gib,
        }
    # ru_maxrss is in KiB on Linux
    return {"memory/host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


class StepTimer:
    """Splits wall time into waiting for data and computing; reports per-window averages."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t_start = time.perf_counter()
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0

    def data_begin(self) -> None:
        self._t = time.perf_counter()

    def data_end(self) -> None:
        self.data_s += time.perf_counter() - self._t

    def step_done(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def window(self) -> dict[str, float]:
        """Averages since the last reset (then resets)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = max(time.perf_counter() - self.t_start, 1e-9)
        out = {
            "step_time_s": wall / max(self.steps, 1),
            "samples_per_s": self.samples / wall,
            "data_wait_frac": min(1.0, self.data_s / wall),
        }
        self.reset()
        return out
