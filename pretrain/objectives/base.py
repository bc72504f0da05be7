"""The contract between objectives and the engine.

An `Objective` owns every trainable module of a run (backbone, heads, text tower, predictor) so that the
engine hands exactly one `nn.Module` to DeepSpeed. Modules that are *not* trained by the optimizer (EMA
target encoders) are registered by the objective in `frozen_module_names()` and updated in `on_step_end`.
"""

from __future__ import annotations

import torch
from torch import nn


class Objective(nn.Module):
    """Base class. Subclasses set `self.backbone` (an InternImage) and implement `forward`.

    `forward(batch) -> dict[str, Tensor]`: must contain `"loss"` (a scalar that backward is called on); every
    other entry is a detached scalar logged as `loss/<name>` (one per loss term, plus accuracies etc.).

    Batch layout (produced by `pretrain.data`): `image` float (B, 3, S, S) normalised, view 0;
    `image2` (B, 3, S, S) a second augmented view when the data config asks for two views;
    `view_boxes` float (B, V, 5): each view's crop box (x0, y0, x1, y1) in [0, 1] coordinates of the
    original image and a horizontal-flip flag; `label` long (B,), -1 when the sample has no label;
    `caption` list[str] ("" when none) and `has_caption` bool (B,); `source` long (B,); `valid` bool (B,).
    """

    backbone: nn.Module

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

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
