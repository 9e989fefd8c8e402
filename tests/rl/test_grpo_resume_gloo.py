"""`osp-grpo` as two real gloo processes with the osp-next recipe: SIGTERM to one rank mid-run -> both checkpoint and
exit 3; the relaunch resumes and ends bit for bit where an uninterrupted run ends (metrics, LoRA, Adam state, LoRA
EMA, adaptive clipping state, every rank's RNG state restored). Checkpoints are the shared torch_dist ones."""
import os
import signal
from pathlib import Path

import pytest

from tests.rl.test_grpo_cli_resume import assert_same_grpo_checkpoint
from tests.training.train_launch import World, metrics, run_world

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "grpo_demo_cpu.yaml")
OVERRIDES = ["grpo.recipe=osp-next", "grpo.iterations=14", "grpo.steps=6", "grpo.window.size=2", "grpo.group_size=2",
             "grpo.prompts_per_iteration=2", "grpo.rollout_batch=2", "grpo.train_batch=1", "grpo.eval_interval=0",
             "grpo.save_interval=0", "grpo.lr=1e-2", "grpo.ema_decay=0.9", "grpo.latent_shape=[1,4,4]",
             "grpo.lora.rank=4", "grpo.lora.alpha=4", "grpo.lora.targets=[attention]", "model.num_layers=2",
             "model.schedule=full", "tracking.backend=none"]
MODULE = "osp_megatron.cli.grpo"
SAME = ("reward/combined/mean", "grpo/grad_norm", "grpo/ratio_mean", "grpo/kl", "grpo/clip_bound", "grpo/updates")


@pytest.mark.slow
def test_grpo_kill_and_resume_is_bit_exact_on_two_gloo_ranks(tmp_path):
    """Three launches of two processes (~3 min on 2 shared cores)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_world(2, CONFIG, OVERRIDES + [f"train.run_dir={ref}"], tmp_path / "logs_ref", module=MODULE) == [0, 0]
    world = World(2, CONFIG, OVERRIDES + [f"train.run_dir={run}"], tmp_path / "logs_run", module=MODULE)
    world.wait_for_line("step 2/14")
    os.kill(world.procs[1].pid, signal.SIGTERM)
    assert world.wait() == [3, 3], world.text(0)[-3000:]
    stopped = metrics(run)[-1]["step"]
    assert 2 <= stopped < 14
    assert (run / "grpo_checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert run_world(2, CONFIG, OVERRIDES + [f"train.run_dir={run}"], tmp_path / "logs_resume", module=MODULE) == [0, 0]
    assert "resuming from" in (tmp_path / "logs_resume" / "rank0.0.log").read_text()
    a, b = metrics(ref), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 15))
    for key in SAME:
        assert [m[key] for m in a] == [m[key] for m in b], key  # bit for bit
    fa, fb = ref / "grpo_checkpoints" / "iter_0000014", run / "grpo_checkpoints" / "iter_0000014"
    oa, ob = assert_same_grpo_checkpoint(fa, fb, tmp_path)
    assert oa["clip"] == ob["clip"] and oa["clip"]["mode"] == "adaptive"
    assert len(ob["rng"]) == 2  # every rank's full RNG state
