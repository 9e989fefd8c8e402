"""Rectified-flow samplers: sigma grids, Euler / UniPC / DPM-Solver++ ODE steps, CFG, and the GRPO SDE step.

Conventions (whole stack): `x_σ = (1-σ)·x0 + σ·ε`, σ runs from 1 (noise) to 0 (data), the model predicts the
velocity `v ≈ ε - x0`. Everything here works with any `velocity_fn(x [b,...], sigma [b]) -> v [b,...]`; use
`model_velocity_fn` to call a DiT `model(latents, timestep, text)` with timestep 1000·σ (float, as OSP-Next)
or ⌊1000·σ⌋ (int, as diffusers' UniPC): `model_timesteps`.

Implied quantities: `x̂0 = x - σ·v`, `ε̂ = x + (1-σ)·v`. Grids are 1-D float64 tensors `[steps+1]` ending at 0;
step `i` goes from `sigmas[i]` to `sigmas[i+1]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]

NOISE_LEVELS = ("flow_grpo", "dance_grpo", "osp_next")
SOLVERS = ("euler", "unipc")


# --------------------------------------------------------------------------------------------
# sigma grids
# --------------------------------------------------------------------------------------------
def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 / Wan time shift `σ ← s·σ / (1 + (s-1)·σ)` (s=1: identity)."""
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0 (1 = no shift)")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(steps: int, shift: float = 1.0) -> Tensor:
    """`linspace(1, 0, steps+1)` shifted: `[steps+1]` float64, first 1, last 0."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def unipc_flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The grid of diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)` (Wan's default sampler):
    `linspace(1, 1/T, steps+1)[:-1]`, shifted, first value lowered by 1e-6, then a final 0. `[steps+1]`."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    base = torch.linspace(1.0, 1.0 / num_train_timesteps, steps + 1, dtype=torch.float64)[:-1]
    s = shift_sigmas(base, shift)
    if abs(float(s[0]) - 1.0) < 1e-6:
        s[0] -= 1e-6
    return torch.cat([s, s.new_zeros(1)])


# --------------------------------------------------------------------------------------------
# model adapters and guidance
# --------------------------------------------------------------------------------------------
TIMESTEPS = ("float", "int")


def model_timesteps(sigma: Tensor, timesteps: str = "float") -> Tensor:
    """The DiT's timestep for σ [b]: `float` 1000·σ (OSP-Next's Euler loop, training), `int` ⌊1000·σ⌋ (diffusers'
    UniPC / Wan, which hand the model int64 timesteps; computed from float64 σ so the floor matches numpy's).
    Returns float32 [b] on σ's device."""
    if timesteps == "int":
        return torch.floor(sigma.to(torch.float64) * 1000.0).to(torch.float32)
    if timesteps != "float":
        raise ValueError(f"timesteps={timesteps!r}: use one of {', '.join(TIMESTEPS)}")
    return sigma.to(torch.float32) * 1000.0


def solver_timesteps(solver: str) -> str:
    """The timestep kind the reference of `solver` feeds: unipc (diffusers WanPipeline) int, euler (OSP-Next) float."""
    return "int" if solver == "unipc" else "float"


def model_velocity_fn(model: Callable, text: Tensor, timesteps: str = "float") -> VelocityFn:
    """Wrap `model(latents, timestep, text)` as `velocity_fn(x, sigma[b])` (timestep: `model_timesteps`)."""

    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        return model(x, model_timesteps(sigma, timesteps).to(x.device), text)

    return fn


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: `v_u + s·(v_c - v_u)` (s=1: conditional only)."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_velocity_fn(model: Callable, text: Tensor, null_text: Optional[Tensor], scale: float,
                    timesteps: str = "float", detach_uncond: bool = False) -> VelocityFn:
    """CFG velocity: one batched call on `[cond; uncond]` (2b samples). `scale == 1` or no null text: one pass.

    `detach_uncond`: two calls, the unconditional one under no_grad, combined as `lerp(v_u.detach(), v_c, s)`, so
    a backward through the result carries `s·dv_c` only (OSP-Next's training forward)."""
    if null_text is None or scale == 1.0:
        return model_velocity_fn(model, text, timesteps)
    if null_text.shape[0] == 1 and text.shape[0] > 1:
        null_text = null_text.expand(text.shape[0], *null_text.shape[1:])
    if null_text.shape != text.shape:
        raise ValueError(f"null_text shape {tuple(null_text.shape)} must match text {tuple(text.shape)} (or batch 1)")
    if detach_uncond:
        cond_fn, uncond_fn = model_velocity_fn(model, text, timesteps), model_velocity_fn(model, null_text, timesteps)

        def detached(x: Tensor, sigma: Tensor) -> Tensor:
            v_cond = cond_fn(x, sigma)
            with torch.no_grad():
                v_uncond = uncond_fn(x, sigma)
            return torch.lerp(v_uncond.detach().to(v_cond.dtype), v_cond, float(scale))

        return detached
    both = torch.cat([text, null_text], dim=0)

    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        timestep = model_timesteps(sigma, timesteps).to(x.device)
        v = model(torch.cat([x, x]), torch.cat([timestep, timestep]), both)
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, scale)

    return fn


