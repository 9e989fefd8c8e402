"""Every collective the model issues, over an explicit process group.

Context-parallel traffic is counted in `comm_stats` (all-to-alls, the exit gather, all-reduces); the
tensor-parallel gathers of the HiF8 linears are not, like megatron's own TP communication.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from osp_megatron.parallel import comm_stats


def group_size(group) -> int:
    """World size of `group`; 1 for None or when torch.distributed is not initialised."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


# ---------------------------------------------------------------------------------------- all-to-all
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


def uneven_all_to_all(x: torch.Tensor, in_counts: List[int], out_counts: List[int], group) -> torch.Tensor:
    """all_to_all_single over rows of x [sum(in_counts), *F] -> [sum(out_counts), *F] (no autograd)."""
    per_row = x[0].numel() if x.shape[0] else int(torch.tensor(x.shape[1:]).prod())
    out = x.new_empty((sum(out_counts),) + tuple(x.shape[1:]))
    me = dist.get_rank(group)
    sent = sum(c for j, c in enumerate(in_counts) if j != me) * per_row * x.element_size()
    comm_stats.record("all_to_all", x.numel() * x.element_size(), dist.get_world_size(group), sent=sent)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_counts, input_split_sizes=in_counts, group=group)
    return out


def all_to_all_uneven(x: torch.Tensor, in_counts: List[int], out_counts: List[int], group) -> torch.Tensor:
    """Autograd `uneven_all_to_all`; backward is the reverse exchange."""
    return _UnevenAllToAll.apply(x, list(in_counts), list(out_counts), group)


class _UnevenAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_counts, out_counts, group):
        ctx.args = (in_counts, out_counts, group)
        return uneven_all_to_all(x, in_counts, out_counts, group)

    @staticmethod
    def backward(ctx, grad):
        in_counts, out_counts, group = ctx.args
        return uneven_all_to_all(grad.contiguous(), out_counts, in_counts, group), None, None, None


# ---------------------------------------------------------------------------------------- gathers
def all_gather_shards(x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
    """All-gather local shards -> [size, *shape] in group-rank order; backward keeps this rank's slice
    (the result is used replicated downstream)."""
    return _GatherShards.apply(x, group, size, rank)


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.rank = rank
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        comm_stats.record("all_gather", x.numel() * x.element_size() * size, size)
        dist.all_gather_into_tensor(out, x, group=group)
        return out.view((size,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank].contiguous(), None, None, None


def all_gather_rows(x: torch.Tensor, counts: List[int], rank: int, group) -> torch.Tensor:
    """All-gather rows of uneven length: x [counts[rank], *F] -> [sum(counts), *F] in group-rank order (one
    all-to-all); backward keeps this rank's rows (the result is used replicated downstream)."""
    return _GatherRows.apply(x, list(counts), rank, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.start, ctx.n = sum(counts[:rank]), counts[rank]
        size = len(counts)
        return uneven_all_to_all(torch.cat([x] * size), [x.shape[0]] * size, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.n].contiguous(), None, None, None


def all_gather_cat(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Gather equal-shaped tensors from every rank and concatenate along `dim` (no autograd; weights, eval)."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    comm_stats.record("all_gather", x.numel() * x.element_size() * size, size)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def gather_along_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s, ...] per rank -> [s * size, ...] (rank order), allocated on x's device (no autograd, not counted)."""
    out = torch.empty((x.shape[0] * group_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def reduce_scatter_along_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s * size, ...] per rank -> sum over ranks, this rank's [s, ...] slice (no autograd, not counted)."""
    out = torch.empty((x.shape[0] // group_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


# ---------------------------------------------------------------------------------------- all-reduce
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


def sum_value_keep_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Value: the sum of x over `group`; gradient: that of this rank's x only (not counted)."""
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return x + (total - x.detach())
