"""Explicit FLOPs formula for one OSP-Next / Wan2.1 DiT training sample (multiply-add = 2 FLOPs).

Per block with C = hidden, F = ffn hidden, L = text tokens, N = tokens the block runs on:
    self-attn projections  Q,K,V,O : 4 * 2*N*C^2
    self-attention core            : full block 4*N^2*C (QK^T and PV);
                                     sparse block: P^2 classes of S = Np/P^2 tokens -> 4*Np^2*C / P^2
    cross-attn projections Q, O    : 2 * 2*N*C^2;  K, V of the text: 2 * 2*L*C^2 (once per sample)
    cross-attention core           : 4*N*L*C
    FFN                            : 2 * 2*N*C*F
Executed work, as the token placement runs it: padded sparse blocks hold the Skiparse grid (Np = T*Hp*Wp, H/W
padded to multiples of P^2), so their projections, cross-attention and FFN run on Np tokens, while their
self-attention sees each class's valid tokens only: sum over the P^2 classes of 4*n_c^2*C. Full blocks attend
over the N = T*H*W valid tokens (4*N^2*C); their other work runs on N on one device (raster layout) and on Np
in layout-native plans (`padded=True`: any context or sequence parallelism). Padding-free plans (`packed=True`,
`model.padding_free`) run every per-token op of every block on the N real tokens.
Model FLOPs (the numerator of MFU) count the useful work only: every block on the N real tokens, no recompute.
Outside the blocks: patch embedding 2*N*(16*4)*C, head 2*N*C*(4*16), text embedding 2*L*(text_dim*C + C*C).
Training = forward + backward = 3x forward; activation recompute executes one more forward (4x).
"""
from __future__ import annotations

from typing import Dict, List, Sequence
from osp_megatron.skiparse import block_schedule, padded_grid


def class_sizes(grid: Sequence[int], ratio: int, layout: str) -> List[int]:
    """Valid tokens of each Skiparse class of an unpadded (T, H, W) grid (token: (h mod P, w mod P);
    group: (floor(h/P) mod P, floor(w/P) mod P))."""
    t, h, w = grid

    def count(n: int, cls: int) -> int:
        if layout == "token":
            return sum(1 for i in range(n) if i % ratio == cls)
        return sum(1 for i in range(n) if (i // ratio) % ratio == cls)

    return [t * count(h, p) * count(w, q) for p in range(ratio) for q in range(ratio)]


def forward_flops(model_cfg, latent_shape: Sequence[int], text_len: int, padded: bool = True,
                  packed: bool = False) -> Dict[str, float]:
    """Forward FLOPs of one sample with latents [16, T, H, W]; returns a breakdown and `total`.

    `padded`: layout-native plan (CP or SP > 1): full blocks also hold the padded grid; else they run on raster.
    `packed`: padding-free sparse blocks (every block's per-token work on the real tokens; overrides `padded`)."""
    dims = model_cfg.resolve()
    c, f = dims.hidden_size, dims.ffn_hidden_size
    pt, ph, pw = dims.patch_size
    _, t, h, w = latent_shape
    grid = (t // pt, h // ph, w // pw)
    n_full = grid[0] * grid[1] * grid[2]
    ratio = model_cfg.sparse_ratio
    tp, hp, wp = padded_grid(grid, ratio, 1, sparse=True)
    n_pad = tp * hp * wp
    lt = text_len
    kinds = block_schedule(dims.num_layers, model_cfg.schedule, dims.num_full_blocks)
    out = {"linear": 0.0, "self_attention": 0.0, "cross_attention": 0.0, "ffn": 0.0}
    sparse_model = any(k != "full" for k in kinds)  # the dense Wan schedule never leaves the raster sequence
    for kind in kinds:
        n = n_pad if sparse_model and not packed and (kind != "full" or padded) else n_full
        out["linear"] += 4 * 2 * n * c * c + 2 * 2 * n * c * c + 2 * 2 * lt * c * c
        if kind == "full":
            out["self_attention"] += 4.0 * n_full * n_full * c
        else:
            out["self_attention"] += sum(4.0 * m * m * c for m in class_sizes(grid, ratio, kind))
        out["cross_attention"] += 4.0 * n * lt * c
        out["ffn"] += 2 * 2 * n * c * f
    patch_dim = dims.in_channels * pt * ph * pw
    out["embed_head"] = 2.0 * n_full * patch_dim * c + 2.0 * n_full * c * dims.out_channels * pt * ph * pw
    out["text_embed"] = 2.0 * lt * (dims.text_dim * c + c * c)
    out["total"] = sum(out.values())
    out["tokens"] = float(n_full)
    out["tokens_padded"] = float(n_pad)
    return out


def train_flops_per_sample(model_cfg, latent_shape: Sequence[int], text_len: int, recompute: bool = False,
                           padded: bool = True, packed: bool = False) -> float:
    """Executed FLOPs of one training sample: 3x forward (+1x forward with full activation recompute)."""
    fwd = forward_flops(model_cfg, latent_shape, text_len, padded, packed)["total"]
    return fwd * (4.0 if recompute else 3.0)


def model_flops_per_sample(model_cfg, latent_shape: Sequence[int], text_len: int) -> float:
    """Model FLOPs of one training sample, the numerator of MFU: 3x the forward on the real tokens only (no
    padding, no recompute), whatever the placement executes."""
    return 3.0 * forward_flops(model_cfg, latent_shape, text_len, padded=False, packed=True)["total"]


def packed_plan(padding_free, padded: bool) -> bool:
    """Whether a plan runs padding-free (`model.padding_free`: None = where the plan is not layout-native)."""
    return (not padded) if padding_free is None else bool(padding_free)
