"""`pretrain eval zero-shot`: zero-shot top-1/top-5 of a checkpoint on a held-out labelled split.

  pretrain eval zero-shot --config configs/tiny_cpu_m3i.yaml --checkpoint runs/tiny_cpu_m3i/checkpoints
  pretrain eval zero-shot --config C --checkpoint CKPT --split data/sample/val/manifest.json

The checkpoint is anything `pretrain.convert` opens (our step directories / checkpoint root with DeepSpeed
shards of any ZeRO stage, a consolidated .pt/.safetensors of the whole objective). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers, name: str) -> None:
    from pretrain.config import add_config_arguments

    parser = subparsers.add_parser(
        name,
        help="evaluate a checkpoint (zero-shot)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL")
    p = sub.add_parser("zero-shot", help="zero-shot classification with class-name prompts")
    add_config_arguments(p, config_help="the run's YAML config (model, data, objective)")
    p.add_argument("--checkpoint", required=True, help="checkpoint root, step directory or consolidated file")
    p.add_argument("--tag", default=None, help="checkpoint tag inside a root (default: latest)")
    p.add_argument(
        "--split", default=None, help="held-out manifest (default: objective.zero_shot.split or val/)"
    )
    p.add_argument("--max-batches", type=int, default=None)
    p.set_defaults(func=run_zero_shot)


def load_objective_weights(objective, checkpoint: str, tag: str | None = None) -> dict:
    """Load every tensor of `checkpoint` into `objective` (strict on the objective's keys).

    Returns {"loaded": n, "format": ...}. Missing keys are an error (a checkpoint of another objective);
    keys the objective lacks are an error too, except buffers that are rebuilt (none today).
    """
    from ..convert.sources import open_source

    src = open_source(checkpoint, tag=tag)
    state = {k.removeprefix("module."): v.load() for k, v in src.tensors.items()}
    result = objective.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the objective: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    return {"loaded": len(state), "format": src.format}


def run_zero_shot(args) -> int:
    import dataclasses

    from ..config import load_config
    from ..data.schema import Manifest
    from ..engine.build import build_model
    from . import build_objective
    from .evaluation import eval_split, zero_shot

    cfg = load_config(args.config, args.overrides)
    split = args.split or eval_split(cfg)
    names = Manifest.load(split, check_shards=False).label_names or []
    model = build_model(cfg)
    objective = build_objective(cfg.objective, model, {"label_names": names, "num_classes": len(names)})
    info = load_objective_weights(objective, args.checkpoint, args.tag)
    if args.max_batches is not None:
        zs = dataclasses.replace(cfg.objective.zero_shot, max_batches=args.max_batches)
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, zero_shot=zs))
    results = zero_shot(objective, cfg, split=split)
    print(json.dumps({"checkpoint": args.checkpoint, "split": split, **info, **results}))
    return 0
