"""`pretrain flops MODEL --img-size N` and `pretrain models`."""

from __future__ import annotations

import json


def register(subparsers, name: str) -> None:
    if name == "flops":
        p = subparsers.add_parser(name, help="FLOPs (MACs) and parameters per image, DCN sampling included")
        p.add_argument("model", help="a registered variant, e.g. internimage_t (see `pretrain models`)")
        p.add_argument("--img-size", type=int, default=224, help="square input resolution in pixels")
        p.add_argument("--num-classes", type=int, default=1000)
        p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
        p.set_defaults(func=_flops)
    else:
        p = subparsers.add_parser(name, help="list the registered InternImage variants")
        p.set_defaults(func=_models)


def _flops(args) -> int:
    from .flops import count_flops

    report = count_flops(args.model, args.img_size, num_classes=args.num_classes)
    if args.json:
        print(
            json.dumps(
                {
                    "model": report.model,
                    "img_size": report.img_size,
                    "params": report.params,
                    "macs": report.macs,
                    "flops": report.flops,
                    "train_flops": report.train_flops,
                    "macs_by_kind": report.macs_by_kind,
                }
            )
        )
    else:
        print(report.table())
    return 0


def _models(args) -> int:
    import torch

    from .registry import VARIANTS, create_model

    for name, cfg in VARIANTS.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name).parameters())
        print(
            f"{name:<16} {params / 1e6:>9.2f}M  channels={cfg['channels']} depths={cfg['depths']} groups={cfg['groups']}"
        )
    return 0
