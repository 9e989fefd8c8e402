"""3D rotary position embedding (Wan2.1): head_dim split t/h/w = d-2*(2*(d//6)) / 2*(d//6) / 2*(d//6).

For head_dim 128 that is 44/42/42. Channels are rotated in interleaved pairs (0,1), (2,3), ...
Tables are built for raster positions and *gathered* with a layout's position index (the token
placement's `positions(layout)`, see `attention.SequenceContext.rope`), so a permuted layout sees exactly
the angles of its tokens' original (t, h, w) positions.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from osp_megatron.models.fused import rotate_pairs


def axis_dims(head_dim: int) -> Tuple[int, int, int]:
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def rope_angles(grid: Sequence[int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles per raster token and channel pair: float64 [T*H*W, head_dim/2]."""
    t, h, w = (int(v) for v in grid)
    parts = []
    for size, dim, axis in zip((t, h, w), axis_dims(head_dim), range(3)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        ang = torch.arange(size, dtype=torch.float64)[:, None] * freqs[None, :]  # [size, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        parts.append(ang.view(shape).expand(t, h, w, dim // 2))
    return torch.cat(parts, dim=-1).reshape(t * h * w, head_dim // 2)


def rope_tables(grid: Sequence[int], head_dim: int, theta: float, positions: torch.Tensor, dtype=torch.float32):
    """cos/sin for the slots of a layout: positions long [...] (raster index, -1 = padding) -> [..., head_dim/2] each.

    Padding slots get angle 0 (cos 1, sin 0); they are masked in attention anyway.
    """
    ang = rope_angles(grid, head_dim, theta).to(positions.device)
    a = ang[positions.clamp(min=0)]
    a = torch.where((positions >= 0).unsqueeze(-1), a, torch.zeros_like(a))
    return a.cos().to(dtype), a.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs. x [..., heads, d]; cos/sin broadcastable to [..., 1, d/2]."""
    return rotate_pairs(x, cos, sin)
