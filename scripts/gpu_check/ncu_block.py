"""Where the fused DCN block's time goes, by the hardware counters: the workload that `ncu` profiles in the device
run's step c-ncu, and the parser of ncu's CSV.

The emulation counts L2 bytes at 5-23x the DRAM floor for H (BENCHMARKS.md, step 21), so whether these kernels are
bound by L2, HBM or the tensor cores is for the counters to say: per kernel, its time, DRAM and L2 bytes, and
how near the SM, L2 and DRAM are to their peaks.

    python scripts/gpu_check/ncu_block.py run MODEL STAGE BATCH   # one warm-up, then one profiled fwd+bwd
    python scripts/gpu_check/ncu_block.py table CSV [CSV ...]     # the Markdown table of ncu's raw CSVs

`run` marks the profiled pass with cudaProfilerStart/Stop (ncu --profile-from-start off). Standard library only
at the top level: `table` runs where torch is not installed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

# Counters of every kernel (ncu --metrics): names that Nsight Compute has kept since Ampere. METRICS_MIN is the
# retry where a name is unknown to the installed ncu.
METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes.sum",
    "lts__t_bytes.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__inst_executed_pipe_tensor.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
)
METRICS_MIN = ("gpu__time_duration.sum", "dram__bytes.sum", "lts__t_bytes.sum")
KERNELS = "regex:dcn_|gemm_kernel|sum_slots|absmax_rows"
# (model, stage) -> the block's (channels, groups, center-feature-scale) and map side at 224 px.
SHAPES = {
    ("t", 1): (64, 4, False, 56),
    ("t", 2): (128, 8, False, 28),
    ("h", 1): (320, 10, True, 56),
    ("h", 3): (1280, 40, True, 14),
}


def run(model: str, stage: int, batch: int) -> None:
    import torch

    from pretrain.bench.blocks import make_block
    from pretrain.ops import cuda

    c, group, cfs, side = SHAPES[(model, stage)]
    value, x1, params, geom = make_block(batch, side, side, c, group, cfs, torch.bfloat16, "cuda")
    grad = torch.randn_like(value)

    def step():
        out = cuda.dcnv3_fused_cuda(value, x1, params, geom)
        out.backward(grad)

    step()  # first launches, autotuning, lazy loading: not profiled
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {model.upper()}{stage} batch {batch}: {batch}x{side}x{side}x{c}, G {group}")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse(text: str) -> list[dict]:
    """Kernels of an `ncu --csv --page raw --print-units base` output (any lines before its header are skipped):
    [{"kernel", "grid", "block", metric: float, ...}] in launch order."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line), None)
    if start is None:
        return []
    rows = list(csv.reader(lines[start:]))
    header, out = rows[0], []
    for row in rows[1:]:
        rec = dict(zip(header, row, strict=False))
        if len(row) != len(header) or not rec.get("ID", "0").strip().isdigit() or not rec.get("Kernel Name"):
            continue  # the units row, or a line ncu interleaved
        kernel = {
            "kernel": rec.get("Kernel Name", "?"),
            "grid": rec.get("Grid Size", ""),
            "block": rec.get("Block Size", ""),
        }
        for name in METRICS:
            if name in rec and _number(rec[name]) is not None:
                kernel[name] = _number(rec[name])
        out.append(kernel)
    return out


def _short(kernel: str) -> str:
    """dcnv3::dcn_bwd_value_kernel<cutlass::bfloat16_t, 32, true, true, 128>(dcnv3::DcnParams) -> the name and
    its template arguments, without namespaces."""
    name = kernel.split("(")[0].replace("dcnv3::", "").replace("cutlass::", "").replace("void ", "")
    return name.replace("bfloat16_t", "bf16").replace("half_t", "f16")


def table(title: str, kernels: list[dict]) -> list[str]:
    """A Markdown table of one profiled pass: per kernel and in total."""

    def cell(k, name, scale=1.0, spec=".1f"):
        v = k.get(name)
        return "" if v is None else format(v * scale, spec)

    lines = [
        f"{title}: per kernel, one forward + backward (ncu; time in us, bytes in MB, throughput in % of peak)",
        "",
        "| kernel | grid | block | time | DRAM MB | L2 MB | L2 / DRAM | SM % | L2 % | DRAM % | tensor inst (M) "
        "| warps active % | regs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        dram, l2 = k.get("dram__bytes.sum"), k.get("lts__t_bytes.sum")
        ratio = f"{l2 / dram:.1f}" if dram and l2 is not None else ""
        lines.append(
            f"| {_short(k['kernel'])} | {k['grid']} | {k['block']} | {cell(k, 'gpu__time_duration.sum', 1e-3)} "
            f"| {cell(k, 'dram__bytes.sum', 1e-6)} | {cell(k, 'lts__t_bytes.sum', 1e-6)} | {ratio} "
            f"| {cell(k, 'sm__throughput.avg.pct_of_peak_sustained_elapsed', spec='.0f')} "
            f"| {cell(k, 'lts__throughput.avg.pct_of_peak_sustained_elapsed', spec='.0f')} "
            f"| {cell(k, 'dram__throughput.avg.pct_of_peak_sustained_elapsed', spec='.0f')} "
            f"| {cell(k, 'sm__inst_executed_pipe_tensor.sum', 1e-6, '.2f')} "
            f"| {cell(k, 'sm__warps_active.avg.pct_of_peak_sustained_active', spec='.0f')} "
            f"| {cell(k, 'launch__registers_per_thread', spec='.0f')} |"
        )
    total = {n: sum(k.get(n, 0.0) for k in kernels) for n in METRICS_MIN}
    if kernels:
        ratio = total["lts__t_bytes.sum"] / total["dram__bytes.sum"] if total["dram__bytes.sum"] else 0.0
        lines.append(
            f"| all {len(kernels)} | | | {total['gpu__time_duration.sum'] * 1e-3:.1f} "
            f"| {total['dram__bytes.sum'] * 1e-6:.1f} | {total['lts__t_bytes.sum'] * 1e-6:.1f} | {ratio:.1f} "
            "| | | | | | |"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "run":
        run(argv[1], int(argv[2]), int(argv[3]))
        return 0
    if len(argv) >= 2 and argv[0] == "table":
        for path in argv[1:]:
            print("\n".join(table(Path(path).stem, parse(Path(path).read_text(errors="replace")))))
            print()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
