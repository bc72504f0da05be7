"""`pretrain convert SRC DST [--to FORMAT] [--dtype fp32|bf16|fp16] [--model VARIANT] [--prefix P] ...`"""

from __future__ import annotations

import json
import sys

FORMAT_HELP = (
    "official: .pth with weights under 'model' (official keys); hf: directory in the HF port's layout; "
    "safetensors: X.safetensors or a directory with model.safetensors + config.json; consolidated: a flat "
    "torch state dict of the whole module; universal: DeepSpeed universal checkpoint (resume on another "
    "world size). Default: from DST's suffix (.pth, .safetensors, .pt/.bin)."
)


def register(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name,
        help="convert checkpoints between ZeRO, consolidated, official, HF, safetensors, universal",
        description="Convert a checkpoint. SRC: a DeepSpeed checkpoint directory (any ZeRO stage and world "
        "size: the run root with 'latest', a global_stepN/ directory, our step directory, or a universal "
        "checkpoint), an official .pth, an HF directory, safetensors (file or directory) or a consolidated "
        ".pt. Every key "
        "and shape is checked against the model; DST is written under a temporary name and renamed at the end.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--to", choices=("official", "hf", "safetensors", "consolidated", "universal"), help=FORMAT_HELP
    )
    p.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="cast floating tensors (default: as stored)"
    )
    p.add_argument(
        "--model",
        metavar="VARIANT",
        help="the variant the checkpoint must be (e.g. internimage_h); default: the file's own "
        "record, else detected among the registered variants",
    )
    p.add_argument(
        "--model-kwargs",
        metavar="JSON",
        type=json.loads,
        help='overrides of the variant\'s options, e.g. \'{"channels": 16, "depths": [1, 1, 2, 1]}\'',
    )
    p.add_argument(
        "--prefix",
        metavar="P",
        help="key prefix of the backbone inside a DeepSpeed/consolidated checkpoint (default: auto, "
        "'backbone.' for our Objective); with --to consolidated, extract only that backbone",
    )
    p.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the 'latest' file, else the newest)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle non-tensor objects in torch files (only for files you trust)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from .api import convert
    from .tensors import ConvertError

    try:
        report = convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            model=args.model,
            model_kwargs=args.model_kwargs,
            prefix=args.prefix,
            tag=args.tag,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            progress=not args.quiet,
        )
    except ConvertError as err:
        print(f"pretrain convert: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(report.summary())
    return 0
