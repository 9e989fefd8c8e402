"""Mixed ODE–SDE rollouts: plans, shared initial noise, Flash tail accuracy, ratio = 1, KL to the reference."""
import pytest
import torch

from osp_megatron.config import Config
from osp_megatron.diffusion import samplers as S
from osp_megatron.config import GRPOConfig, parse_section
from osp_megatron.rl.lora import lora_disabled
from osp_megatron.rl.rollout import NoiseSource, make_plan, rollout, transition_log_prob
from osp_megatron.rl.trainer import GRPOTrainer
from osp_megatron.rl.windows import Window
from osp_megatron.training.ema import unwrap


def gaussian_velocity(mean, std):
    def fn(x, sigma):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a = 1.0 - s
        x0_hat = mean + a * std * std / (a * a * std * std + s * s) * (x - a * mean)
        return (x - x0_hat) / s

    return fn


def test_plan_kinds_and_noise_levels():
    p = make_plan(10, 3.0, Window(2, 4), (2, 3, 4, 5), "flow_grpo", 0.7)
    assert p.kinds == ["ode"] * 2 + ["sde"] * 4 + ["ode"] * 4
    assert all(g > 0 for g in p.g[2:6]) and p.g[:2] == [0.0, 0.0] and p.g[6:] == [0.0] * 4
    f = make_plan(25, 3.0, Window(0, 4), (0, 1, 2, 3), flash=True, compression=0.4)
    assert f.kinds == ["sde"] * 4 + ["dpm"] * 7 and f.num_steps == 11
    o = make_plan(25, 3.0, Window(0, 10), tuple(range(10)), "osp_next")
    assert o.g[3] == pytest.approx(float(o.sigmas[3]))
    with pytest.raises(ValueError, match="outside the SDE window"):
        make_plan(10, 3.0, Window(2, 4), (1, 2))


def test_same_initial_noise_identical_until_window_then_diverge():
    vel = gaussian_velocity(torch.zeros(16, 1, 4, 4), torch.ones(16, 1, 4, 4) * 0.5)
    src = NoiseSource(seed=1, iteration=0)
    shape = (16, 1, 4, 4)
    x0 = src.initial(shape, [0, 0, 0])  # one group: same initial noise
    called = []

    def noise(step):
        called.append(step)
        return src.sde(shape, [0, 1, 2], step)

    plan = make_plan(10, 3.0, Window(3, 3), (3, 4, 5))
    res = rollout(vel, x0, plan, noise)
    assert called == [3, 4, 5]  # SDE noise only inside the window
    assert res.latents.shape == (3, 3, *shape) and res.log_probs.shape == (3, 3)
    assert torch.equal(res.latents[0, 0], res.latents[1, 0]) and torch.equal(res.latents[1, 0], res.latents[2, 0])
    assert not torch.allclose(res.next_latents[0, 0], res.next_latents[1, 0])
    assert not torch.allclose(res.final[0], res.final[1])
    # stored transitions chain: next of step k is the input of step k+1
    assert torch.equal(res.next_latents[:, 0], res.latents[:, 1])


