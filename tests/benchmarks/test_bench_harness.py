"""benchmarks/_common.py: device slugs, row ratios, timing calls, the result file, and the stored results."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

BENCHMARKS = ("attention", "attention_kernels", "blocks", "comm_volume", "e2e", "grpo", "hif8", "loader", "parallel", "train_step")


@pytest.mark.parametrize("name,slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H20", "h20"), ("NVIDIA GB200", "gb200"), ("NVIDIA B200", "b200"), ("Tesla V100-SXM2-32GB", "v100"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada-generation"),
])
def test_slug_from_name(name, slug):
    assert C.slug_from_name(name) == slug


def test_cpu_device():
    assert C.device_slug("cpu") == "cpu"
    assert C.device_name("cpu")
    assert C.peak_memory_gib("cpu") is None


def test_row_ratio_is_higher_is_better():
    assert C.row("t", 2.0, "ms", "base", 6.0, higher_is_better=False)["ratio"] == pytest.approx(3.0)
    assert C.row("r", 6.0, "GB/s", "base", 2.0)["ratio"] == pytest.approx(3.0)
    assert C.row("none", 1.0, "ms", "base", None)["ratio"] is None
    assert C.row("zero", 0.0, "ms", "base", 1.0, higher_is_better=False)["ratio"] is None
    r = C.row("db", 30.0, "dB", "fp8", 27.0, "report", ratio=2.0, memory_gib=1.5)
    assert (r["ratio"], r["goal"], r["memory_gib"]) == (2.0, "report", 1.5)
    assert set(C.ROW_KEYS) <= set(r)


def test_time_fn_calls():
    calls = []
    ms = C.time_fn(lambda: calls.append(1), warmup=2, iters=3, cuda=False, chain=4)
    assert len(calls) == 2 + 3 * 4 and ms >= 0


def test_write_results(tmp_path):
    rows = [C.row("a", 1.0, "ms", "b", 2.0, higher_is_better=False)]
    path = C.write_results("unit", rows, {"note": "x"}, shapes={"grid": [1, 2, 3]}, out_dir=tmp_path, device="cpu",
                           argv=["--flag"])
    doc = json.loads(path.read_text())
    assert path.name == f"unit-cpu-{doc['date']}.json" and list(tmp_path.iterdir()) == [path]
    assert {"benchmark", "device", "torch", "command", "date", "results", "versions", "shapes", "note"} <= set(doc)
    assert doc["command"] == "python tests/benchmarks/test_bench_harness.py --flag"
    assert doc["versions"]["torch"] and doc["shapes"] == {"grid": [1, 2, 3]} and doc["results"] == rows
    with pytest.raises(ValueError, match="keys"):
        C.write_results("unit", [{"name": "x"}], out_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="device"):
        C.write_results("unit", rows, {"device": "other"}, out_dir=tmp_path, device="cpu")


def test_stored_results_follow_the_convention():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for f in files:
        doc = json.loads(f.read_text())
        assert {"benchmark", "device", "torch", "command", "date", "results"} <= set(doc), f.name
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", doc["device"]), f.name
        assert f.name == f"{doc['benchmark']}-{doc['device']}-{doc['date'][:10]}.json"
        for r in doc["results"]:
            assert set(C.ROW_KEYS) <= set(r), (f.name, r.get("name"))


def test_every_benchmark_imports():
    code = "import sys; sys.path.insert(0, 'benchmarks'); " + "; ".join(f"import {b}" for b in BENCHMARKS)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
