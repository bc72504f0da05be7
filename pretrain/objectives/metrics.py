"""Small helpers shared by the objectives: labelled-row selection and top-k accuracy across ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def labelled_rows(batch: dict, num_classes: int) -> torch.Tensor:
    """(B,) bool: valid rows whose label is a class index in [0, num_classes)."""
    label = batch["label"]
    rows = (label >= 0) & (label < num_classes)
    valid = batch.get("valid")
    if valid is not None:
        rows = rows & valid.to(rows.device, torch.bool)
    return rows


class TopK:
    """Accumulates top-k hits over batches; `result` all-reduces the counts when a process group is up."""

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(int(k) for k in ks)
        self.hits = torch.zeros(len(self.ks), dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (N, C), target (N,) long."""
        if logits.numel() == 0:
            return
        kmax = min(max(self.ks), logits.shape[-1])
        top = logits.float().topk(kmax, dim=-1).indices
        hit = top == target[:, None]
        for i, k in enumerate(self.ks):
            self.hits[i] += hit[:, : min(k, kmax)].any(-1).sum().item()
        self.n += target.numel()

    def result(self, prefix: str) -> dict[str, float]:
        counts = torch.cat([self.hits, self.n[None]])
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        n = counts[-1].item()
        out = {f"{prefix}/top{k}": (counts[i].item() / n if n else 0.0) for i, k in enumerate(self.ks)}
        out[f"{prefix}/n"] = n
        return out
