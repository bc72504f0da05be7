"""The training engine: DeepSpeed setup, the train loop, parameter groups and schedule, checkpoint + resume.

    from pretrain.engine import Trainer
    Trainer(load_config("configs/tiny_cpu.yaml")).fit()

`Trainer(config, stream_factory=None, resume=None, on_checkpoint=None)` works under any launcher (or none).
The ZeRO-aware EMA helpers it shares with the objectives live one layer below, in `pretrain.parallel`.
"""

from .checkpoint import CheckpointManager, resolve_resume
from .trainer import NonFiniteLossError, Trainer

__all__ = ["CheckpointManager", "NonFiniteLossError", "Trainer", "resolve_resume"]
