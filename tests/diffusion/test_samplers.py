"""Samplers: grids, Euler/UniPC/DPM-Solver++ ODE steps, CFG, SDE step with log-prob."""
import math

import pytest
import torch

from osp_megatron.diffusion import samplers as S


def gaussian_velocity(mean: torch.Tensor, std: torch.Tensor):
    """Exact flow velocity E[ε - x0 | x_σ] for data x0 ~ N(mean, diag(std²)) (closed form, per element)."""

    def fn(x, sigma):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a = 1.0 - s
        var = a * a * std * std + s * s
        x0_hat = mean + a * std * std / var * (x - a * mean)
        return (x - x0_hat) / s

    return fn


def toy(shape=(3, 4, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape[1:], generator=g, dtype=torch.float64)
    std = 0.3 + torch.rand(shape[1:], generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    return gaussian_velocity(mean, std), noise, mean, std


def test_flow_sigmas_and_shift():
    s = S.flow_sigmas(10, shift=1.0)
    assert torch.allclose(s, torch.linspace(1, 0, 11, dtype=torch.float64))
    s3 = S.flow_sigmas(10, shift=3.0)
    assert s3[0] == 1 and s3[-1] == 0
    t = 0.5
    assert math.isclose(float(S.shift_sigmas(torch.tensor(t), 3.0)), 3 * t / (1 + 2 * t))
    assert torch.all(s3[1:-1] > s[1:-1])  # shift > 1 spends more steps at high noise
    with pytest.raises(ValueError, match="steps"):
        S.flow_sigmas(0)


def test_unipc_grid_equals_diffusers():
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    sch.set_timesteps(20)
    ours = S.unipc_flow_sigmas(20, shift=5.0)
    assert torch.allclose(ours.float(), sch.sigmas.float(), atol=1e-7)


@pytest.mark.parametrize("steps,shift,order", [(8, 1.0, 2), (20, 5.0, 2), (5, 3.0, 2), (10, 3.0, 3), (20, 5.0, 1)])
def test_unipc_matches_diffusers_scheduler(steps, shift, order):
    from diffusers import UniPCMultistepScheduler

    vel, noise, _, _ = toy(seed=steps)
    noise = noise.float()
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  solver_order=order)
    sch.set_timesteps(steps)
    x_ref = noise.clone()
    for i, t in enumerate(sch.timesteps):
        sigma = torch.full((x_ref.shape[0],), float(sch.sigmas[i]))
        v = vel(x_ref.double(), sigma.double()).float()
        x_ref = sch.step(v, t, x_ref).prev_sample

    sig = S.unipc_flow_sigmas(steps, shift)
    x = S.sample(lambda x, s: vel(x.double(), s.double()).float(), noise.clone(), steps=steps, shift=shift,
                 solver="unipc", sigmas=sig, order=order)
    assert torch.allclose(x, x_ref, rtol=1e-4, atol=1e-4), (x - x_ref).abs().max()


def test_solvers_convergence_order():
    """Against a fine Euler reference: halving the step halves Euler's error and quarters UniPC-2's."""
    vel, noise, _, _ = toy(seed=3)
    ref = S.sample(vel, noise, steps=4000, shift=3.0, solver="euler")

    def err(steps, solver):
        out = S.sample(vel, noise, steps=steps, shift=3.0, solver=solver, sigmas=S.flow_sigmas(steps, 3.0))
        return (out - ref).abs().max().item()

    e10, e20 = err(10, "euler"), err(20, "euler")
    u10, u20 = err(10, "unipc"), err(20, "unipc")
    assert 1.6 < e10 / e20 < 2.4, (e10, e20)
    assert u10 / u20 > 3.2 and u20 < 0.3 * e20, (u10, u20, e20)


def dpm_solve(vel, noise, sig, order):
    x = noise.clone()
    dpm = S.DPMSolverPP(order=order)
    for i in range(len(sig) - 1):
        v = vel(x, torch.full((x.shape[0],), float(sig[i]), dtype=x.dtype))
        x = dpm.step(x, v, sig[i], sig[i + 1])
    return x


def test_dpm_solver_pp_orders():
    """Order 1 is DDIM = Euler for rectified flow; order 2 (midpoint) converges at second order."""
    vel, noise, _, _ = toy(seed=4)
    ref = S.sample(vel, noise, steps=4000, shift=3.0, solver="euler")
    euler = S.sample(vel, noise, steps=8, shift=3.0, solver="euler")
    assert torch.allclose(dpm_solve(vel, noise, S.flow_sigmas(8, 3.0), 1), euler, atol=1e-9)
    e8 = (dpm_solve(vel, noise, S.flow_sigmas(8, 3.0), 2) - ref).abs().max().item()
    e16 = (dpm_solve(vel, noise, S.flow_sigmas(16, 3.0), 2) - ref).abs().max().item()
    assert e8 / e16 > 3.0 and e16 < 0.3 * (euler - ref).abs().max().item(), (e8, e16)


def test_dpm_first_order_from_sigma_one_is_ddim():
    x = torch.randn(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    out = S.DPMSolverPP(order=1).step(x, v, 1.0, 0.6)
    x0 = x - v
    assert torch.allclose(out, 0.6 * x + 0.4 * x0)  # alpha_t x0 + sigma_t eps, eps = x at sigma=1


def test_euler_step_and_x0():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(S.euler_step(x, v, 0.8, 0.5), x + (0.5 - 0.8) * v)
    assert torch.equal(S.predict_x0(x, v, 0.8), x - 0.8 * v)


def test_cfg_velocity_fn_batches_cond_and_uncond():
    calls = []

    def model(latents, timestep, text):
        calls.append(latents.shape[0])
        return latents * 0 + text.mean(dim=(1, 2)).view(-1, 1, 1) + timestep.view(-1, 1, 1) / 1000.0

    text = torch.ones(2, 3, 4)
    null = torch.zeros(1, 3, 4)
    fn = S.cfg_velocity_fn(model, text, null, scale=5.0)
    v = fn(torch.zeros(2, 4, 4), torch.tensor([0.5, 0.5]))
    # cond = 1 + 0.5, uncond = 0 + 0.5 -> 0.5 + 5*(1.5-0.5)
    assert torch.allclose(v, torch.full_like(v, 5.5)) and calls == [4]
    assert torch.equal(S.cfg_combine(torch.tensor(2.0), torch.tensor(1.0), 1.0), torch.tensor(2.0))


# ------------------------------------------------------------------------------------------ SDE
def test_noise_levels():
    sig = S.flow_sigmas(10, 3.0)
    g = S.sde_noise_level("flow_grpo", float(sig[3]), 0.7, sig)
    assert math.isclose(g, 0.7 * math.sqrt(sig[3] / (1 - sig[3])))
    g1 = S.sde_noise_level("flow_grpo", 1.0, 0.7, sig)  # sigma=1 uses sigmas[1] in the denominator
    assert math.isfinite(g1) and math.isclose(g1, 0.7 * math.sqrt(1.0 / (1 - float(sig[1]))))
    assert S.sde_noise_level("dance_grpo", 0.4, 0.3) == 0.3
    assert S.sde_noise_level("osp_next", 0.4, 123.0) == 0.4
    with pytest.raises(ValueError, match="noise level"):
        S.sde_noise_level("bogus", 0.4, 0.3)


@pytest.mark.parametrize("kind", S.NOISE_LEVELS)
def test_sde_log_prob_equals_gaussian_density(kind):
    gen = torch.Generator().manual_seed(0)
    sig = S.flow_sigmas(10, 3.0)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=gen)
    v = torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=gen)
    i = 2
    g = S.sde_noise_level(kind, float(sig[i]), 0.7, sig)
    out = S.sde_step_with_logprob(x, v, sig[i], sig[i + 1], g, generator=torch.Generator().manual_seed(1))
    s, sn = float(sig[i]), float(sig[i + 1])
    d = sn - s
    mean = x + d * (v + g * g / (2 * s) * (x + (1 - s) * v))
    std = g * math.sqrt(-d)
    assert torch.allclose(out.mean, mean) and math.isclose(out.std, std)
    direct = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).flatten(1).mean(1)
    assert torch.allclose(out.log_prob, direct, atol=1e-12)
    # rescoring the stored sample gives the same log-prob
    again = S.sde_step_with_logprob(x, v, sig[i], sig[i + 1], g, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_sde_empirical_moments():
    sig = S.flow_sigmas(10, 1.0)
    x = torch.randn(1, 8, dtype=torch.float64).expand(20000, 8).contiguous()
    v = torch.randn(1, 8, dtype=torch.float64).expand(20000, 8).contiguous()
    g = S.sde_noise_level("flow_grpo", float(sig[4]), 0.7, sig)
    out = S.sde_step_with_logprob(x, v, sig[4], sig[5], g, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.prev_sample.mean(0), out.mean[0], atol=4 * out.std / math.sqrt(20000) * 1.5)
    assert abs(out.prev_sample.std(0).mean().item() / out.std - 1) < 0.03


def test_sde_mean_tends_to_ode_step():
    x, v = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    sig = S.flow_sigmas(10, 3.0)
    ode = S.euler_step(x, v, sig[3], sig[4])
    errs = []
    for eta in (0.5, 0.05, 0.005):
        g = S.sde_noise_level("flow_grpo", float(sig[3]), eta, sig)
        mean, _ = S.sde_mean_std(x, v, sig[3], sig[4], g)
        errs.append((mean - ode).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4
    mean0, std0 = S.sde_mean_std(x, v, sig[3], sig[4], 0.0)
    assert torch.equal(mean0, x + (float(sig[4]) - float(sig[3])) * (v + 0.0 * (x + (1 - float(sig[3])) * v)))
    assert std0 == 0.0


def test_sde_preserves_marginals_like_ode():
    """Mixed SDE window + ODE elsewhere and all-step SDE reach the same data marginal as the ODE."""
    vel, _, mean, std = toy(shape=(1, 4), seed=7)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    sig = S.flow_sigmas(100, 1.0)

    def run(sde_steps):
        x = noise.clone()
        for i in range(100):
            s = torch.full((n,), float(sig[i]), dtype=torch.float64)
            v = vel(x, s)
            if i in sde_steps:
                g = S.sde_noise_level("flow_grpo", float(sig[i]), 0.7, sig)
                x = S.sde_step_with_logprob(x, v, sig[i], sig[i + 1], g, generator=gen).prev_sample
            else:
                x = S.euler_step(x, v, sig[i], sig[i + 1])
        return x

    for steps in (set(range(10, 40)), set(range(0, 98))):
        x = run(steps)
        assert torch.allclose(x.mean(0), mean, atol=0.05), (x.mean(0), mean)
        assert torch.allclose(x.std(0), std, rtol=0.06), (x.std(0), std)


def test_kl_zero_for_same_mean():
    m = torch.randn(2, 3, 4)
    assert torch.equal(S.kl_to_reference(m, m.clone(), 0.1), torch.zeros(2))
    assert torch.allclose(S.kl_to_reference(m + 0.1, m, 0.1), torch.full((2,), 0.5))


def test_sample_rejects_unknown_solver():
    with pytest.raises(ValueError, match="solver"):
        S.sample(lambda x, s: x, torch.zeros(1, 2), steps=2, solver="heun")


def test_seeded_noise_is_reproducible():
    assert torch.equal(S.seeded_noise((2, 3), 5), S.seeded_noise((2, 3), 5))
    assert not torch.equal(S.seeded_noise((2, 3), 5), S.seeded_noise((2, 3), 6))


def test_sample_draws_noise_from_seed_or_generator():
    vel = lambda x, s: x * 0.5  # noqa: E731
    a = S.sample(vel, shape=(2, 3), seed=4, steps=3, solver="euler")
    b = S.sample(vel, S.seeded_noise((2, 3), 4), steps=3, solver="euler")
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(S.sample(vel, shape=(2, 3), generator=g1, steps=3), S.sample(vel, shape=(2, 3), generator=g2, steps=3))
    with pytest.raises(ValueError, match="seed"):
        S.sample(vel, shape=(2, 3), steps=3)
