"""Mixed ODE–SDE rollouts for Mix-GRPO, their noise, and re-scoring of stored transitions.

A `RolloutPlan` says, per step of the grid, how to move: `ode` (Euler) before/after the window, `sde` inside it
(Gaussian transition with log-prob), `dpm` (DPM-Solver++ on the compressed MixGRPO-Flash grid) after it.
Transitions of the trained steps are stored: latents `[b,K,C,T,H,W]` before the step, the sampled next latents,
and the old log-probs `[b,K]`.

Noise: every sample has a global id; its initial noise is drawn from (seed, iteration, id) (with
`init_same_noise` the id is its prompt slot, so a group starts from one noise) and its SDE noise at step i from
(seed, iteration, id, i). Every rank that holds the sample (all ranks of a context-parallel group) therefore draws
identical noise with no communication (values are drawn on the target device, so CPU and CUDA runs differ, all
CUDA ranks agree). `mode="broadcast"` instead draws on the group's first rank and broadcasts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from osp_megatron.diffusion.samplers import (
    DPMSolverPP,
    VelocityFn,
    euler_step,
    flow_sigmas,
    predict_x0,
    sde_noise_level,
    sde_step_with_logprob,
)
from osp_megatron.rl.windows import Window, flash_sigmas
from osp_megatron.training.rng import derive_seed

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------
class NoiseSource:
    """Per-sample Gaussian noise for one iteration (see module doc). `group`: the context-parallel process group
    (only used by `mode="broadcast"`)."""

    INITIAL_TAG = 1 << 20  # the σ=1 draw; SDE draws are tagged with their step index (0 .. steps - 1)

    def __init__(self, seed: int, iteration: int, mode: str = "seed", group=None, rank_seed: int = 0) -> None:
        if mode not in ("seed", "broadcast"):
            raise ValueError(f"noise mode {mode!r}: use seed or broadcast")
        self.seed, self.iteration, self.mode, self.group = int(seed), int(iteration), mode, group
        self._rank_gen = torch.Generator().manual_seed(derive_seed(seed, iteration, rank_seed, 0xB00))

    def _draw(self, shape: Sequence[int], ids: Sequence[int], tag: int, device) -> Tensor:
        device = torch.device(device)
        if self.mode == "seed":
            out = torch.empty((len(ids), *shape), dtype=torch.float32, device=device)
            gen = torch.Generator(device=device)
            for k, i in enumerate(ids):  # drawn on the target device: same values on every rank of one device type
                gen.manual_seed(derive_seed(self.seed, self.iteration, int(i), tag))
                out[k].normal_(generator=gen)
            return out
        out = torch.randn((len(ids), *shape), generator=self._rank_gen).to(device)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            src = dist.get_global_rank(self.group, 0)
            dist.broadcast(out, src=src, group=self.group)
        return out

    def initial(self, shape: Sequence[int], ids: Sequence[int], device="cpu") -> Tensor:
        """`[len(ids), *shape]` float32 noise at σ=1."""
        return self._draw(shape, ids, self.INITIAL_TAG, device)

    def sde(self, shape: Sequence[int], ids: Sequence[int], step: int, device="cpu") -> Tensor:
        """`[len(ids), *shape]` float32 noise of SDE step `step`."""
        return self._draw(shape, ids, int(step), device)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
@dataclass
class RolloutPlan:
    """Grid `sigmas [n+1]`, per-step `kinds` (ode | sde | dpm), per-step noise level `g` (0 off the window),
    and the `trained` step indices (sorted, all `sde`)."""

    sigmas: Tensor
    kinds: List[str]
    g: List[float]
    trained: Tuple[int, ...]
    dpm_order: int = 2

    @property
    def num_steps(self) -> int:
        return len(self.kinds)

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.kinds)


def make_plan(steps: int, shift: float, window: Window, trained: Sequence[int], noise_level: str = "flow_grpo",
              eta: float = 0.7, flash: bool = False, compression: float = 0.4, dpm_order: int = 2,
              flash_min_points: int = 2) -> RolloutPlan:
    """Plan for one iteration: Euler before `window`, SDE inside, Euler (or Flash DPM-Solver++) after."""
    if window.end > steps:
        raise ValueError(f"window {window.steps} does not fit in {steps} steps")
    bad = [t for t in trained if t not in window.steps]
    if bad:
        raise ValueError(f"trained steps {bad} lie outside the SDE window {window.steps}")
    if flash:
        sigmas, dpm_from = flash_sigmas(steps, shift, window, compression, flash_min_points)
    else:
        sigmas, dpm_from = flow_sigmas(steps, shift), None
    n = len(sigmas) - 1
    kinds, g = [], []
    for i in range(n):
        if window.start <= i < window.end:
            kinds.append("sde")
            g.append(sde_noise_level(noise_level, float(sigmas[i]), eta, sigmas))
        else:
            kinds.append("dpm" if dpm_from is not None and i >= dpm_from else "ode")
            g.append(0.0)
    return RolloutPlan(sigmas, kinds, g, tuple(sorted(trained)), dpm_order)


# --------------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------------
@dataclass
class RolloutResult:
    """`final [b,...]` (σ=0 latents), `latents`/`next_latents [b,K,...]` of the trained steps, `log_probs [b,K]`."""

    final: Tensor
    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    nfe: int


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)


@torch.no_grad()
def ode_prefix(velocity_fn: VelocityFn, x_init: Tensor, plan: RolloutPlan, end: int) -> Tensor:
    """Euler steps `[0, end)` of the plan (all must be `ode`: the part before the window) -> x at `sigmas[end]`.
    With `init_same_noise` this part is identical for every member of a group, so it is run once per group."""
    if any(k != "ode" for k in plan.kinds[:end]):
        raise ValueError(f"ode_prefix: steps [0, {end}) are not all ODE steps ({plan.kinds[:end]})")
    x = x_init.float()
    for i in range(end):
        s, sn = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        x = euler_step(x, velocity_fn(x, _sigma_batch(x, s)).float(), s, sn)
    return x


@torch.no_grad()
def rollout(velocity_fn: VelocityFn, x_init: Tensor, plan: RolloutPlan,
            sde_noise: Callable[[int], Tensor], start: int = 0) -> RolloutResult:
    """Run the plan from `x_init` at `sigmas[start]` (σ=1 for start 0; float32). `sde_noise(step)` returns the
    `[b,...]` noise of an SDE step."""
    x = x_init.float()
    dpm = DPMSolverPP(plan.dpm_order) if "dpm" in plan.kinds else None
    lat, nxt, lps = [], [], []
    sig = plan.sigmas
    for i, kind in enumerate(plan.kinds):
        if i < start:
            continue
        s, sn = float(sig[i]), float(sig[i + 1])
        v = velocity_fn(x, _sigma_batch(x, s)).float()
        if kind == "sde":
            out = sde_step_with_logprob(x, v, s, sn, plan.g[i], noise=sde_noise(i).to(x))
            if i in plan.trained:
                lat.append(x)
                nxt.append(out.prev_sample)
                lps.append(out.log_prob)
            if dpm is not None:
                dpm.push(s, predict_x0(x, v, s))  # window x̂0 feeds the multistep state (Flash)
            x = out.prev_sample
        elif kind == "dpm":
            x = dpm.step(x, v, s, sn)
        else:
            x = euler_step(x, v, s, sn)
    b = x.shape[0]
    if lat:
        latents, next_latents, log_probs = torch.stack(lat, 1), torch.stack(nxt, 1), torch.stack(lps, 1)
    else:
        latents = next_latents = x.new_zeros((b, 0, *x.shape[1:]))
        log_probs = x.new_zeros((b, 0))
    return RolloutResult(x, latents, next_latents, log_probs, plan.num_steps - start)


def transition_log_prob(velocity_fn: VelocityFn, latents: Tensor, next_latents: Tensor, plan: RolloutPlan,
                        step: int):
    """Re-score the stored transition of `step` under the current model: (log_prob [b], mean [b,...], std)."""
    s, sn = float(plan.sigmas[step]), float(plan.sigmas[step + 1])
    v = velocity_fn(latents, _sigma_batch(latents, s)).float()
    out = sde_step_with_logprob(latents.float(), v, s, sn, plan.g[step], prev_sample=next_latents.float())
    return out.log_prob, out.mean, out.std


@torch.no_grad()
def ode_sample(velocity_fn: VelocityFn, x_init: Tensor, steps: int, shift: float) -> Tensor:
    """Deterministic Euler sampling on the shifted grid (evaluation)."""
    sig = flow_sigmas(steps, shift)
    x = x_init.float()
    for i in range(steps):
        v = velocity_fn(x, _sigma_batch(x, float(sig[i]))).float()
        x = euler_step(x, v, sig[i], sig[i + 1])
    return x


def sde_noise_fn(source: Optional[NoiseSource], shape: Sequence[int], ids: Sequence[int],
                 device) -> Callable[[int], Tensor]:
    """Bind a NoiseSource to one micro-batch: `step -> [len(ids), *shape]` noise."""

    def fn(step: int) -> Tensor:
        return source.sde(shape, ids, step, device)

    return fn
