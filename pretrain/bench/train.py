"""`pretrain bench train`: step time, samples/s and MFU of full training steps (DeepSpeed engine, synthetic data).

    pretrain bench train                                   # InternImage-T and -H, 224 px, bf16, every DCN backend
    pretrain bench train --models internimage_h --batch-size 32 --zero-stage 3 --with-cp
    pretrain bench train --tiny --steps 4 --warmup 2       # CPU smoke check (tiny model, fp32): no MFU on CPU
    pretrain bench train --models internimage_h --with-cp --batch-size auto   # the largest batch that fits

Each (model, backend) pair runs `warmup + steps` optimizer steps of the real trainer (`pretrain.engine.Trainer`:
forward, backward, ZeRO step, clipping; no checkpoints, no TensorBoard) on the synthetic stream, and reports the
mean over the measured steps. MFU = training FLOPs per sample (pretrain.models.flops, 3x forward) x samples/s
per device / the device's peak dense TFLOP/s at the precision (pretrain.monitor.throughput.PEAK_TFLOPS).
The DCN backends compared are the reference op (pure PyTorch) and every other registered backend that is
available on the device (the fused CUDA kernel once built).

What is measured is the model, not the input pipeline: the synthetic stream's first batches are moved to the
device once and replayed. The optimizer is torch's AdamW (`fused=True`; DeepSpeed's `torch_adam`), so no
DeepSpeed op is JIT-compiled on the GPU (its FusedAdam would be); `--optimizer deepspeed` keeps DeepSpeed's
choice. `--batch-size auto` predicts the largest batch per (model, backend) from two short forward+backward
passes (peak memory is linear in the batch) plus the optimizer states DeepSpeed adds, and retries once at 3/4
of it if the run still runs out of memory.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import time

TINY = "model.overrides={channels: 16, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8]}"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: internimage_t internimage_h (--tiny: internimage_t)",
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--batch-size",
        type=_batch_arg,
        default=None,
        help="per device: a number, or 'auto' (the largest that fits; GPU only); default 128 for T-S, 32 else",
    )
    parser.add_argument("--max-batch", type=int, default=1024, help="cap of --batch-size auto")
    parser.add_argument(
        "--optimizer",
        default="torch",
        choices=["torch", "deepspeed"],
        help="torch: torch's AdamW (fused), nothing JIT-compiled; deepspeed: DeepSpeed's choice (FusedAdam on GPU)",
    )
    parser.add_argument("--json", dest="json_out", help="also write the result rows as JSON here")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--with-cp", action="store_true", help="activation checkpointing")
    parser.add_argument("--backends", nargs="+", default=None, help="DCN backends (default: all available)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke check: a tiny InternImage, fp32, 32 px"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any run-config override")  # fmt: skip


def _batch_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--batch-size takes a number or 'auto', got {text!r}") from None


def _backends(requested: list[str] | None) -> list[str]:
    """The requested backends, or the reference plus every backend available for tensors on this device
    (probed with a CUDA tensor when there is a GPU: the kernel backend refuses CPU tensors)."""
    import torch

    from pretrain.ops import available_backends

    if requested:
        return requested
    try:
        import pretrain.ops.cuda  # noqa: F401  (registers the kernel backend)
    except ImportError:
        pass
    probe = torch.empty(0, device="cuda") if torch.cuda.is_available() else None
    avail = list(available_backends(probe))
    return ["reference"] + [b for b in avail if b != "reference"]


class DeviceBatches:
    """The config's stream with its first `count` batches moved to `device` once and then replayed, so that
    the benchmark times the model and not batch synthesis on the host (a 1024 x 224 px batch takes about a
    second to generate on a CPU). Everything else (batch_size, image_size, info, ...) is the inner stream's."""

    def __init__(self, inner, device, count: int = 2):
        self.inner = inner
        self.batches = []
        for _, batch in zip(range(count), inner):
            self.batches.append(
                {k: v.to(device) if hasattr(v, "to") and callable(v.to) else v for k, v in batch.items()}
            )
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _device_stream_factory(device):
    from pretrain.engine.streams import build_default_stream

    def factory(cfg, rank, world_size):
        return DeviceBatches(build_default_stream(cfg, rank, world_size), device)

    return factory


# Bytes per parameter DeepSpeed's mixed-precision ZeRO optimizer adds to a bf16 model with bf16 grads (what the
# probe holds): fp32 master weights, Adam's two fp32 moments, the fp32 gradient partition.
OPTIMIZER_BYTES_PER_PARAM = 16
ZERO_BUFFERS_BYTES = 2 * 1024**3  # reduce/all-gather buckets (5e8 elements each, bf16)


