"""Named model sizes (Wan2.1 T2V dims) and their typed, resolved form.

`tiny` is for CPU tests; `wan_1_3b` / `wan_14b` are Wan2.1 T2V exactly (head_dim 128, RoPE t/h/w 44/42/42).
The OSP-Next variants are the same weights with a layout schedule on top (`model.schedule=dual_end`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

# name -> (hidden, ffn, heads, layers, text_dim, freq_dim, default number of full blocks for dual_end)
_TABLE = {
    "tiny": (64, 128, 4, 8, 32, 32, 4),
    "wan_1_3b": (1536, 8960, 12, 30, 4096, 256, 8),
    "wan_14b": (5120, 13824, 40, 40, 4096, 256, 8),
}


@dataclass(frozen=True)
class ModelDims:
    """The DiT's dimensions after a size's registry entry and the explicit `model.*` fields are combined."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_layers: int
    text_dim: int
    freq_dim: int
    num_full_blocks: int  # full-attention blocks of the dual_end / uniform schedule
    in_channels: int = 16
    out_channels: int = 16
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZES: Dict[str, ModelDims] = {
    name: ModelDims(hidden_size=h, ffn_hidden_size=f, num_attention_heads=a, num_layers=n, text_dim=t, freq_dim=q,
                    num_full_blocks=nf)
    for name, (h, f, a, n, t, q, nf) in _TABLE.items()
}

# ModelConfig fields that override a size's entry when set
DIM_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "in_channels", "out_channels",
              "text_dim", "freq_dim", "patch_size", "eps", "rope_theta")


def default_num_full(schedule: str, entry: ModelDims, num_layers: int) -> int:
    """Released value for dual_end (8 of 40 / 30 blocks; 4 for tiny); about a third of the layers for uniform."""
    if schedule == "dual_end":
        return entry.num_full_blocks
    return max(2, num_layers // 3 // 2 * 2)


__all__ = ["DIM_FIELDS", "ModelDims", "SIZES", "default_num_full"]
