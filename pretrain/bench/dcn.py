"""`pretrain bench dcn`: the DCN block's hot path (offset/mask projection, softmax, sampling, center-feature-scale,
output projection), forward and forward+backward, per implementation, in one run on one GPU:

* kernel      the fused CUDA kernels (pretrain.ops.cuda; needs `python -m pretrain.ops.build` first)
* kernel-split  the same, with the output projection and grad x1 as GEMMs of their own instead of the sampling
              kernels' epilogues (fewer HBM bytes against more shared memory per CTA: the GPU decides)
* kernel-8w   the same as kernel, with the backward's sampling kernel in 8 warps per CTA instead of 4 (two warps per
              scheduler where one CTA fills an SM: more latency hiding, the same results)
* kernel-wpack-gemm  the same as kernel, with grad wpack reduced by a GEMM over stored grad logits instead of in the
              backward's persistent CTAs (where those run: InternImage-T stages 1-2 at training batches; elsewhere
              the same as kernel)
* kernel-no-masks  the same as kernel, with the backward recomputing every halo pixel within the tile reach's
              rectangles instead of skipping those whose touch masks rule its tile out (more tensor-core work)
* kernel-stored-grad-y  the same as kernel, with grad_y computed once by a GEMM launch, stored and read by the
              backward's sampling kernel instead of recomputed per chunk of its own tile and halo (2 C more HBM bytes
              per pixel against the halo's grad_y GEMMs: the GPU decides)
* kernel-stored-logits  the same as kernel, with the forward storing its fp32 logits for the backward to read
              instead of recomputing them per chunk (packed_cols(G) floats a pixel written and read back against
              the backward's logits GEMMs)
* kernel-stored-both  both of the above
* reference   pretrain.ops.dcnv3_fused_reference (PyTorch ops, grid_sample)
* compiled    the reference under torch.compile
* dcnv4       the DCNv4 package's op (pip `DCNv4`, built on the GPU machine) + PyTorch projections. Different
              semantics: no softmax over the mask, its own offset/mask layout; timed for speed only.

Shapes: InternImage stage shapes at --image-size (stride 4, 8, 16, 32), batch filling the GPU. Ceilings are
measured in the same run: a large device-to-device copy (HBM GB/s) and large matmuls (bf16, fp32 TFLOP/s).
Prints a Markdown table (and writes it with --out) for BENCHMARKS.md.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import statistics
import sys

from .blocks import kernel_variant, make_block

# InternImage variants: (base channels, groups per stage, center-feature-scale), from the official configs.
MODELS = {
    "t": (64, (4, 8, 16, 32), False),
    "s": (80, (5, 10, 20, 40), False),
    "b": (112, (7, 14, 28, 56), False),
    "h": (320, (10, 20, 40, 80), True),
}
IMPLS = (
    "kernel",
    "kernel-split",
    "kernel-8w",
    "kernel-wpack-gemm",
    "kernel-no-masks",
    "kernel-stored-grad-y",
    "kernel-stored-logits",
    "kernel-stored-both",
    "reference",
    "compiled",
    "dcnv4",
)


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="t,h", help="comma list of variants (t, s, b, h); default t,h")
    parser.add_argument("--stages", default="1,2,3,4", help="comma list of stages 1-4")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=0, help="images per step; 0 = fill the GPU (per stage)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without a GPU: tiny reference-only smoke run"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also time each kernel of one fwd+bwd per shape and impl (torch.profiler) and list the N slowest: "
        "which launch the time goes to",
    )
    parser.add_argument(
        "--emulate",
        action="store_true",
        help="no GPU needed: count the kernels' memory traffic, atomics and mma in the CPU emulation "
        "(first dtype of --dtypes; the kernel variant of the first --impls entry, kernel when it is none; see "
        "pretrain/bench/dcn_counters.py)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=8,
        help="--emulate: slice size in stage-1 rows (rows x image_size/4 pixels)",
    )
    parser.add_argument(
        "--marginal",
        action="store_true",
        help="--emulate: also count a slice twice as large, and give the DRAM floor per added pixel (what a "
        "large batch pays per pixel, weights and grad wpack's partials amortised) against the activations' "
        "essential bytes",
    )
    parser.add_argument(
        "--offset-std",
        type=float,
        default=1.0,
        metavar="PX",
        help="spread of the random sampling offsets, in pixels (0: a freshly initialised block, whose offset "
        "projection is zero); sets how much halo the backward recomputes",
    )
    parser.add_argument(
        "--by-line",
        type=int,
        default=0,
        metavar="N",
        help="--emulate: also list, per stage, the N source lines that move the most L2 bytes in the forward + "
        "backward (per launch, per output pixel): where the traffic comes from",
    )


# ----------------------------------------------------------------------------------------------------------


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _timer(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of fn() over iters (after warmup), CUDA events on GPU, wall clock on CPU."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device) -> dict[str, float]:
    """HBM copy bandwidth (GB/s, read + write counted) and dense matmul rates (TFLOP/s) on this GPU, now."""
    import torch

    out = {}
    n = 1 << 30  # 1 GiB each way: far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timer(lambda s=src, d=dst: d.copy_(s), 3, 10, device)
    out["hbm_gbs"] = 2 * n / (ms * 1e-3) / 1e9
    del src, dst
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dt, size in (("bf16_tflops", torch.bfloat16, 8192), ("fp32_tflops", torch.float32, 4096)):
        a = torch.randn(size, size, device=device, dtype=dt)
        b = torch.randn(size, size, device=device, dtype=dt)
        ms = _timer(lambda a=a, b=b: a @ b, 3, 10, device)
        out[name] = 2 * size**3 / (ms * 1e-3) / 1e12
    out["fp16_tflops"] = out["bf16_tflops"]
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out


def block_cost(n, h, w, c, group, points, cfs, elem_bytes) -> dict[str, float]:
    """Essential HBM bytes and FLOPs of the block: what any implementation must read/write and compute.

    Forward reads value and x1 and writes out (3 activations); backward reads grad_out, value, x1 and writes
    grad value and grad x1 (5 more). FLOPs: the two projections (2*M*C*Nout each way, x3 for fwd+bwd) plus
    bilinear sampling (4 corners x 2 flops per channel and point, about x2.5 in backward).
    """
    m = n * h * w
    act = m * c * elem_bytes
    proj = 2 * m * c * (group * 3 * points + (group if cfs else 0)) + 2 * m * c * c
    sample = m * c * points * 8
    return {
        "fwd_bytes": 3 * act,
        "fwdbwd_bytes": 8 * act,
        "fwd_flops": proj + sample,
        "fwdbwd_flops": 3 * proj + 3.5 * sample,
    }


def _dcnv4_fn(c, group, dtype, device):
    """DCNv4 op + PyTorch projections (offset/mask Linear, output Linear), or a reason it cannot run."""
    try:
        try:
            from DCNv4.modules.dcnv4 import DCNv4 as DCNv4Module
        except ImportError:
            from DCNv4 import DCNv4 as DCNv4Module
    except Exception as err:  # not installed / not built for this GPU
        return None, f"DCNv4 not importable ({type(err).__name__})"
    import torch

    try:
        mod = DCNv4Module(
            channels=c, kernel_size=3, stride=1, pad=1, dilation=1, group=group, without_pointwise=True
        )
        mod = mod.to(device=device, dtype=dtype)
        out_proj = torch.nn.Linear(c, c, device=device, dtype=dtype)
    except Exception as err:
        return None, f"DCNv4 rejected the shape ({type(err).__name__}: {str(err)[:60]})"

    def fn(value, x1, params, geom):
        n, h, w, _ = value.shape
        # DCNv4's module computes its offset/mask Linear from its input; the value tensor stands in for x1.
        y = mod(value.reshape(n, h * w, c), shape=(h, w))
        return out_proj(y.reshape(n, h, w, c))

    return fn, None


def _impl_fn(impl, c, group, dtype, device):
    import torch

    from pretrain.ops import cuda, dcnv3_fused_reference

    if impl == "reference":
        return dcnv3_fused_reference, None
    if impl == "compiled":
        return torch.compile(dcnv3_fused_reference), None
    if impl.startswith("kernel"):
        reason = cuda.unavailable_reason(torch.empty(0, device=device, dtype=dtype))
        if reason:
            return None, reason
        return cuda.dcnv3_fused_cuda, None  # the variants: timed under their switch (kernel_variant)
    if impl == "dcnv4":
        return _dcnv4_fn(c, group, dtype, device)
    raise ValueError(f"unknown impl {impl!r}")


def _auto_batch(h, w, c, device) -> int:
    """Largest power of two whose reference fwd+bwd (about 40 activation-sized fp32 buffers) fits in half
    of the free GPU memory, capped at 1024 images."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    per_image = 40 * h * w * c * 4
    return max(1, min(1024, 2 ** int(math.log2(max(1, free // 2 // per_image)))))


def run(args) -> int:
    import torch

    if args.emulate:
        from . import dcn_counters

        return dcn_counters.run(args)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print(
            "pretrain bench dcn needs a CUDA GPU and none is visible; run it on a GPU machine after "
            "`python -m pretrain.ops.build` (or pass --allow-cpu for a reference-only smoke run)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    impls = [i for i in args.impls.split(",") if i]
    if not on_gpu:
        impls = [i for i in impls if i == "reference"]
    ceilings = measure_ceilings(device) if on_gpu else {}
    rows = []
    for model in args.models.split(","):
        base, groups, cfs = MODELS[model]
        for stage in (int(s) for s in args.stages.split(",")):
            c, group = base * 2 ** (stage - 1), groups[stage - 1]
            h = w = args.image_size // (4 * 2 ** (stage - 1))
            if not on_gpu:
                n = args.batch or 1
            else:
                n = args.batch or _auto_batch(h, w, c, device)
            for dname in args.dtypes.split(","):
                dtype = _dtype(dname)
                cost = block_cost(n, h, w, c, group, 9, cfs, torch.finfo(dtype).bits // 8)
                timings = {}
                for impl in impls:
                    timings[impl] = _bench_impl(impl, n, h, w, c, group, cfs, dtype, device, args)
                rows.extend(_rows(model, stage, n, h, w, c, group, dname, timings, cost, ceilings))
                # The table so far, after every shape: a run cut off by a time limit keeps what it measured.
                _write(args.out, _markdown(rows, ceilings, device, args) + "\n\n(partial: still running)")
                if on_gpu:
                    torch.cuda.empty_cache()
    table = _markdown(rows, ceilings, device, args)
    print(table)
    _write(args.out, table)
    return 0


def _write(path, text: str) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)


def _bench_impl(impl, n, h, w, c, group, cfs, dtype, device, args):
    """(fwd ms, fwd+bwd ms) or a short note why there is no number."""
    import torch

    fn, reason = _impl_fn(impl, c, group, dtype, device)
    if fn is None:
        return reason
    try:
        value, x1, params, geom = make_block(n, h, w, c, group, cfs, dtype, device, args.offset_std)
        grad = torch.randn_like(value)

        def fwd():
            return fn(value, x1, params, geom)

        def fwd_bwd():
            fn(value, x1, params, geom).backward(grad)

        with kernel_variant(impl):
            fwd_ms = _timer(fwd, args.warmup, args.iters, device)
            both_ms = _timer(fwd_bwd, args.warmup, args.iters, device)
            if getattr(args, "profile", 0) and device.type == "cuda":
                shape = f"{n}x{h}x{w}x{c}, G={group}, {str(dtype).removeprefix('torch.')}"
                PROFILES.append((shape, impl, both_ms, kernel_times(fwd_bwd)[: args.profile]))
        return fwd_ms, both_ms
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as err:  # a peer that asserts on this shape: report it, keep going
        return f"error: {type(err).__name__}: {str(err)[:80]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# (shape, impl, fwd+bwd ms, [(kernel, ms, launches)]) per profiled call, listed under the table (--profile).
PROFILES: list[tuple[str, str, float, list[tuple[str, float, int]]]] = []


def kernel_times(fn) -> list[tuple[str, float, int]]:
    """[(kernel name, total GPU ms, launches)] of one call of fn, slowest first (torch.profiler, CUDA activity)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = us if us is not None else getattr(e, "cuda_time_total", 0)
        if us > 0 and e.key:
            out.append((e.key, us / 1e3, e.count))
    return sorted(out, key=lambda r: -r[1])


def profile_markdown(profiles) -> list[str]:
    lines = [
        "",
        "Per-kernel GPU time of one fwd+bwd (torch.profiler; the launches of the whole call, slowest first):",
        "",
    ]
    lines += ["| shape | impl | fwd+bwd ms (timed) | kernel | ms | launches |", "|---|---|---|---|---|---|"]
    for shape, impl, both_ms, kernels in profiles:
        for name, ms, count in kernels:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(
                f"| {shape} | {impl} | {both_ms:.3f} | `{short.replace('|', '/')}` | {ms:.3f} | {count} |"
            )
    return lines


def _rows(model, stage, n, h, w, c, group, dname, timings, cost, ceilings):
    rows = []
    peak = ceilings.get(f"{dname}_tflops")
    bw = ceilings.get("hbm_gbs")
    floor_ms = None
    if peak and bw:
        floor_ms = max(cost["fwdbwd_bytes"] / (bw * 1e9), cost["fwdbwd_flops"] / (peak * 1e12)) * 1e3
    ref_v4 = timings.get("dcnv4")
    for impl, t in timings.items():
        shape = f"{model.upper()} s{stage}: {n}x{h}x{w}x{c}, G={group}"
        if not isinstance(t, tuple):
            rows.append([shape, dname, impl, "-", "-", "-", "-", "-", "-", str(t)])
            continue
        fwd_ms, both_ms = t
        gbs = cost["fwdbwd_bytes"] / (both_ms * 1e-3) / 1e9
        tflops = cost["fwdbwd_flops"] / (both_ms * 1e-3) / 1e12
        vs_floor = f"{both_ms / floor_ms:.2f}" if floor_ms else "-"
        vs_v4 = f"{ref_v4[1] / both_ms:.2f}" if isinstance(ref_v4, tuple) else "-"
        rows.append(
            [
                shape,
                dname,
                impl,
                f"{fwd_ms:.3f}",
                f"{both_ms:.3f}",
                f"{gbs:.0f}",
                f"{tflops:.1f}",
                vs_floor,
                vs_v4,
                "",
            ]
        )
    return rows


def _markdown(rows, ceilings, device, args) -> str:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a benchmark)"
    date = _dt.date.today().isoformat()
    cmd = (
        "pretrain bench dcn " + " ".join(sys.argv[3:])
        if sys.argv[1:3] == ["bench", "dcn"]
        else "pretrain bench dcn"
    )
    lines = [
        f"Measured {date} on {name}, torch {torch.__version__}, command: `{cmd}`.",
    ]
    if ceilings:
        lines.append(
            f"Ceilings measured in the same run: copy {ceilings['hbm_gbs']:.0f} GB/s, bf16 matmul "
            f"{ceilings['bf16_tflops']:.0f} TFLOP/s, fp32 matmul (no TF32) {ceilings['fp32_tflops']:.1f} TFLOP/s. "
            "GB/s and TFLOP/s count the block's essential traffic and FLOPs over the fwd+bwd time; "
            "x floor = fwd+bwd time / max(bytes / copy rate, FLOPs / matmul rate); vs DCNv4 = DCNv4 time / this time."
        )
    lines.append("")
    head = [
        "shape",
        "dtype",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        "GB/s",
        "TFLOP/s",
        "x floor",
        "vs DCNv4",
        "note",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines.extend("| " + " | ".join(r) + " |" for r in rows)
    if PROFILES:
        lines.extend(profile_markdown(PROFILES))
    return "\n".join(lines)
