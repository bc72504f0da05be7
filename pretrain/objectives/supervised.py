"""Plain supervised classification: a linear classifier on the backbone's pooled feature, cross-entropy."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Objective
from .config import ObjectiveConfig
from .metrics import TopK, labelled_rows


class SupervisedObjective(Objective):
    """Cross-entropy on `label` over the rows that are valid and labelled (label in [0, num_classes)).

    The classifier is the model's own `head` when it is a Linear with `num_classes` outputs (so official
    checkpoint keys `head.*` stay meaningful), otherwise a new `classifier` Linear on `model.pooled_dim`.
    Logged terms: `ce` (the loss), `top1` (training accuracy of the batch, over labelled rows).
    """

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, num_classes: int):
        super().__init__()
        if num_classes <= 0:
            raise ValueError("objective 'supervised' needs data_info['num_classes'] > 0")
        self.cfg = cfg
        self.backbone = model
        self.num_classes = num_classes
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear) and head.out_features == num_classes:
            self.classifier = None
        else:
            if isinstance(head, nn.Linear):  # a head of the wrong size would silently stay untrained
                warnings.warn(
                    f"the model's head has {head.out_features} classes but the data has {num_classes}: training "
                    f"a separate {num_classes}-way classifier (set model.num_classes={num_classes} to train the "
                    "model's own head)",
                    stacklevel=2,
                )
            self.classifier = nn.Linear(_pooled_dim(model), num_classes)
            nn.init.trunc_normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> class logits (B, num_classes)."""
        pooled = self.backbone.forward_features(images)["pooled"]
        head = self.backbone.head if self.classifier is None else self.classifier
        return head(pooled)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["image"])
        rows = labelled_rows(batch, self.num_classes)
        if rows.any():
            target = batch["label"][rows]
            loss = F.cross_entropy(
                logits[rows].float(), target, label_smoothing=self.cfg.supervised.label_smoothing
            )
            top1 = (logits[rows].argmax(-1) == target).float().mean()
        else:  # keep every parameter in the graph so DeepSpeed's reducers see a gradient
            loss = logits.sum() * 0.0
            top1 = loss.new_zeros(())
        return {"loss": loss, "ce": loss.detach(), "top1": top1.detach()}

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[dict], label_names: list[str] | None = None, max_batches: int = 0
    ) -> dict[str, float]:
        """Closed-set accuracy of the classifier: {"eval/top1", "eval/top5", "eval/n"} (all ranks reduced).

        `label_names` is accepted for the common hook signature and unused (labels are class indices)."""
        was_training = self.training
        self.eval()
        meter = TopK(self.cfg.zero_shot.topk)
        try:
            for i, batch in enumerate(batches):
                if max_batches and i >= max_batches:
                    break
                rows = labelled_rows(batch, self.num_classes)
                if rows.any():
                    meter.update(self.logits(batch["image"][rows]), batch["label"][rows])
        finally:
            self.train(was_training)
        return meter.result("eval")


def _pooled_dim(model: nn.Module) -> int:
    dim = getattr(model, "pooled_dim", None) or getattr(model, "num_features", None)
    if not dim:
        raise ValueError("the model must expose `pooled_dim` (or `num_features`)")
    return int(dim)
