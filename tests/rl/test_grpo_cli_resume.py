"""`osp-grpo` as a real process (one rank, gloo on CPU, the osp-next recipe at tiny sizes): SIGTERM mid-run ->
checkpoint and exit 3; the relaunch resumes and ends bit for bit where an uninterrupted run ends (every logged
metric, LoRA, Adam moments, LoRA EMA, clipping state, the PEFT folders). The two-rank variant with a stop
signal to one rank is tests/rl/test_grpo_resume_gloo.py (slow)."""
import os
import signal
from pathlib import Path

import torch

from tests.training.train_launch import World, checkpoint_tensors, metrics, run_world

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "grpo_demo_cpu.yaml")
ITERATIONS = 16  # ~0.15 s each: the stop request after iteration 2 reaches the trainer long before the end
OVERRIDES = [f"grpo.iterations={ITERATIONS}", "grpo.recipe=osp-next", "grpo.steps=6", "grpo.window.size=2",
             "grpo.group_size=2", "grpo.prompts_per_iteration=1", "grpo.rollout_batch=2", "grpo.train_batch=1",
             "grpo.eval_interval=0", "grpo.save_interval=0", "grpo.lr=1e-2", "grpo.ema_decay=0.9",
             "grpo.latent_shape=[1,4,4]", "grpo.lora.rank=4", "grpo.lora.alpha=4", "grpo.lora.targets=[attention]",
             "model.num_layers=2", "model.schedule=full", "tracking.backend=none"]
MODULE = "osp_megatron.cli.grpo"
SAME = ("loss", "grad_norm", "lr", "reward/combined/mean", "grpo/ratio_mean", "grpo/kl", "grpo/clip_bound",
        "grpo/updates", "window/start")


def test_grpo_cli_sigterm_and_resume_is_bit_exact(tmp_path):
    """Three launches of one process, the first two side by side (~30 s on 2 cores, most of it imports)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    uninterrupted = World(1, CONFIG, OVERRIDES + [f"train.run_dir={ref}"], tmp_path / "logs_ref", module=MODULE)
    try:
        world = World(1, CONFIG, OVERRIDES + [f"train.run_dir={run}"], tmp_path / "logs_run", module=MODULE)
        world.wait_for_line(f"step 2/{ITERATIONS}")  # the progress line of iteration 2 (printed, then flushed)
        os.kill(world.procs[0].pid, signal.SIGTERM)
        assert world.wait() == [3], world.text(0)[-3000:]
        assert uninterrupted.wait() == [0], uninterrupted.text(0)[-3000:]
    finally:
        uninterrupted.stop_all()
    stopped = metrics(run)[-1]["step"]
    assert 2 <= stopped < ITERATIONS
    assert f"stopped at step {stopped} (signal {int(signal.SIGTERM)})" in world.text(0)
    assert "checkpointed for requeue (exit code 3)" in world.text(0)
    assert (run / "grpo_checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"

    logs = tmp_path / "logs_resume"
    assert run_world(1, CONFIG, OVERRIDES + [f"train.run_dir={run}"], logs, module=MODULE) == [0]
    assert f"resumed at step {stopped}" in (logs / "rank0.0.log").read_text()
    a, b = metrics(ref), metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, ITERATIONS + 1))
    for key in SAME:
        assert [m[key] for m in a] == [m[key] for m in b], key  # bit for bit

    last = f"iter_{ITERATIONS:07d}"
    oa, ob = assert_same_grpo_checkpoint(ref / "grpo_checkpoints" / last, run / "grpo_checkpoints" / last, tmp_path)
    assert oa["clip"] == ob["clip"] and oa["clip"]["mode"] == "adaptive"
    assert oa["updates"] == ob["updates"] == 2 * ITERATIONS and oa["grpo"] == ob["grpo"]


def assert_same_grpo_checkpoint(fa: Path, fb: Path, scratch: Path):
    """Two GRPO checkpoint folders hold the same LoRA parameters, LoRA EMA and Adam moments (and nothing of the
    frozen base) bit for bit, and the same PEFT exports. Returns both checkpoints' `osp` entries."""
    (scratch / "a").mkdir(exist_ok=True), (scratch / "b").mkdir(exist_ok=True)
    sa, sb = checkpoint_tensors(fa, scratch / "a"), checkpoint_tensors(fb, scratch / "b")
    lora = [k for k in sa if k.endswith((".lora_A", ".lora_B")) and not k.startswith("ema.")]
    assert lora and all(f"ema.{k}" in sa for k in lora)  # the LoRA and its EMA, nothing of the frozen base
    assert not any(k.endswith((".weight", ".bias")) for k in sa)
    assert any("exp_avg" in k for k in sa) and any("exp_avg_sq" in k for k in sa)
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    for folder in ("adapter", "adapter_ema"):  # the PEFT exports written with the checkpoint
        name = "adapter_model.safetensors"
        assert (fa / folder / name).read_bytes() == (fb / folder / name).read_bytes(), folder
    return tuple(torch.load(f / "common.pt", weights_only=False)["osp"] for f in (fa, fb))
