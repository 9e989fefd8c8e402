"""Named model sizes (Wan2.1 T2V dims) and the OSP-Next layout schedule on top.

`tiny` is for CPU tests; `wan_1_3b` / `wan_14b` are Wan2.1 T2V exactly (head_dim 128, RoPE t/h/w
44/42/42). The OSP-Next variants are the same weights with `schedule=dual_end` (8 full blocks).
"""
from __future__ import annotations

from typing import Any, Dict, List

from osp_megatron.skiparse import block_schedule

SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_layers=8,
        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, patch_size=[1, 2, 2],
        eps=1e-6, rope_theta=10000.0, default_num_full=4,
    ),
    "wan_1_3b": dict(
        hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, num_layers=30,
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2],
        eps=1e-6, rope_theta=10000.0, default_num_full=8,
    ),
    "wan_14b": dict(
        hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, num_layers=40,
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2],
        eps=1e-6, rope_theta=10000.0, default_num_full=8,
    ),
}

DIM_FIELDS = (
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "in_channels",
    "out_channels", "text_dim", "freq_dim", "patch_size", "eps", "rope_theta",
)
SCHEDULES = ("full", "dual_end", "uniform")


def resolve_model_dims(model_cfg) -> Dict[str, Any]:
    """Registry entry for `model_cfg.size` with the explicit fields of `model_cfg` applied."""
    if model_cfg.size not in SIZES:
        raise KeyError(model_cfg.size)
    dims = dict(SIZES[model_cfg.size])
    for name in DIM_FIELDS:
        value = getattr(model_cfg, name, None)
        if value is not None:
            dims[name] = list(value) if name == "patch_size" else value
    num_full = model_cfg.num_full_blocks
    if num_full is None:
        num_full = dims["default_num_full"] if model_cfg.schedule == "dual_end" else max(2, dims["num_layers"] // 3 // 2 * 2)
    dims["num_full_blocks"] = num_full
    dims.pop("default_num_full")
    return dims


def validate_model_config(model_cfg, errors: List[str]) -> None:
    if model_cfg.size not in SIZES:
        errors.append(f"model.size={model_cfg.size!r}: use one of {', '.join(SIZES)}")
        return
    if model_cfg.schedule not in SCHEDULES:
        errors.append(f"model.schedule={model_cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if model_cfg.sparse_ratio not in (2, 4):
        errors.append(f"model.sparse_ratio={model_cfg.sparse_ratio}: P must be 2 (released) or 4")
    if model_cfg.attention_backend not in ("auto", "sdpa", "flash", "te", "math"):
        errors.append(f"model.attention_backend={model_cfg.attention_backend!r}: use auto, sdpa, flash, te or math")
    if model_cfg.spec not in ("local", "te"):
        errors.append(f"model.spec={model_cfg.spec!r}: use local or te")
    dims = resolve_model_dims(model_cfg)
    h, heads = dims["hidden_size"], dims["num_attention_heads"]
    if h % heads != 0:
        errors.append(f"model: hidden_size={h} is not divisible by num_attention_heads={heads}")
    else:
        head_dim = h // heads
        if head_dim % 2 != 0 or head_dim < 6:
            errors.append(f"model: head_dim={head_dim} must be even and >= 6 for 3D RoPE")
    if list(dims["patch_size"]) != [1, 2, 2]:
        errors.append(f"model.patch_size={dims['patch_size']}: only [1, 2, 2] (Wan2.1) is supported")
    if model_cfg.schedule != "full":
        try:
            block_schedule(dims["num_layers"], model_cfg.schedule, dims["num_full_blocks"])
        except ValueError as exc:
            errors.append(f"model.num_full_blocks: {exc}")
