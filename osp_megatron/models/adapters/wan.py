"""Original Wan2.1 checkpoint layout (`wan/modules/model.py` WanModel) <-> ours.

Wan names the cross-attention norm `norm3` (diffusers calls it `norm2`); embeddings are nn.Sequential
(`text_embedding.0/.2`, `time_embedding.0/.2`, `time_projection.1`); the head is `head.head` + `head.modulation`.
"""
from __future__ import annotations

from typing import Any, Dict

from osp_megatron.models.adapters.common import StateDict, export_state_dict, import_state_dict
from osp_megatron.models.adapters import diffusers as diffusers_adapter

TO_OURS = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    (r"time_embedding\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    (r"time_projection\.1\.(weight|bias)", r"time_projection.\1"),
    (r"text_embedding\.0\.(weight|bias)", r"text_embedding.linear_1.\1"),
    (r"text_embedding\.2\.(weight|bias)", r"text_embedding.linear_2.\1"),
    (r"blocks\.(\d+)\.self_attn\.([qkv])\.(weight|bias)", r"blocks.\1.self_attention.linear_\2.\3"),
    (r"blocks\.(\d+)\.self_attn\.o\.(weight|bias)", r"blocks.\1.self_attention.linear_proj.\2"),
    (r"blocks\.(\d+)\.self_attn\.norm_([qk])\.weight", r"blocks.\1.self_attention.\2_norm.weight"),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])\.(weight|bias)", r"blocks.\1.cross_attention.linear_\2.\3"),
    (r"blocks\.(\d+)\.cross_attn\.o\.(weight|bias)", r"blocks.\1.cross_attention.linear_proj.\2"),
    (r"blocks\.(\d+)\.cross_attn\.norm_([qk])\.weight", r"blocks.\1.cross_attention.\2_norm.weight"),
    (r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.mlp.linear_fc1.\2"),
    (r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.mlp.linear_fc2.\2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.modulation"),
    (r"head\.modulation", r"head.modulation"),
    (r"head\.head\.(weight|bias)", r"head.linear.\1"),
]
TO_WAN = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"time_embedding\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"time_projection\.(weight|bias)", r"time_projection.1.\1"),
    (r"text_embedding\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"text_embedding\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"blocks\.(\d+)\.self_attention\.linear_([qkv])\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.self_attention\.linear_proj\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.self_attention\.([qk])_norm\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.cross_attention\.linear_([qkv])\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.cross_attention\.linear_proj\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.cross_attention\.([qk])_norm\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.mlp\.linear_fc1\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.mlp\.linear_fc2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.modulation"),
    (r"head\.modulation", r"head.modulation"),
    (r"head\.linear\.(weight|bias)", r"head.head.\1"),
]


def config_from_wan(config: Dict[str, Any]):
    """Wan2.1 config.json (dim, ffn_dim, num_heads, ...) -> ModelConfig (schedule `full`)."""
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"Wan model_type={config.get('model_type')!r}: only t2v checkpoints are supported")
    return diffusers_adapter.config_from_diffusers({
        "num_attention_heads": config["num_heads"], "attention_head_dim": config["dim"] // config["num_heads"],
        "ffn_dim": config["ffn_dim"], "num_layers": config["num_layers"], "in_channels": config.get("in_dim", 16),
        "out_channels": config.get("out_dim", 16), "text_dim": config.get("text_dim", 4096),
        "freq_dim": config.get("freq_dim", 256), "patch_size": config.get("patch_size", [1, 2, 2]),
        "eps": config.get("eps", 1e-6),
    })


def wan_config(model_config) -> Dict[str, Any]:

    d = model_config.resolve()
    return {
        "_class_name": "WanModel", "model_type": "t2v", "patch_size": list(d.patch_size), "text_len": 512,
        "in_dim": d.in_channels, "dim": d.hidden_size, "ffn_dim": d.ffn_hidden_size, "freq_dim": d.freq_dim,
        "text_dim": d.text_dim, "out_dim": d.out_channels, "num_heads": d.num_attention_heads,
        "num_layers": d.num_layers, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": d.eps,
    }


# the three names DESIGN.md §6 promises for every adapter
config_from_original = config_from_wan


def from_wan(state_dict: StateDict, model_config) -> StateDict:
    """Original Wan2.1 keys -> our full keys. Raises StateDictMismatch naming missing/unexpected keys."""
    return import_state_dict(state_dict, TO_OURS, model_config, "from_wan")


def to_wan(state_dict: StateDict, model_config) -> StateDict:
    """Our full keys -> original Wan2.1 keys."""
    return export_state_dict(state_dict, TO_WAN, model_config, "to_wan")


# DESIGN.md names: config_from_diffusers / from_diffusers / to_diffusers in `adapters.diffusers`,
# and the same three names here for the original Wan2.1 layout.
config_from_diffusers = config_from_wan
from_diffusers = from_wan
to_diffusers = to_wan
