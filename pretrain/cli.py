"""The `pretrain` command line: one sub-command per area, each registered by its own module.

Every area owns a `commands.py` exposing `register(subparsers)`; this file only lists them, so adding a
command never means editing another area's code. Areas are imported lazily (only the one asked for pays
for its imports: `pretrain flops` should not start Ray).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module that registers it (and its own sub-sub-commands)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "pretrain.engine.commands",
        "train a model from a YAML config (one process or under deepspeed)",
    ),
    "data": ("pretrain.data.commands", "build, inspect and generate corpus shards"),
    "convert": (
        "pretrain.convert.commands",
        "convert checkpoints between ZeRO, consolidated, official, HF, safetensors",
    ),
    "eval": ("pretrain.objectives.commands", "evaluate a checkpoint (zero-shot)"),
    "bench": ("pretrain.bench.commands", "benchmarks: dcn kernel, ingest, train step"),
    "flops": ("pretrain.models.commands", "FLOPs (MACs) and parameters of a model per image"),
    "models": ("pretrain.models.commands", "list the registered model variants"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="InternImage pretraining at scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        importlib.import_module(module).register(sub, name)  # an import error is a real bug: let it show
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