def test_flash_tail_close_to_fine_ode():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(8, 6, generator=g, dtype=torch.float64)
    std = 0.6 + torch.rand(8, 6, generator=g, dtype=torch.float64)
    vel = gaussian_velocity(mean, std)
    x0 = torch.randn(4, 8, 6, generator=g, dtype=torch.float64)
    zero = lambda step: torch.zeros_like(x0)  # noqa: E731  (SDE off: noise 0, tiny eta)
    ref = S.sample(vel, x0, steps=4000, shift=3.0, solver="euler")
    flash = make_plan(25, 3.0, Window(0, 4), (0, 1, 2, 3), eta=1e-8, flash=True, compression=0.4)
    out = rollout(vel, x0, flash, zero).final.double()
    # same NFE with Euler on the same compressed grid
    x = x0.clone()
    for i in range(flash.num_steps):
        s = float(flash.sigmas[i])
        x = S.euler_step(x, vel(x, torch.full((4,), s, dtype=torch.float64)), s, flash.sigmas[i + 1])
    full = rollout(vel, x0, make_plan(25, 3.0, Window(0, 4), (0,), eta=1e-8), zero).final.double()
    err_flash, err_euler, err_full = ((out - ref).abs().max().item(), (x - ref).abs().max().item(),
                                      (full - ref).abs().max().item())
    assert err_flash < 0.6 * err_euler, (err_flash, err_euler)
    assert err_flash < 1.5 * err_full, (err_flash, err_full)  # 11 NFE about as good as 25 Euler NFE
    # the tail alone (from an accurate state at the window end): DPM-Solver++ 2 vs Euler on the compressed grid
    e = 4
    x_e = S.sample(vel, x0, solver="euler",
                   sigmas=S.shift_sigmas(torch.linspace(1, 1 - e / 25, 2001, dtype=torch.float64), 3.0))
    tail = flash.sigmas[e:]
    ref_tail = S.sample(vel, x_e, solver="euler", sigmas=S.shift_sigmas(
        torch.linspace(1 - e / 25, 0, 4001, dtype=torch.float64), 3.0))
    dpm, xe = S.DPMSolverPP(2), x_e.clone()
    for i in range(len(tail) - 1):
        xe = dpm.step(xe, vel(xe, torch.full((4,), float(tail[i]), dtype=torch.float64)), tail[i], tail[i + 1])
    eul = S.sample(vel, x_e, solver="euler", sigmas=tail)
    assert (xe - ref_tail).abs().max() < 0.6 * (eul - ref_tail).abs().max()


def tiny_trainer(tmp_path, recompute=False, recipe="none", **over):
    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.precision.recipe = recipe
    cfg.model.num_layers, cfg.model.schedule = 2, "full"
    cfg.model.recompute = "full" if recompute else "none"
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.tracking.backend = "none"
    cfg.train.seed = 0  # the trainer seeds the base model's init from train.seed
    g = dict(iterations=2, steps=6, window=dict(strategy="fixed", start=1, size=3), group_size=3,
             prompts_per_iteration=2, rollout_batch=3, train_batch=3, lr=1e-2, clip_range=1e-2, latent_shape=[1, 4, 4],
             prompts=["one", "two"], lora=dict(rank=4, alpha=4))
    g.update(over)
    torch.manual_seed(0)
    return GRPOTrainer(cfg, parse_section(GRPOConfig, g), device="cpu")


def test_ratio_exactly_one_before_first_update(tmp_path):
    t = tiny_trainer(tmp_path)
    plan = t.plan_for(0)
    batch = t.collect(0, plan)
    assert batch["old_log_probs"].shape == (6, 3)
    t.model.train()
    for k in range(0, 6, 3):
        idx = torch.arange(k, k + 3)
        fn = t.velocity_fn(t.text.encode([batch["prompts"][i] for i in idx]))
        for ki, step in enumerate(plan.trained):
            lp, _, _ = transition_log_prob(fn, batch["latents"][idx, ki], batch["next_latents"][idx, ki], plan, step)
            assert torch.equal(lp, batch["old_log_probs"][idx, ki])
    adv, _, _ = t.advantages(0, batch["scores"])
    stats = t.train_on(batch, adv, plan)
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0


def test_kl_zero_at_start_positive_after_update(tmp_path):
    t = tiny_trainer(tmp_path, kl_beta=0.01)
    plan = t.plan_for(0)
    batch = t.collect(0, plan)
    idx = torch.arange(3)

    def kl():
        fn = t.velocity_fn(t.text.encode([batch["prompts"][i] for i in idx]))
        x, xn = batch["latents"][idx, 0], batch["next_latents"][idx, 0]
        with torch.no_grad():
            _, mean, std = transition_log_prob(fn, x, xn, plan, plan.trained[0])
            with lora_disabled(t.model):
                _, ref, _ = transition_log_prob(fn, x, xn, plan, plan.trained[0])
        return float(((mean - ref) ** 2).mean() / (2 * std * std))

    assert kl() == 0.0
    adv, _, _ = t.advantages(0, batch["scores"])
    stats = t.train_on(batch, adv, plan)
    assert stats["kl"] == 0.0  # measured before the (only) update
    assert kl() > 0.0