def auto_batch(model: str, backend: str, size: int, precision: str, args) -> tuple[int, dict]:
    """The largest batch predicted to fit one GPU, and how it was predicted.

    Peak memory of a forward+backward at batch b and 2b (the model alone, in the compute dtype) gives the
    per-sample slope and the fixed part; the optimizer states and ZeRO buffers come on top; 85% of the
    device's memory is the budget (allocator fragmentation and the engine's own workspaces). Rounded down to
    a multiple of 8, capped at --max-batch."""
    import torch

    from pretrain.models import create_model

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    gc.collect()
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        net = create_model(model, num_classes=1000, dcn_backend=backend, with_cp=args.with_cp)
    net = net.to(dtype).train()
    params = sum(p.numel() for p in net.parameters())
    b1 = 8
    peaks = []
    for b in (b1, 2 * b1):
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        x = torch.randn(b, 3, size, size, device="cuda", dtype=dtype)
        net(x).float().logsumexp(-1).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        del x
    del net
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return fit_batch(peaks, b1, total, params, args.max_batch)


def fit_batch(peaks: list[int], b1: int, total: int, params: int, max_batch: int) -> tuple[int, dict]:
    """The batch predicted to fit from the peak bytes of fwd+bwd at batch b1 and 2*b1 (linear in the batch),
    the device's bytes and the parameter count: the largest multiple of 8 (at least 1, at most max_batch)
    whose activations, model, optimizer states and ZeRO buffers stay within 85% of the device."""
    slope = max(1.0, (peaks[1] - peaks[0]) / b1)
    fixed = peaks[0] - slope * b1
    extra = OPTIMIZER_BYTES_PER_PARAM * params + ZERO_BUFFERS_BYTES
    fit = (0.85 * total - fixed - extra) / slope
    batch = max(1, min(max_batch, int(fit) // 8 * 8 or int(fit)))
    gib = 1024**3
    how = {
        "gib_per_sample": slope / gib,
        "fixed_gib": fixed / gib,
        "optimizer_gib": extra / gib,
        "device_gib": total / gib,
        "predicted_max": int(fit),
    }
    return batch, how


def bench_one(model: str, backend: str, args) -> dict:
    """One (model, backend) row; with --batch-size auto, retried once at 3/4 of the batch on out-of-memory."""
    import torch

    size = 32 if args.tiny else args.img_size
    precision = "fp32" if args.tiny else args.precision
    how = None
    if args.batch_size == "auto" and torch.cuda.is_available():
        batch, how = auto_batch(model, backend, size, precision, args)
        print(f"{model} / {backend}: batch {batch} predicted to fit ({json.dumps(how)})", flush=True)
    elif args.batch_size == "auto" or args.batch_size is None:
        batch = 8 if args.tiny else (128 if model in ("internimage_t", "internimage_s") else 32)
    else:
        batch = args.batch_size
    retry = False
    try:
        result = _run_trainer(model, backend, batch, size, precision, args)
    except torch.OutOfMemoryError:
        if how is None:
            raise
        retry = True  # retried outside the handler: the exception's frames still hold the failed engine
    if retry:
        gc.collect()
        torch.cuda.empty_cache()
        batch = max(1, int(batch * 0.75) // 8 * 8)
        print(f"{model} / {backend}: out of memory, retrying at batch {batch}", flush=True)
        how["retried"] = True
        result = _run_trainer(model, backend, batch, size, precision, args)
    if how is not None:
        result["batch_search"] = how
    return result


def _optimizer_override(out_dir: str) -> str:
    """A DeepSpeed JSON merged over the generated one: torch's AdamW (fused), so nothing is JIT-compiled."""
    path = os.path.join(out_dir, "torch_adamw.json")
    with open(path, "w") as f:
        json.dump({"optimizer": {"params": {"torch_adam": True, "fused": True}}}, f)
    return path


def _run_trainer(model: str, backend: str, batch: int, size: int, precision: str, args) -> dict:
    import torch

    from pretrain.config import load_config
    from pretrain.engine import dist
    from pretrain.engine.trainer import Trainer

    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    sets = [
        f"model.variant={model}", f"model.dcn_backend={backend}", f"model.with_cp={str(args.with_cp).lower()}",
        "model.num_classes=1000", "objective.name=supervised", "synthetic.enabled=true", f"synthetic.image_size={size}",
        f"synthetic.batch_size={batch}", f"engine.precision={precision}", f"engine.zero_stage={args.zero_stage}",
        f"schedule.total_steps={args.warmup + args.steps}", "schedule.warmup_steps=0", "optim.lr_ref_batch=null",
        "logging.every_steps=1", "logging.tensorboard=false", "logging.console=false", "logging.image_grid=false",
        "logging.dcn_points_every=0", "checkpoint.every_steps=0", "checkpoint.save_final=false",
        "checkpoint.save_on_signal=false", f"output_dir={out_dir}",
    ]  # fmt: skip
    if args.tiny:
        sets += [TINY, "model.num_classes=10"]
    if args.optimizer == "torch":
        sets.append(f"engine.deepspeed_config={_optimizer_override(out_dir)}")
    cfg = load_config(None, [*sets, *args.overrides])
    trainer = Trainer(cfg, stream_factory=_device_stream_factory(dist.device()))
    t0 = time.perf_counter()
    try:
        summary = trainer.fit()
    finally:
        del trainer
        gc.collect()
    wall = time.perf_counter() - t0
    rows = [r for r in summary["history"] if r["step"] > args.warmup]
    result = {
        "model": model + (" (tiny)" if args.tiny else ""),
        "backend": backend,
        "img": size,
        "batch/device": batch,
        "precision": precision,
        "zero": args.zero_stage,
        "step_s": statistics.mean(r["perf/step_time_s"] for r in rows),
        "samples/s": statistics.mean(r["perf/samples_per_s"] for r in rows),
        "samples/s/device": statistics.mean(r["perf/samples_per_s_per_device"] for r in rows),
        "tflops/device": statistics.mean(r.get("perf/tflops_per_device", float("nan")) for r in rows),
        "mfu": statistics.mean(r["perf/mfu"] for r in rows) if all("perf/mfu" in r for r in rows) else None,
        "mem_gib": max(
            r.get("memory/max_allocated_gib", r.get("memory/host_max_rss_gib", 0.0)) for r in rows
        ),
        "wall_s": wall,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "optimizer": "torch AdamW (fused)" if args.optimizer == "torch" else "DeepSpeed's",
        "with_cp": bool(args.with_cp),
    }
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def table(results: list[dict]) -> str:
    head = "| model | DCN backend | px | batch/dev | prec | ZeRO | step (s) | samples/s | samples/s/dev | TFLOP/s/dev | MFU | mem (GiB) | device |"
    lines = [head, "|" + "---|" * 13]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['img']} | {r['batch/device']} | {r['precision']} | {r['zero']} | "
            f"{r['step_s']:.3f} | {r['samples/s']:.1f} | {r['samples/s/device']:.1f} | {r['tflops/device']:.2f} | "
            f"{mfu} | {r['mem_gib']:.2f} | {r['device']} |"
        )
    return "\n".join(lines)


def run(args) -> int:
    from pretrain.engine import dist

    # one process group for every measured configuration (the trainer joins it instead of creating its own)
    dist.ensure_process_group("auto")
    models = args.models or (["internimage_t"] if args.tiny else ["internimage_t", "internimage_h"])
    results, errors = [], []
    for model in models:
        for backend in _backends(args.backends):
            try:
                results.append(bench_one(model, backend, args))
            except Exception as err:  # a backend that cannot run (or crashes): report it, measure the others
                errors.append(
                    {"model": model, "backend": backend, "error": f"{type(err).__name__}: {err}"[:500]}
                )
                print(f"{model} / {backend}: FAILED {errors[-1]['error']}", flush=True)
                _release()
            else:
                print(table(results[-1:]).splitlines()[-1], flush=True)
            if args.json_out:  # after every row: a run killed later keeps what it measured
                with open(args.json_out, "w") as f:
                    json.dump([_finite(r) for r in results] + errors, f, indent=1)
    print()
    print(f"{time.strftime('%Y-%m-%d')}: pretrain bench train {' '.join(_argv(args, models))}")
    print(table(results))
    for e in errors:
        print(f"FAILED {e['model']} / {e['backend']}: {e['error']}")
    return 1 if errors else 0


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finite(row: dict) -> dict:
    """NaN (no TFLOP/s on CPU) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _argv(args, models: list[str]) -> list[str]:
    out = ["--models", *models, "--img-size", str(args.img_size), "--precision", args.precision,
           "--zero-stage", str(args.zero_stage), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.batch_size:
        out += ["--batch-size", str(args.batch_size)]
    if args.optimizer != "torch":
        out += ["--optimizer", args.optimizer]
    if args.with_cp:
        out.append("--with-cp")
    if args.tiny:
        out.append("--tiny")
    return out
