"""MLflow tracker on a real sqlite store: params, metrics, artifacts, re-opening the same run on resume."""
import json

import pytest

from mlflow.tracking import MlflowClient

from osp_megatron.config import Config
from osp_megatron.training.tracking import MetricsLog, Tracker, default_tracking_uri, format_progress


def test_tracker_sqlite_store_and_resume(tmp_path):
    cfg = Config()
    run_dir = tmp_path / "run"
    tr = Tracker(cfg.tracking, run_dir, enabled=True)
    assert tr.uri == default_tracking_uri(run_dir) and (run_dir / "mlflow.db").exists()
    tr.log_params(cfg.flat())
    tr.log_metrics({"loss": 0.5, "grad_norm": float("nan"), "lr": 1e-4}, step=1)
    art = tmp_path / "config.yaml"
    art.write_text(cfg.to_yaml())
    tr.log_artifact(art, "config")
    tr.finish("KILLED")
    run_id = tr.run_id

    cfg.train.lr = 2e-4  # changed on resume: kept as a tag, the original param stays
    tr2 = Tracker(cfg.tracking, run_dir, enabled=True, run_id=run_id)
    tr2.log_params(cfg.flat(), step=1)
    tr2.log_metrics({"loss": 0.25}, step=2)
    tr2.finish()

    client = MlflowClient(default_tracking_uri(run_dir))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["model.size"] == "tiny"
    assert run.data.tags["changed_at_step_1.train.lr"] == "0.0002"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert client.get_metric_history(run_id, "grad_norm") == []  # non-finite values stay out of the store
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/config.yaml"]
    assert (run_dir / "mlartifacts").is_dir()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["grad_norm"] != lines[0]["grad_norm"]  # NaN kept in the JSONL
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_metrics_log_truncates_steps_lost_by_a_crash(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.append({"step": s, "loss": 1.0 / s})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_progress_line():
    line = format_progress(7, 10, {"loss": 0.123456, "grad_norm": 1.5, "lr": 1e-4, "samples_per_s": 2.0,
                                   "tflops_per_device": 400.0, "mfu": 0.4, "nonfinite_steps_total": 1})
    assert line == ("step 7/10 | loss 0.1235 | grad 1.500 | lr 1.00e-04 | 2.00 samples/s | 400 TFLOP/s/dev "
                    "| MFU 40% | nonfinite 1")


def test_progress_line_eta():
    from osp_megatron.training.tracking import estimate_eta, format_duration

    assert estimate_eta(30.0, 10, 290) == pytest.approx(870.0)  # 3 s/step x 290 steps left
    assert estimate_eta(5.0, 0, 300) is None
    assert [format_duration(x) for x in (7.4, 185, 7620, None, float("nan"))] == ["7s", "3m05s", "2h07m", "?", "?"]
    line = format_progress(10, 300, {"loss": 1.0}, eta_s=estimate_eta(30.0, 10, 290))
    assert line == "step 10/300 | loss 1.0000 | ETA 14m30s"
    assert "ETA" not in format_progress(10, 300, {"loss": 1.0})
