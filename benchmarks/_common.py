"""Shared benchmark helpers: device naming, CUDA-event timing, measured matmul peak, result JSON (DESIGN §7)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu-" + (platform.processor() or platform.machine()).replace(" ", "_")


def time_fn(fn: Callable[[], None], warmup: int = 3, iters: int = 10, cuda: Optional[bool] = None) -> float:
    """Median milliseconds of fn() (CUDA events when `cuda`, default: CUDA is available; else perf_counter)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available() if cuda is None else cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate (random data) in this run: the MFU denominator."""
    if not torch.cuda.is_available():
        n = 1024
        dtype = torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_fn(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def row(name, value, unit, baseline=None, baseline_value=None, goal=None, lower_is_better=False) -> Dict:
    ratio = None
    if baseline_value not in (None, 0) and value not in (None, 0):
        ratio = baseline_value / value if lower_is_better else value / baseline_value
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "goal": goal}


def save_json(path: Path, doc: Dict) -> Path:
    """Write a result document atomically (tmp + rename); on the device machine also hand it back via $OUT."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, path.name).write_text(json.dumps(doc, indent=1))
    return path


def write_results(benchmark: str, results: List[Dict], extra: Optional[Dict] = None) -> Path:
    date = _dt.date.today().isoformat()
    payload = {
        "benchmark": benchmark, "device": device_name(), "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "date": date, "results": results,
    }
    if torch.cuda.is_available():
        payload["cuda"] = torch.version.cuda
    payload.update(extra or {})
    return save_json(RESULTS / f"{benchmark}-{device_name()}-{date}.json", payload)


def print_table(results: List[Dict]) -> None:
    print(f"{'name':58s} {'value':>12s} {'unit':>8s} {'baseline':>12s} {'ratio':>7s}  goal")
    for r in results:
        v = r["value"]
        bv = r["baseline_value"]
        print(f"{r['name'][:58]:58s} {v if v is None else round(v, 3):>12} {r['unit']:>8s} "
              f"{'' if bv is None else round(bv, 3):>12} {'' if r['ratio'] is None else round(r['ratio'], 3):>7}  {r['goal'] or ''}")
