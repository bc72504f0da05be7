"""The training engine: DeepSpeed setup, the train loop, parameter groups and schedule, checkpoint + resume.

    from pretrain.engine import Trainer
    Trainer(load_config("configs/tiny_cpu.yaml")).fit()

`Trainer(config, stream_factory=None, resume=None, on_checkpoint=None)` works under any launcher (or none);
`local_shard` / `ema_update_` are the ZeRO-3-safe helpers for EMA teachers (see ema.py).
"""

from .checkpoint import CheckpointManager, resolve_resume
from .ema import TeacherEMA, WeightEMA, ema_update_, local_shard
from .trainer import NonFiniteLossError, Trainer

__all__ = [
    "CheckpointManager",
    "NonFiniteLossError",
    "Trainer",
    "TeacherEMA",
    "WeightEMA",
    "ema_update_",
    "local_shard",
    "resolve_resume",
]
