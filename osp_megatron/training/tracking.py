"""Experiment tracking on rank 0: MLflow (sqlite store under the run directory by default), a JSONL
metrics log, and the console progress line.

Store layout (default, `tracking.uri` empty):
    <run_dir>/mlflow.db          sqlite backend store (`sqlite:///<run_dir>/mlflow.db`)
    <run_dir>/mlartifacts/       artifact root (config yaml, sample videos)
    <run_dir>/metrics.jsonl      one JSON object per logged step (exact float reprs; tests compare traces)
A `tracking.uri` (e.g. http://host:5000) switches the backend to that server. On resume the same MLflow
run id (saved in the checkpoint) is re-opened, so a requeued job continues one run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

MAX_PARAM_LEN = 6000  # MLflow's limit on one param value


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MetricsLog:
    """Append-only JSONL of logged steps; `truncate_after(step)` drops lines of steps lost by a crash."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> int:
        """Keep the lines of steps <= `step`; returns the last step the file held (0: none). A torn last line
        (a crash or a full disk mid-append) is dropped with a warning; a bad line elsewhere names the file."""
        if not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append((json.loads(line)["step"], line))
            except (ValueError, KeyError, TypeError) as exc:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.path}: dropped a torn last line ({line[:60]!r}...)", stacklevel=2)
                    continue
                raise ValueError(f"{self.path} line {i + 1} is not a metrics record ({exc}); fix or remove that line") from None
        last = max((s for s, _ in records), default=0)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for s, line in records if s <= step))
        os.replace(tmp, self.path)
        return last

    def append(self, record: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    """Seconds -> `42s`, `3m05s`, `2h07m` (or `?` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def estimate_eta(elapsed_s: float, steps_done: int, steps_left: int) -> Optional[float]:
    """Seconds left at the mean step time of this process's `steps_done` steps (None before the first)."""
    if steps_done <= 0:
        return None
    return elapsed_s / steps_done * max(steps_left, 0)


def format_progress(step: int, total: int, m: Dict[str, float], eta_s: Optional[float] = None) -> str:
    """One console line: step, loss, grad norm, lr, throughput, TFLOP/s, MFU, peak GPU memory, skip counters,
    and the estimated time to `total` when `eta_s` is given."""
    parts = [f"step {step}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "grad_norm" in m:
        parts.append(f"grad {m['grad_norm']:.3f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "samples_per_s" in m:
        parts.append(f"{m['samples_per_s']:.2f} samples/s")
    if "tflops_per_device" in m:
        parts.append(f"{m['tflops_per_device']:.3g} TFLOP/s/dev")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.3g}%")
    if "max_memory_gib" in m:
        parts.append(f"mem {m['max_memory_gib']:.1f} GiB")
    if m.get("nonfinite_steps_total"):
        parts.append(f"nonfinite {int(m['nonfinite_steps_total'])}")
    if m.get("data_skipped_total"):
        parts.append(f"skipped samples {int(m['data_skipped_total'])}")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class Tracker:
    """MLflow run + JSONL + console on rank 0; every method is a no-op on other ranks."""

    def __init__(self, tracking_cfg, run_dir: str | Path, enabled: bool, run_id: Optional[str] = None):
        self.cfg = tracking_cfg
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.client = None
        self.run_id: Optional[str] = None
        self.logged_until: Optional[int] = None  # steps <= this reached the tracker before a resume: not sent again
        if not enabled or tracking_cfg.backend == "none":
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:  # pragma: no cover - install issue
            raise RuntimeError(
                "tracking.backend=mlflow needs mlflow: pip install 'osp-megatron[track]' (or set tracking.backend=none)"
            ) from exc
        uri = tracking_cfg.uri or default_tracking_uri(self.run_dir)
        self.uri = uri
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is None:
            artifact_location = None
            if not tracking_cfg.uri:
                artifact_location = (self.run_dir.resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(tracking_cfg.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        if run_id:
            self.client.get_run(run_id)  # raises a clear MlflowException if the id is unknown to this store
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            name = tracking_cfg.run_name or self.run_dir.name
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: Dict[str, Any], step: int = 0) -> None:
        """Log the flattened config; on resume keep existing values and record changed ones as tags."""
        if not self.active:
            return
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new, tags = [], []
        for key, value in params.items():
            text = str(value)[:MAX_PARAM_LEN]
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                tags.append(RunTag(f"changed_at_step_{step}.{key}", text[:5000]))
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics_log.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if not self.active or (self.logged_until is not None and step <= self.logged_until):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        # non-finite values are not portable across MLflow stores; they stay in metrics.jsonl and as counters
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Dict[str, str]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED | KILLED (checkpointed for requeue) | FAILED."""
        if self.active:
            self.client.set_terminated(self.run_id, status=status)
