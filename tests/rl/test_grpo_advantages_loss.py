"""Advantage normalisation, multi-reward mixing, PPO-clip semantics and the KL term."""
import torch

from osp_megatron.rl.advantages import combine_rewards, group_advantages, shuffled
from osp_megatron.rl.loss import kl_penalty, ppo_clip_loss, reinforce_surrogate


def test_group_normalisation_mean0_std1():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g, dtype=torch.float64) * 3 + 1
    gid = torch.arange(24) // 6
    a = group_advantages(r, gid, eps=1e-12, clip=100.0)
    for k in range(4):
        ak = a[gid == k].double()
        assert abs(float(ak.mean())) < 1e-6 and abs(float(ak.std(unbiased=True)) - 1) < 1e-5


def test_groups_never_mix_prompts():
    r = torch.tensor([0.0, 1.0, 100.0, 101.0])
    a = group_advantages(r, torch.tensor([0, 0, 1, 1]), eps=1e-12)
    assert torch.allclose(a, torch.tensor([-0.70710678, 0.70710678, -0.70710678, 0.70710678]))
    # interleaved group ids work the same
    a2 = group_advantages(r[[0, 2, 1, 3]], torch.tensor([0, 1, 0, 1]), eps=1e-12)
    assert torch.allclose(a2, a[[0, 2, 1, 3]])


def test_constant_group_gives_zero_and_no_nan():
    a = group_advantages(torch.tensor([2.0, 2.0, 2.0, 5.0, 6.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert torch.equal(a[:3], torch.zeros(3)) and torch.isfinite(a).all()


def test_clamp_and_biased_std():
    r = torch.tensor([0.0] * 99 + [1.0])
    a = group_advantages(r, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert float(a.max()) == 5.0
    b = group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]), unbiased=False, eps=0.0, clip=10)
    assert torch.allclose(b, torch.tensor([-1.0, 1.0]))  # biased std of {0, 2} is 1


def test_global_std():
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    gid = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, gid, norm="global", eps=0.0, clip=100)
    std = r.std()
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / std)


def test_advantage_aggr_is_weighted_sum_of_normalised():
    g = torch.Generator().manual_seed(1)
    gid = torch.arange(12) // 4
    r1, r2 = torch.randn(12, generator=g), torch.randn(12, generator=g) * 10
    adv, comb = combine_rewards({"a": r1, "b": r2}, {"a": 1.0, "b": 3.0}, gid, "advantage_aggr", clip=5.0)
    expect = 0.25 * group_advantages(r1, gid, clip=1e9) + 0.75 * group_advantages(r2, gid, clip=1e9)
    assert torch.allclose(adv, expect.clamp(-5, 5), atol=1e-6)
    assert torch.allclose(comb, 0.25 * r1 + 0.75 * r2, atol=1e-6)
    adv_r, _ = combine_rewards({"a": r1, "b": r2}, {"a": 1.0, "b": 3.0}, gid, "reward_aggr")
    assert torch.allclose(adv_r, group_advantages(0.25 * r1 + 0.75 * r2, gid), atol=1e-6)


def test_shuffled_is_a_permutation():
    a = torch.arange(10.0)
    s = shuffled(a, torch.Generator().manual_seed(0))
    assert not torch.equal(s, a) and torch.equal(s.sort().values, a)


# ------------------------------------------------------------------------------------------ loss
def test_ratio_one_loss_gradient_is_reinforce():
    lp = torch.randn(5, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(5, dtype=torch.float64)
    loss, st = ppo_clip_loss(lp, lp.detach().clone(), adv, 1e-4)
    assert st.ratio_mean == 1.0 and st.clip_frac == 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(grad, -adv / 5)  # d/dlogp of mean(-A * exp(logp - old)) at ratio 1
    (g2,) = torch.autograd.grad(reinforce_surrogate(lp, adv), lp)
    assert torch.allclose(grad, g2)


def test_clipping_zeroes_gradient_outside_trust_region():
    eps = 0.1
    old = torch.zeros(4, dtype=torch.float64)
    # ratios: 1.5 (A>0: clipped), 1.5 (A<0: not clipped), 0.5 (A<0: clipped), 0.5 (A>0: not clipped)
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss, st = ppo_clip_loss(lp, old, adv, eps)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[0] == 0 and grad[2] == 0
    assert torch.allclose(grad[[1, 3]], torch.tensor([1.5, -0.5], dtype=torch.float64) / 4)
    assert st.clip_frac == 1.0
    expected = torch.tensor([-1.1, 1.5, 0.9, -0.5], dtype=torch.float64).mean()
    assert torch.isclose(loss, expected)


def test_kl_penalty():
    m = torch.randn(3, 4, 5, requires_grad=True)
    assert float(kl_penalty(m, m.detach().clone(), 0.2, 0.5).detach()) == 0.0
    k = kl_penalty(m, m.detach() - 0.2, 0.2, 0.5)
    assert torch.isclose(k, torch.tensor(0.5 * 0.04 / (2 * 0.04)))
