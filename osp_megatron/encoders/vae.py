"""Wan VAE (diffusers `AutoencoderKLWan`): video [b, 3, T, H, W] in [-1, 1] <-> normalised latents
[b, 16, (T-1)/4+1, H/8, W/8].

`spec` is a local path (a diffusers VAE folder, or a pipeline folder with a `vae/` subfolder) or `"tiny"`:
the real class with tiny widths, random-initialised from a fixed seed (same weights every time, the global
RNG untouched). Latents are normalised like the Wan pipelines: `(mu - latents_mean) / latents_std`;
`decode` undoes it.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

TINY_SEED = 20240
TINY_VAE_KWARGS = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)


class WanVAE:
    """Encode/decode with latent normalisation; `latents_mean`/`latents_std` are per-channel lists."""

    temporal_stride = 4
    spatial_stride = 8

    def __init__(self, model, spec: str, device: torch.device, dtype: torch.dtype):
        self.model, self.spec, self.device, self.dtype = model, spec, device, dtype
        cfg = model.config
        self.z_dim = int(cfg.z_dim)
        self.latents_mean: List[float] = [float(x) for x in cfg.latents_mean]
        self.latents_std: List[float] = [float(x) for x in cfg.latents_std]
        self._mean = torch.tensor(self.latents_mean, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(self.latents_std, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def latent_shape(self, frames: int, height: int, width: int) -> List[int]:
        """[16, T', H', W'] for a [3, frames, height, width] clip."""
        return [self.z_dim, (frames - 1) // self.temporal_stride + 1, height // self.spatial_stride,
                width // self.spatial_stride]

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE encode: expected video [b, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % self.temporal_stride or h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"VAE encode: T={t} must be 4k+1 and H={h}, W={w} multiples of 8")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[b, 3, T, H, W] in [-1, 1] -> normalised float32 latents [b, 16, (T-1)/4+1, H/8, W/8] (posterior mean
        unless `sample`)."""
        self._check_video(video)
        dist = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.float() - self._mean) / self._std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [b, 16, T', H', W'] -> float32 video [b, 3, 4(T'-1)+1, 8H', 8W'] clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"VAE decode: expected latents [b, {self.z_dim}, T, H, W], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32) * self._std + self._mean
        return self.model.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


def tiny_vae_model():
    """The real AutoencoderKLWan class with tiny widths, weights from a fixed seed."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return AutoencoderKLWan(**TINY_VAE_KWARGS)


def load_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """`"tiny"` or a local diffusers folder -> WanVAE in eval mode on `device` / `dtype`."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        raise RuntimeError("the Wan VAE needs diffusers: pip install 'osp-megatron[encoders]'") from exc
    device = torch.device(device)
    if spec == "tiny":
        model = tiny_vae_model()
    else:
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"encoders.vae={spec!r}: not a folder; give a local diffusers AutoencoderKLWan "
                                    "folder (or a Wan diffusers pipeline folder with vae/) or 'tiny'")
        sub = os.path.join(spec, "vae")
        path = sub if os.path.isdir(sub) and not os.path.isfile(os.path.join(spec, "config.json")) else spec
        model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
    model = model.to(device=device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    model = model.eval().requires_grad_(False)
    return WanVAE(model, spec, device, dtype)


__all__ = ["WanVAE", "load_vae", "tiny_vae_model", "TINY_VAE_KWARGS"]
