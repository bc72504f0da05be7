"""Peak-memory probe of the converter on a fake full-size checkpoint (not run by the test suite).

    python -m pretrain.convert.memprobe --variant internimage_h --workdir /tmp/memprobe

Writes a fake checkpoint of the variant's exact keys and shapes (constant values: memory does not depend
on them), then runs each conversion in a fresh process while a thread samples /proc/self/status, and prints
the peak anonymous memory (RssAnon: what the process allocated) and the peak resident total (VmHWM, which
also counts memory-mapped file pages: page cache the kernel can drop), both relative to the fp32 size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _probe(job: dict) -> dict:
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.02)

    base = _status()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    from pretrain.convert import convert, load_pretrained

    if job["op"] == "convert":
        convert(job["src"], job["dst"], to=job["to"], dtype=job.get("dtype"), overwrite=True)
    else:
        import torch

        from pretrain.models import create_model

        with torch.device("meta"):
            model = create_model(job["variant"])
        model = model.to_empty(device="cpu")
        for t in model.state_dict().values():  # fault the model's own pages in before measuring
            t.zero_()
        after_model = _status()["RssAnon"]
        load_pretrained(job["src"], model)
        peak["model_bytes"] = after_model - base["RssAnon"]
    done.set()
    thread.join()
    s = _status()
    return {**peak, "VmHWM": s["VmHWM"], "base_anon": base["RssAnon"], "seconds": time.time() - t0}


def _fake(variant: str, path: Path) -> int:
    import torch

    from .spec import expected_shapes, record_from_variant
    from .tensors import LazyTensor, write_safetensors

    record = record_from_variant(variant, 1000)
    lazy = {}
    for key, shape in expected_shapes(record["kwargs"]).items():
        dtype = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        lazy[key] = LazyTensor(tuple(shape), dtype, lambda s=shape, d=dtype: torch.full(s, 0.5).to(d))
    meta = {"internimage_pretrain": json.dumps({"variant": variant, "kwargs": record["kwargs"]})}
    return write_safetensors(path, lazy, metadata=meta)


def _ds_worker(rank: int, world: int, port: int, variant: str, stage: int, out: str) -> None:
    """One rank of a real ZeRO checkpoint of `variant`: one AdamW step on a 32-px input, then save."""
    import os

    # the launcher variables of a one-node world (written out: convert sits below the engine)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )
    import deepspeed
    import torch

    from pretrain.models import create_model

    deepspeed.init_distributed(dist_backend="gloo")
    model = create_model(variant).eval()  # BatchNorm statistics of a batch of one: not needed here
    config = {
        "train_batch_size": world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    loss = engine(torch.randn(1, 3, 32, 32)).float().mean()  # a tiny input: only the step matters
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)


def _make_deepspeed(variant: str, stage: int, out: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ds_worker, args=(2, port, variant, stage, str(out)), nprocs=2, start_method="spawn")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", default="internimage_h")
    p.add_argument("--workdir", default="/tmp/memprobe")
    p.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        help="instead: a real 2-rank ZeRO checkpoint of the variant (use L or smaller on a 24 GB host)",
    )
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        print(json.dumps(_probe(json.loads(args.job))))
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fake = work / "fake.safetensors"
    size = _fake(args.variant, fake)
    print(f"fake {args.variant}: {size / 2**30:.2f} GiB fp32")
    if args.zero_stage:
        _make_deepspeed(args.variant, args.zero_stage, work / "ds")
        jobs = [
            (
                f"ZeRO-{args.zero_stage} (2 ranks) -> official .pth",
                {"op": "convert", "src": work / "ds", "dst": work / "z.pth", "to": "official"},
            ),
            (
                f"ZeRO-{args.zero_stage} (2 ranks) -> safetensors",
                {"op": "convert", "src": work / "ds", "dst": work / "z", "to": "safetensors"},
            ),
        ]
    else:
        jobs = [
            (
                "safetensors -> official .pth",
                {"op": "convert", "src": fake, "dst": work / "a.pth", "to": "official"},
            ),
            (
                "official .pth -> safetensors",
                {"op": "convert", "src": work / "a.pth", "dst": work / "b", "to": "safetensors"},
            ),
            (
                "official .pth -> hf (bf16)",
                {"op": "convert", "src": work / "a.pth", "dst": work / "c", "to": "hf", "dtype": "bf16"},
            ),
            (
                "official .pth -> official .pth (bf16)",
                {
                    "op": "convert",
                    "src": work / "a.pth",
                    "dst": work / "d.pth",
                    "to": "official",
                    "dtype": "bf16",
                },
            ),
            (
                "load_pretrained(official .pth)",
                {"op": "load", "src": work / "a.pth", "variant": args.variant},
            ),
        ]
    print("| conversion | peak RssAnon | peak RSS (VmHWM, incl. mmap page cache) | time |\n|---|---|---|---|")
    for label, job in jobs:
        job = {k: str(v) for k, v in job.items()}
        out = subprocess.run(
            [sys.executable, "-m", "pretrain.convert.memprobe", "--job", json.dumps(job)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        anon = r["RssAnon"] - r["base_anon"] - r.get("model_bytes", 0)
        extra = " (beyond the model itself)" if "model_bytes" in r else ""
        print(
            f"| {label} | {anon / size:.2f}x{extra} | {(r['VmHWM'] - r['base_anon']) / size:.2f}x | {r['seconds']:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
