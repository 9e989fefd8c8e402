"""Maths options: CFG with a detached unconditional branch in the training forward, zero-advantage filtering,
MixGRPO's decay / exp_decay windows and its grid tail, the LoRA A initialisations."""
import math

import pytest
import torch

from osp_megatron.diffusion.samplers import cfg_velocity_fn, flow_sigmas
from osp_megatron.rl.lora import apply_lora, lora_parameters
from osp_megatron.rl.windows import Window, WindowSchedule, flash_sigmas, window_history
from tests.rl.test_grpo_e2e import make_trainer


class Toy(torch.nn.Module):
    """v = tanh(W [x; text] + b·t): a velocity model whose cond and uncond outputs differ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, timestep, text):
        return torch.tanh(self.lin(torch.cat([x, text], -1)) * (timestep[:, None] / 1000.0 + 1.0))


def _grad(model, fn, x, sigma):
    model.zero_grad()
    (fn(x, sigma) * torch.arange(1.0, 5.0)).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_detached_uncond_gradient_is_s_times_cond_gradient():
    model, s = Toy(), 5.0
    x, sigma = torch.randn(3, 4), torch.tensor([0.9, 0.5, 0.2])
    text, null = torch.randn(3, 4), torch.randn(1, 4)
    g_cond = _grad(model, cfg_velocity_fn(model, text, None, 1.0), x, sigma)
    g_uncond = _grad(model, cfg_velocity_fn(model, null.expand(3, 4), None, 1.0), x, sigma)
    detached = cfg_velocity_fn(model, text, null, s, detach_uncond=True)
    both = cfg_velocity_fn(model, text, null, s)
    with torch.no_grad():  # same values either way
        assert torch.allclose(detached(x, sigma), both(x, sigma), atol=1e-6)
    g_det, g_both = _grad(model, detached, x, sigma), _grad(model, both, x, sigma)
    assert torch.allclose(g_det, s * g_cond, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_both, s * g_cond + (1 - s) * g_uncond, rtol=1e-5, atol=1e-6)
    assert (g_both - g_det).norm() > 0.3 * g_det.norm()  # the two options differ materially


def _update_grads(trainer, batch, adv, plan):
    """LoRA gradients of the iteration's (single) optimizer step, captured before AdamW applies them (the grads
    megatron DDP reduced into `main_grad`)."""
    seen = []
    step = trainer.optimizer.step_with_ready_grads
    trainer.optimizer.step_with_ready_grads = lambda: seen.append(
        torch.cat([p.main_grad.flatten().clone() for p in trainer.params]))
    try:
        trainer.train_on(batch, adv, plan)
    finally:
        trainer.optimizer.step_with_ready_grads = step
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("kl", [0.0, 0.5])
def test_zero_advantage_samples_contribute_no_gradient(tmp_path, kl):
    small = dict(iterations=1, steps=6, group_size=4, prompts_per_iteration=1, rollout_batch=4, train_batch=4,
                 eval_interval=0, latent_shape=[1, 4, 4], window=dict(strategy="fixed", size=2), kl_beta=kl,
                 cfg_scale=3.0, negative_prompt="blurry", clip_grad=0.0)
    out = {}
    for flt in (True, False):
        t = make_trainer(tmp_path / str(flt), layers=2, schedule="full", zero_adv_filter=flt, **small)
        with torch.no_grad():  # LoRA away from the base model, so the KL term has a gradient too
            for p in t.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        plan = t.plan_for(0)
        batch = t.collect(0, plan)
        adv = torch.tensor([1.0, 0.0, -1.0, 0.0])
        g1 = _update_grads(t, batch, adv, plan)
        changed = dict(batch, latents=batch["latents"].clone())
        changed["latents"][[1, 3]] += 1.0  # zero-advantage samples' transitions moved
        g2 = _update_grads(t, changed, adv, plan)
        out[flt] = (g1, g2)
        assert t.train_samples(0, adv) == ([0, 2] if flt else [0, 1, 2, 3])
    g1, g2 = out[True]
    assert torch.equal(g1, g2)
    h1, h2 = out[False]
    if kl > 0:  # unfiltered, the KL term of A = 0 samples carries gradient
        assert not torch.allclose(h1, h2)
    else:  # without KL they add nothing but their share of the mean: the filtered gradient is 2x
        assert torch.allclose(g1, 2 * h1, rtol=1e-4, atol=1e-7)


def test_zero_advantage_padding_to_the_rollout_batch_count(tmp_path):
    t = make_trainer(tmp_path, layers=2, schedule="full", iterations=1, steps=6, group_size=4,
                     prompts_per_iteration=2, rollout_batch=2, train_batch=2, latent_shape=[1, 4, 4],
                     window=dict(strategy="fixed", size=2), zero_adv_filter=True, eval_interval=0)
    adv = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 0.0])  # 3 kept, 4 rollout batches -> 1 padded in
    order = t.train_samples(0, adv)
    assert len(order) == 4 and {0, 5, 6} <= set(order) and order == sorted(order)
    assert order == t.train_samples(0, adv)  # seeded
    adv = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 3.0])  # 4 kept: no padding
    assert t.train_samples(0, adv) == [0, 5, 6, 7]
    # one update per train micro-batch (updates_per_iteration = 0)
    t.g.updates_per_iteration, t.g.grad_accumulation = 0, 1
    assert t.update_groups([0, 5, 6, 7]) == [[[0, 5]], [[6, 7]]]
    t.g.grad_accumulation = 2
    assert t.update_groups([0, 5, 6, 7, 1]) == [[[0, 5], [6, 7]], [[1]]]


def _mixgrpo_starts(iterations, init, size, limit, stride, interval, roll_back=True):
    """MixGRPO's window state machine written out: counter += 1 each iteration; when it reaches interval(start)
    the start moves by `stride` and the counter resets; start > limit rolls back to `init` (or clamps)."""
    start, count, out = init, 0, []
    for _ in range(iterations):
        out.append(start)
        count += 1
        if count >= interval(start):
            count, start = 0, start + stride
        if start > limit:
            start, count = (init, 0) if roll_back else (limit, count)
    return out


def test_decay_window_by_hand():
    # interval(s) = max(1, int(4·(1 - s/6) + 1·s/6)) = 4, 3, 3, 2, 2, 1, 1 for s = 0..6
    s = WindowSchedule("decay", size=2, num_steps=8, shift_interval=4, stride=1, tail="mixgrpo",
                       decay_max_interval=4, decay_min_interval=1)
    assert [s.interval(k) for k in range(7)] == [4, 3, 3, 2, 2, 1, 1]
    expect = [0] * 4 + [1] * 3 + [2] * 3 + [3] * 2 + [4] * 2 + [5] + [6] + [0] * 4
    assert window_history(s, len(expect)) == expect
    decay = lambda k: max(1, int(4 * (1 - k / 6) + k / 6))  # noqa: E731
    assert window_history(s, 60) == _mixgrpo_starts(60, 0, 2, 6, 1, decay)
    assert s.window(14) == Window(5, 1) and s.window(15).steps == ()  # shrinking, then empty at start = limit


def test_exp_decay_window_by_hand():
    s = WindowSchedule("exp_decay", size=4, num_steps=25, shift_interval=25, stride=1, tail="mixgrpo",
                       exp_decay_k=0.1, exp_decay_start=13)
    interval = lambda k: math.ceil(25 * math.exp(-0.1 * max(0, k - 13)))  # noqa: E731
    assert [s.interval(k) for k in (0, 13, 14, 20, 23)] == [25, 25, 23, 13, 10]
    assert window_history(s, 800) == _mixgrpo_starts(800, 0, 4, 23, 1, interval)
    full = WindowSchedule("exp_decay", size=2, num_steps=6, shift_interval=3, stride=1, exp_decay_k=0.5,
                          exp_decay_start=1)  # tail full: starts 0..2, then back to 0
    assert window_history(full, 9) == [0, 0, 0, 1, 1, 1, 2, 2, 0]


def test_progressive_tails():
    mix = WindowSchedule("progressive", size=2, num_steps=6, shift_interval=1, stride=1, tail="mixgrpo", start=1)
    assert [mix.window(i).steps for i in range(6)] == [(1, 2), (2, 3), (3,), (), (1, 2), (2, 3)]  # back to init 1
    clamp = WindowSchedule("progressive", size=2, num_steps=6, shift_interval=1, stride=1, tail="mixgrpo",
                           roll_back=False)
    assert [clamp.window(i).steps for i in range(6)] == [(0, 1), (1, 2), (2, 3), (3,), (), ()]
    full = WindowSchedule("progressive", size=2, num_steps=6, shift_interval=1, stride=1, start=1)
    assert [full.window(i).steps for i in range(4)] == [(1, 2), (2, 3), (0, 1), (1, 2)]


def test_flash_one_point_tail_stops_above_zero():
    w = Window(19, 4)  # (25 - 22)·0.4 = 1.2 -> int 1
    ours, _ = flash_sigmas(25, 3.0, w, 0.4)
    mix, _ = flash_sigmas(25, 3.0, w, 0.4, min_points=1)
    assert len(ours) - 1 == 24 and float(ours[-1]) == 0.0
    assert len(mix) - 1 == 23 and torch.equal(mix, flow_sigmas(25, 3.0)[:24]) and float(mix[-1]) > 0


def test_empty_window_iteration_trains_nothing(tmp_path):
    t = make_trainer(tmp_path, layers=2, schedule="full", iterations=4, steps=6, group_size=2,
                     prompts_per_iteration=1, rollout_batch=2, train_batch=2, latent_shape=[1, 4, 4],
                     window=dict(strategy="progressive", size=2, shift_interval=1, tail="mixgrpo", limit=3),
                     eval_interval=0)
    before = [p.detach().clone() for p in t.params]
    for it in range(3):  # windows [0, 2), [1, 3), [2, 3)
        t.run_step()
    trained = [p.detach().clone() for p in t.params]
    assert any(not torch.equal(a, b) for a, b in zip(before, trained))
    m = t.run_step()  # iteration 3: window [3, 3)
    assert m["window/trained_steps"] == 0.0 and m["grpo/updates"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(trained, t.params))


def test_gaussian_lora_init_std():
    lin = torch.nn.Sequential(torch.nn.Linear(4096, 8))
    apply_lora(lin, 32, 64, ["0"], init="gaussian")
    a = lora_parameters(lin)[0].detach()
    assert abs(float(a.std()) - 1 / 32) < 1e-3 and abs(float(a.mean())) < 1e-3
    apply_lora(k := torch.nn.Sequential(torch.nn.Linear(4096, 8)), 32, 64, ["0"])
    assert float(lora_parameters(k)[0].abs().max()) <= 1 / 64 + 1e-7  # Kaiming-uniform bound 1/sqrt(in)


def test_adaptive_clipping_bound_and_resume(tmp_path):
    small = dict(iterations=2, steps=6, group_size=2, prompts_per_iteration=1, rollout_batch=2, train_batch=2,
                 latent_shape=[1, 4, 4], window=dict(strategy="fixed", size=2), eval_interval=0, lr=1e-2,
                 clip_mode="adaptive", clip_grad=1.0)
    t = make_trainer(tmp_path, layers=2, schedule="full", **small)
    m = t.run_step()
    assert m["grpo/clip_bound"] == pytest.approx(min(1.0, 3 * m["grpo/grad_norm"]))  # OSP-Next's first bound
    state = t.clipper.state_dict()
    assert state["mode"] == "adaptive" and state["mean"] is not None
    ckpt = t.save()
    r = make_trainer(tmp_path, layers=2, schedule="full", **small)
    r.load(ckpt)
    assert r.clipper.state_dict() == state
