"""Padding-free Skiparse attention, with the dense kernel injected.

`kernel(q, k, v) -> o` is any dense attention over whole sequences, `[B, S, h, d] -> [B, S, h, d]`, no mask
(torch SDPA, flash-attn, TransformerEngine, ... : `models/core_attention.py`). Padding never enters it:
the valid slots of every attention problem are gathered first and problems of equal length run as one
dense batch; padding slots come back as zeros.

- `AttentionProblems.from_positions(positions [S, G], kind)`: the problems of a sequence `[S, G*b, h, d]`
  (G classes in the batch axis, class-major): kind `sparse`: one per class (its valid slots); kind `full`:
  one per sample (every valid slot of all G classes; no gather at all when every slot is valid).
- `grouped_attention(q, k, v, problems, kernel)`: the attention of those problems, `[S, G*b, h, d]` in and out.
- `SkiparseAttention(kernel)`: the same as a raster-in / raster-out op (`[N, b, h, d]`, raster `(t h w)`),
  the layout rearrangement fused into the row gathers; equals dense attention under the class-equality mask.
- `row_gather` / `row_scatter`: row copies with unique indices (autograd: copy back, no accumulation);
  `row_permute`: a permutation of rows (autograd: the inverse permutation).
- Packed sequences (`layouts.PackedLayout`, `[N, b, h, d]`, classes along the sequence):
  `AttentionProblems.from_segments(layout.segments)`; each run of equal-length classes is one kernel call on a
  view of the rows (no gather, no scatter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from osp_megatron.skiparse.layouts import positions as layout_positions

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Groups = List[Tuple[torch.Tensor, torch.Tensor]]


class _RowGather(torch.autograd.Function):
    """x[idx] for unique row indices; backward copies the gradient back (no atomics, no sort)."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        gx = grad.new_zeros((ctx.rows, grad.shape[1]))
        gx.index_copy_(0, idx, grad)
        return gx, None


class _RowScatter(torch.autograd.Function):
    """zeros(rows, C) with src copied into rows idx (unique); padding rows stay zero."""

    @staticmethod
    def forward(ctx, src, idx, rows):
        ctx.save_for_backward(idx)
        out = src.new_zeros((rows, src.shape[1]))
        out.index_copy_(0, idx, src)
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.index_select(0, idx), None, None


class _RowPermute(torch.autograd.Function):
    """x[idx] for a permutation idx of x's rows (inverse `inv`); backward is the inverse gather (no zero fill)."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def row_permute(x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x [R, *] -> x[idx] for a permutation idx of range(R) with inverse inv (inv[idx] = arange)."""
    return _RowPermute.apply(x, idx, inv)


