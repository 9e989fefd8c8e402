"""GRPO kill-and-resume in one process through the shared trainer loop: N iterations straight vs k iterations, a
stop (train.exit_after_steps: exit code 3 after a checkpoint, the path a stop signal takes), a fresh trainer
resuming to N. LoRA weights, Adam state, LoRA EMA, rewards and every logged metric equal bit for bit; the
checkpoint holds the trainable set only."""
import torch

from osp_megatron.training import signals
from tests.rl.test_grpo_e2e import make_trainer
from tests.training.train_launch import checkpoint_tensors

SMALL = dict(iterations=4, steps=6, group_size=2, prompts_per_iteration=2, rollout_batch=2, train_batch=1,
             window=dict(strategy="progressive", size=2, shift_interval=1, stride=1), eval_interval=0,
             latent_shape=[1, 4, 4], lr=1e-2, ema_decay=0.9, clip_mode="adaptive", clip_grad=1.0,
             save_interval=0, updates_per_iteration=2, lora=dict(rank=4, alpha=4))
SAME = ("reward/combined/mean", "loss", "grad_norm", "grpo/ratio_mean", "grpo/clip_bound", "grpo/updates")


def _run(run_dir, exit_after=0):
    t = make_trainer(run_dir, layers=2, schedule="full", **SMALL)
    t.cfg.train.exit_after_steps = exit_after
    return t, t.fit(track=False)


def test_grpo_stop_and_resume_is_bit_exact(tmp_path):
    ref, ref_hist = _run(tmp_path / "ref")
    assert ref.exit_code == signals.EXIT_OK and ref.iteration == 4
    stopped, first = _run(tmp_path / "run", exit_after=2)
    assert stopped.exit_code == signals.EXIT_REQUEUE and stopped.stopped and stopped.iteration == 2
    root = tmp_path / "run" / "grpo_checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000002"
    resumed, second = _run(tmp_path / "run")
    assert resumed.exit_code == signals.EXIT_OK and resumed.iteration == 4 and len(second) == 2
    hist = first + second
    for key in SAME:
        assert [h[key] for h in ref_hist] == [h[key] for h in hist], key  # bit for bit
    for a, b in zip(ref.params, resumed.params):
        assert torch.equal(a, b)
    assert all(torch.equal(ref.ema.tensors()[k], v) for k, v in resumed.ema.tensors().items())
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    sa = checkpoint_tensors(tmp_path / "ref" / "grpo_checkpoints" / "iter_0000004", tmp_path / "a")
    sb = checkpoint_tensors(root / "iter_0000004", tmp_path / "b")
    assert sa.keys() == sb.keys()
    lora = {k for k in sa if k.endswith((".lora_A", ".lora_B")) and not k.startswith("ema.")}
    assert len(lora) == len(ref.params) and {f"ema.{k}" for k in lora} <= sa.keys()
    assert not any(k.endswith((".weight", ".bias")) for k in sa)  # the frozen base is not checkpointed
    assert any("exp_avg_sq" in k for k in sa)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    oa, ob = (torch.load(d / "common.pt", weights_only=False)["osp"]
              for d in (tmp_path / "ref" / "grpo_checkpoints" / "iter_0000004", root / "iter_0000004"))
    assert oa["clip"] == ob["clip"] and oa["clip"]["mode"] == "adaptive" and oa["updates"] == ob["updates"] == 8
    assert len(ob["rng"]) == 1 and ob["grpo"]["window"] == oa["grpo"]["window"]
