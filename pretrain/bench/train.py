"""`pretrain bench train`: step time, samples/s and MFU of full training steps (DeepSpeed engine, synthetic data).

    pretrain bench train                                   # InternImage-T and -H, 224 px, bf16, every DCN backend
    pretrain bench train --models internimage_h --batch-size 32 --zero-stage 3 --with-cp
    pretrain bench train --tiny --steps 4 --warmup 2       # CPU smoke check (tiny model, fp32): no MFU on CPU

Each (model, backend) pair runs `warmup + steps` optimizer steps of the real trainer (`pretrain.engine.Trainer`:
forward, backward, ZeRO step, clipping; no checkpoints, no TensorBoard) on the synthetic stream, and reports the
mean over the measured steps. MFU = training FLOPs per sample (pretrain.models.flops, 3x forward) x samples/s
per device / the device's peak dense TFLOP/s at the precision (pretrain.monitor.throughput.PEAK_TFLOPS).
The DCN backends compared are the reference op (pure PyTorch) and every other registered backend that is
available on the device (the fused CUDA kernel once built).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time

TINY = "model.overrides={channels: 16, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8]}"


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=["internimage_t", "internimage_h"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per device (default: 128 for T-B, 32 else)"
    )
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


def _backends(requested: list[str] | None) -> list[str]:
    from pretrain.ops import available_backends

    avail = list(available_backends())
    if requested:
        return requested
    return ["reference"] + [b for b in avail if b != "reference"]


def bench_one(model: str, backend: str, args) -> dict:
    import torch

    from pretrain.config import load_config
    from pretrain.engine.trainer import Trainer

    size = 32 if args.tiny else args.img_size
    batch = args.batch_size or (
        8 if args.tiny else (128 if model in ("internimage_t", "internimage_s") else 32)
    )
    precision = "fp32" if args.tiny else args.precision
    sets = [
        f"model.variant={model}", f"model.dcn_backend={backend}", f"model.with_cp={str(args.with_cp).lower()}",
        "model.num_classes=1000", "objective.name=supervised", "synthetic.enabled=true", f"synthetic.image_size={size}",
        f"synthetic.batch_size={batch}", f"engine.precision={precision}", f"engine.zero_stage={args.zero_stage}",
        f"schedule.total_steps={args.warmup + args.steps}", "schedule.warmup_steps=0", "optim.lr_ref_batch=null",
        "logging.every_steps=1", "logging.tensorboard=false", "logging.console=false", "logging.image_grid=false",
        "logging.dcn_points_every=0", "checkpoint.every_steps=0", "checkpoint.save_final=false",
        "checkpoint.save_on_signal=false", f"output_dir={tempfile.mkdtemp(prefix='bench_train_')}",
    ]  # fmt: skip
    if args.tiny:
        sets += [TINY, "model.num_classes=10"]
    cfg = load_config(None, [*sets, *args.overrides])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    summary = trainer.fit()
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
    }
    del trainer
    gc.collect()
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
    models = (
        ["internimage_t"] if args.tiny and args.models == ["internimage_t", "internimage_h"] else args.models
    )
    results = []
    for model in models:
        for backend in _backends(args.backends):
            results.append(bench_one(model, backend, args))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"{time.strftime('%Y-%m-%d')}: pretrain bench train {' '.join(_argv(args, models))}")
    print(table(results))
    return 0


def _argv(args, models: list[str]) -> list[str]:
    out = ["--models", *models, "--img-size", str(args.img_size), "--precision", args.precision,
           "--zero-stage", str(args.zero_stage), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.batch_size:
        out += ["--batch-size", str(args.batch_size)]
    if args.with_cp:
        out.append("--with-cp")
    if args.tiny:
        out.append("--tiny")
    return out
