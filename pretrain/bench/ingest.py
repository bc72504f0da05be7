"""`pretrain bench ingest`: decoded + augmented samples/s per CPU core, Ray pipeline vs a bare decode loop.

Modes, each in its own fresh process so peak memory is its own:
  bare   one process, a plain loop: read the shard rows, decode_views + batch normalise (the floor cost);
  arrow  the plain reader (`Stream`, num_workers threads) on the same cores;
  ray    the Ray Data reader (`RayStream`, num_workers decode actors of 1 CPU) on a local Ray instance.
Per mode: wall-clock samples/s (and per core = / workers), and samples per CPU-second of the process and
all its descendants (Ray's raylet, GCS and workers included): on a shared machine the CPU-time figure is the
per-core rate the code would reach on a free core, the wall figure what this machine gave.
Images come from a generated corpus of JPEGs at --image-px (img2dataset-like sizes), so the numbers do not
depend on a download. Prints a Markdown table for BENCHMARKS.md and a JSON line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import threading
import time


def add_arguments(parser) -> None:
    parser.add_argument(
        "--corpus", default=None, help="manifest to read (default: generate one under --workdir)"
    )
    parser.add_argument("--workdir", default="runs/bench_ingest", help="where the generated corpus goes")
    parser.add_argument(
        "--num", type=int, default=2000, help="images in the generated corpus (one epoch is timed)"
    )
    parser.add_argument("--image-px", type=int, default=384, help="side of the generated JPEGs")
    parser.add_argument("--size", type=int, default=224, help="output crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="cores (threads / Ray actors) per pipeline")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["bare", "arrow", "ray"], choices=["bare", "arrow", "ray"]
    )


def _make_corpus(workdir: str, num: int, px: int) -> str:
    """JPEGs at px x px: the sample renderer at 96 px, upscaled (bicubic) with fresh noise, quality 90."""
    import io

    import numpy as np
    from PIL import Image

    from pretrain.data import storage
    from pretrain.data.sample import caption_for, render
    from pretrain.data.schema import MANIFEST_NAME, Manifest, empty_columns, write_shard

    out = os.path.join(workdir, f"corpus_{px}px_{num}")
    url = os.path.join(out, MANIFEST_NAME)
    if storage.exists(url):
        return url
    rng = np.random.default_rng(0)
    shards, cols = [], empty_columns()
    for i in range(num):
        small, attrs = render(rng, 96)
        big = np.asarray(Image.fromarray(small).resize((px, px), Image.BICUBIC), np.float32)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=90)
        for k, v in (
            ("key", f"b{i:06d}"),
            ("image", buf.getvalue()),
            ("caption", caption_for(attrs, rng)),
            ("label", 0),
            ("source", "bench"),
            ("width", px),
            ("height", px),
            ("meta", None),
        ):
            cols[k].append(v)
        if len(cols["key"]) == 500 or i == num - 1:
            shards.append(write_shard(os.path.join(out, f"shard-{len(shards):05d}.parquet"), cols, 100))
            cols = empty_columns()
    return Manifest(name="bench", shards=shards, label_names=["x"]).save(url)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and all its live descendants (Ray's raylet and workers)."""
    import psutil

    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _peak_rss_mib(children: bool) -> float:
    import psutil

    procs = [psutil.Process()]
    if children:
        procs += psutil.Process().children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _measure(
    mode: str, manifest: str, size: int, views: int, batch: int, samples: int, workers: int, q
) -> None:
    """One mode in a fresh process: time one epoch from the first delivered batch (warm-up excluded)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pretrain.data import DataConfig, SourceConfig, build_stream

    cfg = DataConfig(
        sources=[SourceConfig("bench", manifest)],
        image_size=size,
        views=views,
        batch_size=batch,
        num_workers=workers,
        reader="ray" if mode == "ray" else "arrow",
        ray_num_cpus=1.0,
    )
    peak = [0.0]
    stop = threading.Event()

    def sample_memory():
        while not stop.is_set():
            peak[0] = max(peak[0], _peak_rss_mib(children=mode == "ray"))
            time.sleep(0.2)

    threading.Thread(target=sample_memory, daemon=True).start()
    if mode == "bare":
        import pyarrow.parquet as pq

        from pretrain.data.schema import Manifest
        from pretrain.data.transforms import decode_views, normalizer

        m = Manifest.load(manifest)
        norm = normalizer(cfg.augment)
        data = []
        for i in range(len(m.shards)):
            data += pq.read_table(m.shard_url(i), columns=["image"]).column("image").to_pylist()
        rng = np.random.default_rng(0)
        out = np.empty((batch, views, 3, size, size), np.uint8)
        done, t0 = 0, None
        idx = 0
        while done < samples:
            for v_out in range(batch):
                out[v_out], _ = decode_views(data[idx % len(data)], size, views, cfg.augment, rng)
                idx += 1
            for v in range(views):
                norm(out[:, v])
            if t0 is None:
                t0, c0 = time.perf_counter(), _cpu_seconds()  # first batch is the warm-up
            else:
                done += batch
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    else:
        if mode == "ray":
            import ray

            ray.init(
                num_cpus=workers + 1,
                object_store_memory=512 * 2**20,
                include_dashboard=False,
                log_to_driver=False,
            )
        stream = build_stream(cfg, rank=0, world_size=1, seed=0)
        done, t0 = 0, None
        for b in stream:  # exactly one epoch: everything the pipeline decodes is consumed and counted
            if t0 is None:
                t0, c0 = time.perf_counter(), _cpu_seconds()
            else:
                done += int(b["valid"].sum())
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if mode == "ray":
            peak[0] = max(peak[0], _peak_rss_mib(children=True))
            ray.shutdown()
    stop.set()
    peak[0] = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    q.put(
        {
            "mode": mode,
            "views": views,
            "samples": done,
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "per_s": done / elapsed,
            "per_core_s": done / elapsed / workers,
            "per_cpu_s": done / cpu,
            "peak_rss_mib": peak[0],
        }
    )


def run(args) -> int:
    manifest = args.corpus or _make_corpus(args.workdir, args.num, args.image_px)
    from pretrain.data.schema import Manifest

    samples = (
        Manifest.load(manifest).num_rows - args.batch_size
    )  # what a stream delivers after its first batch
    ctx = mp.get_context("spawn")
    results = []
    for views in args.views:
        for mode in args.modes:
            q = ctx.Queue()
            p = ctx.Process(
                target=_measure,
                args=(mode, manifest, args.size, views, args.batch_size, samples, args.workers, q),
            )
            p.start()
            res = q.get()
            p.join()
            results.append(res)
            print(json.dumps(res), flush=True)
    load = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible, load average {load[0]:.1f} at the end; workers={args.workers}, "
        f"{args.image_px}px JPEG -> {args.size}px, batch {args.batch_size}\n"
    )
    print(
        "| views | mode | samples/s (wall) | per core (wall) | per CPU-second | vs bare (wall / CPU) | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        bare = next((b for b in results if b["mode"] == "bare" and b["views"] == r["views"]), None)
        rel = (
            f"{r['per_s'] / bare['per_s']:.0%} / {r['per_cpu_s'] / bare['per_cpu_s']:.0%}" if bare else "n/a"
        )
        print(
            f"| {r['views']} | {r['mode']} | {r['per_s']:.0f} | {r['per_core_s']:.0f} | {r['per_cpu_s']:.0f} "
            f"| {rel} | {r['peak_rss_mib']:.0f} |"
        )
    return 0
