"""`pretrain train --config X [--set k=v ...] [--resume auto|PATH] [--output-dir DIR]`.

The same command runs as one process (it creates a world of one) and under the `deepspeed` launcher (which
sets RANK/WORLD_SIZE/MASTER_* and passes `--local_rank`, accepted and ignored here).
"""

from __future__ import annotations

import argparse
import signal
import sys


def register(subparsers, name: str) -> None:
    from pretrain.config import add_config_arguments

    p = subparsers.add_parser(
        name,
        help="train a model from a YAML config (one process or under deepspeed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, required=False)
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (the run's latest checkpoint, if any) or a checkpoint path (step dir or root)",
    )
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--describe-config", action="store_true", help="print every config key with its doc and exit"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def resolved_config(args):
    from pretrain.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def config_error(err: Exception) -> int:
    """One line naming the key or file, exit 2 (every rank prints the same line under a launcher)."""
    print("pretrain train: config error: " + " ".join(str(err).split()), file=sys.stderr)
    return 2


def run(args) -> int:
    from pretrain.config import ConfigError, describe, dump_config

    if args.describe_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = resolved_config(args)
    except ConfigError as err:
        return config_error(err)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from .dist import CollectiveTimeoutError, ExtensionLockError
    from .trainer import Trainer

    try:
        summary = Trainer(cfg, resume=args.resume).fit()
    except ConfigError as err:  # found at start-up: a model option, a manifest, --resume, the DeepSpeed JSON
        return config_error(err)
    except (CollectiveTimeoutError, ExtensionLockError) as err:  # a frozen rank; a stale JIT-build lock
        print("pretrain train: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    reason = summary["reason"]
    if reason.startswith("signal "):  # interrupted after saving: the usual 128 + signal number
        return 128 + int(getattr(signal, reason.split()[1]))
    return 0
