"""`pretrain data sample|build|inspect|tokenizer`: the corpus command line (thin; logic lives in the modules)."""

from __future__ import annotations

import importlib
import json


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="build, inspect and generate corpus shards")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser("sample", help="write the synthetic sample corpus (train + labelled val split)")
    p.add_argument("out_dir", help="output folder or URL (writes OUT/train and OUT/val)")
    p.add_argument("--num", type=int, default=2000, help="training samples (default 2000)")
    p.add_argument("--num-val", type=int, default=None, help="held-out labelled samples (default num/5)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[64],
        metavar="PX",
        help="image side, or MIN MAX for random sizes (default 64)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--row-group-rows", type=int, default=100)
    p.add_argument("--caption-prob", type=float, default=1.0, help="fraction of train samples with a caption")
    p.add_argument("--label-prob", type=float, default=1.0, help="fraction of train samples with a label")
    p.add_argument(
        "--label-by",
        choices=["color", "shape", "texture", "count"],
        default="color",
        help="the attribute that is the label (default color: learnable by tiny models in minutes on CPU)",
    )
    p.set_defaults(func=_sample)

    p = sub.add_parser("build", help="convert an image folder, img2dataset output or a CSV/TSV into shards")
    _lazy_arguments(p, "pretrain.data.builders")
    p.set_defaults(func=_lazy_run("pretrain.data.builders"))

    p = sub.add_parser(
        "inspect", help="summarise a manifest (rows, shards, stats, labels) and print its first rows"
    )
    p.add_argument("manifest", help="manifest URL or the corpus folder")
    p.add_argument("--rows", type=int, default=0, help="also print the first N rows' key/label/caption")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("tokenizer", help="train/inspect the caption tokenizer (pretrain.text)")
    try:
        importlib.import_module("pretrain.text.commands").add_arguments(p)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("pretrain"):
            raise
    p.set_defaults(func=_tokenizer)


def _lazy_arguments(parser, module: str) -> None:
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("pretrain"):
            raise


def _lazy_run(module: str):
    def run(args):
        return importlib.import_module(module).run(args)

    return run


def _sample(args) -> int:
    import time

    from .sample import make_sample_corpus

    size = args.size[0] if len(args.size) == 1 else (args.size[0], args.size[1])
    t0 = time.perf_counter()
    train = make_sample_corpus(
        args.out_dir,
        num=args.num,
        size=size,
        seed=args.seed,
        num_val=args.num_val,
        shard_rows=args.shard_rows,
        row_group_rows=args.row_group_rows,
        caption_prob=args.caption_prob,
        label_prob=args.label_prob,
        label_by=args.label_by,
    )
    print(f"wrote {train} (+ val split next to it) in {time.perf_counter() - t0:.1f}s")
    return 0


def _inspect(args) -> int:
    from .schema import Manifest

    m = Manifest.load(args.manifest)
    print(
        json.dumps(
            {
                "manifest": m.url,
                "name": m.name,
                "rows": m.num_rows,
                "shards": len(m.shards),
                "bytes": sum(s.bytes for s in m.shards),
                "label_names": m.label_names,
                "stats": m.stats,
            },
            indent=1,
        )
    )
    if args.rows:
        from . import storage

        shown = 0
        for i in range(len(m.shards)):
            t = storage.read_parquet(m.shard_url(i), columns=["key", "label", "caption", "width", "height"])
            for r in t.slice(0, args.rows - shown).to_pylist():
                print(json.dumps(r))
                shown += 1
            if shown >= args.rows:
                break
    return 0


def _tokenizer(args) -> int:
    try:
        mod = importlib.import_module("pretrain.text.commands")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("pretrain"):
            raise
        print("pretrain data tokenizer: not available (pretrain.text.commands is missing)")
        return 2
    return mod.run(args)
