"""Token placement: which tokens of one latent grid a rank holds in each layout, and how they move.

`TokenPlacement` moves tokens and nothing else (attention math and RoPE stay in the model, index math in
`osp_megatron.skiparse`). The model calls, per forward:

- `enter(tokens)`: raster patch tokens (identical on every CP rank) -> this rank's shard of the entry layout,
  no communication (+ its TP sequence-parallel chunk);
- `switch(x, src, dst)`: token <-> group before a sparse block (`ssp.token_group_switch`: one all-to-all over
  the SSP group when SSP > 1); raster <-> token/group only on one device (a local pad+permute / permute+crop);
- `seq_to_heads(t, layout, kind, keys=False)` / `heads_to_seq(o, layout, kind)`: the Ulysses all-to-alls around
  attention (sparse: inside the SSP rank's classes; full: over the whole CP group, sending only valid rows), and
  `attention_positions(layout, kind)`: the positions of the key sequence the kernel sees in between. Full
  blocks whose heads do not divide over CP run Ulysses over `full_ulysses` = U < CP ranks (runs of U CP ranks,
  each run's tokens as queries) and gather keys and values (`keys=True`) over the CP/U runs, so every query
  still sees every token;
- `exit(y)`: one gather at the end (sampling), or `shard_target(tokens)` / `target_valid()` / `reduce_loss(loss)`:
  the loss on the rank's own tokens of the final layout (training).

On one device (no CP, no TP sequence parallelism) full blocks run on the unpadded raster sequence and sparse
blocks switch into/out of the Skiparse layouts locally; when the sequence is split (CP or SP) the
placement is layout-native (token layout from the first block, no communication at full <-> sparse boundaries).

Padding-free (`padding_free`, grids whose H or W needs padding; None: on one device only, True: under context
parallelism too, never on TP sequence-parallel chunks): every rank holds its tokens packed
(`skiparse.PackedLayout`, `[n, b, C]`: its real tokens only, its classes one after another along the sequence,
the sample a batch dim), so no per-token op sees a padding slot. On one device the sparse layouts are packed
and every switch (raster -> token when a sparse run starts, token <-> group inside it, group -> raster when it
ends) is one row gather by a precomputed permutation. Under CP the whole layout-native run is packed (full
blocks too): `enter` gathers the rank's rows, the SSP switch is the padding-free `TokenExchange` between packed
shards, the Ulysses all-to-alls of full and sparse blocks have uneven splits (shards differ in length; one may
be empty), `exit` gathers uneven rows. `classes_per_rank` is then 1 and `positions` is `[n, 1]`. With padding
(the default under CP, `padding_free=None`) every shard of a layout has the same length.

Notation: a local shard is `[S_loc, G*b, *R]` with G classes of the layout on this rank (class-major batch).
Positions (`positions(layout)`: raster index or -1 for padding, `[S_loc, G]`) describe every rearrangement, so
RoPE tables and masks are permuted exactly like the data. CP = SSP x Ulysses, cp rank = ssp_rank * ulysses +
ulysses_rank.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import tensor_parallel

from osp_megatron.parallel import comm_stats
from osp_megatron.parallel.collectives import all_gather_rows, all_gather_shards, sum_value_keep_grad
from osp_megatron.parallel.groups import ParallelState
from osp_megatron.parallel.exchange import TokenExchange
from osp_megatron.parallel.ssp import token_group_switch
from osp_megatron.parallel.ulysses import (
    gather_rows_uneven,
    head_gather_seq_scatter,
    head_gather_seq_scatter_uneven,
    seq_gather_head_scatter,
    seq_gather_head_scatter_uneven,
)
from osp_megatron.skiparse import (AttentionProblems, LayoutGeometry, PackedLayout, from_layout, plan_blocks,
                                   row_gather, row_permute, row_scatter, to_layout)


class TokenPlacement:
    """Where the tokens of one latent grid live under one parallel layout, and how they move between ranks."""

    def __init__(self, grid: Sequence[int], ratio: int, schedule: Sequence[str], parallel: ParallelState = None,
                 device: torch.device = torch.device("cpu"), full_ulysses: Optional[int] = None,
                 padding_free: Optional[bool] = False):
        self.parallel = parallel or ParallelState()
        self.cp = self.parallel.cp
        self.full_ulysses = self.cp.size if full_ulysses is None else full_ulysses
        if self.cp.size % self.full_ulysses:
            raise ValueError(f"full_ulysses={self.full_ulysses} must divide the context-parallel size {self.cp.size}")
        if self.full_ulysses < self.cp.size and self.parallel.sp_size > 1:
            raise ValueError("full blocks at Ulysses < CP (heads not divisible by the CP size) do not run with "
                             "parallel.sequence_parallel; disable it or choose CP among the divisors of the heads")
        self.sp_size = self.parallel.sp_size
        self.device = device
        self.layout_native = self.parallel.splits_sequence
        self.entry_layout, self.steps, self.final_layout = plan_blocks(schedule, self.layout_native)
        self.sparse = any(k != "full" for k in schedule)
        self.packed = False  # set below, once the geometry says whether the grid is padded at all
        if not self.sparse and self.cp.ssp > 1:
            raise ValueError("parallel.ssp > 1 needs sparse blocks; the full schedule uses parallel.ulysses only")
        self.geometry = LayoutGeometry(grid, ratio, self.cp.ssp, self.cp.ulysses)
        self.grid, self.ratio = self.geometry.grid, ratio
        self.num_tokens = self.geometry.num_tokens
        # packed only where there is padding to take out: on an unpadded grid the layouts are padding-free already;
        # None: on one device only; never on TP sequence-parallel chunks (they split the sequence evenly)
        want = (not self.layout_native) if padding_free is None else bool(padding_free)
        self.packed = (want and self.sparse and self.sp_size == 1 and self.geometry.padded("token") != self.grid)
        self._check_sp()
        self._pos: Dict[str, torch.Tensor] = {}
        self._switches: Dict[Tuple[str, str], Callable] = {}
        self._compaction: Dict[str, Tuple[List[int], torch.Tensor]] = {}
        self._run_counts: Dict[str, List[int]] = {}
        self._packed_layouts: Dict[Tuple[str, int, int], PackedLayout] = {}
        self._permutations: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._packed_problems: Dict[str, AttentionProblems] = {}

    def _check_sp(self) -> None:
        if self.sp_size == 1:
            return
        s_loc = self.local_len(self.entry_layout)
        unit = self.geometry.padded("token" if self.sparse else "raster")[2]
        if (s_loc // unit) % self.sp_size:
            raise ValueError(
                f"parallel.sequence_parallel with tensor_parallel={self.sp_size}: the {s_loc // unit} (frame, row) units "
                f"of this rank's shard for grid {self.grid} are not divisible by TP; change the frame count/height "
                "or disable sequence_parallel"
            )

    # ------------------------------------------------------------------ facts
    def local_len(self, layout: str) -> int:
        return len(self.packed_layout(layout)) if self.packed else self.geometry.local_len(layout)

    def classes_per_rank(self, layout: str) -> int:
        """Classes in the batch axis of this rank's tensor of `layout` (packed: 1, the classes lie along the
        sequence)."""
        return 1 if self.packed else self.geometry.classes_per_rank(layout)

    def packed_layout(self, layout: str, ssp_rank: Optional[int] = None, ulysses_rank: Optional[int] = None
                      ) -> PackedLayout:
        """The packed form of rank (ssp_rank, ulysses_rank)'s shard of `layout` (default: this rank's;
        padding-free placements only)."""
        if not self.packed:
            raise ValueError("packed_layout: this placement holds padded layouts (padding_free off, an unpadded "
                             "grid, or TP sequence-parallel chunks)")
        key = (layout, self.cp.ssp_rank if ssp_rank is None else ssp_rank,
               self.cp.ulysses_rank if ulysses_rank is None else ulysses_rank)
        if key not in self._packed_layouts:
            self._packed_layouts[key] = PackedLayout(self.geometry.positions(*key))
        return self._packed_layouts[key]

    def _packed_counts(self, layout: str, ranks) -> List[int]:
        u = self.cp.ulysses
        return [len(self.packed_layout(layout, r // u, r % u)) for r in ranks]

    def packed_problems(self, layout: str) -> AttentionProblems:
        """Sparse attention problems of the sequence `seq_to_heads` gives the kernel when packed: contiguous
        runs of classes (`segments`) on this rank's rows, or, after a Ulysses gather, each class's rows of
        every Ulysses rank."""
        if layout not in self._packed_problems:
            u = self.cp.ulysses
            if u == 1:
                problems = AttentionProblems.from_segments(self.packed_layout(layout).segments)
            else:
                cls = torch.cat([self.packed_layout(layout, self.cp.ssp_rank, j).row_class for j in range(u)])
                by_count: Dict[int, List[torch.Tensor]] = {}
                for c in range(self.geometry.classes_per_rank(layout)):
                    rows = (cls == c).nonzero().squeeze(1)
                    by_count.setdefault(rows.numel(), []).append(rows)
                groups = []
                for count, members in sorted(by_count.items()):
                    if count == 0:
                        continue
                    seq = torch.stack(members)
                    groups.append((seq.to(self.device), torch.zeros_like(seq).to(self.device)))
                problems = AttentionProblems(1, groups)
            self._packed_problems[layout] = problems
        return self._packed_problems[layout]

    def positions(self, layout: str) -> torch.Tensor:
        """Raster index of each slot of this rank's shard, long [S_loc, G] (-1 = padding), on `device`."""
        if layout not in self._pos:
            if self.packed:
                pos = self.packed_layout(layout).positions[:, None]
            else:
                pos = self.geometry.positions(layout, self.cp.ssp_rank, self.cp.ulysses_rank)
            self._pos[layout] = pos.to(self.device)
        return self._pos[layout]

    def valid(self, layout: str) -> torch.Tensor:
        return self.positions(layout) >= 0

    # ------------------------------------------------------------------ enter / exit / loss
    def enter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster patch tokens [N, b, C] (identical on every CP rank) -> this rank's shard of the entry layout
        [S_loc, G*b, C] (its [S_loc/TP, G*b, C] chunk under sequence parallelism)."""
        if self.packed:  # this rank's rows of the raster tokens (one device: raster entry, the identity)
            if not self.layout_native:
                return tokens
            pos = self.positions(self.entry_layout)[:, 0]
            return row_gather(tokens.reshape(tokens.shape[0], -1), pos).view(pos.numel(), *tokens.shape[1:])
        x = self.geometry.shard(tokens, self.entry_layout, self.cp.ssp_rank, self.cp.ulysses_rank)
        if self.sp_size > 1:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.parallel.tp_group)
        return x

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's shard [S_loc(/TP), G*b, C] of the final layout -> full raster [N, b, C] on every rank."""
        if self.sp_size > 1:
            y = tensor_parallel.gather_from_sequence_parallel_region(
                y, tensor_parallel_output_grad=False, group=self.parallel.tp_group)
        if self.packed:
            if self.cp.size == 1:
                return self._permute(y, self.final_layout, "raster")
            counts = self._packed_counts(self.final_layout, range(self.cp.size))
            with comm_stats.scope("exit"):
                rows = all_gather_rows(y, counts, self.cp.rank, self.cp.cp_group)
            u = self.cp.ulysses
            pos = torch.cat([self.packed_layout(self.final_layout, r // u, r % u).positions
                             for r in range(self.cp.size)]).to(rows.device)
            return row_permute(rows, torch.argsort(pos), pos)
        pieces = [y]
        if self.cp.size > 1:
            with comm_stats.scope("exit"):
                pieces = list(all_gather_shards(y, self.cp.cp_group, self.cp.size, self.cp.rank).unbind(0))
        return self.geometry.unshard(pieces, self.final_layout)

    def _sp_chunk(self, t: torch.Tensor) -> torch.Tensor:
        if self.sp_size == 1:
            return t
        n = t.shape[0] // self.sp_size
        r = self.parallel.tp_rank
        return t[r * n : (r + 1) * n]

    def shard_target(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster per-token targets [N, b, C'] -> this rank's own slots of the final layout [S_loc(/TP), G*b, C']."""
        if self.packed:
            if self.cp.size == 1:
                return self._permute(tokens, "raster", self.final_layout)
            return tokens.index_select(0, self.positions(self.final_layout)[:, 0])
        return self._sp_chunk(self.geometry.shard(tokens, self.final_layout, self.cp.ssp_rank, self.cp.ulysses_rank))

    def target_valid(self) -> torch.Tensor:
        """bool [S_loc(/TP), G]: which slots of `shard_target` hold real tokens."""
        return self._sp_chunk(self.valid(self.final_layout))

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's loss share -> under sequence parallelism, value = the sum over the TP chunks (the whole
        sequence's share on every TP rank), gradient = this chunk's; unchanged otherwise."""
        if self.sp_size == 1:
            return loss
        return sum_value_keep_grad(loss, self.parallel.tp_group)

    # ------------------------------------------------------------------ layout switches
    def switch(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """A local shard [S_loc, G*b, C] of `src` -> the shard of `dst` (token <-> group, or raster <-> sparse on
        one device)."""
        if src == dst:
            return x
        if self.packed:
            if {src, dst} != {"token", "group"} and ("raster" not in (src, dst) or self.layout_native):
                raise ValueError(f"the SSP switch goes token <-> group, not {src} -> {dst}")
            if self.cp.ssp == 1:  # the same tokens on this rank: a local permutation
                return self._permute(x, src, dst)
            if (src, dst) not in self._switches:  # the padding-free exchange between the packed shards
                u, ssp = self.cp.ulysses_rank, self.cp.ssp
                self._switches[(src, dst)] = TokenExchange(
                    [self.packed_layout(src, j, u).positions[:, None] for j in range(ssp)],
                    [self.packed_layout(dst, j, u).positions[:, None] for j in range(ssp)],
                    self.cp.ssp_rank, self.cp.ssp_group, self.num_tokens, self.device)
            with comm_stats.scope("sparse"):
                return self._switches[(src, dst)](x)
        if "raster" in (src, dst):
            if self.layout_native:
                raise ValueError(f"layout-native plans never switch {src} -> {dst}")
            if src == "raster":
                return to_layout(x, self.grid, self.ratio, dst)
            return from_layout(x, self.grid, self.ratio, src)
        if (src, dst) not in self._switches:
            self._switches[(src, dst)] = token_group_switch(self.geometry, self.cp, self.sp_size, src, dst, self.device)
        with comm_stats.scope("sparse"):
            return self._switches[(src, dst)](x)

    def _permute(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Packed [N, b, *R] of `src` -> of `dst`: one row gather (backward: the inverse gather)."""
        if src == dst:
            return x
        if (src, dst) not in self._permutations:
            idx = self.packed_layout(dst).index_from(self.packed_layout(src))
            inv = torch.empty_like(idx)
            inv[idx] = torch.arange(idx.numel())
            self._permutations[(src, dst)] = (idx.to(self.device), inv.to(self.device))
        idx, inv = self._permutations[(src, dst)]
        return row_permute(x, idx, inv)

    # ------------------------------------------------------------------ Ulysses around attention
    def _ulysses(self, kind: str):
        if kind == "sparse":
            return self.cp.ulysses_group, self.cp.ulysses
        if self.full_ulysses < self.cp.size:
            return self.cp.full_groups[self.full_ulysses][0], self.full_ulysses
        return self.cp.cp_group, self.cp.size

    def _compacted(self, kind: str) -> bool:
        """Full blocks under CP send valid rows only (uneven splits): padding never travels nor needs compaction."""
        return kind == "full" and self.cp.size > 1 and self.sp_size == 1

    def _rank_positions(self, layout: str, kind: str) -> List[torch.Tensor]:
        """Positions of the shards one Ulysses all-to-all gathers, in group-rank order."""
        u = self.cp.ulysses
        if kind == "sparse":
            return [self.geometry.positions(layout, self.cp.ssp_rank, j) for j in range(u)]
        return [self.geometry.positions(layout, r // u, r % u) for r in range(self.cp.size)]

    def _rows(self, layout: str) -> Tuple[List[int], torch.Tensor]:
        """Valid-row counts of the ranks of this rank's full-block Ulysses group, and this rank's valid rows."""
        if layout not in self._compaction:
            counts = [int((p >= 0).sum()) for p in self._rank_positions(layout, "full")]
            u = self.full_ulysses
            run = self.cp.rank // u
            rows = self.valid(layout).reshape(-1).nonzero().squeeze(1)
            self._compaction[layout] = (counts[run * u : (run + 1) * u], rows.to(self.device))
            self._run_counts[layout] = [sum(counts[j * u : (j + 1) * u]) for j in range(self.cp.size // u)]
        return self._compaction[layout]

    def _gather_keys(self, t: torch.Tensor, layout: str) -> torch.Tensor:
        """Full blocks at Ulysses < CP: this run's key/value rows [n_run, B, h/U, d] -> every run's, in CP rank
        order [n_valid, B, h/U, d] (all-gather over the ranks at this Ulysses position)."""
        self._rows(layout)
        group = self.cp.full_groups[self.full_ulysses][1]
        return gather_rows_uneven(t, self._run_counts[layout], group)

    def attention_positions(self, layout: str, kind: str) -> torch.Tensor:
        """Positions long [S', G'] (CPU) of the sequence `seq_to_heads` hands to the kernel (kind: full | sparse)."""
        pos = self._rank_positions(layout, kind)
        if self._compacted(kind):
            return torch.cat([p.reshape(-1)[p.reshape(-1) >= 0] for p in pos])[:, None]
        return torch.cat(pos, dim=0)

    def seq_to_heads(self, t: torch.Tensor, layout: str, kind: str, keys: bool = False) -> torch.Tensor:
        """q, k or v [S_loc, G*b, h, d] -> the attention sequence of its heads [S', G'*b, h/U, d]: the Ulysses
        ranks' shards stacked in rank order (full blocks under CP: their valid rows, G' = 1). keys: k or v, which
        full blocks at Ulysses < CP gather from every run of Ulysses ranks (queries stay the run's own)."""
        if self._compacted(kind):
            counts, rows = self._rows(layout)
            _, size = self._ulysses(kind)
            with comm_stats.scope(kind):
                s, gb, h, d = t.shape
                b = gb // self.classes_per_rank(layout)
                if not self.packed:  # packed shards hold valid rows only
                    t = row_gather(t.reshape(-1, b * h * d), rows).view(-1, b, h, d)
                if size > 1:
                    t = seq_gather_head_scatter_uneven(t, counts, self._ulysses(kind)[0])
                if keys and size < self.cp.size:
                    t = self._gather_keys(t, layout)
                return t
        group, size = self._ulysses(kind)
        if size == 1:
            return t
        with comm_stats.scope(kind):
            if self.packed:  # sparse blocks: the Ulysses ranks' packed shards differ in length
                counts = self._packed_counts(layout, [self.cp.ssp_rank * size + j for j in range(size)])
                return seq_gather_head_scatter_uneven(t, counts, group)
            return seq_gather_head_scatter(t, group, size)

    def heads_to_seq(self, o: torch.Tensor, layout: str, kind: str) -> torch.Tensor:
        """Inverse of `seq_to_heads`: [S', G'*b, h/U, d] -> [S_loc, G*b, h, d] (padding slots zero)."""
        group, size = self._ulysses(kind)
        if self._compacted(kind):
            counts, rows = self._rows(layout)
            with comm_stats.scope(kind):
                if size > 1:  # [n_me, b, h, d]
                    o = head_gather_seq_scatter_uneven(o.contiguous(), counts, self.cp.rank % size, group)
                if self.packed:
                    return o
                s, g = self.local_len(layout), self.classes_per_rank(layout)
                _, b, h, d = o.shape
                return row_scatter(o.reshape(-1, b * h * d), rows, s * g).view(s, g * b, h, d)
        if size == 1:
            return o
        with comm_stats.scope(kind):
            if self.packed:
                counts = self._packed_counts(layout, [self.cp.ssp_rank * size + j for j in range(size)])
                return head_gather_seq_scatter_uneven(o.contiguous(), counts, self.cp.ulysses_rank, group)
            return head_gather_seq_scatter(o, group, size)
