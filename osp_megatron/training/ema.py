"""Exponential moving average of the model weights.

The EMA copy is a second model built by the same factory (same TP/PP shard, same module names), kept in
fp32 without gradients, so `ema.module.sharded_state_dict(prefix="ema.")` checkpoints and reshards exactly
like the model. Update every `interval` optimizer steps: ema = decay * ema + (1 - decay) * weights.
The twin may live on another device than the model (`train.ema_device=cpu`: host memory, for models whose
fp32 copy does not fit next to the training state; each update then copies the weights device -> host).
"""
from __future__ import annotations

from typing import Callable

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything with a `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class EMA:
    """EMA weights of `source` in a twin module from `build_twin()` (fp32, no grad)."""

    def __init__(self, build_twin: Callable[[], torch.nn.Module], source: torch.nn.Module, decay: float, interval: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1) (train.ema_decay)")
        self.decay = float(decay)
        self.interval = int(interval)
        self.module = build_twin().float()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.copy_from(source)

    def _pairs(self, source: torch.nn.Module):
        src = dict(unwrap(source).named_parameters())
        dst = dict(self.module.named_parameters())
        if src.keys() != dst.keys():
            missing = sorted(set(src) ^ set(dst))[:5]
            raise RuntimeError(f"EMA twin does not match the model: differing parameters {missing}")
        return [(dst[k], src[k]) for k in dst]

    @torch.no_grad()
    def copy_from(self, source: torch.nn.Module) -> None:
        for e, p in self._pairs(source):
            e.copy_(p.detach().to(device=e.device, dtype=torch.float32))

    @torch.no_grad()
    def update(self, source: torch.nn.Module, step: int) -> bool:
        """Apply one EMA update after optimizer step `step` (1-based) if it falls on the interval."""
        if step % self.interval != 0:
            return False
        for e, p in self._pairs(source):
            e.mul_(self.decay).add_(p.detach().to(device=e.device, dtype=torch.float32, non_blocking=True),
                                    alpha=1.0 - self.decay)
        return True

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def sharded_state_dict(self):
        return self.module.sharded_state_dict(prefix="ema.")
