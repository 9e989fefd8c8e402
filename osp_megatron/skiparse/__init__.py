"""Skiparse-2D (OSP-Next), one home: layouts and padding, token<->group, positions and valid masks, block
schedules, and the padding-free grouped attention with the dense kernel injected.

A leaf: imports only torch and the standard library; `models/` and `parallel/` import it, never the reverse.
- `layouts`: raster/token/group index math on sequence-first tensors, `LayoutGeometry` (padded grids,
  local lengths, per-rank positions and shards of a context-parallel group) and `PackedLayout` (a sparse
  layout without its padding, on one device).
- `schedule`: `block_schedule` (full | dual_end | uniform) and `plan_blocks` (the layout at every block).
- `attention`: `AttentionProblems`, `grouped_attention`, `SkiparseAttention`, row gather/scatter.
"""
from osp_megatron.skiparse.attention import (
    AttentionProblems,
    Kernel,
    SkiparseAttention,
    grouped_attention,
    row_gather,
    row_permute,
    row_scatter,
)
from osp_megatron.skiparse.layouts import (
    LAYOUTS,
    LayoutGeometry,
    PackedLayout,
    crop_raster,
    from_layout,
    group_to_token,
    layout_to_raster,
    num_classes,
    packed_layout,
    pad_raster,
    padded_grid,
    positions,
    raster_to_layout,
    shard,
    to_layout,
    token_to_group,
    unshard,
    valid_mask,
)
from osp_megatron.skiparse.schedule import BlockStep, block_schedule, plan_blocks

__all__ = [
    "AttentionProblems", "BlockStep", "Kernel", "LAYOUTS", "LayoutGeometry", "PackedLayout", "SkiparseAttention",
    "block_schedule", "packed_layout", "row_permute",
    "crop_raster", "from_layout", "group_to_token", "grouped_attention", "layout_to_raster", "num_classes",
    "pad_raster", "padded_grid", "plan_blocks", "positions", "raster_to_layout", "row_gather", "row_scatter",
    "shard", "to_layout", "token_to_group", "unshard", "valid_mask",
]
