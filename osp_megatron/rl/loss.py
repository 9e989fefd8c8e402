"""PPO-clip GRPO loss on one trained denoising step, and the KL-to-reference term.

Per sample: `ρ = exp(logp_θ - logp_old)`, `L = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))`, averaged over the batch.
The trainer divides by (#trained steps x #micro-batches of an update) and backpropagates step by step.
KL (Flow-GRPO / OSP-Next form): `β·||μθ - μref||² / (2 s²)` averaged over elements and batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class PPOStats:
    """Detached per-batch statistics: mean ratio, clip fraction, mean |log ratio|, policy loss."""

    ratio_mean: float
    clip_frac: float
    approx_kl: float
    policy_loss: float


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float):
    """(scalar loss, PPOStats). All inputs `[b]`; `old_log_prob` and `advantages` are treated as constants."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.dim() != 1:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} must all be [b]")
    adv = advantages.detach().to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = PPOStats(
            ratio_mean=float(ratio.mean()),
            clip_frac=float(((ratio - 1.0).abs() > clip_range).float().mean()),
            approx_kl=float((0.5 * (log_prob - old_log_prob) ** 2).mean()),
            policy_loss=float(loss),
        )
    return loss, stats


def kl_penalty(mean: Tensor, mean_ref: Tensor, std: float, beta: float) -> Tensor:
    """`β·||μθ - μref||²/(2 s²)` averaged over non-batch dims and the batch (scalar)."""
    kl = ((mean - mean_ref.detach()) ** 2).flatten(1).mean(dim=1) / (2.0 * std * std)
    return beta * kl.mean()


def reinforce_surrogate(log_prob: Tensor, advantages: Tensor, old_log_prob: Optional[Tensor] = None) -> Tensor:
    """`-A·ρ` without clipping (reference for tests: equals the PPO loss while nothing is clipped)."""
    ratio = torch.exp(log_prob - (old_log_prob.detach() if old_log_prob is not None else log_prob.detach()))
    return (-advantages.detach() * ratio).mean()
