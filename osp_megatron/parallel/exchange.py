"""Padding-free token exchange between two sharded layouts: one `all_to_all_single` with uneven splits.

Both layouts are described by global positions (raster index of every local slot on every rank of the
group, -1 for padding), so every rank computes the same routing without communication: each valid token
is sent once, from its slot in the source shard straight to its slot in the destination shard; padding
never travels and arrives as zeros. Used for the SSP token <-> group switch, where it moves exactly the
valid tokens (the padded H rows of 720P would otherwise add 6.7% to every switch), between padded shards or
between packed ones (`plan.TokenPlacement` with padding_free: positions [n, 1], no padding slot at all).
Backward is the reverse exchange.
"""
from __future__ import annotations

from typing import Sequence

import torch

from osp_megatron.parallel.collectives import uneven_all_to_all


class TokenExchange:
    """Routing for `src` shards -> `dst` shards over `group` (positions: one [S, G] long tensor per group rank)."""

    def __init__(self, src_pos: Sequence[torch.Tensor], dst_pos: Sequence[torch.Tensor], rank: int, group,
                 num_tokens: int, device):
        size = len(src_pos)
        dst_rank_of = torch.full((num_tokens,), -1, dtype=torch.long)
        dst_row_of = torch.full((num_tokens,), -1, dtype=torch.long)
        for r, pos in enumerate(dst_pos):
            flat = pos.reshape(-1).cpu()
            keep = flat >= 0
            dst_rank_of[flat[keep]] = r
            dst_row_of[flat[keep]] = torch.arange(flat.numel())[keep]
        mine = src_pos[rank].reshape(-1).cpu()
        rows = torch.arange(mine.numel())[mine >= 0]
        ids = mine[mine >= 0]
        order = torch.argsort(dst_rank_of[ids] * num_tokens + dst_row_of[ids])
        self.send_rows = rows[order].to(device)
        self.send_counts = torch.bincount(dst_rank_of[ids], minlength=size).tolist()
        recv_rows, recv_counts = [], []
        for j in range(size):
            src = src_pos[j].reshape(-1).cpu()
            src = src[src >= 0]
            sel = src[dst_rank_of[src] == rank]
            recv_rows.append(torch.sort(dst_row_of[sel]).values)
            recv_counts.append(int(sel.numel()))
        self.recv_rows = torch.cat(recv_rows).to(device)
        self.recv_counts = recv_counts
        self.src_rows = src_pos[rank].numel()
        self.dst_rows = dst_pos[rank].numel()
        self.src_classes = src_pos[rank].shape[1]
        self.dst_classes = dst_pos[rank].shape[1]
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [S_src, G_src*b, *R] -> [S_dst, G_dst*b, *R] (padding slots zero)."""
        b = x.shape[1] // self.src_classes  # (a shard may hold no token at all: packed, past the last real row)
        rows = x.reshape(self.src_rows, b, *x.shape[2:])
        out = _Exchange.apply(rows, self)
        return out.reshape(self.dst_rows // self.dst_classes, self.dst_classes * b, *x.shape[2:])


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, ex: TokenExchange):
        ctx.ex = ex
        recv = uneven_all_to_all(rows.index_select(0, ex.send_rows), ex.send_counts, ex.recv_counts, ex.group)
        out = rows.new_zeros((ex.dst_rows,) + tuple(rows.shape[1:]))
        out.index_copy_(0, ex.recv_rows, recv)
        return out

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.ex
        back = uneven_all_to_all(grad.index_select(0, ex.recv_rows), ex.recv_counts, ex.send_counts, ex.group)
        g = grad.new_zeros((ex.src_rows,) + tuple(grad.shape[1:]))
        g.index_copy_(0, ex.send_rows, back)
        return g, None
