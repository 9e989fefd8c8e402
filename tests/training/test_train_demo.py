"""The README demo end to end (short variant): synthetic clips -> osp-shards -> 2-process osp-train on raw
mp4 shards with the patch VAE and tiny umT5 -> MLflow store, checkpoints, a sample mp4. Plus SSP2 loss parity."""
import subprocess
import sys

import pytest
import yaml

from train_launch import REPO, metrics, run_world


@pytest.mark.slow
def test_demo_command_short(tmp_path):
    subprocess.run([sys.executable, "-m", "osp_megatron.cli.shards", "--synthetic", "6", "--output",
                    "demo_data/shards", "--workers", "1", "--no-progress"], cwd=tmp_path, check=True, timeout=180)
    logs = tmp_path / "logs"
    codes = run_world(2, str(REPO / "configs" / "demo_cpu.yaml"),
                      ["train.steps=4", "train.warmup_steps=1", "train.save_interval=2", "train.log_interval=2",
                       "train.sample_interval=4", "train.sample_steps=2"], logs, cwd=tmp_path)
    out = (logs / "rank0.0.log").read_text()
    assert codes == [0, 0], out[-3000:]
    run = tmp_path / "runs" / "demo_cpu"
    assert "step 4/4" in out and "MLflow run" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert (run / "mlflow.db").is_file()
    mp4 = run / "samples" / "step_0000004_0.mp4"
    import av

    with av.open(str(mp4)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 17 and (frames[0].height, frames[0].width) == (64, 64)
    assert list((run / "mlartifacts").rglob("step_0000004_0.mp4"))
    m = metrics(run)
    assert [x["step"] for x in m] == [2, 4] and all(x["loss"] > 0 for x in m)


@pytest.mark.slow
def test_ssp2_training_matches_single_process(tmp_path):
    """Loss bookkeeping under context parallelism: SSP2 (2 ranks, one sample split) == 1 rank."""
    cfg = {
        "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
        "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 2, 8, 8], "text_len": 8,
                 "micro_batch_size": 2, "num_workers": 0},
        "train": {"steps": 3, "lr": 1e-3, "log_interval": 1},
        "tracking": {"backend": "none"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_world(1, str(path), [f"train.run_dir={tmp_path / 'one'}"], tmp_path / "l1") == [0]
    assert run_world(2, str(path), [f"train.run_dir={tmp_path / 'ssp'}", "parallel.ssp=2"], tmp_path / "l2") == [0, 0]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "ssp")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
