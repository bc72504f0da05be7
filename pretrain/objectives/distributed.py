"""All-gather with gradients, for contrastive losses whose negatives come from every rank.

Each rank computes the loss of its *local* rows against the gathered global batch, so the logits are
(b_local, B_global): memory grows linearly with the batch. The backward of the gather sums, over ranks, the
gradients every rank's loss sends to a slice and returns this rank's slice; with the engine's gradient
averaging that reproduces the gradient of the single-process loss over the global batch exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on every rank (same b) -> (world·b, ...) in rank order, differentiable; identity on 1 rank."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without a graph (labels, keys, validity)."""
    size = world()[1]
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no graph); returns a new tensor."""
    x = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