def _sigma_batch(x: Tensor, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)


# --------------------------------------------------------------------------------------------
# deterministic steps
# --------------------------------------------------------------------------------------------
def predict_x0(x: Tensor, v: Tensor, sigma: float) -> Tensor:
    """`x̂0 = x - σ·v`."""
    return x - float(sigma) * v


def euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler ODE step `x + (σ' - σ)·v`."""
    return x + (float(sigma_next) - float(sigma)) * v


def _lambda(sigma: float) -> float:
    """Half log-SNR `log((1-σ)/σ)`; +inf at σ=0, -inf at σ=1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class UniPCSolver:
    """Multistep UniPC (B(h)=bh2, data prediction, UniC corrector, lower order at the final step), the algorithm of
    diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)`.

    `sigmas`: the grid `[N+1]` ending at 0 (use `unipc_flow_sigmas` to match diffusers exactly). Call `step(x, v, i)`
    for i = 0..N-1 with the velocity evaluated at the sample returned by the previous call (one NFE per step).
    """

    def __init__(self, sigmas: Tensor, order: int = 2) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order={order}: use 1, 2 or 3")
        self.sigmas = [float(s) for s in sigmas]
        if self.sigmas[0] >= 1.0:  # alpha=0 at sigma=1: log-SNR would be -inf (diffusers lowers it by 1e-6)
            self.sigmas[0] = 1.0 - 1e-6
        self.order = order
        self.num_steps = len(self.sigmas) - 1
        self.model_outputs: List[Tensor] = []
        self.last_sample: Optional[Tensor] = None
        self.lower_order_nums = 0
        self.this_order = 1

    def _coeffs(self, s_t: float, s_s0: float, prev_sigmas: Sequence[float], order: int):
        lam_t, lam_s0 = _lambda(s_t), _lambda(s_s0)
        h = lam_t - lam_s0
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)  # bh2
        rks = [(_lambda(s) - lam_s0) / h for s in prev_sigmas] + [1.0]
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return h_phi_1, b_h, rks, rows, b

    def _x0_update(self, x: Tensor, m0: Tensor, s_t: float, s_s0: float, res: Optional[Tensor], b_h: float,
                   h_phi_1: float) -> Tensor:
        alpha_t = 1.0 - s_t
        out = (s_t / s_s0) * x - alpha_t * h_phi_1 * m0
        if res is not None:
            out = out - alpha_t * b_h * res
        return out

    def _predictor(self, x: Tensor, i: int, order: int) -> Tensor:
        s_t, s_s0 = self.sigmas[i + 1], self.sigmas[i]
        m0 = self.model_outputs[-1]
        if s_t == 0.0 and order == 1:
            return m0.clone()  # limit of the first-order update at sigma=0
        prev = [self.sigmas[i - k] for k in range(1, order)]
        h_phi_1, b_h, rks, rows, b = self._coeffs(s_t, s_s0, prev, order)
        res = None
        if order >= 2:
            d1s = [(self.model_outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
            if order == 2:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(
                    torch.tensor(rows, dtype=torch.float64)[:-1, :-1], torch.tensor(b, dtype=torch.float64)[:-1]
                ).tolist()
            res = sum(r * d for r, d in zip(rhos, d1s))
        return self._x0_update(x, m0, s_t, s_s0, res, b_h, h_phi_1)

    def _corrector(self, model_t: Tensor, i: int, order: int) -> Tensor:
        s_t, s_s0 = self.sigmas[i], self.sigmas[i - 1]
        m0 = self.model_outputs[-1]
        x = self.last_sample
        prev = [self.sigmas[i - (k + 1)] for k in range(1, order)]
        h_phi_1, b_h, rks, rows, b = self._coeffs(s_t, s_s0, prev, order)
        if order == 1:
            rhos = [0.5]
        else:
            rhos = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
        res = rhos[-1] * (model_t - m0)
        for k in range(1, order):
            res = res + rhos[k - 1] * (self.model_outputs[-(k + 1)] - m0) / rks[k - 1]
        return self._x0_update(x, m0, s_t, s_s0, res, b_h, h_phi_1)

    def step(self, x: Tensor, v: Tensor, i: int) -> Tensor:
        """One UniPC step from `sigmas[i]` to `sigmas[i+1]`; `v` is the velocity at (x, sigmas[i])."""
        m = x - self.sigmas[i] * v
        if i > 0 and self.last_sample is not None:
            x = self._corrector(m, i, self.this_order)
        self.model_outputs = (self.model_outputs + [m])[-self.order:]
        this_order = min(self.order, self.num_steps - i)  # lower order at the final steps
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = x
        out = self._predictor(x, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return out


class DPMSolverPP:
    """Multistep DPM-Solver++ (data prediction, ODE), order 1 or 2 with the `midpoint` second-order update.

    History entries are `(sigma, x̂0)`; `push(sigma, x0)` adds one from outside (MixGRPO-Flash pushes the x̂0 of the
    SDE window so the first step after it is already second order). The final step into σ=0 is first order (x̂0).
    """

    def __init__(self, order: int = 2) -> None:
        if order not in (1, 2):
            raise ValueError(f"DPM-Solver++ order={order}: use 1 or 2")
        self.order = order
        self.history: List[Tuple[float, Tensor]] = []

    def push(self, sigma: float, x0: Tensor) -> None:
        self.history = (self.history + [(float(sigma), x0)])[-2:]

    def step(self, x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        x0 = x - sigma * v
        self.push(sigma, x0)
        if sigma_next <= 0.0:
            return x0.clone()
        lam_s, lam_t = _lambda(sigma), _lambda(sigma_next)
        h = lam_t - lam_s
        alpha_t = 1.0 - sigma_next
        phi = math.expm1(-h)  # e^{-h} - 1
        out = (sigma_next / sigma) * x - alpha_t * phi * x0  # at sigma=1: e^{-h}=0, DDIM from pure noise
        use_second = self.order == 2 and len(self.history) == 2 and math.isfinite(_lambda(self.history[0][0]))
        if use_second and math.isfinite(lam_s):
            sigma_prev, x0_prev = self.history[0]
            h0 = lam_s - _lambda(sigma_prev)
            r0 = h0 / h
            d1 = (x0 - x0_prev) / r0
            out = out - 0.5 * alpha_t * phi * d1
        return out


# --------------------------------------------------------------------------------------------
# SDE step with log-prob (GRPO)
# --------------------------------------------------------------------------------------------
def sde_noise_level(kind: str, sigma: float, eta: float, sigmas: Optional[Tensor] = None) -> float:
    """Diffusion coefficient g(σ) of the reverse SDE.

    flow_grpo (Flow-GRPO / MixGRPO): `η·sqrt(σ/(1-σ))`, at σ=1 the denominator uses `1 - sigmas[1]`;
    dance_grpo: constant `η`; osp_next: `g = σ` (η ignored).
    """
    sigma = float(sigma)
    if kind == "flow_grpo":
        denom_sigma = sigma
        if sigma >= 1.0:
            if sigmas is None or len(sigmas) < 2:
                raise ValueError("noise level flow_grpo at sigma=1 needs the grid (sigmas[1] replaces sigma)")
            denom_sigma = float(sigmas[1])
        return eta * math.sqrt(sigma / (1.0 - denom_sigma))
    if kind == "dance_grpo":
        return float(eta)
    if kind == "osp_next":
        return sigma
    raise ValueError(f"noise level {kind!r}: use one of {', '.join(NOISE_LEVELS)}")


def sde_mean_std(x: Tensor, v: Tensor, sigma: float, sigma_next: float, g: float) -> Tuple[Tensor, float]:
    """Euler–Maruyama transition of the reverse SDE with the flow's marginals.

    `μ = x + Δ·[v + g²/(2σ)·(x + (1-σ)·v)]`, `s = g·sqrt(|Δ|)`, Δ = σ' - σ < 0. Returns (μ like x, s float).
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    delta = sigma_next - sigma
    mean = x + delta * (v + (g * g / (2.0 * sigma)) * (x + (1.0 - sigma) * v))
    std = g * math.sqrt(abs(delta))
    return mean, std


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: float) -> Tensor:
    """Diagonal Gaussian log-density of `sample` under N(mean, std²), averaged over non-batch dims -> [b]."""
    lp = -((sample.detach() - mean) ** 2) / (2.0 * std * std) - math.log(std) - 0.5 * math.log(2.0 * math.pi)
    return lp.flatten(1).mean(dim=1)


@dataclass
class SDEStep:
    """One SDE transition: `prev_sample` x' [b,...], `mean` μ [b,...], `std` s, `log_prob` [b] (mean over dims)."""

    prev_sample: Tensor
    mean: Tensor
    std: float
    log_prob: Tensor


def sde_step_with_logprob(
    x: Tensor,
    v: Tensor,
    sigma: float,
    sigma_next: float,
    g: float,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> SDEStep:
    """SDE step with log-prob. Pass `prev_sample` to score a stored transition (training), else it is drawn as
    `μ + s·noise` (noise drawn from `generator` if not given). With g=0 this is the Euler ODE step (log-prob NaN-free
    only for g>0)."""
    mean, std = sde_mean_std(x, v, sigma, sigma_next, g)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        prev_sample = mean + std * noise
    if std <= 0.0:
        return SDEStep(prev_sample, mean, std, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    return SDEStep(prev_sample, mean, std, gaussian_log_prob(prev_sample, mean, std))


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: float) -> Tensor:
    """`||μθ - μref||² / (2 s²)` averaged over non-batch dims -> [b] (Flow-GRPO / OSP-Next KL form)."""
    return ((mean - mean_ref.detach()) ** 2).flatten(1).mean(dim=1) / (2.0 * std * std)


# --------------------------------------------------------------------------------------------
# the sampling loop (osp-sample)
# --------------------------------------------------------------------------------------------
def sample(
    velocity_fn: VelocityFn,
    noise: Optional[Tensor] = None,
    steps: int = 50,
    shift: float = 5.0,
    solver: str = "unipc",
    sigmas: Optional[Tensor] = None,
    order: int = 2,
    callback: Optional[Callable[[int, Tensor], None]] = None,
    shape: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device="cpu",
    latent_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """ODE sampling from `noise` [b,...] (σ=1) to data (σ=0). Returns latents like `noise`.

    Without `noise`, it is drawn with `shape` from `generator` (on its device) or from `seed` (`seeded_noise`,
    CPU values, moved to `device`). solver `euler` uses `flow_sigmas(steps, shift)`, `unipc` the diffusers/Wan UniPC
    grid; pass `sigmas` to override. CFG: build `velocity_fn` with `cfg_velocity_fn`. NFE = steps (x2 with CFG).
    `latent_dtype` (e.g. bf16, as OSP-Next's pipeline): the latents are rounded to it at the start and after every
    step (each update itself is computed in fp32). `velocity_fn` gets σ as a float64 [b] tensor.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: use one of {', '.join(SOLVERS)}")
    if noise is None:
        if shape is None:
            raise ValueError("sample: give `noise`, or `shape` with `seed` or `generator`")
        if generator is not None:
            noise = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
        elif seed is not None:
            noise = seeded_noise(shape, seed, device=device)
        else:
            raise ValueError("sample: without `noise`, pass `seed` or `generator` (reproducible sampling)")
    if sigmas is None:
        sigmas = flow_sigmas(steps, shift) if solver == "euler" else unipc_flow_sigmas(steps, shift)
    out_dtype = noise.dtype
    x = noise if latent_dtype is None else noise.to(latent_dtype)
    unipc = UniPCSolver(sigmas, order=order) if solver == "unipc" else None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity_fn(x, _sigma_batch(x, s, torch.float64))
        if latent_dtype is not None:
            x, v = x.float(), v.float()
        x = euler_step(x, v, s, s_next) if unipc is None else unipc.step(x, v, i)
        if latent_dtype is not None:
            x = x.to(latent_dtype)
        if callback is not None:
            callback(i, x)
    return x.to(out_dtype)


def seeded_noise(shape: Sequence[int], seed: int, dtype=torch.float32, device="cpu") -> Tensor:
    """Standard normal noise from a CPU generator seeded with `seed` (device-independent values)."""
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
