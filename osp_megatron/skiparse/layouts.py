"""Skiparse-2D layouts (OSP-Next), as pure index math on sequence-first tensors.

Tensors are `[s, b, *rest]` (megatron's sequence-first convention). Grid `(T, H, W)` is the latent
grid after patchify; `P` is the Skiparse ratio. H and W are zero-padded to `Hp, Wp`, multiples of
`P^2` (Hp optionally of `P^2 * h_multiple`, so the sequence can be split over Ulysses ranks along
`h''` rows). Layouts (class id -> batch, class members -> sequence; batch order is class-major):

- raster: `(t h w)`, one class.
- token:  class `(p, q) = (h mod P, w mod P)`:
          `(t h' p w' q) b -> (t h' w') (p q b)`
- group:  class `(p1, q1) = (floor(h/P) mod P, floor(w/P) mod P)`:
          `(t h'' p1 p2 w'' q1 q2) b -> (t h'' p2 w'' q2) (p1 q1 b)`

Every class spans all T frames. token<->group is an involution. Padded positions carry position -1
(`positions`) and are masked as keys and excluded from the loss.

Sharding for context parallelism (`shard`): SSP rank `r` of `ssp` owns classes
`[r*G, (r+1)*G)` (G = P^2/ssp) and Ulysses rank `u` of `ulysses` owns the `h''`-row chunk `u`
of every owned class. The same function shards a raster layout along H rows. `LayoutGeometry` holds
these facts for one grid and one context-parallel group (padded grids, local lengths, per-rank positions).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

Grid = Tuple[int, int, int]
LAYOUTS = ("raster", "token", "group")


def num_classes(layout: str, ratio: int) -> int:
    return 1 if layout == "raster" else ratio * ratio


def padded_grid(grid: Sequence[int], ratio: int, h_multiple: int = 1, sparse: bool = True) -> Grid:
    """(T, Hp, Wp): H padded to a multiple of P^2*h_multiple, W of P^2 (sparse); raster only pads H for sharding."""
    t, h, w = (int(v) for v in grid)
    bh = (ratio * ratio if sparse else 1) * h_multiple
    bw = ratio * ratio if sparse else 1
    return t, math.ceil(h / bh) * bh, math.ceil(w / bw) * bw


def pad_raster(x: torch.Tensor, grid: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """[T*H*W, b, *R] -> [T*Hp*Wp, b, *R], zeros at the bottom rows / right columns."""
    t, h, w = grid
    _, hp, wp = padded
    if (h, w) == (hp, wp):
        return x
    rest = x.shape[1:]
    v = x.reshape(t, h, w, *rest)
    out = x.new_zeros(t, hp, wp, *rest)
    out[:, :h, :w] = v
    return out.reshape(t * hp * wp, *rest)


def crop_raster(x: torch.Tensor, grid: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """[T*Hp*Wp, b, *R] -> [T*H*W, b, *R]."""
    t, h, w = grid
    _, hp, wp = padded
    if (h, w) == (hp, wp):
        return x
    rest = x.shape[1:]
    return x.reshape(t, hp, wp, *rest)[:, :h, :w].reshape(t * h * w, *rest)


def raster_to_layout(x: torch.Tensor, padded: Sequence[int], ratio: int, layout: str) -> torch.Tensor:
    """Padded raster [T*Hp*Wp, b, *R] -> layout [S, C*b, *R] (C classes, class-major batch)."""
    if layout == "raster":
        return x
    t, hp, wp = padded
    p = ratio
    b, rest = x.shape[1], x.shape[2:]
    nr = len(rest)
    tail = tuple(range(8, 8 + nr))
    if layout == "token":
        v = x.reshape(t, hp // (p * p), p, p, wp // (p * p), p, p, b, *rest)  # t h'' p1 p w'' q1 q b
        v = v.permute(0, 1, 2, 4, 5, 3, 6, 7, *tail)  # t h'' p1 w'' q1 | p q | b
    elif layout == "group":
        v = x.reshape(t, hp // (p * p), p, p, wp // (p * p), p, p, b, *rest)  # t h'' p1 p2 w'' q1 q2 b
        v = v.permute(0, 1, 3, 4, 6, 2, 5, 7, *tail)  # t h'' p2 w'' q2 | p1 q1 | b
    else:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    return v.reshape(t * hp * wp // (p * p), p * p * b, *rest)


def layout_to_raster(y: torch.Tensor, padded: Sequence[int], ratio: int, layout: str) -> torch.Tensor:
    """Inverse of `raster_to_layout`: [S, C*b, *R] -> padded raster [T*Hp*Wp, b, *R]."""
    if layout == "raster":
        return y
    t, hp, wp = padded
    p = ratio
    b = y.shape[1] // (p * p)
    rest = y.shape[2:]
    nr = len(rest)
    tail = tuple(range(8, 8 + nr))
    v = y.reshape(t, hp // (p * p), p, wp // (p * p), p, p, p, b, *rest)
    if layout == "token":  # t h'' p1 w'' q1 p q b -> t h'' p1 p w'' q1 q b
        v = v.permute(0, 1, 2, 5, 3, 4, 6, 7, *tail)
    elif layout == "group":  # t h'' p2 w'' q2 p1 q1 b -> t h'' p1 p2 w'' q1 q2 b
        v = v.permute(0, 1, 5, 2, 3, 6, 4, 7, *tail)
    else:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    return v.reshape(t * hp * wp, b, *rest)


def token_to_group(y: torch.Tensor, padded: Sequence[int], ratio: int) -> torch.Tensor:
    """token <-> group on one device (an involution): swap (p1,q1) in the sequence with (p2,q2) in the batch."""
    t, hp, wp = padded
    p = ratio
    b = y.shape[1] // (p * p)
    rest = y.shape[2:]
    nr = len(rest)
    tail = tuple(range(8, 8 + nr))
    v = y.reshape(t, hp // (p * p), p, wp // (p * p), p, p, p, b, *rest)  # t h'' A w'' B | C D | b
    v = v.permute(0, 1, 5, 3, 6, 2, 4, 7, *tail)  # t h'' C w'' D | A B | b
    return v.reshape(y.shape)


group_to_token = token_to_group


def to_layout(x: torch.Tensor, grid: Sequence[int], ratio: int, layout: str, h_multiple: int = 1) -> torch.Tensor:
    """Unpadded raster [T*H*W, b, *R] -> layout [S, C*b, *R] (pads H, W first)."""
    padded = padded_grid(grid, ratio, h_multiple, sparse=layout != "raster")
    return raster_to_layout(pad_raster(x, grid, padded), padded, ratio, layout)


def from_layout(y: torch.Tensor, grid: Sequence[int], ratio: int, layout: str, h_multiple: int = 1) -> torch.Tensor:
    """Layout [S, C*b, *R] -> unpadded raster [T*H*W, b, *R]."""
    padded = padded_grid(grid, ratio, h_multiple, sparse=layout != "raster")
    return crop_raster(layout_to_raster(y, padded, ratio, layout), grid, padded)


def positions(grid: Sequence[int], ratio: int, layout: str, h_multiple: int = 1) -> torch.Tensor:
    """Raster index (into the unpadded T*H*W grid) of every layout slot, -1 for padding: long [S, C]."""
    t, h, w = grid
    idx = torch.arange(t * h * w, dtype=torch.long).view(-1, 1)
    padded = padded_grid(grid, ratio, h_multiple, sparse=layout != "raster")
    t_, hp, wp = padded
    full = torch.full((t, hp, wp), -1, dtype=torch.long)
    full[:, :h, :w] = idx.view(t, h, w)
    return raster_to_layout(full.view(-1, 1), padded, ratio, layout)


def valid_mask(grid: Sequence[int], ratio: int, layout: str, h_multiple: int = 1) -> torch.Tensor:
    """bool [S, C]: True where the slot holds a real (unpadded) token."""
    return positions(grid, ratio, layout, h_multiple) >= 0


def shard(
    y: torch.Tensor, padded: Sequence[int], ratio: int, layout: str,
    ssp_rank: int = 0, ssp: int = 1, ulysses_rank: int = 0, ulysses: int = 1,
) -> torch.Tensor:
    """The local shard of a layout tensor [S, C*b, *R] -> [S/U, (C/ssp)*b, *R] (no communication).

    Classes are split over SSP ranks (contiguous), the `h''` rows (raster: H rows) over Ulysses ranks.
    """
    t, hp, wp = padded
    c = num_classes(layout, ratio)
    if c % ssp:
        raise ValueError(f"ssp={ssp} does not divide the {c} classes of the {layout} layout")
    b = y.shape[1] // c
    rest = y.shape[2:]
    g = c // ssp
    if layout == "raster":
        rows, inner = hp, wp
    else:
        rows, inner = hp // (ratio * ratio), ratio * (wp // (ratio * ratio)) * ratio
    if rows % ulysses:
        raise ValueError(f"ulysses={ulysses} does not divide the {rows} row blocks of the padded grid")
    v = y.reshape(t, rows, inner, c, b, *rest)
    r0 = ulysses_rank * (rows // ulysses)
    v = v[:, r0 : r0 + rows // ulysses, :, ssp_rank * g : (ssp_rank + 1) * g]
    return v.reshape(t * (rows // ulysses) * inner, g * b, *rest)


def unshard(
    pieces: List[List[torch.Tensor]], padded: Sequence[int], ratio: int, layout: str
) -> torch.Tensor:
    """Inverse of `shard`: pieces[ssp_rank][ulysses_rank] -> the whole layout tensor [S, C*b, *R]."""
    t, hp, wp = padded
    ssp, ulysses = len(pieces), len(pieces[0])
    c = num_classes(layout, ratio)
    g = c // ssp
    if layout == "raster":
        rows, inner = hp, wp
    else:
        rows, inner = hp // (ratio * ratio), ratio * (wp // (ratio * ratio)) * ratio
    any_piece = pieces[0][0]
    b = any_piece.shape[1] // g
    rest = any_piece.shape[2:]
    cols = []
    for r in range(ssp):
        rows_r = [pieces[r][u].reshape(t, rows // ulysses, inner, g, b, *rest) for u in range(ulysses)]
        cols.append(torch.cat(rows_r, dim=1))
    v = torch.cat(cols, dim=3)
    return v.reshape(t * rows * inner, c * b, *rest)


class LayoutGeometry:
    """Where the slots of every layout of one latent grid sit on a context-parallel group (pure index math).

    CP = `ssp x ulysses` ranks, CP rank = `ssp_rank * ulysses + ulysses_rank`. Sparse layouts: the classes are
    split over the SSP ranks (`shard`), the `h''` row blocks over the Ulysses ranks, so H is padded to a multiple
    of `P^2 * ulysses`. Raster layout: H rows split over all CP ranks (H padded to a multiple of CP only).
    A local shard is `[S_loc, G*b, *R]` with G = `classes_per_rank(layout)` (class-major batch).
    """

    def __init__(self, grid: Sequence[int], ratio: int, ssp: int = 1, ulysses: int = 1):
        self.grid: Grid = tuple(int(v) for v in grid)
        self.ratio, self.ssp, self.ulysses = ratio, ssp, ulysses
        self.cp = ssp * ulysses
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.w_blocks = self.padded("token")[2] // (ratio * ratio)  # `w''` blocks of a sparse layout row
        self._pos: dict = {}

    def h_multiple(self, layout: str) -> int:
        """Row split of a layout: over the Ulysses ranks (sparse layouts) or all CP ranks (raster)."""
        return self.cp if layout == "raster" else self.ulysses

    def padded(self, layout: str) -> Grid:
        return padded_grid(self.grid, self.ratio, self.h_multiple(layout), sparse=layout != "raster")

    def local_len(self, layout: str) -> int:
        t, hp, wp = self.padded(layout)
        return t * hp * wp // num_classes(layout, self.ratio) // self.h_multiple(layout)

    def classes_per_rank(self, layout: str) -> int:
        return num_classes(layout, self.ratio) // (self.ssp if layout != "raster" else 1)

    def _shard_args(self, layout: str, ssp_rank: int, ulysses_rank: int) -> Tuple[int, int, int, int]:
        if layout == "raster":  # rows over every CP rank (one class)
            return 0, 1, ssp_rank * self.ulysses + ulysses_rank, self.cp
        return ssp_rank, self.ssp, ulysses_rank, self.ulysses

    def positions(self, layout: str, ssp_rank: int = 0, ulysses_rank: int = 0) -> torch.Tensor:
        """Raster index of each slot of rank (ssp_rank, ulysses_rank)'s shard, long [S_loc, G] (-1 = padding), CPU."""
        key = (layout, ssp_rank, ulysses_rank)
        if key not in self._pos:
            full = positions(self.grid, self.ratio, layout, self.h_multiple(layout))  # [S, C]
            self._pos[key] = shard(full, self.padded(layout), self.ratio, layout,
                                   *self._shard_args(layout, ssp_rank, ulysses_rank))
        return self._pos[key]

    def shard(self, tokens: torch.Tensor, layout: str, ssp_rank: int = 0, ulysses_rank: int = 0) -> torch.Tensor:
        """Unpadded raster tokens [T*H*W, b, *R] -> rank (ssp_rank, ulysses_rank)'s shard [S_loc, G*b, *R]."""
        y = to_layout(tokens, self.grid, self.ratio, layout, self.h_multiple(layout))
        if self.cp == 1:
            return y
        return shard(y, self.padded(layout), self.ratio, layout, *self._shard_args(layout, ssp_rank, ulysses_rank))

    def unshard(self, pieces: Sequence[torch.Tensor], layout: str) -> torch.Tensor:
        """Every rank's shard, in CP-rank order -> unpadded raster tokens [T*H*W, b, *R]."""
        if self.cp == 1:
            y = pieces[0]
        elif layout == "raster":
            y = unshard([list(pieces)], self.padded(layout), self.ratio, layout)
        else:
            u = self.ulysses
            y = unshard([list(pieces[s * u : (s + 1) * u]) for s in range(self.ssp)], self.padded(layout),
                        self.ratio, layout)
        return from_layout(y, self.grid, self.ratio, layout, self.h_multiple(layout))


