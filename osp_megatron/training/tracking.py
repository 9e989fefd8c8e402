"""Experiment tracking on rank 0: one `Tracker` fanning out to the configured backends (MLflow, TensorBoard,
W&B offline; `tracking.backend`, several at once), a JSONL metrics log, and the console progress line.

Store layout (defaults):
    <run_dir>/metrics.jsonl      one JSON object per logged step, always (exact float reprs; tests compare traces)
    <run_dir>/mlflow.db          mlflow: sqlite backend store (`sqlite:///<run_dir>/mlflow.db`; `tracking.uri` picks
    <run_dir>/mlartifacts/                another store or server); artifact root (config, samples, curves)
    <run_dir>/tensorboard/       tensorboard: event files (scalars, the config and tags as text, PNGs as images)
    <run_dir>/wandb/             wandb: offline runs (`wandb sync <run_dir>/wandb/offline-run-*` uploads them)
    <run_dir>/loss_curve.png     loss vs step, redrawn from metrics.jsonl at each checkpoint save
On resume the same run id (saved in the checkpoint) is re-opened (MLflow, W&B), and steps that already reached the
trackers before the resume (`Tracker.logged_until`) are not sent again, for every backend.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil
import torch

import osp_megatron
from osp_megatron.config.redact import redact_secrets
from osp_megatron.config.sections import TRACKERS
from osp_megatron.training.curves import curve_points, write_curve_png

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


INSTALL_HINT = "pip install 'osp-megatron[track]'"


def backend_names(value: str | Sequence[str]) -> Tuple[str, ...]:
    """`tracking.backend` (`mlflow,tensorboard`, or a list) -> the tracker backends in order, `none` dropped."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names: List[str] = []
    for item in (str(i).strip() for i in items):
        if item not in TRACKERS:
            raise ValueError(f"tracking.backend={value!r}: unknown tracker {item!r}; use one or more of "
                             f"{', '.join(TRACKERS)}, comma-separated")
        if item != "none" and item not in names:
            names.append(item)
    return tuple(names)


def git_commit(path: str | Path = Path(osp_megatron.__file__).resolve().parent.parent) -> Optional[str]:
    """HEAD of the git checkout holding `path` (default: this package's source), or None (an installed wheel, no
    git)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def run_tags(world_size: int) -> Dict[str, str]:
    """The tags every run gets at its start: git_commit (when run from a git checkout), slurm_job_id (under SLURM),
    host, world_size, osp_megatron_version, torch_version."""
    tags = {"host": platform.node(), "world_size": str(world_size), "osp_megatron_version": osp_megatron.__version__,
            "torch_version": torch.__version__}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


_PROCESS: Optional[psutil.Process] = None


def system_metrics(device: Optional[torch.device] = None) -> Dict[str, float]:
    """This process's resources, for a logged step: system/cpu_percent (its CPU use since the previous call; 100 =
    one core busy), system/rss_gib, and on CUDA system/gpu_mem_allocated_gib, system/gpu_mem_reserved_gib and
    system/gpu_utilization (percent, when torch.cuda.utilization can read it: pynvml / amdsmi)."""
    global _PROCESS
    out: Dict[str, float] = {}
    try:
        if _PROCESS is None:
            _PROCESS = psutil.Process()
            _PROCESS.cpu_percent(None)  # starts the measurement interval
        out["system/cpu_percent"] = float(_PROCESS.cpu_percent(None))
        out["system/rss_gib"] = _PROCESS.memory_info().rss / 2**30
    except psutil.Error:
        pass
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["system/gpu_mem_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        out["system/gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
        try:
            out["system/gpu_utilization"] = float(torch.cuda.utilization(device))
        except Exception:  # noqa: BLE001 - no NVML / amdsmi, or a driver refusal: leave the metric out
            pass
    return out


def _missing(name: str, module: str, exc: ImportError) -> RuntimeError:
    return RuntimeError(f"tracking.backend={name} needs {module} ({exc}): {INSTALL_HINT} (or remove {name} from "
                        "tracking.backend)")


def _png_size(path: Path) -> Tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def image_tag(path: Path, artifact_path: Optional[str]) -> str:
    """`samples/step_0000040_1.png` -> `samples/1` (the step is the image's step), `loss_curve.png` -> `loss_curve`."""
    stem = re.sub(r"^step_\d+_", "", path.stem)
    return f"{artifact_path}/{stem}" if artifact_path else stem


class TrackerBackend:
    """One tracker behind `Tracker`. Values arrive checked: metrics finite floats, params and tags strings."""

    name = ""

    def log_params(self, params: Dict[str, str], step: int) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str], step: int) -> None:
        pass

    def set_tags(self, tags: Dict[str, str]) -> None:
        pass

    def close(self, status: str) -> None:
        pass

    def describe(self) -> str:
        return self.name


