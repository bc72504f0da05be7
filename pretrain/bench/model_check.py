"""`pretrain bench model`: a DCN backend inside whole models, against the reference op, forward and backward.

    pretrain bench model                                  # InternImage-T and a small H-style model, 224 px, bf16+fp32
    pretrain bench model --tiny --candidate reference     # CPU smoke run of the same plumbing (32 px, tiny models)

The kernel tests check the op on its own; this checks it where it is used: the same weights and inputs, the
model run with the reference backend and with the candidate (default: the fused CUDA kernel), each in the
compute dtype (the whole model cast to it, as DeepSpeed's bf16 engine does), compared with the reference in
float64 on the same device (the oracle). Reported per model, dtype and backend: the relative error
||x - oracle|| / ||oracle|| of the output, of all parameter gradients together and of the input gradient, and
the parameter whose gradient is worst. The candidate passes when each of its errors is at most twice the
reference's own error in that dtype plus a small floor (the flash-attention rule the kernel tests use), and
nothing is NaN. TF32 is off, so fp32 means fp32.

Models: `internimage_t` (official T) and `tiny_h` (the H variant's options: center-feature-scale, 5x5
depthwise, res-post-norm, level-2 post norms, CLIP projector; 32 channels per group as in H; 64 base channels).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

MODELS = {
    "internimage_t": ("internimage_t", {}),
    "tiny_h": (
        "internimage_h",
        {
            "channels": 64,
            "depths": [2, 2, 6, 2],
            "groups": [2, 4, 8, 16],
            "level2_post_norm_block_ids": [2, 5],
        },
    ),
}
# The CPU smoke shapes: one block per stage, channels per group 16/32 as the kernel has.
TINY = {
    "internimage_t": ("internimage_t", {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}),
    "tiny_h": (
        "internimage_h",
        {"channels": 32, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "level2_post_norm_block_ids": [1]},
    ),
}
FLOOR = {"fp32": 1e-5, "bf16": 2e-3, "fp16": 5e-4}  # absolute slack on a relative error


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="internimage_t,tiny_h", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--candidate", default="cuda", help="DCN backend checked against the reference")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models at 32 px")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", dest="json_out", help="write the rows as JSON here")
    parser.add_argument("--out", help="write the Markdown table here")


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (NaN propagates)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def run_model(model, x, w, dtype):
    """Forward + backward of sum(out * w) in `dtype`: (out, {param name: grad}, input grad), all float64."""
    m = copy.deepcopy(model).to(dtype)
    xi = x.detach().to(dtype).requires_grad_()
    out = m(xi)
    (out.double() * w).sum().backward()
    grads = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
    return out.detach().double(), grads, xi.grad.double()


def _errors(result, oracle) -> dict:
    out, grads, gx = result
    o_out, o_grads, o_gx = oracle
    num = sum(((grads[n] - o_grads[n]) ** 2).sum().item() for n in o_grads)
    den = sum((o_grads[n] ** 2).sum().item() for n in o_grads)
    # parameters whose true gradient is ~0 (an attention key bias: softmax is shift-invariant) have no
    # meaningful relative error: the worst is taken among the others
    norms = {n: o_grads[n].norm().item() for n in o_grads}
    live = [n for n in o_grads if norms[n] > 1e-6 * max(norms.values())] or list(o_grads)
    worst = max(live, key=lambda n: _rel(grads[n], o_grads[n]))
    return {
        "out": _rel(out, o_out),
        "grad_params": math.sqrt(num / den) if den > 0 else math.sqrt(num),
        "grad_input": _rel(gx, o_gx),
        "worst_param": worst,
        "worst_param_err": _rel(grads[worst], o_grads[worst]),
        "missing_grads": sorted(set(o_grads) - set(grads)),
    }


def check_model(name: str, args, device) -> list[dict]:
    import torch

    from pretrain.models import create_model

    variant, overrides = (TINY if args.tiny else MODELS)[name]
    size = 32 if args.tiny else args.img_size
    torch.manual_seed(args.seed)
    model = create_model(variant, num_classes=100, drop_path_rate=0.0, dcn_backend="reference", **overrides)
    model = model.to(device).eval()  # eval: drop-path off, the head's BatchNorm uses its running stats
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, size, size, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(args.batch, 100, generator=gen, dtype=torch.float64).to(device)
    t0 = time.perf_counter()
    oracle = run_model(model, x, w, torch.float64)
    oracle_s = time.perf_counter() - t0
    rows = []
    for dname in args.dtypes.split(","):
        dtype = _dtype(dname)
        errs = {}
        for backend in ("reference", args.candidate):
            row = {"model": name, "img": size, "batch": args.batch, "dtype": dname, "backend": backend}
            if backend in errs:  # the candidate is the reference itself (CPU smoke run)
                rows.append({**row, **errs[backend], "note": "same as reference"})
                continue
            m = copy.deepcopy(model)
            try:
                m.set_dcn_backend(backend)
                t0 = time.perf_counter()
                errs[backend] = _errors(run_model(m, x, w, dtype), oracle)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                errs[backend]["seconds"] = time.perf_counter() - t0
                rows.append({**row, **errs[backend], "note": ""})
            except Exception as err:  # unavailable backend, unsupported shape, a crash: a failed row, go on
                errs[backend] = None
                rows.append({**row, "note": f"{type(err).__name__}: {str(err)[:200]}"})
            del m
        ref, cand = errs.get("reference"), errs.get(args.candidate)
        verdict = _verdict(ref, cand, dname)
        rows[-1]["pass"] = verdict
        rows[-1]["oracle_seconds"] = oracle_s
    return rows


def _verdict(ref: dict | None, cand: dict | None, dname: str) -> bool:
    """The candidate's errors are within 2x the reference's own (plus the dtype's floor), none NaN."""
    if ref is None or cand is None or cand["missing_grads"]:
        return False
    keys = ("out", "grad_params", "grad_input")
    if any(not math.isfinite(cand[k]) for k in keys):
        return False
    return all(cand[k] <= 2 * ref[k] + FLOOR[dname] for k in keys)


def table(rows: list[dict]) -> str:
    head = "| model | px | batch | dtype | backend | out rel err | grad rel err (params) | grad rel err (input) | worst param grad | pass | note |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "out" not in r:
            lines.append(
                f"| {r['model']} | {r['img']} | {r['batch']} | {r['dtype']} | {r['backend']} | - | - | - | - | "
                f"{_mark(r)} | {r['note']} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['img']} | {r['batch']} | {r['dtype']} | {r['backend']} | {r['out']:.2e} | "
            f"{r['grad_params']:.2e} | {r['grad_input']:.2e} | {r['worst_param']} {r['worst_param_err']:.1e} | "
            f"{_mark(r)} | {r['note']} |"
        )
    return "\n".join(lines)


def _mark(row: dict) -> str:
    return "" if "pass" not in row else ("yes" if row["pass"] else "**NO**")


def run(args) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            print(
                f"unknown model {name!r} for `pretrain bench model`: choose from {', '.join(MODELS)}",
                file=sys.stderr,
            )
            return 2
        new = check_model(name, args, device)
        rows.extend(new)
        print("\n".join(table(new).splitlines()[2:]), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = (
        f"{time.strftime('%Y-%m-%d')} on {device_name}, torch {torch.__version__}: "
        f"{args.candidate} vs reference, relative errors against the float64 reference (TF32 off)\n\n"
        + table(rows)
    )
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": device_name, "candidate": args.candidate, "rows": rows}, f, indent=1)
    ok = all(r.get("pass", True) for r in rows)
    return 0 if ok else 1
