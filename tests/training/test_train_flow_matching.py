"""Flow-matching targets: timestep distributions, static/dynamic shift (vs diffusers/Flux), x_t and v."""
import math

import pytest
import torch

from osp_megatron.diffusion import flow_matching as fm


def test_training_pair_is_the_rectified_flow_interpolation():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=g)
    noise = torch.randn(3, 16, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x_t, v = fm.make_training_pair(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(v, noise - x0)
    # the Euler step along v from x_t reaches x0 exactly at sigma=0 (what the sampler relies on)
    torch.testing.assert_close(x_t[1] - 0.25 * v[1], x0[1])


def test_uniform_and_logit_normal_sigmas():
    g = torch.Generator().manual_seed(1)
    u = fm.sample_sigmas(20000, g, "uniform")
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    ln = fm.sample_sigmas(20000, g, "logit_normal", logit_mean=0.5, logit_std=0.7)
    z = torch.logit(ln)
    assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.7) < 0.02
    with pytest.raises(ValueError, match="uniform or logit_normal"):
        fm.sample_sigmas(2, g, "beta")


def test_static_shift_matches_diffusers_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigma = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0):
        ours = fm.shift_sigmas(sigma, shift)
        ref = sched.time_shift(math.log(shift), 1.0, sigma)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm.shift_sigmas(sigma, 1.0), sigma)


def test_dynamic_shift_matches_flux_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (256, 1024, 4096, 32760, 75600):
        mu = fm.dynamic_shift_mu(seq, 256, 4096, 0.5, 1.15)
        assert mu == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15), rel=1e-12)
        assert fm.dynamic_shift(seq, 256, 4096, 0.5, 1.15) == pytest.approx(math.exp(mu))
    flow = fm.FlowMatching(use_dynamic_shift=True, base_seq_len=256, max_seq_len=4096)
    small, big = flow.shift_for([16, 1, 32, 32]), flow.shift_for([16, 21, 60, 104])
    assert small == pytest.approx(math.exp(0.5))  # 256 tokens -> base shift
    assert big > small  # more tokens -> more noise


def test_draw_is_a_pure_function_of_the_seed_tuple():
    flow = fm.FlowMatching(sampling="logit_normal", shift=3.0)
    x0 = torch.randn(2, 16, 2, 4, 4)

    def draw(dp_rank, step, micro=0):
        g = torch.Generator().manual_seed(fm.step_seed(7, dp_rank, step, micro))
        return flow.draw(x0, g)

    a, b = draw(0, 5), draw(0, 5)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = draw(1, 5)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], draw(0, 6)[0])
    assert not torch.equal(a[0], draw(0, 5, micro=1)[0])
    x_t, timestep, target, sigma = a
    torch.testing.assert_close(timestep, 1000.0 * sigma)
    assert x_t.shape == target.shape == x0.shape and timestep.shape == (2,)
