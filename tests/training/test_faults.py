"""Faults injected into real `osp-train` runs (gloo, CPU) and into the checkpoint files they leave.

Signals reach a rank's whole process group (as SLURM `--signal`, `scancel --signal`, torchrun and a terminal's
Ctrl-C deliver them): the loader workers and the checkpoint writer's Manager must survive until the final save.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from train_launch import REPO, World, free_port, metrics, run_world

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


SYN = {
    "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
    "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 2, 8, 8], "text_len": 8,
             "micro_batch_size": 1, "num_workers": 0},
    "train": {"steps": 8, "global_batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
              "log_interval": 1, "save_interval": 2, "clip_grad": 1.0},
    "tracking": {"backend": "mlflow"},
}


def _syn_config(tmp_path: Path) -> str:
    path = tmp_path / "syn.yaml"
    path.write_text(yaml.safe_dump(SYN))
    return str(path)


def _trace(run: Path):
    return [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in metrics(run)]


def _wait_for(pred, what: str, timeout: float = 240.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_kill_9_of_a_rank_mid_save_and_of_the_launcher_then_resume_bit_for_bit(tmp_path):
    from mlflow.tracking import MlflowClient

    from osp_megatron.training.tracking import default_tracking_uri

    cfg = _syn_config(tmp_path)
    ref = tmp_path / "ref"
    assert run_world(2, cfg, [f"train.run_dir={ref}"], tmp_path / "l_ref") == [0, 0]

    # SIGKILL rank 0 while step 4 is being written (a .distcp file exists in step_0000004.tmp): steps 3-4 reached
    # metrics.jsonl and MLflow but not a checkpoint; the resume replays them (MLflow keeps one point per step)
    run = tmp_path / "run"
    world = World(2, cfg, [f"train.run_dir={run}"], tmp_path / "l_kill")
    tmp = run / "checkpoints" / "step_0000004.tmp"
    _wait_for(lambda: tmp.is_dir() and any(tmp.glob("*.distcp")), "the step-4 save")
    os.kill(world.procs[0].pid, signal.SIGKILL)
    world.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert run_world(2, cfg, [f"train.run_dir={run}"], tmp_path / "l_resume") == [0, 0]
    assert _trace(run) == _trace(ref)  # bit for bit, every step
    client = MlflowClient(default_tracking_uri(run))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("osp-megatron").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")) == list(range(1, 9))

    # SIGKILL of the launcher (torchrun): its ranks live on as orphans and hold the run directory; a second
    # trainer on it is refused, the orphans finish, and their trace is the uninterrupted one
    run = tmp_path / "run_tr"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(tmp_path / "torchrun.log", "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(free_port()), "-m", "osp_megatron.cli.train", cfg,
                                     f"train.run_dir={run}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3, "step 3 under torchrun")
    ranks = [p for p in psutil.Process(launcher.pid).children() if "osp_megatron.cli.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    # the orphans are held still (SIGSTOP) while a second trainer tries the run directory: they would otherwise
    # finish the few remaining steps before it starts up
    for p in ranks:
        p.suspend()
    try:
        logs = tmp_path / "l_second"
        assert run_world(1, cfg, [f"train.run_dir={run}"], logs) == [1]
        assert "is in use by another trainer (pid " in (logs / "rank0.0.log").read_text()
    finally:
        for p in ranks:
            p.resume()
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file()
              and (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
              and _lock_free(run), "the orphans to finish", 600)
    assert _trace(run) == _trace(ref)
    logs = tmp_path / "l_rerun"  # a rerun of the finished run: resumes at 8, saves nothing again
    assert run_world(2, cfg, [f"train.run_dir={run}"], logs) == [0, 0]
    text = (logs / "rank0.0.log").read_text()
    assert "resumed at step 8" in text and "checkpoint step 8" not in text


def _lock_free(run: Path) -> bool:
    from osp_megatron.training.checkpoint import CheckpointError, RunDirLock

    lock = RunDirLock(run)
    try:
        lock.acquire()
    except CheckpointError:
        return False
    lock.release()
    return True


@pytest.mark.slow
def test_read_only_and_full_run_directories_fail_clearly_with_nothing_half_written(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    cfg = _syn_config(tmp_path)
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(full)], check=True)
    try:
        logs = tmp_path / "l_ro"
        assert run_world(1, cfg, [f"train.run_dir={ro / 'run'}", "tracking.backend=none"], logs) == [1]
        text = (logs / "rank0.0.log").read_text()
        assert f"cannot write to train.run_dir={ro / 'run'}: Read-only file system" in text, text[-2000:]

        logs = tmp_path / "l_full"
        run = full / "run"
        codes = run_world(1, cfg, [f"train.run_dir={run}", "train.save_interval=1"], logs)
        text = (logs / "rank0.0.log").read_text()
        assert codes == [1] and "No space left on device" in text, text[-3000:]
        assert "MlflowException" not in text.splitlines()[-1]  # the real cause is the last word, not the tracker's
        ckpts = run / "checkpoints"
        finals = [p for p in ckpts.iterdir() if p.name.startswith("step_") and p.suffix not in (".tmp", ".old")]
        for p in finals:  # whatever holds a final name is complete
            verify_checkpoint(p)
        if (ckpts / "latest").is_file():
            verify_checkpoint(ckpts / (ckpts / "latest").read_text().strip())
    finally:
        subprocess.run(["umount", str(ro)], check=False)
        subprocess.run(["umount", str(full)], check=False)