class MlflowBackend(TrackerBackend):
    """An MLflow run: sqlite store under the run directory unless `tracking.uri` names another store or server."""

    name = "mlflow"

    def __init__(self, tracking_cfg, run_dir: Path, run_id: Optional[str]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow", exc) from exc
        self.uri = tracking_cfg.uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is None:
            artifact_location = None
            if not tracking_cfg.uri:
                artifact_location = (run_dir.resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(tracking_cfg.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        if run_id:
            self.client.get_run(run_id)  # raises a clear MlflowException if the id is unknown to this store
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            name = tracking_cfg.run_name or run_dir.name
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id

    def log_params(self, params: Dict[str, str], step: int) -> None:
        """New keys as params; on resume a changed value becomes the tag `changed_at_step_<step>.<key>`."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new, tags = [], []
        for key, text in params.items():
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                tags.append(RunTag(f"changed_at_step_{step}.{key}", text[:5000]))
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i: i + 100])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def log_artifact(self, path: Path, artifact_path: Optional[str], step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} ({redact_secrets(self.uri)})"


class TensorBoardBackend(TrackerBackend):
    """Event files under <run_dir>/tensorboard (torch.utils.tensorboard): scalars, the config and tags as text,
    PNG artifacts (sample frame strips, loss curve) as images at their step. Other artifacts are not kept here."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", "tensorboard", exc) from exc
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @staticmethod
    def _table(values: Dict[str, str]) -> str:
        rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in values.items())
        return "| key | value |\n|---|---|\n" + rows

    def log_params(self, params: Dict[str, str], step: int) -> None:
        self.writer.add_text("config", self._table(params), global_step=step)
        self.writer.flush()

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: Optional[str], step: int) -> None:
        if path.suffix.lower() != ".png":
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = _png_size(path)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=path.read_bytes())
        self.writer._get_file_writer().add_summary(  # the encoded PNG as is: no decode / re-encode
            Summary(value=[Summary.Value(tag=image_tag(path, artifact_path), image=image)]), step)
        self.writer.flush()

    def set_tags(self, tags: Dict[str, str]) -> None:
        self.writer.add_text("tags", self._table(tags), global_step=0)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()

    def describe(self) -> str:
        return f"TensorBoard {self.log_dir}"


class WandbBackend(TrackerBackend):
    """A W&B run in offline mode under <run_dir>/wandb (no network, no account; `wandb sync` uploads it later). The
    run id is the Tracker's, so a resume continues the same W&B run. Tags go to the config as `tag.<key>`;
    artifacts are saved as run files, PNGs also logged as images."""

    name = "wandb"
    EXIT_CODES = {"FINISHED": 0, "KILLED": 3, "FAILED": 1}  # KILLED: checkpointed for requeue (osp-train's code 3)

    def __init__(self, tracking_cfg, run_dir: Path, run_id: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb", exc) from exc
        self.wandb = wandb
        self.last_step = -1
        self.run = wandb.init(mode="offline", dir=str(run_dir), project=tracking_cfg.experiment,
                              name=tracking_cfg.run_name or run_dir.name, id=run_id, resume="allow",
                              settings=wandb.Settings(console="off"), reinit="create_new")
        self.dir = Path(self.run.dir).parent

    def log_params(self, params: Dict[str, str], step: int) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)
        self.last_step = max(self.last_step, step)

    def log_artifact(self, path: Path, artifact_path: Optional[str], step: int) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")
        if path.suffix.lower() == ".png" and step >= self.last_step:  # W&B steps only go forward
            try:
                image = self.wandb.Image(str(path))
            except Exception:  # noqa: BLE001 - no Pillow: the file is still saved with the run
                return
            self.run.log({image_tag(path, artifact_path): image}, step=step)
            self.last_step = step

    def set_tags(self, tags: Dict[str, str]) -> None:
        self.run.config.update({f"tag.{k}": v for k, v in tags.items()}, allow_val_change=True)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=self.EXIT_CODES.get(status, 1))
        # finish() can return before W&B's service process has written the offline run file; teardown waits for
        # it (its atexit hook does the same, but not reliably with multiprocessing workers, as osp-train has)
        self.wandb.teardown()

    def describe(self) -> str:
        return f"W&B offline run {self.run.id} ({self.dir})"


