"""benchmarks/e2e.py --quick runs end to end on CPU (tiny model, all three variants) and writes its rows."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "e2e.py"
PAIRS = ("OSP-Next vs dense", "OSP-Next vs diffusers", "dense vs diffusers")


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("e2e_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_all_rows(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e-smoke-cpu-*.json")
    doc = json.loads(path.read_text())
    assert {"benchmark", "device", "torch", "command", "date", "results", "versions", "shapes"} <= set(doc)
    assert (doc["benchmark"], doc["device"]) == ("e2e-smoke", "cpu")
    assert doc["command"].startswith("python benchmarks/e2e.py --quick")
    assert "diffusers" in doc["versions"] and "megatron-core" in doc["versions"]
    rows = {r["name"]: r for r in doc["results"]}
    for label in ("tiny tiny forward", "tiny tiny forward CFG batch 2", "tiny tiny train step"):
        for pair in PAIRS:
            r = rows[f"{label} {pair}"]
            assert r["unit"] == "ms" and r["value"] > 0 and r["baseline_value"] > 0
            assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])  # times: baseline / new
            assert "memory_gib" in r and "baseline_memory_gib" in r
    for variant in ("OSP-Next", "dense", "diffusers"):
        assert 0 < rows[f"tiny tiny train step MFU {variant}"]["value"] < 1
        assert f"tiny tiny train step peak memory {variant}" in rows
    # the table is printed last: its final line is the last row
    assert proc.stdout.strip().splitlines()[-1].startswith(doc["results"][-1]["name"])


def test_bad_arguments_are_named():
    mod = _module()
    with pytest.raises(SystemExit, match="--sizes"):
        mod.main(["--sizes", "7b"])
    with pytest.raises(SystemExit, match="--train"):
        mod.main(["--train", "1.3b@1080p"])
    with pytest.raises(SystemExit, match="--variants"):
        mod.main(["--quick", "--variants", "dense,megatron"])


def test_case_selection():
    mod = _module()
    ns = lambda **kw: SimpleNamespace(**{"sizes": None, "res": None, "train": "1.3b@480p", **kw})  # noqa: E731
    assert mod.parse_cases(ns()) == (mod.DEFAULT_CASES, [("1.3b", "480p")])
    assert mod.parse_cases(ns(sizes="14b")) == ([("14b", "720p")], [])
    assert mod.parse_cases(ns(res="480p", train="none")) == ([("14b", "480p"), ("1.3b", "480p")], [])
    assert mod.latent_shape("720p") == [16, 21, 90, 160] and mod.latent_shape("480p") == [16, 21, 60, 104]
