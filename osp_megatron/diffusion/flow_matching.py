"""Rectified-flow (flow matching) training targets, as used by Wan2.1 / OSP-Next.

Convention (sigma in (0, 1), 0 = clean data, 1 = pure noise):
    x_t = (1 - sigma) * x0 + sigma * noise,      velocity target v = noise - x0,
    model timestep = 1000 * sigma.

Timesteps: `uniform` U(0, 1) or `logit_normal` sigmoid(N(mean, std)) (SD3). Shift:
static `shift` s maps sigma -> s*sigma / (1 + (s-1)*sigma); the dynamic (resolution-dependent) shift
uses s = exp(mu) with mu linear in a token count between (base_seq_len, base_shift) and
(max_seq_len, max_shift), as in Flux / SD3 (`time_shift(mu, 1, sigma)`). `shift_rule` picks the count:
`per_frame` = tokens of one latent frame, h*w/4 (OSP-Next's `FlowMatchingScheduler.q_sample`, with FLUX's
256 -> 0.5, 4096 -> 1.15), `per_sample` = tokens of the whole latent, T*h*w/4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from osp_megatron.training.rng import derive_seed


def sample_sigmas(
    n: int, generator: torch.Generator, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0
) -> torch.Tensor:
    """n unshifted sigmas in (0, 1), float64 on CPU (drawn from `generator`)."""
    if sampling == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return u.clamp(1e-5, 1.0 - 1e-5)
    if sampling == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float64) * logit_std + logit_mean
        return torch.sigmoid(z)
    raise ValueError(f"timestep sampling {sampling!r}: use uniform or logit_normal (train.timestep_sampling)")


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift: s*sigma / (1 + (s - 1)*sigma); s=1 is the identity, s>1 moves mass to high noise."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def dynamic_shift_mu(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """mu(seq_len): linear through (base_seq_len, base_shift) and (max_seq_len, max_shift) (Flux)."""
    if max_seq_len == base_seq_len:
        return base_shift
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def dynamic_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The static shift equivalent to Flux's time_shift(mu, 1, sigma): s = exp(mu)."""
    return math.exp(dynamic_shift_mu(seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


def tokens_per_sample(latent_shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Sequence length after patchify of one latent [C, T, H, W]."""
    _, t, h, w = latent_shape
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw)


def tokens_per_frame(latent_shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Tokens of one latent frame [C, T, H, W] after the spatial patchify: H*W / (ph*pw) (OSP-Next: h*w // 4)."""
    _, _, h, w = latent_shape
    return (h * w) // (patch_size[1] * patch_size[2])


SHIFT_RULES = ("per_sample", "per_frame")


def make_training_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x0, noise [b, C, T, H, W], sigma [b] -> (x_t, velocity target), both like x0."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1.0 - s) * x0 + s * noise
    return x_t, noise - x0


def step_seed(seed: int, dp_rank: int, step: int, micro: int = 0) -> int:
    """`derive_seed(seed, dp_rank, step, micro)`: CP/TP/PP ranks of one DP rank agree."""
    return derive_seed(seed, dp_rank, step, micro)


@dataclass
class FlowMatching:
    """Draws (x_t, timestep, target) for a latent batch; settings from `TrainConfig`."""

    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    use_dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    shift_rule: str = "per_sample"
    patch_size: Tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_train_config(cls, train_cfg, patch_size=(1, 2, 2)) -> "FlowMatching":
        return cls(
            sampling=train_cfg.timestep_sampling, logit_mean=train_cfg.logit_mean, logit_std=train_cfg.logit_std,
            shift=train_cfg.shift, use_dynamic_shift=train_cfg.dynamic_shift, base_shift=train_cfg.base_shift,
            max_shift=train_cfg.max_shift, base_seq_len=train_cfg.base_seq_len, max_seq_len=train_cfg.max_seq_len,
            shift_rule=train_cfg.shift_rule, patch_size=tuple(patch_size),
        )

    def shift_for(self, latent_shape: Sequence[int]) -> float:
        """The shift used for latents of shape [C, T, H, W] (dynamic: depends on the token count)."""
        if not self.use_dynamic_shift:
            return self.shift
        if self.shift_rule not in SHIFT_RULES:
            raise ValueError(f"train.shift_rule={self.shift_rule!r}: use one of {', '.join(SHIFT_RULES)}")
        count = tokens_per_frame if self.shift_rule == "per_frame" else tokens_per_sample
        n = count(latent_shape, self.patch_size)
        return dynamic_shift(n, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def sigmas(self, n: int, latent_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """n shifted sigmas (float64, CPU)."""
        sigma = sample_sigmas(n, generator, self.sampling, self.logit_mean, self.logit_std)
        return shift_sigmas(sigma, self.shift_for(latent_shape))

    def draw(self, x0: torch.Tensor, generator: torch.Generator):
        """x0 [b, C, T, H, W] -> (x_t, timestep [b] = 1000*sigma (float32), target v, sigma [b]).

        Noise and sigma come from `generator` on the CPU, so every rank seeded alike draws identical values.
        """
        b = x0.shape[0]
        sigma = self.sigmas(b, x0.shape[1:], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
        sigma_dev = sigma.to(device=x0.device, dtype=torch.float32)
        x_t, target = make_training_pair(x0, noise, sigma_dev)
        return x_t, (1000.0 * sigma_dev), target, sigma_dev
