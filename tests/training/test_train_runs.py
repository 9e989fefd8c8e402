"""`osp-train` as real multi-process runs (gloo, CPU): kill-and-resume bit for bit, requeue exit code,
resume with another DP size, corrupt checkpoints refused, NaN steps skipped and counted in MLflow,
sample videos and params in the MLflow store, parallel plan dry-run."""
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from train_launch import World, checkpoint_tensors, metrics, run_world

BASE = {
    "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
    "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 2, 8, 8], "text_len": 8,
             "micro_batch_size": 1, "num_workers": 0},
    "train": {"steps": 8, "global_batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9,
              "log_interval": 1, "save_interval": 0, "clip_grad": 1.0, "weight_decay": 0.01},
    "tracking": {"backend": "mlflow"},
}


def _config(tmp_path: Path, **sections) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    from osp_megatron.training.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(run_dir))
    exp = client.get_experiment_by_name("osp-megatron")
    return client, client.search_runs([exp.experiment_id])


def test_kill_and_resume_is_bit_exact_then_dp_change_and_corrupt_refusal(tmp_path):
    cfg = _config(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_world(2, cfg, [f"train.run_dir={ref}"], tmp_path / "logs_ref") == [0, 0]

    # SIGTERM to rank 1 only, mid-run: both ranks agree, finish the step, checkpoint, exit 3
    world = World(2, cfg, [f"train.run_dir={run}"], tmp_path / "logs_run")
    world.wait_for_line("step 3/8")
    os.kill(world.procs[1].pid, signal.SIGTERM)
    codes = world.wait()
    assert codes == [3, 3], world.text(0)[-3000:]
    stopped = metrics(run)[-1]["step"]
    assert 3 <= stopped < 8
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert "checkpointed for requeue (exit code 3)" in world.text(0)

    assert run_world(2, cfg, [f"train.run_dir={run}"], tmp_path / "logs_resume") == [0, 0]
    a, b = metrics(ref), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in a] == [m[key] for m in b], key  # bit for bit
    # the whole final state (weights, Adam moments, EMA) is identical too
    sa = checkpoint_tensors(ref / "checkpoints" / "step_0000008", tmp_path)
    sb = checkpoint_tensors(run / "checkpoints" / "step_0000008", tmp_path)
    assert sa.keys() == sb.keys() and any(k.startswith("ema.") for k in sa)
    assert any("exp_avg" in k for k in sa)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    client, runs = _mlflow(run)
    assert len(runs) == 1  # the resumed job re-opened the same MLflow run
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, 9))

    # a different data-parallel size (2 -> 1) loads the same checkpoint and trains on
    logs = tmp_path / "logs_dp1"
    assert run_world(1, cfg, [f"train.run_dir={run}", "train.steps=10"], logs) == [0]
    text = (logs / "rank0.0.log").read_text()
    assert "resumed at step 8" in text and "DP 1" in text
    assert [m["step"] for m in metrics(run)][-2:] == [9, 10]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(run))

    # a corrupt checkpoint is refused with a message naming the file
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    shard = sorted(latest.glob("*.distcp"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x55
    shard.write_bytes(bytes(raw))
    logs = tmp_path / "logs_corrupt"
    assert run_world(1, cfg, [f"train.run_dir={run}", "train.steps=12"], logs) == [1]
    text = (logs / "rank0.0.log").read_text()
    assert f"is corrupt: file {shard.name} fails its CRC32 check" in text


def test_nan_step_is_skipped_counted_and_samples_reach_mlflow(tmp_path):
    run = tmp_path / "run"
    cfg = _config(tmp_path, train={"steps": 4, "global_batch_size": 1, "debug_nonfinite_steps": [2],
                                   "sample_interval": 4, "sample_steps": 2, "sample_guidance": 2.0,
                                   "sample_prompts": ["a red square moving right"]})
    logs = tmp_path / "logs"
    assert run_world(1, cfg, [f"train.run_dir={run}"], logs) == [0]
    text = (logs / "rank0.0.log").read_text()
    assert "step 2: non-finite loss nan" in text and "update skipped (1 in a row)" in text
    m = metrics(run)
    assert [x["skipped_step"] for x in m] == [0.0, 1.0, 0.0, 0.0]
    assert m[1]["loss"] != m[1]["loss"] and all(x["loss"] == x["loss"] for x in (m[0], m[2], m[3]))
    common = torch.load(run / "checkpoints" / "step_0000004" / "common.pt", weights_only=False)
    assert common["osp"]["updates"] == 3 and common["osp"]["nonfinite_total"] == 1

    client, runs = _mlflow(run)
    r = runs[0]
    hist = {k: client.get_metric_history(r.info.run_id, k) for k in
            ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "tflops_per_device", "mfu",
             "nonfinite_steps_total", "skipped_step")}
    assert [(h.step, h.value) for h in hist["nonfinite_steps_total"]] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert [h.step for h in hist["loss"]] == [1, 3, 4]  # the NaN loss stays out of the store
    assert all(len(hist[k]) >= 3 for k in hist)
    assert r.data.params["train.lr"] == "0.001" and r.data.params["model.schedule"] == "dual_end"
    assert r.data.params["train.debug_nonfinite_steps"] == "[2]"
    assert r.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
    assert arts == {"samples/step_0000004_0.mp4", "samples/step_0000004_0.png"}  # the clip and its frame strip
    local = Path(client.download_artifacts(r.info.run_id, "samples/step_0000004_0.mp4", str(tmp_path / "dl")))
    import av

    with av.open(str(local)) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == 5 and (frames[0].height, frames[0].width) == (64, 64)  # tiny VAE: 2 latent frames
    assert {a.path for a in client.list_artifacts(r.info.run_id, "config")} == {"config/config.yaml"}


def test_nonfinite_steps_in_a_row_stop_with_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = _config(tmp_path, train={"steps": 6, "global_batch_size": 1, "save_interval": 1,
                                   "debug_nonfinite_steps": [3, 4], "max_nonfinite_steps": 2},
                  tracking={"backend": "none"})
    logs = tmp_path / "logs"
    assert run_world(1, cfg, [f"train.run_dir={run}"], logs) == [4]
    text = (logs / "rank0.0.log").read_text()
    assert "2 non-finite steps in a row" in text
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_dry_run_prints_config_and_plan_and_bad_plans_fail_before_init(monkeypatch, capsys, tmp_path):
    from osp_megatron.cli.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "shards").mkdir()  # --dry-run checks that the inputs exist
    assert main(["configs/demo_cpu.yaml", "parallel.ssp=2", f"data.shards={tmp_path / 'shards'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and yaml.safe_load(out.split("# parallel plan")[0])["parallel"]["ssp"] == 2
    assert "world size 2 = TP 1 x CP 2 (SSP 2 x Ulysses 1) x DP 1 x PP 1" in out
    assert "stage 0: 0:full, 1:full, 2:token, 3:group, 4:token, 5:group, 6:full, 7:full" in out
    assert main(["configs/demo_cpu.yaml", "parallel.ssp=3", "--dry-run"]) == 2
    assert "parallel.ssp=3 does not divide P^2=4" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["configs/demo_cpu.yaml", "parallel.ssp=2"]) == 2  # rejected before any process group
    assert "world size 3 is not divisible by TP x PP x CP = 1 x 1 x 2" in capsys.readouterr().err
    assert main(["configs/demo_cpu.yaml", "parallel.ssp=1"]) == 2
    assert "train.global_batch_size=4 is not divisible by data.micro_batch_size x DP = 2 x 3" in capsys.readouterr().err
    assert main(["configs/demo_cpu.yaml", "train.warmup_steps=500", "train.steps=10", "--dry-run"]) == 2
    assert "train.warmup_steps=500" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "Exit codes: 0 done" in capsys.readouterr().out


def test_save_checkpoints_false_writes_no_checkpoint(tmp_path):
    cfg = _config(tmp_path, train={"steps": 2, "warmup_steps": 1, "save_interval": 1, "save_checkpoints": False,
                                   "ema_decay": 0.0}, tracking={"backend": "none"})
    run = tmp_path / "run"
    assert run_world(1, cfg, [f"train.run_dir={run}"], tmp_path / "logs") == [0]
    assert [m["step"] for m in metrics(run)] == [1, 2]
    ckpt = run / "checkpoints"
    assert not ckpt.exists() or not any(ckpt.iterdir()), list(ckpt.iterdir())
