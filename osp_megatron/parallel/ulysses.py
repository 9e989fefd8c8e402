"""Ulysses sequence parallelism: all-to-all between sequence-sharded and head-sharded attention inputs.

Used by full blocks over the whole context-parallel group (or over gcd(heads, CP) ranks, keys and values then
gathered from the other runs: `gather_rows_uneven`), and inside a Skiparse class by the Ulysses part of
SSP x Ulysses. Each call is one all-to-all of a [S_loc, B, h, d] tensor (4 per attention: q, k, v, out).
"""
from __future__ import annotations

import torch

from osp_megatron.parallel.collectives import all_to_all_equal, all_to_all_uneven


def seq_gather_head_scatter(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Ulysses: [S_loc, B, h, d] -> [size*S_loc, B, h/size, d] (sequence gathered in group-rank order)."""
    s, bsz, h, d = x.shape
    if h % size:
        raise ValueError(f"Ulysses over {size} ranks needs the local head count {h} divisible by it")
    send = x.reshape(s, bsz, size, h // size, d).permute(2, 0, 1, 3, 4)
    recv = all_to_all_equal(send, group)  # [src rank, S_loc, B, h/size, d]
    return recv.reshape(size * s, bsz, h // size, d)


def head_gather_seq_scatter(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Inverse Ulysses: [size*S_loc, B, h/size, d] -> [S_loc, B, h, d]."""
    st, bsz, hs, d = x.shape
    send = x.reshape(size, st // size, bsz, hs, d)
    recv = all_to_all_equal(send, group)  # [head chunk j, S_loc, B, h/size, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(st // size, bsz, size * hs, d)


def seq_gather_head_scatter_uneven(x: torch.Tensor, counts, group) -> torch.Tensor:
    """Ulysses on compacted (padding-free) rows: x [n_me, B, h, d] -> [sum(counts), B, h/size, d], where
    counts[j] is rank j's row count (known to every rank); rows arrive in group-rank order."""
    size = len(counts)
    n, bsz, h, d = x.shape
    if h % size:
        raise ValueError(f"Ulysses over {size} ranks needs the local head count {h} divisible by it")
    send = x.reshape(n, bsz, size, h // size, d).permute(2, 0, 1, 3, 4).reshape(size * n, bsz, h // size, d)
    return all_to_all_uneven(send, [n] * size, counts, group)


def head_gather_seq_scatter_uneven(x: torch.Tensor, counts, rank: int, group) -> torch.Tensor:
    """Inverse of `seq_gather_head_scatter_uneven`: [sum(counts), B, h/size, d] -> [counts[rank], B, h, d]."""
    size = len(counts)
    n = counts[rank]
    recv = all_to_all_uneven(x, counts, [n] * size, group)  # [size (head chunk), n, B, h/size, d]
    _, bsz, hs, d = recv.shape
    return recv.reshape(size, n, bsz, hs, d).permute(1, 2, 0, 3, 4).reshape(n, bsz, size * hs, d)



def gather_rows_uneven(x: torch.Tensor, counts, group) -> torch.Tensor:
    """[counts[me], B, h, d] -> [sum(counts), B, h, d], every rank's rows in group-rank order (counts known to all).

    Autograd: the gradient of this rank's rows is the sum of the gradients every rank computed for them."""
    size = len(counts)
    if size == 1:
        return x
    return all_to_all_uneven(torch.cat([x] * size), [x.shape[0]] * size, list(counts), group)
