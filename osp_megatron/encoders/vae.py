"""Wan VAE (diffusers `AutoencoderKLWan`): video [b, 3, T, H, W] in [-1, 1] <-> normalised latents
[b, 16, (T-1)/4+1, H/8, W/8].

`spec` is a local path (a diffusers VAE folder, or a pipeline folder with a `vae/` subfolder), `"tiny"`:
the real class with tiny widths, random-initialised from a fixed seed (same weights every time, the global
RNG untouched), or `"patch"`: `PatchVAE`, a fixed linear pixel-patch code with the Wan latent layout whose
decode is a readable low-resolution video (the CPU demo's VAE: a random tiny VAE decodes to noise). Latents are normalised like the Wan pipelines: `(mu - latents_mean) / latents_std`;
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


class PatchVAE:
    """A deterministic linear stand-in with the Wan VAE's latent layout: video [b, 3, T, H, W] in [-1, 1] <->
    latents [b, 16, (T-1)/4+1, H/8, W/8].

    Frames are grouped like the causal Wan VAE (frame 0 alone, then groups of 4). Per group and 4x4-pixel cell
    the code keeps the mean RGB and the least-squares slope of the luma over the group's frames; the 2x2 cells of
    each 8x8 patch are stacked into channels: 12 = (rgb, dy, dx), 4 = (slope, dy, dx). `decode` paints each cell
    with its colour plus slope x (frame offset): a 4x4-pixel-block video, exact on cell-constant, linearly changing
    clips. Normalised like the Wan VAE with fixed per-channel `latents_mean` / `latents_std`.
    """

    temporal_stride = 4
    spatial_stride = 8
    cell = 4
    z_dim = 16
    rgb_std, slope_std = 0.6, 0.035  # ~unit variance on the synthetic clips
    _offsets = (-1.5, -0.5, 0.5, 1.5)  # frame offsets inside a group of 4 (sum of squares 5)

    def __init__(self, device: torch.device, spec: str = "patch"):
        self.spec, self.device, self.dtype, self.model = spec, torch.device(device), torch.float32, None
        self.latents_mean: List[float] = [0.0] * self.z_dim
        self.latents_std: List[float] = [self.rgb_std] * 12 + [self.slope_std] * 4

    latent_shape = WanVAE.latent_shape
    _check_video = WanVAE._check_video

    def _std(self, device) -> torch.Tensor:
        return torch.tensor(self.latents_std, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[b, 3, T, H, W] in [-1, 1] -> normalised float32 latents [b, 16, (T-1)/4+1, H/8, W/8] (deterministic;
        `sample` and `generator` are accepted for the WanVAE signature)."""
        self._check_video(video)
        x = video.to(self.device, torch.float32)
        b, _, t, h, w = x.shape
        c = self.cell
        cells = torch.nn.functional.avg_pool3d(x, (1, c, c))  # [b, 3, T, H/4, W/4]
        first, rest = cells[:, :, :1], cells[:, :, 1:].reshape(b, 3, (t - 1) // 4, 4, h // c, w // c)
        offsets = torch.tensor(self._offsets, device=x.device).view(1, 1, 1, 4, 1, 1)
        rgb = torch.cat([first, rest.mean(dim=3)], dim=2)  # [b, 3, T', H/4, W/4]
        slope = (rest.mean(dim=1, keepdim=True) * offsets).sum(dim=3) / 5.0  # [b, 1, T'-1, H/4, W/4]
        slope = torch.cat([torch.zeros_like(first[:, :1]), slope], dim=2)
        z = torch.cat([_space_to_depth(rgb), _space_to_depth(slope)], dim=1)
        return z / self._std(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [b, 16, T', H', W'] -> float32 video [b, 3, 4(T'-1)+1, 8H', 8W'] clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"VAE decode: expected latents [b, {self.z_dim}, T, H, W], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32) * self._std(self.device)
        rgb, slope = _depth_to_space(z[:, :12]), _depth_to_space(z[:, 12:])  # [b, 3|1, T', H/4, W/4]
        b, _, tl, hc, wc = rgb.shape
        offsets = torch.tensor(self._offsets, device=z.device).view(1, 1, 1, 4, 1, 1)
        rest = rgb[:, :, 1:, None] + slope[:, :, 1:, None] * offsets  # [b, 3, T'-1, 4, H/4, W/4]
        frames = torch.cat([rgb[:, :, :1], rest.reshape(b, 3, 4 * (tl - 1), hc, wc)], dim=2)
        c = self.cell
        video = frames.repeat_interleave(c, dim=3).repeat_interleave(c, dim=4)
        return video.clamp(-1, 1)


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """[b, c, T, 2H, 2W] -> [b, 4c, T, H, W], channel order (c, dy, dx)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, 4 * c, t, h // 2, w // 2)


def _depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """[b, 4c, T, H, W] -> [b, c, T, 2H, 2W], the inverse of `_space_to_depth`."""
    b, c4, t, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c4 // 4, t, 2 * h, 2 * w)


def tiny_vae_model():
    """The real AutoencoderKLWan class with tiny widths, weights from a fixed seed."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return AutoencoderKLWan(**TINY_VAE_KWARGS)


def load_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """`"tiny"` or a local diffusers folder -> WanVAE in eval mode on `device` / `dtype`; `"patch"` -> PatchVAE
    (float32)."""
    if spec == "patch":
        return PatchVAE(torch.device(device))
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
                                    "folder (or a Wan diffusers pipeline folder with vae/), 'tiny' or 'patch'")
        sub = os.path.join(spec, "vae")
        path = sub if os.path.isdir(sub) and not os.path.isfile(os.path.join(spec, "config.json")) else spec
        model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
    model = model.to(device=device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    model = model.eval().requires_grad_(False)
    return WanVAE(model, spec, device, dtype)


__all__ = ["WanVAE", "PatchVAE", "load_vae", "tiny_vae_model", "TINY_VAE_KWARGS"]
