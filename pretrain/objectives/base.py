"""The contract between objectives and the engine.

An `Objective` owns every trainable module of a run (backbone, heads, text tower, predictor) so that the
engine hands exactly one `nn.Module` to DeepSpeed. Modules that are *not* trained by the optimizer (EMA
target encoders) are registered by the objective in `frozen_module_names()` and updated in `on_step_end`.
The trainer calls every method below directly: a subclass implements `forward` and overrides only the
hooks it needs; the defaults do nothing.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
from torch import nn


class Objective(nn.Module, abc.ABC):
    """Base class. Subclasses set `self.backbone` (an InternImage) and implement `forward`.

    `forward(batch) -> dict[str, Tensor]`: must contain `"loss"` (a scalar that backward is called on); every
    other entry is a detached scalar logged as `loss/<name>` (one per loss term, plus accuracies etc.).

    Batch layout: see `pretrain.data.cursor.Stream` (the schema every stream delivers).
    Parameters and buffers are saved by DeepSpeed with the module (`state_dict()`); per-rank extras go
    through `rank_state` / `load_rank_state`.
    """

    backbone: nn.Module

    @abc.abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The losses dict of one micro-batch (see the class docstring)."""

    def evaluate(
        self, batches: Iterable[dict], label_names: list[str] | None = None, max_batches: int = 0
    ) -> dict[str, float]:
        """Held-out metrics over `batches` (every rank calls it; counts are reduced across ranks), named
        `<group>/<metric>`. The default has no evaluation and returns {} (nothing is logged)."""
        return {}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimizer step (EMA updates, temperature clamps)."""

    def frozen_module_names(self) -> tuple[str, ...]:
        """Names of submodules excluded from the optimizer (e.g. an EMA teacher)."""
        return ()

    def rank_state(self) -> dict:
        """This rank's state that is not in the module's parameters (e.g. an fp32 EMA master); the engine saves
        it with the rank's trainer state and hands it back to `load_rank_state` on resume."""
        return {}

    def load_rank_state(self, state: dict) -> str | None:
        """Restore `rank_state()`; may return a warning for the log (e.g. state that no longer fits)."""
        return None
