"""benchmarks/hif8.py runs end to end on CPU (--cpu-smoke) and writes the JSON layout the project uses."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hif8.py"


def test_cpu_smoke_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("hif8_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("hif8-smoke-cpu-*.json")
    data = json.loads(path.read_text())
    assert {"benchmark", "device", "torch", "command", "date", "results", "versions", "shapes"} <= set(data)
    assert (data["benchmark"], data["device"]) == ("hif8-smoke", "cpu")
    assert path.name == f"hif8-smoke-cpu-{data['date']}.json"
    keys = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "goal"}
    assert data["results"] and all(keys <= set(r) for r in data["results"])
    names = " ".join(r["name"] for r in data["results"])
    for needle in ("qdq one-pass", "qdq current scaling", "HiF8 linear fwd+bwd", "SNR", "flushed-to-zero",
                   "FP8 native fp8_current", "FP8 native fp8_delayed"):
        assert needle in names
    snr = [r for r in data["results"] if r["name"].startswith("SNR") and "E4M3" in r["baseline"]]
    assert all(20 < r["value"] < 40 for r in snr)  # HiF8 keeps 3 or 2 mantissa bits: ~25-32 dB
