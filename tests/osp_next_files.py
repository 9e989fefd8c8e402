"""Tiny checkpoints in OSP-Next's released format, written the way OSP-Next writes them (no project code).

Key names and shapes follow `ospnext/modules/osp_next.py` (OSPNextAttentionBlock, Conv3d patch embedding,
nn.Sequential embeddings) and `ospnext/modules/want2v.py` (Head); config.json holds `OSPNextModel.__init__`'s
registered arguments as diffusers' `save_pretrained` writes them, plus `text_dim` (OSP-Next's loader ignores it;
the tiny model's text width is 32 instead of umT5's 4096). Training checkpoints follow
`ospnext/distributed/checkpoint.py`: `<output_dir>/config.yaml` (`model_config:`) + `iter_XXXXXXXXX/{model,
ema_model}_state_dict.pt`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

DIM, FFN, HEADS, LAYERS, IN, OUT, FREQ, TEXT = 64, 128, 4, 8, 16, 16, 32, 32

CONFIG = {
    "_class_name": "OSPNextModel", "_diffusers_version": "0.35.1", "dim": DIM, "eps": 1e-06, "ffn_dim": FFN,
    "freq_dim": FREQ, "in_dim": IN, "model_type": "t2v", "num_full_blocks": 4, "num_heads": HEADS,
    "num_layers": LAYERS, "out_dim": OUT, "quant": None, "quant_attn": None, "scale_max_backward": 224.0,
    "scale_max_forward": 15.0, "skiparse_model_type": "dual_end", "sparse_ratio": 2, "text_len": 512,
    "text_dim": TEXT,
}


def shapes(dim=DIM, ffn=FFN, layers=LAYERS, in_dim=IN, out_dim=OUT, freq=FREQ, text=TEXT) -> Dict[str, tuple]:
    out = {"patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
           "text_embedding.0.weight": (dim, text), "text_embedding.0.bias": (dim,),
           "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
           "time_embedding.0.weight": (dim, freq), "time_embedding.0.bias": (dim,),
           "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
           "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
           "head.head.weight": (4 * out_dim, dim), "head.head.bias": (4 * out_dim,), "head.modulation": (1, 2, dim)}
    for i in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                out[f"blocks.{i}.{attn}.{lin}.weight"] = (dim, dim)
                out[f"blocks.{i}.{attn}.{lin}.bias"] = (dim,)
            out[f"blocks.{i}.{attn}.norm_q.weight"] = (dim,)
            out[f"blocks.{i}.{attn}.norm_k.weight"] = (dim,)
        out[f"blocks.{i}.norm3.weight"], out[f"blocks.{i}.norm3.bias"] = (dim,), (dim,)
        out[f"blocks.{i}.ffn.0.weight"], out[f"blocks.{i}.ffn.0.bias"] = (ffn, dim), (ffn,)
        out[f"blocks.{i}.ffn.2.weight"], out[f"blocks.{i}.ffn.2.bias"] = (dim, ffn), (dim,)
        out[f"blocks.{i}.modulation"] = (1, 6, dim)
    return out


def random_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights in OSP-Next's names (norm weights around 1, the rest small)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes().items():
        t = torch.randn(shape, generator=g)
        sd[name] = 1.0 + 0.1 * t if ".norm" in name else 0.08 * t
    return sd


def write_folder(path: Path, sd: Dict[str, torch.Tensor], **config) -> Path:
    """An `OSPNextModel.save_pretrained`-style folder: config.json + diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config}, indent=2))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    return path


def write_training_output(path: Path, iterations: Dict[int, Dict[str, Dict[str, torch.Tensor]]], **config) -> Path:
    """`output_dir/config.yaml` + `iter_XXXXXXXXX/{model,ema_model}_state_dict.pt` per iteration."""
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    model_config = {k: v for k, v in {**CONFIG, **config}.items() if not k.startswith("_")}
    (path / "config.yaml").write_text(yaml.dump({"model_name": "osp_next", "model_config": model_config}, indent=4))
    for it, files in iterations.items():
        d = path / f"iter_{it:09d}"
        d.mkdir()
        for name, sd in files.items():
            torch.save(sd, d / f"{name}_state_dict.pt")
    return path



def loader_stand_in():
    """A diffusers ModelMixin with `OSPNextModel.__init__`'s signature and `ignore_for_config`, holding zero
    parameters under OSP-Next's names and shapes: `from_pretrained` on it is the loading path of
    `infer/infer_osp.py`. (Its `text_dim` default is the tiny model's 32: the loader never reads text_dim.)"""
    import torch.nn as nn
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class OSPNextModel(ModelMixin, ConfigMixin):
        ignore_for_config = ["patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size"]

        @register_to_config
        def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192,
                     freq_dim=256, text_dim=TEXT, out_dim=16, num_heads=16, num_layers=32, window_size=(-1, -1),
                     qk_norm=True, cross_attn_norm=True, eps=1e-6, skiparse_model_type="full", sparse_ratio=1,
                     num_full_blocks=0, quant=None, quant_attn=None, scale_max_forward=15.0, scale_max_backward=224.0,
                     **kwargs):
            super().__init__()
            assert model_type == "t2v" and skiparse_model_type in ("full", "dual_end")
            for name, shape in shapes(dim, ffn_dim, num_layers, in_dim, out_dim, freq_dim, text_dim).items():
                *path, leaf = name.split(".")
                module = self
                for part in path:
                    if part not in module._modules:
                        module.add_module(part, nn.Module())
                    module = module._modules[part]
                module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))

    return OSPNextModel
