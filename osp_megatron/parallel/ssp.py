"""Sparse Sequence Parallelism: the token <-> group switch as one all-to-all (OSP-Next §3.3).

Each SSP rank owns G = P^2/S whole Skiparse classes. A local shard is `[S_loc, G*b, *R]` whose
sequence axis is whole `(t, h'')` units of `(A, w'', B)` (A, B = the in-class sub-positions), so the
switch needs no sequence gather:

1. local split: view `[units, A, w'', B, G, b, R]`; the pieces with sub-position (A, B) belong to
   target class c' = A*P + B on SSP rank c' // G;
2. one `all_to_all_single` over the SSP group;
3. local merge: the received source classes (j*G + i) become the new in-class sub-positions.

The map is an involution, so group -> token is the same call; backward is the same exchange
(all-to-all's adjoint). With S = 1 it is the single-device `skiparse.token_to_group`.
Under SSP the sequence plan uses the padding-free `exchange.TokenExchange` (same routing, valid tokens
only); this reshape form serves one device and TP sequence-parallel chunks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from osp_megatron.parallel import comm_stats
from osp_megatron.parallel.collectives import all_to_all_equal


def switch_token_group(x: torch.Tensor, ratio: int, w_blocks: int, group=None) -> torch.Tensor:
    """token <-> group for a local shard [S_loc, G*b, *R] (G = P^2 / SSP size)."""
    p = ratio
    s = 1 if group is None else dist.get_world_size(group)
    g = p * p // s
    b = x.shape[1] // g
    rest = x.shape[2:]
    nr = len(rest)
    units = x.shape[0] // (p * w_blocks * p)
    v = x.reshape(units, p, w_blocks, p, g, b, *rest)  # units A w'' B | G b
    tail = tuple(range(6, 6 + nr))
    if s == 1:
        # single device: batch class index (C, D) <-> sequence sub-position (A, B)
        v = x.reshape(units, p, w_blocks, p, p, p, b, *rest)  # units A w'' B C D b
        t7 = tuple(range(7, 7 + nr))
        return v.permute(0, 4, 2, 5, 1, 3, 6, *t7).reshape(x.shape)
    send = v.permute(1, 3, 0, 2, 4, 5, *tail).reshape(s, g, units, w_blocks, g, b, *rest)  # (dst rank, dst cls)
    with comm_stats.scope("sparse"):
        recv = all_to_all_equal(send, group)  # [src rank j, my cls, units, w'', src cls i, b, R]
    recv = recv.permute(2, 0, 4, 3, 1, 5, *tail)  # units j i w'' G_dst b
    recv = recv.reshape(units, p, p, w_blocks, g, b, *rest)  # units C D w'' G b
    out = recv.permute(0, 1, 3, 2, 4, 5, *tail)  # units C w'' D G b
    return out.reshape(units * p * w_blocks * p, g * b, *rest)