class Tracker:
    """The run's trackers (`tracking.backend`) + metrics.jsonl + console on rank 0; every method is a no-op on
    other ranks. `run_id`: the MLflow run id with mlflow, else a generated one (the W&B run id)."""

    def __init__(self, tracking_cfg, run_dir: str | Path, enabled: bool, run_id: Optional[str] = None):
        self.cfg = tracking_cfg
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.backends: List[TrackerBackend] = []
        self.run_id: Optional[str] = None
        self.logged_until: Optional[int] = None  # steps <= this reached the trackers before a resume: not sent again
        self.last_step = 0
        names = backend_names(tracking_cfg.backend)
        if not enabled or not names:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if "mlflow" in names:
                self.backends.append(MlflowBackend(tracking_cfg, self.run_dir, run_id))
                self.run_id = self.backends[0].run_id
            else:
                self.run_id = run_id or uuid.uuid4().hex
            for name in names:
                if name == "tensorboard":
                    self.backends.append(TensorBoardBackend(self.run_dir))
                elif name == "wandb":
                    self.backends.append(WandbBackend(tracking_cfg, self.run_dir, self.run_id))
        except BaseException:
            self.finish("FAILED")  # the backends already opened are closed
            raise

    @property
    def active(self) -> bool:
        return bool(self.backends)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def _backend(self, name: str) -> Optional[TrackerBackend]:
        return next((b for b in self.backends if b.name == name), None)

    @property
    def client(self):
        """The MLflow client (None without the mlflow backend)."""
        mlflow = self._backend("mlflow")
        return mlflow.client if mlflow is not None else None

    @property
    def uri(self) -> Optional[str]:
        """The MLflow store URI (None without the mlflow backend)."""
        mlflow = self._backend("mlflow")
        return mlflow.uri if mlflow is not None else None

    def describe(self) -> str:
        """One line naming each tracker and where it writes ('' without trackers)."""
        return ", ".join(b.describe() for b in self.backends)

    def start_after(self, step: int, reopened: bool) -> None:
        """At the start of a run that continues after `step`: drop metrics.jsonl lines of later steps (lost by a
        crash); when the tracker run was re-opened (`reopened`), hold back the replayed steps it already holds."""
        if not self.enabled:
            return
        logged = self.metrics_log.truncate_after(step)
        if reopened:
            self.logged_until = logged

    def log_params(self, params: Dict[str, Any], step: int = 0) -> None:
        """Log the flattened config; on resume existing values are kept (MLflow records changed ones as tags)."""
        if not self.active:
            return
        texts = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
        for backend in self.backends:
            backend.log_params(texts, step)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Every value to metrics.jsonl; the finite ones to each tracker, unless `step` reached them before a resume
        (non-finite values are not portable across stores; they stay in metrics.jsonl and as counters)."""
        if not self.enabled:
            return
        self.metrics_log.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        self.last_step = max(self.last_step, step)
        if not self.active or (self.logged_until is not None and step <= self.logged_until):
            return
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for backend in self.backends:
            backend.log_metrics(finite, step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, step: Optional[int] = None) -> None:
        """A file to every tracker that keeps files (PNGs become images at `step`, default: the last logged)."""
        if not self.active:
            return
        for backend in self.backends:
            backend.log_artifact(Path(path), artifact_path, self.last_step if step is None else step)

    def set_tags(self, tags: Dict[str, Any]) -> None:
        if self.active:
            texts = {k: str(v) for k, v in tags.items()}
            for backend in self.backends:
                backend.set_tags(texts)

    def write_curve(self, key: str = "loss", filename: str = "loss_curve.png",
                    step: Optional[int] = None) -> Optional[Path]:
        """Redraw `key` vs step from metrics.jsonl into <run_dir>/<filename> (atomic) and log it as an artifact.
        Returns the path (None when no step holds a finite `key`, or there is no drawing library)."""
        if not self.enabled:
            return None
        path = write_curve_png(self.run_dir / filename, curve_points(self.metrics_log.read(), key), key)
        if path is not None:
            self.log_artifact(path, None, step)
        return path

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def finish(self, status: str = "FINISHED") -> None:
        """status: FINISHED | KILLED (checkpointed for requeue) | FAILED. Closes every tracker; the first error
        is raised after all were tried."""
        first: Optional[BaseException] = None
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as exc:  # noqa: BLE001 - close the others, then report
                first = first or exc
        self.backends = []
        if first is not None:
            raise first
