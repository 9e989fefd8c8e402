"""SDE windows over the denoising steps, the MixGRPO-Flash compressed grid, and NFE accounting.

Step `i` of an N-step grid goes from `sigmas[i]` to `sigmas[i+1]`. A window is `[start, start+size)`; every window
lies inside `[0, limit)` (MixGRPO: limit = N - 2). The schedule is a pure function of the iteration (and the seed
for `random`), so resume needs only the iteration number.

progressive: the start moves by `stride` every `shift_interval` iterations; once it would leave `[0, limit-size]`
it goes back to 0 (`roll_back`) or stays at `limit-size`. fixed: always `start`. random: uniform in
`[0, limit-size]`, drawn from (seed, iteration). decay / exp_decay (MixGRPO `grpo_states.py`): progressive, but
the number of iterations before the next move depends on the current start s:
decay `max(min_i, int(max_i·(1 - s/limit) + min_i·s/limit))`, exp_decay `ceil(shift_interval·exp(-k·max(0, s - s0)))`.
`tail="mixgrpo"`: MixGRPO's end of the grid instead: the window is `[s, min(s+size, limit))` (it shrinks, and is
empty at s = limit), and only once s > limit does it go back to the initial start (`roll_back`) or stay at limit.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from osp_megatron.diffusion.samplers import flow_sigmas, shift_sigmas
from osp_megatron.training.rng import derive_seed


@dataclass(frozen=True)
class Window:
    start: int
    size: int

    @property
    def steps(self) -> Tuple[int, ...]:
        return tuple(range(self.start, self.start + self.size))

    @property
    def end(self) -> int:
        """One past the last window step (= index of the sigma the window ends at)."""
        return self.start + self.size


class WindowSchedule:
    """Window for each iteration. `window(it)` is pure; `trained_steps(it)` picks the trained subset."""

    def __init__(self, strategy: str, size: int, num_steps: int, start: int = 0, shift_interval: int = 1,
                 stride: int = 1, roll_back: bool = True, limit: Optional[int] = None, trained_steps: int = 0,
                 trained_select: str = "first", seed: int = 0, tail: str = "full", decay_max_interval: int = 0,
                 decay_min_interval: int = 0, exp_decay_k: float = 0.1, exp_decay_start: int = 13) -> None:
        self.strategy = strategy
        self.size = size
        self.num_steps = num_steps
        self.start = start
        self.shift_interval = shift_interval
        self.stride = stride
        self.roll_back = roll_back
        self.limit = limit if limit is not None else max(num_steps - 2, 1)
        self.trained = trained_steps if trained_steps > 0 else size
        self.trained_select = trained_select
        self.seed = seed
        self.tail = tail
        self.decay_max = decay_max_interval or shift_interval
        self.decay_min = decay_min_interval or max(1, shift_interval // 4)
        self.exp_decay_k, self.exp_decay_start = float(exp_decay_k), int(exp_decay_start)
        self._starts: List[int] = [start]  # window start of iterations 0, 1, ... (moving strategies)
        self._count = 0
        if strategy not in ("fixed", "progressive", "random", "decay", "exp_decay"):
            raise ValueError(f"window strategy {strategy!r}: use fixed, progressive, random, decay or exp_decay")
        if tail not in ("full", "mixgrpo"):
            raise ValueError(f"window tail {tail!r}: use full or mixgrpo")
        if not 1 <= size <= self.limit <= num_steps:
            raise ValueError(f"window size={size}, limit={self.limit}, steps={num_steps}: need 1 <= size <= limit <= steps")
        if not 0 <= start <= self.limit - size:
            raise ValueError(f"window start={start}: must be in [0, {self.limit - size}]")

    @classmethod
    def from_config(cls, c) -> "WindowSchedule":
        w = c.window
        return cls(w.strategy, w.size, c.steps, w.start, w.shift_interval, w.stride, w.roll_back, w.limit,
                   w.trained_steps, w.trained_select, c.seed, w.tail, w.decay_max_interval, w.decay_min_interval,
                   w.exp_decay_k, w.exp_decay_start)

    @property
    def max_start(self) -> int:
        return self.limit - self.size

    def window(self, iteration: int) -> Window:
        if self.strategy == "fixed":
            return Window(self.start, self.size)
        if self.strategy == "random":
            rng = random.Random(derive_seed(self.seed, iteration, 0x57A27))
            return Window(rng.randint(0, self.max_start), self.size)
        while len(self._starts) <= iteration:
            self._advance()
        start = self._starts[iteration]
        if self.tail == "mixgrpo":
            return Window(start, max(min(start + self.size, self.limit) - start, 0))
        return Window(start, self.size)

    def interval(self, start: int) -> float:
        """Iterations the window stays at `start` before it moves (progressive, decay, exp_decay)."""
        if self.strategy == "decay":
            progress = start / self.limit
            return max(self.decay_min, int(self.decay_max * (1 - progress) + self.decay_min * progress))
        if self.strategy == "exp_decay":
            return math.ceil(self.shift_interval * math.exp(-self.exp_decay_k * max(0, start - self.exp_decay_start)))
        return self.shift_interval

    def _advance(self) -> None:
        """One iteration of the moving window (the counter resets whenever the start moves)."""
        start = self._starts[-1]
        self._count += 1
        if self._count >= self.interval(start):
            self._count = 0
            start += self.stride
        if self.tail == "mixgrpo":
            if start > self.limit:
                if self.roll_back:
                    start, self._count = self.start, 0
                else:
                    start = self.limit
        elif start > self.max_start:
            start = 0 if self.roll_back else self.max_start
        self._starts.append(start)

    def trained_steps(self, iteration: int) -> Tuple[int, ...]:
        steps = self.window(iteration).steps
        if self.trained >= len(steps):
            return steps
        if self.trained_select == "first":
            return steps[: self.trained]
        rng = random.Random(derive_seed(self.seed, iteration, 0x7EA1))
        return tuple(sorted(rng.sample(list(steps), self.trained)))

    def state_dict(self) -> Dict[str, object]:
        state = {"strategy": self.strategy, "size": self.size, "start": self.start, "stride": self.stride,
                 "shift_interval": self.shift_interval, "roll_back": self.roll_back, "limit": self.limit}
        if self.tail != "full":
            state["tail"] = self.tail
        if self.strategy == "decay":
            state.update(decay_max_interval=self.decay_max, decay_min_interval=self.decay_min)
        if self.strategy == "exp_decay":
            state.update(exp_decay_k=self.exp_decay_k, exp_decay_start=self.exp_decay_start)
        return state

    def check_state(self, state: Dict[str, object]) -> None:
        """Resume guard: the saved schedule must equal this one (else the window history would jump)."""
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint window schedule differs from the config: {diff} (saved, config); "
                             "restore the grpo.window settings or start a new run_dir")


# --------------------------------------------------------------------------------------------
# MixGRPO-Flash grid
# --------------------------------------------------------------------------------------------
def flash_sigmas(steps: int, shift: float, window: Window, compression: float,
                 min_points: int = 2) -> Tuple[torch.Tensor, int]:
    """Grid for MixGRPO-Flash. Returns (sigmas, first DPM step index).

    Keeps the shifted N-step grid up to the window end `e = start+size` (`sigmas[0..e]`), then replaces the rest by
    `num_post = max(int((N - L)·compression), 2)` points (L = e-1, the last window step) spaced
    `linspace(t_e, 0, num_post)` in un-shifted time and shifted with the same shift: `num_post - 1` DPM steps,
    continuous at the junction. `min_points=1` is MixGRPO's `max(·, 1)`: a 1-point tail adds no step, so the grid
    ends at `sigmas[e]` above 0; 2 (default) keeps at least one step to σ=0.
    """
    base = flow_sigmas(steps, shift)
    e = window.end
    if e >= steps:
        return base, steps
    last = e - 1
    num_post = max(int((steps - last) * compression), min_points)
    t_e = 1.0 - e / steps  # un-shifted time of sigmas[e]
    post = shift_sigmas(torch.linspace(t_e, 0.0, num_post, dtype=torch.float64), shift)
    return torch.cat([base[: e + 1], post[1:]]), e


# --------------------------------------------------------------------------------------------
# NFE accounting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NFECount:
    """Model evaluations per sample (before the CFG factor, without prefix sharing: MixGRPO's accounting) and per
    iteration (with CFG and with the pre-window ODE run once per group: `prefix_runs` trajectories)."""

    ode_before: int
    sde: int
    ode_after: int
    train: int  # forward+backward passes per sample
    reference: int  # extra forward passes for the KL reference
    cfg_factor: int
    samples: int
    prefix_runs: int = -1  # trajectories that run the pre-window ODE steps (-1: every sample)

    @property
    def rollout_per_sample(self) -> int:
        return self.ode_before + self.sde + self.ode_after

    @property
    def per_sample(self) -> int:
        return self.rollout_per_sample + self.train + self.reference

    @property
    def per_iteration(self) -> int:
        runs = self.samples if self.prefix_runs < 0 else self.prefix_runs
        rest = self.sde + self.ode_after + self.train + self.reference
        return self.cfg_factor * (self.ode_before * runs + rest * self.samples)

    def as_dict(self) -> Dict[str, int]:
        return {"nfe_rollout_per_sample": self.rollout_per_sample, "nfe_train_per_sample": self.train,
                "nfe_reference_per_sample": self.reference, "nfe_per_sample": self.per_sample,
                "nfe_per_iteration": self.per_iteration}


def count_nfe(steps: int, window: Window, trained: int, flash_post_steps: Optional[int], cfg_scale: float,
              kl: bool, samples: int, prefix_runs: int = -1) -> NFECount:
    """NFE of one GRPO iteration: Euler before the window (`prefix_runs` trajectories when groups share it, else
    every sample), SDE inside, Euler (or `flash_post_steps` DPM steps) after; `trained` forward+backward passes per
    sample; `trained` reference passes with KL; x2 with CFG."""
    after = steps - window.end if flash_post_steps is None else flash_post_steps
    return NFECount(window.start, window.size, after, trained, trained if kl else 0,
                    2 if cfg_scale != 1.0 else 1, samples, prefix_runs)


def group_prefix_runs(num_samples: int, group_size: int, dp: int) -> int:
    """Pre-window trajectories per iteration when each group runs them once per DP rank that holds members of it
    (samples split contiguously over DP ranks)."""
    n = num_samples // dp
    return sum(len({j // group_size for j in range(r * n, (r + 1) * n)}) for r in range(dp))


def window_history(schedule: WindowSchedule, iterations: int) -> List[int]:
    """Window start of iterations 0..iterations-1 (for plots and tests)."""
    return [schedule.window(i).start for i in range(iterations)]
