"""`pretrain bench dcn|ingest|train`: each benchmark lives in its own module with `add_arguments` + `run`."""

from __future__ import annotations

import importlib

BENCHES = {
    "dcn": (
        "pretrain.bench.dcn",
        "DCN block forward/backward: fused kernel vs reference, torch.compile, DCNv4",
    ),
    "ingest": ("pretrain.bench.ingest", "decode + augment throughput per core, Ray pipeline vs bare loop"),
    "train": ("pretrain.bench.train", "train step time, samples/s and MFU"),
    "model": (
        "pretrain.bench.model_check",
        "a DCN backend inside whole models vs the reference: fwd/bwd errors against float64",
    ),
}


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="benchmarks (write tables for BENCHMARKS.md)")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for bench, (module, help_text) in BENCHES.items():
        p = sub.add_parser(bench, help=help_text)
        p.set_defaults(func=_runner(module), _bench_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("pretrain"):
                raise


def _runner(module: str):
    def run(args):
        return importlib.import_module(module).run(args)

    return run
