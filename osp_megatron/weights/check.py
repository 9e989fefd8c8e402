"""Compare two conversions of one model on one random input (`osp-convert --check`).

A side in diffusers format can run diffusers' own `WanTransformer3DModel` (an independent implementation); the
other sides run our DiT (single process, fp32) with the weights read back from disk. Inputs: latents
[1, C, 3, 8, 12], timestep [1] = 500, text [1, 8, text_dim] from a fixed seed.
"""
from __future__ import annotations

from typing import Dict

import torch

from osp_megatron.models import build_model
from osp_megatron.parallel import ParallelState
from osp_megatron.weights.files import read_state_dict


def random_inputs(dims, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, dims.in_channels, 3, 8, 12, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 8, dims.text_dim, generator=g)
    return x, t, text


@torch.no_grad()
def run_ours(sd, model_config, inputs) -> torch.Tensor:
    model = build_model(model_config, ParallelState.single(), device="cpu").float().eval()
    model.load_full_state_dict({k: v.float() for k, v in sd.items()})
    return model(*inputs).float()


@torch.no_grad()
def run_diffusers(folder: str, inputs) -> torch.Tensor:
    import json
    from pathlib import Path

    from diffusers import WanTransformer3DModel


    config = json.loads((Path(folder) / "config.json").read_text())
    model = WanTransformer3DModel.from_config(config).float().eval()  # no `accelerate` needed
    model.load_state_dict(read_state_dict(folder), strict=True)
    x, t, text = inputs
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float()


def compare(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    diff = (a - b).abs()
    den = b.norm().item()
    return {"max_abs": diff.max().item(), "rel": ((a - b).norm().item() / den) if den > 0 else diff.norm().item()}
