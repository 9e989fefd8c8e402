"""Tracker backends read back from their real on-disk stores: TensorBoard event files (EventAccumulator), a W&B
offline run (its .wandb record log), MLflow sqlite; the `tracking.backend` option from the command line; run tags,
system metrics and the loss-curve PNG of a real `osp-train` run."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train_launch import metrics, run_world

from osp_megatron.cli.train import main as train_main
from osp_megatron.config import load_config
from osp_megatron.config.sections import TrackingConfig
from osp_megatron.training.curves import curve_points, write_curve_png
from osp_megatron.training.samples import write_png
from osp_megatron.training.tracking import (Tracker, backend_names, default_tracking_uri, git_commit, run_tags,
                                            system_metrics)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path, h: int = 6, w: int = 10) -> Path:
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2] = (255, 0, 0)
    return write_png(path, image)


def _events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _png_shape(path: Path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])  # (width, height)


# ------------------------------------------------------------------------------------------ the option
def test_backend_option_from_command_line_overrides(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    base = ["configs/demo_cpu.yaml", "data.kind=synthetic", "parallel.ssp=1"]
    assert train_main([*base, "tracking.backend=tensorboard,mlflow", "--dry-run"]) == 0
    assert "backend: tensorboard,mlflow" in capsys.readouterr().out
    # a YAML list and spaces give the same value; `none` alone means no tracker
    assert load_config(None, ["tracking.backend=[wandb, mlflow]"]).tracking.backend == "wandb,mlflow"
    assert load_config(None, ["tracking.backend=tensorboard, mlflow"]).tracking.backend == "tensorboard,mlflow"
    assert backend_names("tensorboard,mlflow") == ("tensorboard", "mlflow") and backend_names("none") == ()

    assert train_main([*base, "tracking.backend=tensorbord,mlflow", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tracking.backend='tensorbord,mlflow': 'tensorbord' is not allowed" in err
    assert "use one or more of mlflow, tensorboard, wandb, none" in err and "did you mean `tensorboard`?" in err
    assert train_main([*base, "tracking.backend=mlflow,none", "--dry-run"]) == 2
    assert "`none` cannot be combined with other trackers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        Tracker(TrackingConfig(backend="tensorbord"), "unused", enabled=True)  # set in code, not parsed


def test_a_missing_tracker_library_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    with pytest.raises(RuntimeError, match=r"tracking.backend=wandb needs wandb .*pip install 'osp-megatron\[track\]'"):
        Tracker(TrackingConfig(backend="wandb"), tmp_path, enabled=True)


# ------------------------------------------------------------------------------------------ TensorBoard + MLflow
def test_tensorboard_and_mlflow_together_with_resume_tags_and_images(tmp_path):
    cfg = TrackingConfig(backend="tensorboard,mlflow")
    tr = Tracker(cfg, tmp_path, enabled=True)
    assert tr.names == ("mlflow", "tensorboard")
    tr.log_params({"train.lr": 1e-3, "model.size": "tiny"})
    tr.set_tags(run_tags(world_size=2))
    for step in range(1, 6):
        tr.log_metrics({"loss": 1.0 / step, "grad_norm": float("nan") if step == 2 else 0.5}, step)
    strip = _png(tmp_path / "samples" / "step_0000005_0.png")
    tr.log_artifact(strip, "samples", step=5)
    tr.finish("KILLED")
    run_id = tr.run_id

    # crash after step 5, resume from the step-3 checkpoint as the trainers do: steps 4 and 5 are replayed
    tr = Tracker(cfg, tmp_path, enabled=True, run_id=run_id)
    tr.start_after(3, reopened=True)
    assert tr.logged_until == 5
    for step in range(4, 8):
        tr.log_metrics({"loss": 1.0 / step, "grad_norm": 0.5}, step)
    tr.finish()

    acc = _events(tmp_path / "tensorboard")
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 8))  # each step once, across two event files
    assert [e.value for e in loss] == pytest.approx([1.0 / s for s in range(1, 8)])
    assert [e.step for e in acc.Scalars("grad_norm")] == [1, 3, 4, 5, 6, 7]  # the NaN stays in metrics.jsonl only
    images = acc.Images("samples/0")
    assert [(i.step, i.width, i.height) for i in images] == [(5, 10, 6)]
    assert images[0].encoded_image_string == strip.read_bytes()
    texts = {t for t in acc.Tags()["tensors"]}
    assert {"config/text_summary", "tags/text_summary"} <= texts

    client = MlflowClient(default_tracking_uri(tmp_path))
    run = client.get_run(run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 8))
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["host"] and tags["torch_version"].startswith("2.")
    assert tags["osp_megatron_version"] == __import__("osp_megatron").__version__
    assert tags.get("git_commit") == git_commit()  # this checkout's HEAD, or absent outside a git checkout
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {"samples/step_0000005_0.png"}
    assert [r["step"] for r in tr.metrics_log.read()] == list(range(1, 8))


def test_run_tags_and_system_metrics(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = run_tags(8)
    assert tags["slurm_job_id"] == "4242" and tags["world_size"] == "8"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert "slurm_job_id" not in run_tags(8)
    assert git_commit(Path("/")) is None  # not a git checkout
    system_metrics()
    _ = sum(i * i for i in range(200_000))  # some CPU time between the two readings
    m = system_metrics()
    assert m["system/cpu_percent"] >= 0.0 and 0.01 < m["system/rss_gib"] < 64
    assert not any(k.startswith("system/gpu") for k in m)  # no CUDA device given


# ------------------------------------------------------------------------------------------ W&B offline
def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', 0xBEE1, version), then 32 KiB blocks of
    chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if n == 0 and kind == 0:  # padding up to the next block
            pos += left
            continue
        chunk = data[pos + 7: pos + 7 + n]
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_run_holds_metrics_config_tags_and_files(tmp_path):
    tr = Tracker(TrackingConfig(backend="wandb", experiment="osp-test"), tmp_path, enabled=True)
    assert tr.run_id and tr.names == ("wandb",)
    tr.log_params({"train.lr": 1e-3})
    tr.set_tags({"host": "node7", "world_size": 4})
    for step in range(1, 4):
        tr.log_metrics({"loss": 1.0 / step, "system/rss_gib": 0.5, "grad_norm": float("inf") if step == 3 else 1.0},
                       step)
    curve = tr.write_curve("loss", "loss_curve.png", step=3)
    tr.finish()

    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{tr.run_id}"))
    assert len(runs) == 1
    records = _wandb_records(runs[0] / f"run-{tr.run_id}.wandb")
    history = {}
    for r in (r for r in records if r.WhichOneof("record_type") == "history"):
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        history.setdefault(r.history.step.num, {}).update(items)
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["loss"] for s in (1, 2, 3)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert history[2]["system/rss_gib"] == 0.5 and "grad_norm" not in history[3]  # inf is not sent
    assert history[3]["loss_curve/_type"] == "image-file"  # nested keys come flattened
    config = {}
    for r in (r for r in records if r.WhichOneof("record_type") == "config"):
        config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.config.update})
    assert config["train.lr"] == "0.001" and config["tag.host"] == "node7" and config["tag.world_size"] == "4"
    assert (runs[0] / "files" / "loss_curve.png").read_bytes() == curve.read_bytes()


# ------------------------------------------------------------------------------------------ loss curve
@pytest.mark.parametrize("renderer", ["matplotlib", "pillow"])
def test_curve_png_from_metrics_records(tmp_path, renderer):
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3}, {"step": 4, "loss": 0.25}]
    points = curve_points(records, "loss")
    assert points == [(1, 1.0), (4, 0.25)]
    path = write_curve_png(tmp_path / "loss_curve.png", points, "loss", renderer=renderer)
    assert _png_shape(path) == (640, 360) and not list(tmp_path.glob("*.tmp.png"))
    from PIL import Image

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels < 128).any() and (pixels > 250).any()  # drawn lines on a white background
    assert write_curve_png(tmp_path / "empty.png", [], "loss") is None


def test_train_run_writes_loss_curve_system_metrics_and_tensorboard_images(tmp_path):
    cfg = {
        "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
        "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 2, 8, 8], "text_len": 8,
                 "micro_batch_size": 1, "num_workers": 0},
        "train": {"steps": 2, "global_batch_size": 1, "lr": 1e-3, "warmup_steps": 0, "log_interval": 1,
                  "save_interval": 1, "sample_interval": 2, "sample_steps": 1, "sample_guidance": 1.0,
                  "sample_prompts": ["a red square"]},
        "tracking": {"backend": "tensorboard"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    assert run_world(1, str(path), [f"train.run_dir={run}"], logs) == [0], (logs / "rank0.0.log").read_text()[-3000:]
    assert "TensorBoard" in (logs / "rank0.0.log").read_text()
    assert _png_shape(run / "loss_curve.png") == (640, 360)
    m = metrics(run)
    assert [x["step"] for x in m] == [1, 2] and all(x["system/rss_gib"] > 0 and "system/cpu_percent" in x for x in m)
    acc = _events(run / "tensorboard")
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("system/rss_gib")] == [1, 2]
    assert [i.step for i in acc.Images("loss_curve")] == [1, 2]  # redrawn at each save
    assert [i.step for i in acc.Images("samples/0")] == [2]  # the sample's frame strip
    tags = acc.Tensors("tags/text_summary")
    text = tags[0].tensor_proto.string_val[0].decode()
    assert "| world_size | 1 |" in text and "| host |" in text
