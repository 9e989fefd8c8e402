"""Autograd-aware collectives over an explicit process group (counted in comm_stats)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from osp_megatron.parallel import comm_stats


def all_to_all_equal(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single with equal splits along dim 0 (x.shape[0] divisible by the group size)."""
    return _AllToAll.apply(x, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _a2a(grad, ctx.group), None


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    comm_stats.record("all_to_all", x.numel() * x.element_size(), size)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_gather_cat(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Gather equal-shaped tensors from every rank and concatenate along `dim` (no autograd; inference/eval)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    comm_stats.record("all_gather", x.numel() * x.element_size() * size, size)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd all-reduce (sum); backward all-reduces the gradient."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    comm_stats.record("all_reduce", x.numel() * x.element_size(), dist.get_world_size(group))
    return _AllReduceSum.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None