def row_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [R, C], unique idx [n] -> x[idx] [n, C]."""
    return _RowGather.apply(x, idx)


def row_scatter(src: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """src [n, C], unique idx [n] -> [rows, C], zero where no row of src lands."""
    return _RowScatter.apply(src, idx, rows)


@dataclass
class AttentionProblems:
    """The independent attention problems of a sequence `[S, G*b, h, d]`.

    `groups`: `[(seq_idx [m, n], cls_idx [m, n])]`, m problems of n valid slots each (slot = (sequence row,
    class)); None: every slot valid and one problem per sample over all S*G slots (a reshape, no gather).
    `segments` (a packed sequence `[N, b, h, d]`, `layouts.PackedLayout`): `[(m, n)]`, m consecutive problems of
    n rows each, in row order; no gather, no padding (`groups` unused).
    """

    classes: int
    groups: Optional[Groups]
    segments: Optional[List[Tuple[int, int]]] = None

    @classmethod
    def from_segments(cls, segments: Sequence[Tuple[int, int]]) -> "AttentionProblems":
        """The problems of a packed sequence: runs of m contiguous problems of n rows (`PackedLayout.segments`)."""
        return cls(1, None, [(int(m), int(n)) for m, n in segments])

    @classmethod
    def from_positions(cls, positions: torch.Tensor, kind: str, device=None) -> "AttentionProblems":
        """positions long [S, G] (raster index, -1 = padding) of the sequence the kernel sees; kind full | sparse."""
        valid = positions.cpu() >= 0  # [S, G]
        groups = []
        if kind == "sparse":
            by_count: Dict[int, List[int]] = {}
            for c in range(valid.shape[1]):
                by_count.setdefault(int(valid[:, c].sum()), []).append(c)
            for count, classes in sorted(by_count.items()):
                seq = torch.stack([valid[:, c].nonzero().squeeze(1) for c in classes])  # [m, n]
                cl = torch.tensor(classes, dtype=torch.long)[:, None].expand_as(seq)
                groups.append((seq, cl))
        elif kind == "full":
            if bool(valid.all()):
                return cls(valid.shape[1], None)
            s_idx, c_idx = valid.nonzero(as_tuple=True)  # every valid token of a sample, any order
            groups.append((s_idx[None, :], c_idx[None, :]))
        else:
            raise ValueError(f"attention kind {kind!r}: use full or sparse")
        return cls(valid.shape[1], [(s.to(device), c.contiguous().to(device)) for s, c in groups])


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problems: AttentionProblems,
                      kernel: Kernel) -> torch.Tensor:
    """q/k/v [S, G*b, h, d] (G = problems.classes, class-major batch) -> [S, G*b, h, d]; padding slots zero.

    With one problem per sample over all slots (`problems.groups` None), k and v may hold more rows than q
    ([S_kv, G*b, h, d]: keys gathered from more ranks than the queries)."""
    if problems.segments is not None:
        return _segment_attention(q, k, v, problems.segments, kernel)
    g = problems.classes
    s_tot, gb, h, d = q.shape
    b = gb // g
    if problems.groups is None:  # every slot valid, one problem per sample: a reshape, no gather
        qs, ks, vs = (t.reshape(-1, b, h, d).transpose(0, 1) for t in (q, k, v))
        if b > 1:
            qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()
        return kernel(qs, ks, vs).transpose(0, 1).reshape(s_tot, gb, h, d)
    q5, k5, v5 = (t.view(s_tot, g, b, h, d) for t in (q, k, v))
    rows_total = s_tot * g * b
    flat = [t.reshape(rows_total, h * d) for t in (q5, k5, v5)]
    outs, idxs = [], []
    bidx = torch.arange(b, device=q.device)
    for seq_idx, cls_idx in problems.groups:
        m, n = seq_idx.shape
        rows = ((seq_idx[:, None, :] * g + cls_idx[:, None, :]) * b + bidx[None, :, None]).reshape(-1)
        qg, kg, vg = (row_gather(f, rows).view(m * b, n, h, d) for f in flat)
        outs.append(kernel(qg, kg, vg).reshape(-1, h * d))
        idxs.append(rows)
    return row_scatter(torch.cat(outs), torch.cat(idxs), rows_total).view(s_tot, gb, h, d)


def _segment_attention(q, k, v, segments, kernel):
    """q/k/v [N, b, h, d] packed: each run of m problems of n rows is one [m*b, n, h, d] kernel call (the inputs
    a view of the rows when b == 1); the outputs are copied once, straight into their rows."""
    n_tot, b, h, d = q.shape
    if sum(m * n for m, n in segments) != n_tot:
        raise ValueError(f"attention segments {segments} do not cover the {n_tot} rows of the packed sequence")
    out, start = None, 0
    segments = [(m, n) for m, n in segments if m * n]  # classes without a token here (a context-parallel shard)
    if not segments:
        return q.new_zeros(q.shape)
    for m, n in segments:
        rows = slice(start, start + m * n)
        qs, ks, vs = (t[rows].view(m, n, b, h, d).transpose(1, 2).reshape(m * b, n, h, d) for t in (q, k, v))
        o = kernel(qs, ks, vs).reshape(m, b, n, h, d).transpose(1, 2)  # [m, n, b, h, d]
        if len(segments) == 1:
            return o.reshape(n_tot, b, h, d)
        if out is None:
            out = o.new_empty((n_tot, b, h, d))
        out[rows].view(m, n, b, h, d).copy_(o)
        start += m * n
    return out


class SkiparseAttention:
    """Skiparse-2D attention as a raster-in / raster-out op: q/k/v [N, b, h, d] (raster `(t h w)`) -> [N, b, h, d].

    The token/group rearrangement and the padding are fused into one row gather per tensor: each class's
    valid tokens are read straight from the raster rows (classes of equal length batched), attended by the
    kernel, and written back. The row indices are cached per (grid, ratio, layout, b, device) on the object.
    """

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self._rows: Dict[tuple, list] = {}

    def _groups(self, grid: Sequence[int], ratio: int, layout: str, b: int, device) -> list:
        key = (tuple(grid), ratio, layout, b, str(device))
        if key not in self._rows:
            pos = layout_positions(grid, ratio, layout)  # [S, C] raster index or -1
            by_count: Dict[int, List[torch.Tensor]] = {}
            for c in range(pos.shape[1]):
                ids = pos[:, c][pos[:, c] >= 0]
                by_count.setdefault(ids.numel(), []).append(ids)
            bidx = torch.arange(b)
            groups = []
            for count, members in sorted(by_count.items()):
                ids = torch.stack(members)  # [m, count] raster token ids
                rows = (ids[:, None, :] * b + bidx[None, :, None]).reshape(-1)  # rows of the [N*b, h*d] view
                groups.append((len(members), count, rows.to(device)))
            self._rows[key] = groups
        return self._rows[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int], ratio: int,
                 layout: str) -> torch.Tensor:
        n, b, h, d = q.shape
        flat = [t.reshape(n * b, h * d) for t in (q, k, v)]
        outs, idxs = [], []
        for m, count, rows in self._groups(grid, ratio, layout, b, q.device):
            qg, kg, vg = (row_gather(f, rows).view(m * b, count, h, d) for f in flat)
            outs.append(self.kernel(qg, kg, vg).reshape(-1, h * d))
            idxs.append(rows)
        return row_scatter(torch.cat(outs), torch.cat(idxs), n * b).view(n, b, h, d)
