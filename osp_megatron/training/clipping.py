"""Gradient clipping bounds: a fixed global-norm bound, or OSP-Next's adaptive one.

`GradClipper.bound(grad_norm)` takes the global gradient norm of this step (all ranks agree on it, e.g.
megatron's `optimizer.get_grad_norm()`) and returns the norm to clip to (None: no clipping). The caller scales
the gradients (e.g. `clip_grad_by_total_norm_fp32`); this module touches no tensors and no process groups, so the
trainer and GRPO share it.

adaptive (OSP-Next's `AdaptiveGradClipper`, `ospnext/utils/clip_grads.py`): the bound is `mean + 3·sqrt(var)` of an
EMA (decay 0.99) over the norms of accepted steps. The first step starts the mean at `min(initial, 3·norm)` with
variance 0. A step whose norm is within the bound updates the EMA: first `mean ← d·mean + (1-d)·norm`, then
`var ← d·var + (1-d)·(mean - norm)²` with the updated mean. A step above the bound is clipped to it and leaves the
EMA as it was, so one spike does not raise the bound.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

CLIP_MODES = ("norm", "adaptive")


class GradClipper:
    """`mode` norm: clip to `max_norm` (0: off); adaptive: OSP-Next's EMA bound starting at `max_norm`."""

    def __init__(self, mode: str = "norm", max_norm: float = 1.0, ema_decay: float = 0.99) -> None:
        if mode not in CLIP_MODES:
            raise ValueError(f"clip_mode={mode!r}: use one of {', '.join(CLIP_MODES)}")
        if mode == "adaptive" and max_norm <= 0:
            raise ValueError("adaptive clipping needs max_norm > 0 (its initial bound)")
        self.mode, self.max_norm, self.ema_decay = mode, float(max_norm), float(ema_decay)
        self.mean: Optional[float] = None  # adaptive state; None before the first step
        self.var = 0.0
        self.last_bound: Optional[float] = None

    def bound(self, grad_norm: float) -> Optional[float]:
        """The norm to clip this step's gradients to (None: leave them). Adaptive: updates the EMA."""
        if self.mode == "norm":
            self.last_bound = self.max_norm if self.max_norm > 0 else None
            return self.last_bound
        g = float(grad_norm)
        if not math.isfinite(g):
            raise ValueError(f"adaptive clipping got a non-finite gradient norm {g}; skip the step instead")
        if self.mean is None:
            self.mean, self.var = min(self.max_norm, 3.0 * g), 0.0
        bound = self.mean + 3.0 * math.sqrt(self.var)
        if g <= bound:
            d = self.ema_decay
            self.mean = d * self.mean + (1.0 - d) * g
            self.var = d * self.var + (1.0 - d) * (self.mean - g) ** 2
        self.last_bound = bound
        return bound

    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore the EMA (a checkpoint of another mode, or none, starts it afresh)."""
        if state and state.get("mode") == self.mode:
            self.mean, self.var = state.get("mean"), float(state.get("var", 0.0))

    @classmethod
    def from_train_config(cls, train_cfg) -> "GradClipper":
        return cls(train_cfg.clip_mode, train_cfg.clip_grad, train_cfg.clip_ema_decay)


__all__ = ["CLIP_MODES", "GradClipper"]
