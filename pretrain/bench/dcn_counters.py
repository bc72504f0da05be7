"""`pretrain bench dcn --emulate`: what the fused DCNv3 kernels move and compute, counted in the CPU emulation.

No GPU needed: the real csrc kernels run in the emulation (pretrain.ops.emulation), which counts per launch the
32-byte sectors each warp request touches (L2 traffic), the distinct sectors of the launch (the DRAM floor of a
perfect cache), global and shared-memory atomics, shared-memory bytes and mma.sync instructions. Each InternImage stage shape at
--image-size runs on a slice of its pixels (one image, a band of --rows rows at full width; the full map when it
is smaller; several images for the small late-stage maps, about --rows x (image_size / 4) pixels in all), and
every figure is given per output pixel of the slice, beside the essential bytes of the same slice: value and x1
read once, out written once (forward); plus grad_out read, grad value and grad x1 written (forward + backward);
and every weight (and weight gradient) once per slice, as the kernels read them once per launch at best. These counts are the speed measure available without a GPU; GPU
timings (`pretrain bench dcn` on a GPU) confirm them. With --by-line N, each stage also gets the N source lines that
move the most L2 bytes (the emulation's per-call-site counters, mapped to lines by its build's line tables).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time

STAGE_GROUPS = {"t": (64, (4, 8, 16, 32), False), "h": (320, (10, 20, 40, 80), True)}


def essential_bytes_per_pixel(c, group, points, cfs, elem_bytes, pixels) -> tuple[float, float]:
    """(forward, forward+backward) bytes per pixel that any implementation must move."""
    weights = (group * (3 * points + (1 if cfs else 0)) * (c + 1) + c * (c + 1)) * elem_bytes
    fwd = 3 * c * elem_bytes + weights / pixels
    fwdbwd = (
        fwd + 5 * c * elem_bytes + 2 * weights / pixels
    )  # grad_out, value, x1 again; grads; weights + grads
    return fwd, fwdbwd


def count_block(n, h, w, c, group, cfs, dtype, seed=0, offset_std=1.0) -> dict[str, list[dict]]:
    """Per-launch counters of one fused block forward and backward in the emulation, and of the forward under
    no_grad ("infer": nothing is kept for a backward)."""
    import torch

    from pretrain.ops import cuda, emulation

    from .blocks import make_block

    torch.manual_seed(seed)
    value, x1, params, geom = make_block(n, h, w, c, group, cfs, dtype, "cpu", offset_std)
    grad = torch.randn(n, h, w, c).to(dtype)
    with emulation.count() as fwd:
        out = cuda.dcnv3_fused_emu(value, x1, params, geom)
    with emulation.count() as bwd:
        out.backward(grad)
    with torch.no_grad(), emulation.count() as infer:
        cuda.dcnv3_fused_emu(value, x1, params, geom)
    return {"fwd": fwd, "bwd": bwd, "infer": infer}


def summarise(launches: list[dict], pixels: int) -> dict[str, float]:
    """Per-pixel totals over launches."""

    def total(key):
        return sum(launch[key] for launch in launches) / pixels

    return {
        "launches": len(launches),
        "l2_bytes": 32 * (total("load_sectors") + total("store_sectors") + total("atomic_sectors")),
        "dram_floor_bytes": 32
        * (total("unique_load_sectors") + total("unique_store_sectors") + total("unique_atomic_sectors")),
        "atomics": total("atomics"),
        "shared_atomics": total("shared_atomics"),
        "shared_bytes": total("shared_load_bytes") + total("shared_store_bytes"),
        "shared_loads": total("shared_loads"),
        "shared_stores": total("shared_stores"),
        "shared_wavefronts": total("shared_wavefronts"),
        "shared_atomic_wavefronts": total("shared_atomic_wavefronts"),
        "mma": total("mma"),
    }


def traffic_by_line(
    launches: list[tuple[str, dict]], pixels: int, top: int, shared: bool = False
) -> list[tuple[str, str, str, float, float]]:
    """The `top` (launch, kind, source line) entries by L2 bytes per pixel over the (label, counters) `launches`,
    with their warp requests per pixel: (label, kind, line, bytes, requests). shared: by shared-memory bank passes
    (wavefronts) per pixel instead: (label, kind, line, passes, requests)."""
    from pretrain.ops import emulation

    kinds = ("load", "store", "atomic") * 2  # the sites' kinds: global 0-2, shared 3-5
    totals: dict[tuple[str, int, int], list[float]] = {}
    for label, launch in launches:
        for offset, kind, requests, sectors in launch["sites"]:
            if (kind >= 3) != shared:
                continue
            t = totals.setdefault((label, kind, offset), [0.0, 0.0])
            t[0] += (sectors if shared else 32 * sectors) / pixels
            t[1] += requests / pixels
    best = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    lines = emulation.source_lines(sorted({offset for (_, _, offset), _ in best}))
    return [(k, kinds[kind], lines[offset], b, r) for (k, kind, offset), (b, r) in best]


def by_line_markdown(
    title: str, rows: list[tuple[str, str, str, float, float]], total: float, shared: bool = False
) -> str:
    what = "take the most shared-memory bank passes" if shared else "move the most L2 bytes"
    measure = "bank passes | share | requests | passes / request" if shared else "L2 B | share | requests"
    out = [
        f"{title}: the source lines that {what} (forward + backward, per output pixel, of "
        f"{total:.0f} in all; the line of the access, then the lines it is inlined into)",
        "",
        f"| launch | kind | {measure} | source line < inlined into |",
        "|---|---|---|---|---|" + ("---|" if shared else "") + "---|",
    ]
    for kernel, kind, line, b, r in rows:
        ratio = f" {b / r:.2f} |" if shared else ""
        out.append(f"| {kernel} | {kind} | {b:.0f} | {b / total:.1%} | {r:.2f} |{ratio} {line} |")
    return "\n".join(out)


def run(args) -> int:
    import torch

    from pretrain.ops import emulation

    from .blocks import kernel_variant

    ext = emulation.extension()
    if ext is None:
        print(f"error: {emulation.error()}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtypes.split(",")[0]]
    elem = torch.finfo(dtype).bits // 8
    offset_std = getattr(args, "offset_std", 1.0)
    variant = _variant(args)
    with kernel_variant(variant, "cpu"):
        rows_out, by_line = _count_stages(args, ext, dtype, elem, offset_std)
        if rows_out is None:
            return 2
    table = "\n\n".join([markdown(rows_out, args, dtype), *by_line])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


def _variant(args) -> str:
    """The kernel variant counted: the first --impls entry when it names one (kernel-no-masks, ...), else kernel."""
    first = (getattr(args, "impls", "") or "kernel").split(",")[0]
    return first if first.startswith("kernel") else "kernel"


def _count_stages(args, ext, dtype, elem, offset_std):
    """(table rows, --by-line tables) of every requested stage; (None, None) after an error message."""
    import torch

    from pretrain.ops import cuda

    rows_out = []
    by_line: list[str] = []
    for model in args.models.split(","):
        if model not in STAGE_GROUPS:
            print(f"error: --emulate knows models {sorted(STAGE_GROUPS)}, not {model!r}", file=sys.stderr)
            return None, None
        base, groups, cfs = STAGE_GROUPS[model]
        for stage in (int(s) for s in args.stages.split(",")):
            c, group = base * 2 ** (stage - 1), groups[stage - 1]
            side = args.image_size // (4 * 2 ** (stage - 1))
            target = args.rows * (args.image_size // 4)
            band = min(side, -(-target // side))
            images = -(-target // (band * side))
            pixels = images * band * side
            t0 = time.monotonic()
            counted = count_block(images, band, side, c, group, cfs, dtype, offset_std=offset_std)
            if args.marginal:  # the same stage on twice the pixels: more rows, or more images of a full map
                images2, band2 = (images, 2 * band) if 2 * band <= side else (2 * images, band)
                counted1 = counted
                # A large batch accumulates grad wpack in the backward wherever its partials fit, in one CTA per
                # SM (or a cluster per 8: T3, H1): their partials are then a per-launch cost, as the weights are.
                # Both slices are counted that way (one CTA or cluster), so their difference is what each added
                # pixel costs.
                like = torch.empty(0, dtype=dtype)
                fits = any(ext.bwd_wpack_fits(like, group, c, k) for k in (1, 2, 4, 8))
                wpack_slots = 1 if fits else 0
                with cuda.wpack_slots(wpack_slots, device="cpu"):
                    if wpack_slots:
                        counted1 = count_block(
                            images, band, side, c, group, cfs, dtype, offset_std=offset_std
                        )
                    counted2 = count_block(images2, band2, side, c, group, cfs, dtype, offset_std=offset_std)
            secs = time.monotonic() - t0
            fwd_ess, fwdbwd_ess = essential_bytes_per_pixel(c, group, 9, cfs, elem, pixels)
            fwd = summarise(counted["fwd"], pixels)
            both = summarise(counted["fwd"] + counted["bwd"], pixels)
            infer = summarise(counted["infer"], pixels)
            if args.marginal:
                added = images2 * band2 * side - pixels
                for s, launches, launches2 in (
                    (fwd, counted1["fwd"], counted2["fwd"]),
                    (both, counted1["fwd"] + counted1["bwd"], counted2["fwd"] + counted2["bwd"]),
                    (infer, counted1["infer"], counted2["infer"]),
                ):
                    s["marginal_floor_bytes"] = (
                        summarise(launches2, added)["dram_floor_bytes"]
                        - summarise(launches, added)["dram_floor_bytes"]
                    )
            if getattr(args, "by_line", 0):
                launches = [(f"fwd {x['kernel']}", x) for x in counted["fwd"]]
                launches += [(f"bwd {i + 1} {x['kernel']}", x) for i, x in enumerate(counted["bwd"])]
                title = f"{model.upper()} stage {stage} ({images}x{band}x{side}x{c})"
                by_line.append(
                    by_line_markdown(title, traffic_by_line(launches, pixels, args.by_line), both["l2_bytes"])
                )
                by_line.append(
                    by_line_markdown(
                        title,
                        traffic_by_line(launches, pixels, args.by_line, shared=True),
                        both["shared_wavefronts"],
                        shared=True,
                    )
                )
            for name, s, ess, act in (
                ("fwd", fwd, fwd_ess, 3 * c * elem),
                ("fwd+bwd", both, fwdbwd_ess, 8 * c * elem),
                ("fwd, no grad", infer, fwd_ess, 3 * c * elem),
            ):
                s["activation_essential"] = act
                rows_out.append(
                    (model.upper(), stage, f"{images}x{band}x{side}x{c}", group, name, s, ess, secs)
                )
            print(
                f"[bench dcn --emulate] {model.upper()} stage {stage}: {secs:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows_out, by_line


def markdown(rows, args, dtype) -> str:
    head = (
        f"DCNv3 fused block, emulation counters per output pixel ({_dt.date.today().isoformat()}, "
        f"{str(dtype).replace('torch.', '')}, {args.image_size} px{_settings(args)[0]})\n\n"
        "| model | stage | slice (NxHxWxC) | G | pass | launches | essential B | L2 B (sectors) | x essential "
        "| DRAM floor B | atomics | shared B | shared loads | shared stores | mma | floor x essential "
        "| shared atomics | shared passes | atomic passes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    marginal = getattr(args, "marginal", False)
    if marginal:
        head = head.replace(" atomic passes |\n", " atomic passes | marginal floor B | x activations |\n")
        head += "---|---|"
    lines = [head]
    for model, stage, shape, group, name, s, ess, _ in rows:
        line = (
            f"| {model} | {stage} | {shape} | {group} | {name} | {s['launches']} | {ess:.0f} | {s['l2_bytes']:.0f} "
            f"| {s['l2_bytes'] / ess:.1f} | {s['dram_floor_bytes']:.0f} | {s['atomics']:.0f} "
            f"| {s['shared_bytes']:.0f} | {s['shared_loads']:.0f} | {s['shared_stores']:.0f} | {s['mma']:.2f} | {s['dram_floor_bytes'] / ess:.2f} "
            f"| {s['shared_atomics']:.0f} | {s['shared_wavefronts']:.0f} | {s['shared_atomic_wavefronts']:.0f} |"
        )
        if marginal:
            m = s["marginal_floor_bytes"]
            line += f" {m:.0f} | {m / s['activation_essential']:.2f} |"
        lines.append(line)
    lines.append("")
    lines.append(
        "L2 B: 32 x the distinct sectors of each warp-wide request, summed (what the memory system serves); DRAM "
        "floor: 32 x the distinct sectors of each launch, summed over launches (a perfect cache: a sector read after "
        "the launch wrote it counts once); atomics: global ones (shared-memory atomics apart); shared loads: "
        "shared-memory load instructions per thread (any width; an ldmatrix.x4 lane counts one); shared stores: the "
        "same for stores; shared passes: the bank passes (wavefronts) of every warp-wide shared-memory request, "
        "summed (a pass serves at most one 4-byte word per bank; a 64-bit atomic add counts twice, as its "
        "compare-and-swap loop needs a load too); atomic passes: those of the shared atomics; essential: value "
        "and x1 read and out written once (+ grad_out, grad value, grad x1 and the weights' reads and gradients "
        "for fwd+bwd); fwd, no grad: the forward under torch.no_grad (y is not stored)."
        + (
            " Marginal floor: the DRAM floor per pixel added when the slice doubles (weights and other per-launch "
            "bytes cancel: what a large batch pays per pixel; where grad wpack's partials fit on chip, both "
            "slices are counted with them, in one CTA or cluster, as a large batch runs it), against the activations' "
            "essential bytes (value, x1, out; + grad_out, value, x1, grad value, grad x1)."
            if marginal
            else ""
        )
        + f" Command: `pretrain bench dcn --emulate --models {args.models} --stages {args.stages} --rows "
        f"{args.rows}{' --marginal' if marginal else ''}{_settings(args)[1]}`."
    )
    return "\n".join(lines)


def _settings(args) -> tuple[str, str]:
    """How the counted run differs from the defaults (offsets' spread, kernel variant): for the table's title, and
    as the flags its command line needs."""
    std, variant = getattr(args, "offset_std", 1.0), _variant(args)
    note = ("" if std == 1.0 else f", offsets N(0, {std:g}^2) px") + (
        "" if variant == "kernel" else f", {variant}"
    )
    flags = ("" if std == 1.0 else f" --offset-std {std:g}") + (
        "" if variant == "kernel" else f" --impls {variant}"
    )
    return note, flags
