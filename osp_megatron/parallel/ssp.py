"""Sparse Sequence Parallelism: the token <-> group switch (OSP-Next §3.3), chosen in one place.

`token_group_switch(...)` returns this rank's switch, `x [S_loc, G*b, *R] -> [S_loc', G*b, *R]`, as one of:

- `PaddedSwitch`: whole padded shards, on one device (a local permute) or on TP sequence-parallel chunks
  (one equal-split `all_to_all_single` over the SSP group);
- `exchange.TokenExchange`: under SSP on whole shards, the padding-free exchange (one uneven all-to-all
  that moves exactly the valid tokens; padding arrives as zeros).

The padded form: each SSP rank owns G = P^2/S whole Skiparse classes and a shard's sequence axis is whole
`(t, h'')` units of `(A, w'', B)` (A, B = the in-class sub-positions), so the switch needs no sequence gather:

1. local split: view `[units, A, w'', B, G, b, R]`; the pieces with sub-position (A, B) belong to
   target class c' = A*P + B on SSP rank c' // G;
2. one `all_to_all_single` over the SSP group;
3. local merge: the received source classes (j*G + i) become the new in-class sub-positions.

The map is an involution, so group -> token is the same call; backward is the same exchange
(all-to-all's adjoint). With S = 1 it is the single-device `skiparse.token_to_group`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from osp_megatron.parallel.collectives import all_to_all_equal
from osp_megatron.parallel.exchange import TokenExchange
from osp_megatron.parallel.groups import ContextParallel
from osp_megatron.skiparse import LayoutGeometry


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
    recv = all_to_all_equal(send, group)  # [src rank j, my cls, units, w'', src cls i, b, R]
    recv = recv.permute(2, 0, 4, 3, 1, 5, *tail)  # units j i w'' G_dst b
    recv = recv.reshape(units, p, p, w_blocks, g, b, *rest)  # units C D w'' G b
    out = recv.permute(0, 1, 3, 2, 4, 5, *tail)  # units C w'' D G b
    return out.reshape(units * p * w_blocks * p, g * b, *rest)


class PaddedSwitch:
    """token <-> group on whole padded shards (a local permute, or one equal-split all-to-all over `group`)."""

    def __init__(self, ratio: int, w_blocks: int, group=None):
        self.ratio, self.w_blocks, self.group = ratio, w_blocks, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return switch_token_group(x, self.ratio, self.w_blocks, self.group)


def token_group_switch(geometry: LayoutGeometry, cp: ContextParallel, sp_size: int, src: str, dst: str,
                       device) -> Callable[[torch.Tensor], torch.Tensor]:
    """This rank's `src` -> `dst` switch (token <-> group) for `geometry`'s grid under `cp` (see module doc)."""
    if {src, dst} != {"token", "group"}:
        raise ValueError(f"the SSP switch goes token <-> group, not {src} -> {dst}")
    if cp.ssp == 1 or sp_size > 1:  # local, or on sequence-parallel chunks (padded exchange)
        return PaddedSwitch(geometry.ratio, geometry.w_blocks, cp.ssp_group if cp.ssp > 1 else None)
    u = cp.ulysses_rank
    return TokenExchange([geometry.positions(src, j, u) for j in range(cp.ssp)],
                         [geometry.positions(dst, j, u) for j in range(cp.ssp)],
                         cp.ssp_rank, cp.ssp_group, geometry.num_tokens, device)
