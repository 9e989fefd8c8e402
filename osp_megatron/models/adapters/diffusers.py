"""diffusers `WanTransformer3DModel` <-> ours (same math, renamed keys; Conv3d patch weight <-> Linear)."""
from __future__ import annotations

from typing import Any, Dict

from osp_megatron.config import SIZES, ModelConfig
from osp_megatron.models.adapters.common import StateDict, export_state_dict, import_state_dict

_TO_OURS = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.time_embedder\.(linear_[12])\.(weight|bias)", r"time_embedding.\1.\2"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.\1"),
    (r"condition_embedder\.text_embedder\.(linear_[12])\.(weight|bias)", r"text_embedding.\1.\2"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.self_attention.linear_\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attention.linear_proj.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attention.\2_norm.weight"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"blocks.\1.cross_attention.linear_\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attention.linear_proj.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attention.\2_norm.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.linear_fc1.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.mlp.linear_fc2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"scale_shift_table", r"head.modulation"),
    (r"proj_out\.(weight|bias)", r"head.linear.\1"),
]
_TO_DIFFUSERS = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.(linear_[12])\.(weight|bias)", r"condition_embedder.time_embedder.\1.\2"),
    (r"time_projection\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"text_embedding\.(linear_[12])\.(weight|bias)", r"condition_embedder.text_embedder.\1.\2"),
    (r"blocks\.(\d+)\.self_attention\.linear_([qkv])\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
    (r"blocks\.(\d+)\.self_attention\.linear_proj\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.self_attention\.([qk])_norm\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (r"blocks\.(\d+)\.cross_attention\.linear_([qkv])\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
    (r"blocks\.(\d+)\.cross_attention\.linear_proj\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attention\.([qk])_norm\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.linear_fc1\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.linear_fc2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
    (r"head\.modulation", r"scale_shift_table"),
    (r"head\.linear\.(weight|bias)", r"proj_out.\1"),
]


def config_from_diffusers(config: Dict[str, Any]):
    """diffusers WanTransformer3DModel config.json dict -> ModelConfig (schedule `full`; set it for OSP-Next)."""
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ValueError("image-conditioned (I2V) Wan checkpoints are not supported: use a T2V checkpoint")
    heads = int(config["num_attention_heads"])
    dims = dict(
        hidden_size=heads * int(config["attention_head_dim"]), ffn_hidden_size=int(config["ffn_dim"]),
        num_attention_heads=heads, num_layers=int(config["num_layers"]), in_channels=int(config["in_channels"]),
        out_channels=int(config.get("out_channels") or config["in_channels"]), text_dim=int(config["text_dim"]),
        freq_dim=int(config["freq_dim"]), patch_size=list(config.get("patch_size", [1, 2, 2])),
        eps=float(config.get("eps", 1e-6)),
    )
    for name, entry in SIZES.items():
        if all(getattr(entry, k) == v for k, v in dims.items()):
            return ModelConfig(size=name, schedule="full")
    return ModelConfig(size="tiny", schedule="full", **dims)


def diffusers_config(model_config) -> Dict[str, Any]:
    """ModelConfig -> a diffusers WanTransformer3DModel config dict."""

    d = model_config.resolve()
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": list(d.patch_size),
        "num_attention_heads": d.num_attention_heads, "attention_head_dim": d.hidden_size // d.num_attention_heads,
        "in_channels": d.in_channels, "out_channels": d.out_channels, "text_dim": d.text_dim,
        "freq_dim": d.freq_dim, "ffn_dim": d.ffn_hidden_size, "num_layers": d.num_layers,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": d.eps, "image_dim": None,
        "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    }


def from_diffusers(state_dict: StateDict, model_config) -> StateDict:
    """diffusers keys -> our full (unsharded) keys. Raises StateDictMismatch naming missing/unexpected keys."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("norm_added_q.weight")}
    return import_state_dict(sd, _TO_OURS, model_config, "from_diffusers")


def to_diffusers(state_dict: StateDict, model_config) -> StateDict:
    """Our full keys -> diffusers keys (patch weight back to Conv3d [C, in, pt, ph, pw])."""
    return export_state_dict(state_dict, _TO_DIFFUSERS, model_config, "to_diffusers")
