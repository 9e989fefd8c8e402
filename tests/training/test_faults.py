"""Faults injected into real `osp-train` runs (gloo, CPU) and into the checkpoint files they leave.

Signals reach a rank's whole process group (as SLURM `--signal`, `scancel --signal`, torchrun and a terminal's
Ctrl-C deliver them): the loader workers and the checkpoint writer's Manager must survive until the final save.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_launch import REPO, World, metrics, run_world

from osp_megatron.training.checkpoint import verify_checkpoint

RAW = {
    "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
    "data": {"kind": "raw", "fps": 16, "buckets": [{"frames": 17, "height": 64, "width": 64}],
             "micro_batch_size": 1, "num_workers": 1, "shuffle_buffer": 4, "text_len": 8},
    "encoders": {"vae": "tiny", "text_encoder": "tiny"},
    "train": {"steps": 40, "global_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_interval": 1,
              "save_interval": 2, "sample_interval": 0},
    "tracking": {"backend": "none"},
}


@pytest.fixture(scope="module")
def raw_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    subprocess.run([sys.executable, "-m", "osp_megatron.cli.shards", "--synthetic", "4", "--output", str(d / "shards"),
                    "--workers", "1", "--no-progress"], cwd=REPO, check=True, timeout=300, capture_output=True)
    cfg = yaml.safe_load(yaml.safe_dump(RAW))
    cfg["data"]["shards"] = str(d / "shards")
    path = d / "raw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_group_signals_after_a_periodic_save_with_loader_workers_checkpoint_and_exit_3(raw_config, tmp_path):
    run = tmp_path / "run"
    # SIGUSR1 to every rank's process group (workers, writer Manager and all) after the step-2 save
    world = World(2, raw_config, [f"train.run_dir={run}"], tmp_path / "logs")
    world.wait_for_line("checkpoint step 2")
    world.wait_for_line("step 3/40")
    for p in world.procs:
        os.killpg(p.pid, signal.SIGUSR1)
    codes = world.wait()
    assert codes == [3, 3], world.text(0)[-3000:] + world.text(1)[-3000:]
    stopped = metrics(run)[-1]["step"]
    assert "checkpointed for requeue (exit code 3)" in world.text(0) and stopped >= 3
    assert _latest(run).name == f"step_{stopped:07d}" and verify_checkpoint(_latest(run))["step"] == stopped

    # Ctrl-C (SIGINT to rank 0's process group) is a stop request like SIGTERM
    world = World(2, raw_config, [f"train.run_dir={run}"], tmp_path / "logs")
    world.wait_for_line(f"resumed at step {stopped}")
    world.wait_for_line(f"step {stopped + 1}/40")
    os.killpg(world.procs[0].pid, signal.SIGINT)
    codes = world.wait()
    assert codes == [3, 3], world.text(0)[-3000:]
    again = metrics(run)[-1]["step"]
    assert f"stopped at step {again} (signal {int(signal.SIGINT)})" in world.text(0)
    assert verify_checkpoint(_latest(run))["step"] == again > stopped