@pytest.mark.parametrize("over", [
    dict(),
    dict(cfg_scale=3.0, kl_beta=0.01),
    dict(flash=dict(enabled=True, compression=0.5), window=dict(strategy="fixed", start=0, size=2)),
])
def test_reported_nfe_equals_model_evaluations(tmp_path, over):
    """Sum of batch sizes over every model call of one iteration == the NFE the trainer reports."""
    t = tiny_trainer(tmp_path, **over)
    seen = []
    handle = t.model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    m = t.run_step()
    handle.remove()
    assert sum(seen) == m["nfe/nfe_per_iteration"]
    plan = t.plan_for(0)
    start = plan.kinds.index("sde")  # pre-window steps: once per group (2 groups of 3 samples)
    per_sample = plan.num_steps - start + len(plan.trained) * (2 if t.g.kl_beta > 0 else 1)
    assert m["nfe/nfe_per_iteration"] == (per_sample * 6 + start * 2) * (2 if t.g.cfg_scale != 1 else 1)


def test_shared_prefix_matches_per_sample_rollouts(tmp_path):
    a = tiny_trainer(tmp_path / "a", window=dict(strategy="fixed", start=2, size=2))
    b = tiny_trainer(tmp_path / "b", window=dict(strategy="fixed", start=2, size=2), share_prefix=False)
    plan = a.plan_for(0)
    ra, rb = a.collect(0, plan), b.collect(0, plan)
    assert torch.allclose(ra["final"], rb["final"], atol=1e-5)
    assert torch.allclose(ra["old_log_probs"], rb["old_log_probs"], atol=1e-5)
    assert torch.equal(ra["latents"][0, 0], ra["latents"][1, 0])  # group members identical at the window start


def test_encoder_text_and_vae_decoder(tmp_path):
    """The tiny umT5 and tiny Wan VAE from osp_megatron.encoders behind the same trainer."""
    t = tiny_trainer(tmp_path, text_source="encoder", decoder="vae", cfg_scale=2.0, text_len=8, group_size=2,
                     prompts_per_iteration=1, rollout_batch=2, train_batch=2)
    m = t.run_step()
    assert m["nfe/nfe_per_iteration"] > 0 and 0.0 <= m["reward/brightness/mean"] <= 1.0
    assert t.text.encode(["one"]).shape == (1, 8, 32)


def test_activation_recompute_keeps_lora_gradients(tmp_path):
    """Megatron's reentrant recompute with a frozen base: LoRA grads equal those without recompute."""
    from osp_megatron.rl.lora import lora_parameters

    grads = []
    for recompute in (False, True):
        t = tiny_trainer(tmp_path / str(recompute), recompute=recompute, lr=0.0)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for q in lora_parameters(t.model):
                q.copy_(torch.randn(q.shape, generator=gen) * 0.05)
        plan = t.plan_for(0)
        batch = t.collect(0, plan)
        adv, _, _ = t.advantages(0, batch["scores"])
        t.train_on(batch, adv, plan)
        grads.append(torch.cat([q.main_grad.reshape(-1) for q in lora_parameters(t.model)]))  # DDP's reduced grads
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_lora_on_hif8_quantized_model(tmp_path):
    """HiF8 linears (megatron Column/Row subclasses) take adapters; ratio 1 and a non-zero update."""
    t = tiny_trainer(tmp_path, recipe="hif8_current")
    kinds = {type(m).__name__ for n, m in unwrap(t.model).named_modules() if n in t.lora_names}
    assert kinds == {"HiF8ColumnParallelLinear", "HiF8RowParallelLinear"}
    m = t.run_step()
    assert m["grpo/ratio_mean"] == 1.0 and m["grpo/grad_norm"] > 0


def test_grpo_noise_comes_from_the_project_seed_scheme():
    """GRPO's per-sample noise is seeded by `derive_seed(seed, iteration, sample, tag)`, the scheme of the whole
    project (the trainer's noise, timesteps and samples use the same function)."""
    from osp_megatron.rl.rollout import NoiseSource
    from osp_megatron.training.rng import derive_seed

    src = NoiseSource(seed=7, iteration=3)
    for tag, got in ((2, src.sde([4, 2, 2], [5, 9], 2)), (NoiseSource.INITIAL_TAG, src.initial([4, 2, 2], [5, 9]))):
        for k, sample in enumerate((5, 9)):
            want = torch.empty(4, 2, 2).normal_(generator=torch.Generator().manual_seed(derive_seed(7, 3, sample, tag)))
            assert torch.equal(got[k], want)
    assert not torch.equal(src.sde([4, 2, 2], [5], 0), src.initial([4, 2, 2], [5]))
