"""Benchmark harness: device names, result rows, CUDA-event timing, measured matmul peak and peak memory, and
the result file (DESIGN §7).

Every benchmark writes one JSON per run, `benchmarks/results/<benchmark>-<device>-<date>.json`, with the keys
`benchmark`, `device` (a short slug: h200, h100, a100, ..., cpu), `device_name`, `torch`, `command`, `date`,
`versions`, `shapes` and `results`: rows `{name, value, unit, baseline, baseline_value, ratio, goal}` whose
`ratio` is always "higher is better" (new / baseline, or baseline / new for times, bytes and memory).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
if str(REPO) not in sys.path:  # benchmarks run from a checkout import its osp_megatron / data_pipeline
    sys.path.insert(1, str(REPO))
ROW_KEYS = ("name", "value", "unit", "baseline", "baseline_value", "ratio", "goal")
_GPUS = ("gb200", "b200", "h200", "h100", "h800", "h20", "a100", "a800", "l40s", "l40", "l4", "a10g", "a10", "v100")


# ---------------------------------------------------------------------------------------------- devices
def _device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def slug_from_name(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; unknown names: lower-case, dashes."""
    low = name.lower()
    for gpu in _GPUS:
        if re.search(rf"(?<![a-z0-9]){gpu}(?![a-z0-9])", low):
            return gpu
    return re.sub(r"[^a-z0-9]+", "-", low.replace("nvidia", "")).strip("-") or "gpu"


def device_slug(device=None) -> str:
    """Short lower-case device name used in file names and the `device` field: h200, h100, a100, ..., cpu."""
    dev = _device(device)
    return slug_from_name(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"


def device_name(device=None) -> str:
    """The full device name: the CUDA device's name, or the CPU model from /proc/cpuinfo."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- rows
def row(name: str, value, unit: str, baseline: Optional[str] = None, baseline_value=None, goal=None,
        higher_is_better: bool = True, ratio: Optional[float] = None, **fields) -> Dict[str, Any]:
    """One result row. `ratio` is computed "higher is better": value / baseline_value, or baseline_value / value
    when `higher_is_better=False` (times, bytes, memory); pass `ratio` only where neither applies (dB, kept
    fractions). Extra `fields` (e.g. memory of both sides) are kept in the row."""
    if ratio is None and value not in (None, 0) and baseline_value not in (None, 0):
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    out = {"name": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
           "ratio": ratio, "goal": goal}
    out.update(fields)
    return out


def print_table(rows: List[Dict[str, Any]]) -> None:
    """The rows as a fixed-width table on stdout."""
    def fmt(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    w = min(max([len(r["name"]) for r in rows] + [4]), 90)
    bw = min(max([len(str(r["baseline"] or "")) for r in rows] + [8]), 40)
    print(f"{'name':{w}s} {'value':>11s} {'unit':10s} {'baseline':{bw}s} {'base value':>11s} {'ratio':>7s}  goal")
    for r in rows:
        print(f"{r['name'][:w]:{w}s} {fmt(r['value']):>11s} {str(r['unit'])[:10]:10s} "
              f"{str(r['baseline'] or '')[:bw]:{bw}s} {fmt(r['baseline_value']):>11s} "
              f"{'-' if r['ratio'] is None else format(r['ratio'], '.3f'):>7s}  {r['goal'] or ''}", flush=True)


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device=None) -> None:
    if _device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 3, iters: int = 10, cuda: Optional[bool] = None,
            chain: int = 1) -> float:
    """Median milliseconds per call of fn() over `iters` timings, each of `chain` back-to-back calls (chain > 1
    hides launch overhead, as inside a training step). CUDA events when `cuda` (default: CUDA is available),
    else perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available() if cuda is None else cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(chain):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / chain)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            for _ in range(chain):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / chain)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_tflops(device=None) -> float:
    """Measured dense matmul peak of this device in this run, the denominator of every MFU here (TFLOP/s):
    the best rate of `a @ b` over square sizes (bf16 4096/8192/16384 on CUDA, fp32 256/512 on CPU), random
    data, each size timed with time_fn over chains of 10 products."""
    dev = _device(device)
    cuda = dev.type == "cuda"
    sizes, dtype = ((4096, 8192, 16384), torch.bfloat16) if cuda else ((256, 512), torch.float32)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ms = time_fn(lambda: a @ b, warmup=3, iters=5 if cuda else 3, cuda=cuda, chain=10 if cuda else 1)
        best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
        del a, b
    free_memory(dev)
    return best


def peak_row(peak: float, device=None) -> Dict[str, Any]:
    dtype = "bf16" if _device(device).type == "cuda" else "fp32"
    return row(f"{dtype} matmul peak (measured)", peak, "TFLOP/s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the rendezvous of benchmarks that start their own process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- memory
def free_memory(device=None) -> None:
    """On CUDA: collect garbage, return cached blocks and reset the peak-memory counter (call between variants).
    On CPU nothing (memory is not measured there and reference counting frees the models)."""
    if _device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device=None) -> Optional[float]:
    """torch.cuda.max_memory_allocated since the last free_memory(), in GiB; None on CPU."""
    dev = _device(device)
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- results
def versions() -> Dict[str, Optional[str]]:
    """torch, CUDA and the installed versions of triton, megatron-core and diffusers (absent ones left out)."""
    out: Dict[str, Optional[str]] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("triton", "megatron-core", "diffusers", "transformer-engine", "flash-attn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def add_out_dir(ap) -> None:
    """The --out-dir option every benchmark takes (default benchmarks/results/)."""
    ap.add_argument("--out-dir", default=str(RESULTS), help="folder of the result JSON (default: benchmarks/results)")


def _command(argv: Optional[Sequence[str]], script: Optional[str]) -> str:
    script = script or sys.argv[0]
    try:
        script = os.path.relpath(os.path.abspath(script), REPO)
    except ValueError:
        pass
    return " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def write_results(benchmark: str, rows: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None, *,
                  shapes: Optional[Dict[str, Any]] = None, out_dir=None, device=None,
                  argv: Optional[Sequence[str]] = None) -> Path:
    """Write `<out_dir>/<benchmark>-<device>-<date>.json` atomically (temp file + os.replace) and return its path.

    `command` is the calling script with `argv` (default sys.argv[1:]); `extra` adds benchmark-specific keys.
    """
    missing = [r.get("name", r) for r in rows if not set(ROW_KEYS) <= set(r)]
    if missing:
        raise ValueError(f"write_results({benchmark!r}): rows without the keys {ROW_KEYS}: {missing[:3]}")
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    slug = device_slug(device)
    doc: Dict[str, Any] = {
        "benchmark": benchmark, "device": slug, "device_name": device_name(device), "torch": torch.__version__,
        "command": _command(argv, sys._getframe(1).f_globals.get("__file__")), "date": date,
        "versions": versions(), "shapes": shapes,
    }
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"write_results({benchmark!r}): extra key {key!r} would overwrite a standard key")
        doc[key] = value
    doc["results"] = rows
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{slug}-{date}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path