class PackedLayout:
    """A layout with the padding taken out: `[n, b, *R]`, the real tokens only, the sample a batch dim and the
    classes one after another along the sequence (ragged lengths).

    Every sample of a micro-batch shares the grid, so one index describes the whole batch: per-sample vectors
    (modulation, gates) broadcast as `[1, b, C]` exactly as on the raster sequence, and no token needs a sample
    index. Built from the positions `[S, G]` of a (local) padded layout: rows are the classes in the order of
    their valid counts (ascending, then class index: classes of equal length adjacent), each class's valid slots
    in the layout's sequence order. `positions` [n]: raster index of every row; `row_class` [n]: its class
    (0..G-1); `segments`: `[(m, n)]`, m consecutive classes of n rows each (the attention problems, each a
    contiguous run of rows).
    """

    def __init__(self, pos: torch.Tensor):
        pos = pos.cpu()
        valid = pos >= 0
        counts = valid.sum(0).tolist()
        self.classes: List[int] = sorted(range(pos.shape[1]), key=lambda c: (counts[c], c))
        self.positions = torch.cat([pos[valid[:, c], c] for c in self.classes])
        self.row_class = torch.cat([torch.full((counts[c],), c, dtype=torch.long) for c in self.classes])
        self.segments: List[Tuple[int, int]] = []
        for c in self.classes:
            if self.segments and self.segments[-1][1] == counts[c]:
                self.segments[-1] = (self.segments[-1][0] + 1, counts[c])
            else:
                self.segments.append((1, counts[c]))

    def __len__(self) -> int:
        return int(self.positions.numel())

    def index_from(self, src: "PackedLayout") -> torch.Tensor:
        """Rows of `src` that make up this layout: `self_x = src_x[index_from(src)]` (both hold the same tokens)."""
        size = int(max(int(src.positions.max()), int(self.positions.max()))) + 1 if len(src) else 0
        inv = torch.full((size,), -1, dtype=torch.long)
        inv[src.positions] = torch.arange(len(src), dtype=torch.long)
        idx = inv[self.positions]
        if len(src) != len(self) or bool((idx < 0).any()):
            raise ValueError("index_from: the two packed layouts do not hold the same tokens")
        return idx


def packed_layout(grid: Sequence[int], ratio: int, layout: str) -> PackedLayout:
    """The padding-free form of `layout` of the whole grid on one device (see `PackedLayout`); raster: the
    identity, one segment."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    return PackedLayout(positions(grid, ratio, layout))
