"""Layout-native sequence plan: which tokens a rank holds in each layout, and the layout-aware ops.

The model calls four things per forward and never sees a process group itself:
`enter` (patch tokens -> this rank's shard of the first layout, no communication), `switch`
(token <-> group: one all-to-all over the SSP group that moves only valid tokens, see exchange.py),
`attention` (Ulysses all-to-all as needed + padding-free dense kernel per class / per sample; full
blocks send compacted rows), and `exit` / `shard_target` / `valid` (gather once at the end for
sampling, or compute the loss on the rank's own tokens in training).

On one device (no CP, no TP sequence parallelism) full blocks run on the unpadded raster sequence and
sparse blocks switch into/out of the padded Skiparse layouts locally; under CP/SP the plan is
layout-native (token layout from the first block, no communication at full <-> sparse boundaries).

Notation: a local shard is `[S_loc, G*b, *R]` with G classes of the layout on this rank
(class-major batch). Positions (`positions(layout)`: raster index or -1 for padding, `[S_loc, G]`)
travel with every rearrangement, so RoPE tables and masks are always permuted exactly like the data.

Context parallel group = SSP x Ulysses, rank `cp = ssp_rank * ulysses + ulysses_rank`. Sparse
blocks: SSP ranks own whole classes, Ulysses (if > 1) splits heads inside a class. Full blocks:
Ulysses over the whole CP group, on whatever layout they receive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from osp_megatron.models import skiparse
from osp_megatron.models.core_attention import dense_attention
from osp_megatron.models.rope import rope_tables
from osp_megatron.parallel import comm_stats
from osp_megatron.parallel.ssp import switch_token_group
from osp_megatron.parallel.exchange import TokenExchange
from osp_megatron.parallel.ulysses import (
    head_gather_seq_scatter,
    head_gather_seq_scatter_uneven,
    seq_gather_head_scatter,
    seq_gather_head_scatter_uneven,
)


@dataclass
class ContextParallel:
    """Process groups of one context-parallel group (CP = SSP x Ulysses). All None/1 on one device."""

    ssp: int = 1
    ulysses: int = 1
    ssp_rank: int = 0
    ulysses_rank: int = 0
    ssp_group: Optional[object] = None  # ranks with the same ulysses_rank
    ulysses_group: Optional[object] = None  # ranks with the same ssp_rank
    cp_group: Optional[object] = None  # the whole CP group, ordered by cp rank

    @property
    def size(self) -> int:
        return self.ssp * self.ulysses

    @property
    def rank(self) -> int:
        return self.ssp_rank * self.ulysses + self.ulysses_rank


@dataclass
class BlockStep:
    """How one block runs: the layout it sees, the layout to switch from first (None: no switch), its attention."""

    layout: str  # raster | token | group
    switch_from: Optional[str]
    attention: str  # full | sparse

    @property
    def switch_before(self) -> bool:
        return self.switch_from is not None


def plan_blocks(schedule: Sequence[str], layout_native: bool = True) -> Tuple[str, List[BlockStep], str]:
    """Block kinds ('full'|'token'|'group') -> (entry layout, per-block steps, final layout).

    layout_native (any context/sequence parallelism): the hidden state enters in the token layout and
    never returns to raster, so full<->sparse boundaries need no communication. On one device the full
    blocks run on the unpadded raster sequence instead (switches there are local copies).
    """
    sparse = any(k != "full" for k in schedule)
    current = "token" if (sparse and layout_native) else "raster"
    entry = current
    steps = []
    for kind in schedule:
        if kind == "full":
            want = current if layout_native else "raster"
            steps.append(BlockStep(want, None if want == current else current, "full"))
            current = want
        else:
            steps.append(BlockStep(kind, None if kind == current else current, "sparse"))
            current = kind
    return entry, steps, current


class SequencePlan:
    """Everything about where tokens live for one latent grid and one parallel layout."""

    def __init__(
        self,
        grid: Sequence[int],
        ratio: int,
        schedule: Sequence[str],
        head_dim: int,
        rope_theta: float,
        cp: Optional[ContextParallel] = None,
        sp_size: int = 1,
        device: torch.device = torch.device("cpu"),
        backend: str = "sdpa",
    ):
        self.grid = tuple(int(v) for v in grid)
        self.ratio = ratio
        self.cp = cp or ContextParallel()
        self.sp_size = sp_size
        self.device = device
        self.backend = backend
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.layout_native = self.cp.size > 1 or sp_size > 1
        self.entry_layout, self.steps, self.final_layout = plan_blocks(schedule, self.layout_native)
        self.sparse = any(k != "full" for k in schedule)
        if not self.sparse and self.cp.ssp > 1:
            raise ValueError("parallel.ssp > 1 needs sparse blocks; the full schedule uses parallel.ulysses only")
        # rows are split over Ulysses ranks in sparse layouts, over all CP ranks in the raster layout
        self.padded = self.padded_for("token" if self.sparse else "raster")
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        t, hp, wp = self.padded
        self.w_blocks = wp // (ratio * ratio)
        self._check_sp()
        self._pos: Dict[Tuple[str, int, int], torch.Tensor] = {}
        self._rope: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: Dict[Tuple[str, str], list] = {}

    # ------------------------------------------------------------------ positions
    def _check_sp(self) -> None:
        if self.sp_size == 1:
            return
        s_loc = self.local_len(self.entry_layout)
        unit = self.padded[2] if not self.sparse else self.ratio * self.w_blocks * self.ratio
        if (s_loc // unit) % self.sp_size:
            raise ValueError(
                f"parallel.sequence_parallel with tensor_parallel={self.sp_size}: the {s_loc // unit} (frame, row) units "
                f"of this rank's shard for grid {self.grid} are not divisible by TP; change the frame count/height "
                "or disable sequence_parallel"
            )

    def padded_for(self, layout: str):
        """Padded grid of a layout: rows split over Ulysses ranks (sparse layouts) or all CP ranks (raster)."""
        if layout == "raster":
            return skiparse.padded_grid(self.grid, self.ratio, self.cp.size, sparse=False)
        return skiparse.padded_grid(self.grid, self.ratio, self.cp.ulysses, sparse=True)

    def _h_multiple_for(self, layout: str) -> int:
        return self.cp.size if layout == "raster" else self.cp.ulysses

    def local_len(self, layout: str) -> int:
        t, hp, wp = self.padded_for(layout)
        c = skiparse.num_classes(layout, self.ratio)
        return t * hp * wp // c // self._h_multiple_for(layout)

    def classes_per_rank(self, layout: str) -> int:
        return skiparse.num_classes(layout, self.ratio) // (self.cp.ssp if layout != "raster" else 1)

    def positions(self, layout: str, ssp_rank: Optional[int] = None, ulysses_rank: Optional[int] = None) -> torch.Tensor:
        """Raster index of each local slot, long [S_loc, G] (-1 = padding)."""
        ssp_rank = self.cp.ssp_rank if ssp_rank is None else ssp_rank
        ulysses_rank = self.cp.ulysses_rank if ulysses_rank is None else ulysses_rank
        key = (layout, ssp_rank, ulysses_rank)
        if key not in self._pos:
            full = skiparse.positions(self.grid, self.ratio, layout, self._h_multiple_for(layout))  # [S, C]
            padded = self.padded_for(layout)
            if layout == "raster":  # rows split over every CP rank (SSP is 1 here)
                loc = skiparse.shard(full, padded, self.ratio, layout, 0, 1,
                                     ssp_rank * self.cp.ulysses + ulysses_rank, self.cp.size)
            else:
                loc = skiparse.shard(full, padded, self.ratio, layout, ssp_rank, self.cp.ssp,
                                     ulysses_rank, self.cp.ulysses)
            self._pos[key] = loc.to(self.device)
        return self._pos[key]

    def valid(self, layout: str) -> torch.Tensor:
        return self.positions(layout) >= 0

    def rope(self, layout: str, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the local slots: [S_loc, G, 1, 1, d/2] (broadcast over b and heads)."""
        if layout not in self._rope:
            cos, sin = rope_tables(self.grid, self.head_dim, self.rope_theta, self.positions(layout))
            self._rope[layout] = (cos[:, :, None, None, :], sin[:, :, None, None, :])
        cos, sin = self._rope[layout]
        return cos.to(dtype), sin.to(dtype)

    # ------------------------------------------------------------------ data movement
    def enter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster patch tokens [N, b, C] (identical on every CP rank) -> this rank's shard of the entry layout."""
        return self._to_local(tokens, self.entry_layout)

    def shard_target(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster per-token targets [N, b, C'] -> this rank's shard of the final layout (for the loss)."""
        return self._to_local(tokens, self.final_layout)

    def _to_local(self, tokens: torch.Tensor, layout: str) -> torch.Tensor:
        y = skiparse.to_layout(tokens, self.grid, self.ratio, layout, self._h_multiple_for(layout))
        if self.cp.size == 1:
            return y
        padded = self.padded_for(layout)
        if layout == "raster":
            return skiparse.shard(y, padded, self.ratio, layout, 0, 1, self.cp.rank, self.cp.size)
        return skiparse.shard(y, padded, self.ratio, layout, self.cp.ssp_rank, self.cp.ssp, self.cp.ulysses_rank, self.cp.ulysses)

    def exit(self, y: torch.Tensor, layout: Optional[str] = None) -> torch.Tensor:
        """This rank's shard [S_loc, G*b, C] of `layout` -> full raster [N, b, C] on every CP rank (one gather)."""
        layout = layout or self.final_layout
        if self.cp.size > 1:
            with comm_stats.scope("exit"):
                gathered = _GatherShards.apply(y, self.cp.cp_group, self.cp.size, self.cp.rank)
            pieces = list(gathered.unbind(0))  # in cp-rank order
            padded = self.padded_for(layout)
            if layout == "raster":
                y = skiparse.unshard([pieces], padded, self.ratio, layout)
            else:
                u = self.cp.ulysses
                y = skiparse.unshard([pieces[s * u : (s + 1) * u] for s in range(self.cp.ssp)], padded, self.ratio, layout)
        return skiparse.from_layout(y, self.grid, self.ratio, layout, self._h_multiple_for(layout))

    def switch(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """token <-> group on a local shard (one all-to-all over the SSP group when SSP > 1);
        raster <-> token/group only on one device (a local pad+permute / permute+crop)."""
        if src == dst:
            return x
        if "raster" in (src, dst):
            if self.layout_native:
                raise ValueError(f"layout-native plans never switch {src} -> {dst}")
            if src == "raster":
                return skiparse.to_layout(x, self.grid, self.ratio, dst)
            return skiparse.from_layout(x, self.grid, self.ratio, src)
        if {src, dst} != {"token", "group"}:
            raise ValueError(f"no layout switch from {src} to {dst} inside the block stack")
        if self.cp.ssp == 1 or self.sp_size > 1:  # local, or on sequence-parallel chunks (padded exchange)
            group = self.cp.ssp_group if self.cp.ssp > 1 else None
            return switch_token_group(x, self.ratio, self.w_blocks, group)
        key = ("exchange", src, dst)
        if key not in self._groups:
            u = self.cp.ulysses_rank
            self._groups[key] = TokenExchange(
                [self.positions(src, j, u) for j in range(self.cp.ssp)],
                [self.positions(dst, j, u) for j in range(self.cp.ssp)],
                self.cp.ssp_rank, self.cp.ssp_group, self.num_tokens, self.device)
        with comm_stats.scope("sparse"):
            return self._groups[key](x)

    # ------------------------------------------------------------------ attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, kind: str) -> torch.Tensor:
        """Self-attention on local shards q/k/v [S_loc, G*b, h, d] -> [S_loc, G*b, h, d].

        sparse: attention inside each class (after a Ulysses all-to-all when Ulysses > 1);
        full: attention over all tokens of each sample (Ulysses all-to-all over the whole CP group).
        Padding never enters the kernel: each class/sample's valid tokens are gathered first and
        classes with equal valid counts run as one dense batch.
        """
        if kind == "sparse":
            group, size = self.cp.ulysses_group, self.cp.ulysses
        else:
            group, size = self.cp.cp_group, self.cp.size
        if kind == "full" and size > 1 and self.sp_size == 1:
            return self._full_attention_compacted(q, k, v, layout)
        if size > 1:
            with comm_stats.scope(kind):
                q, k, v = (seq_gather_head_scatter(t, group, size) for t in (q, k, v))
        g = self.classes_per_rank(layout)
        groups = self._attention_groups(layout, kind)
        s_tot, gb, h, d = q.shape
        b = gb // g
        q5, k5, v5 = (t.view(s_tot, g, b, h, d) for t in (q, k, v))
        if groups is None:  # every slot valid, one problem per sample: a reshape, no gather
            qs, ks, vs = (t5.reshape(s_tot * g, b, h, d).transpose(0, 1) for t5 in (q5, k5, v5))
            if b > 1:
                qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()
            out = dense_attention(qs, ks, vs, self.backend).transpose(0, 1).reshape(s_tot, gb, h, d)
        else:
            out = self._grouped_attention(q5, k5, v5, groups).view(s_tot, gb, h, d)
        if size > 1:
            with comm_stats.scope(kind):
                out = head_gather_seq_scatter(out, group, size)
        return out

    def _full_attention_compacted(self, q, k, v, layout):
        """Full attention under CP with padding removed before the Ulysses all-to-all (uneven splits):
        only valid tokens travel and the gathered sequence needs no further compaction."""
        key = ("compact", layout)
        if key not in self._groups:
            counts = [int((self.positions(layout, r // self.cp.ulysses, r % self.cp.ulysses) >= 0).sum())
                      for r in range(self.cp.size)]
            rows = (self.positions(layout) >= 0).reshape(-1).nonzero().squeeze(1)
            self._groups[key] = (counts, rows.to(self.device))
        counts, rows = self._groups[key]
        s, gb, h, d = q.shape
        g = self.classes_per_rank(layout)
        b = gb // g
        total = s * g
        me, group = self.cp.rank, self.cp.cp_group
        with comm_stats.scope("full"):
            qa, ka, va = (seq_gather_head_scatter_uneven(_RowGather.apply(t.reshape(total, b * h * d), rows)
                                                         .view(-1, b, h, d), counts, me, group) for t in (q, k, v))
        o = dense_attention(*(t.transpose(0, 1).contiguous() if b > 1 else t.transpose(0, 1) for t in (qa, ka, va)),
                            self.backend).transpose(0, 1)
        with comm_stats.scope("full"):
            o = head_gather_seq_scatter_uneven(o.contiguous(), counts, me, group)  # [n_me, b, h, d]
        out = _RowScatter.apply(o.reshape(-1, b * h * d), rows, total)
        return out.view(s, gb, h, d)

    def _grouped_attention(self, q5, k5, v5, groups):
        """Gather each group's valid tokens into [m*b, n, h, d], run the dense kernel, scatter back.

        Gathers/scatters are row copies with unique indices (autograd: copy back, no accumulation)."""
        s_tot, g, b, h, d = q5.shape
        rows_total = s_tot * g * b
        flat = [t.reshape(rows_total, h * d) for t in (q5, k5, v5)]
        outs, idxs = [], []
        bidx = torch.arange(b, device=q5.device)
        for seq_idx, cls_idx in groups:
            m, n = seq_idx.shape
            rows = ((seq_idx[:, None, :] * g + cls_idx[:, None, :]) * b + bidx[None, :, None]).reshape(-1)
            qg, kg, vg = (_RowGather.apply(f, rows).view(m * b, n, h, d) for f in flat)
            outs.append(dense_attention(qg, kg, vg, self.backend).reshape(-1, h * d))
            idxs.append(rows)
        out = _RowScatter.apply(torch.cat(outs), torch.cat(idxs), rows_total)
        return out.view(s_tot, g, b, h, d)

    def _attention_groups(self, layout: str, kind: str):
        """[(seq_idx [m, n], cls_idx [m, n])]: m independent attention problems of n valid tokens each."""
        key = (layout, kind)
        if key in self._groups:
            return self._groups[key]
        if kind == "sparse":
            pos = torch.cat([self.positions(layout, self.cp.ssp_rank, u) for u in range(self.cp.ulysses)], dim=0)
        else:
            pos = torch.cat([self.positions(layout, r // self.cp.ulysses, r % self.cp.ulysses) for r in range(self.cp.size)], dim=0)
        pos = pos.cpu()
        valid = pos >= 0  # [S_tot, G]
        groups = []
        if kind == "sparse":
            by_count: Dict[int, List[int]] = {}
            for c in range(valid.shape[1]):
                by_count.setdefault(int(valid[:, c].sum()), []).append(c)
            for count, classes in sorted(by_count.items()):
                seq = torch.stack([valid[:, c].nonzero().squeeze(1) for c in classes])  # [m, n]
                cls = torch.tensor(classes, dtype=torch.long)[:, None].expand_as(seq)
                groups.append((seq, cls))
        else:
            if bool(valid.all()):
                self._groups[key] = None  # dense fast path (see attention)
                return None
            s_idx, c_idx = valid.nonzero(as_tuple=True)  # every valid token of a sample, any order
            groups.append((s_idx[None, :], c_idx[None, :]))
        groups = [(s.to(self.device), c.contiguous().to(self.device)) for s, c in groups]
        self._groups[key] = groups
        return groups


class _GatherShards(torch.autograd.Function):
    """All-gather local shards -> [size, *shape]; backward keeps this rank's slice (replicated downstream)."""

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


def skiparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int], ratio: int,
                       layout: str, backend: str = "sdpa", _cache: Dict = {}) -> torch.Tensor:
    """Skiparse-2D attention as a raster-in / raster-out op: q/k/v [N, b, h, d] (raster `(t h w)`) -> [N, b, h, d].

    The token/group rearrangement and the padding are fused into one row gather per tensor: each class's
    valid tokens are read straight from the raster rows (valid-first, classes of equal length batched),
    attended by the dense kernel, and written back. Equivalent to dense attention under the class-equality mask.
    """
    n, b, h, d = q.shape
    key = (tuple(grid), ratio, layout, b, str(q.device))
    if key not in _cache:
        pos = skiparse.positions(grid, ratio, layout)  # [S, C] raster index or -1
        by_count: Dict[int, List[torch.Tensor]] = {}
        for c in range(pos.shape[1]):
            ids = pos[:, c][pos[:, c] >= 0]
            by_count.setdefault(ids.numel(), []).append(ids)
        bidx = torch.arange(b)
        groups = []
        for count, members in sorted(by_count.items()):
            ids = torch.stack(members)  # [m, count] raster token ids
            rows = (ids[:, None, :] * b + bidx[None, :, None]).reshape(-1)  # rows of the [N*b, h*d] view
            groups.append((len(members), count, rows.to(q.device)))
        _cache[key] = groups
    flat = [t.reshape(n * b, h * d) for t in (q, k, v)]
    outs, idxs = [], []
    for m, count, rows in _cache[key]:
        qg, kg, vg = (_RowGather.apply(f, rows).view(m * b, count, h, d) for f in flat)
        outs.append(dense_attention(qg, kg, vg, backend).reshape(-1, h * d))
        idxs.append(rows)
    return _RowScatter.apply(torch.cat(outs), torch.cat(idxs), n * b).view(n, b, h, d)
