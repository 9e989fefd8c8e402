"""Packaging: version, ranges + the CPU constraints file, presets and SLURM templates inside the wheel, only
`osp_megatron` and `data_pipeline` installed (no top-level `tools`), console scripts in `osp_megatron.cli`."""
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import osp_megatron

ROOT = Path(__file__).resolve().parents[1]


def test_version_license_and_constraints():
    assert osp_megatron.__version__.count(".") == 2
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    pins = (ROOT / "constraints-cpu.txt").read_text()
    assert "torch==2.13.0" in pins and "megatron-core==0.16.1" in pins
    setup = (ROOT / "setup.py").read_text()
    assert '"torch>=2.5"' in setup and '"megatron-core>=0.16,<0.20"' in setup and "torch==" not in setup
    assert "constraints-cpu.txt" in (ROOT / ".ci" / "run").read_text()


def test_wheel_ships_presets_and_slurm_templates(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("osp_megatron-*.whl"))
    assert osp_megatron.__version__ in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    presets = {Path(n).name for n in names if n.startswith("osp_megatron/presets/")}
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} <= presets
    assert "osp_megatron/slurm_templates/train.sbatch" in names
    assert any(n.endswith("LICENSE") for n in names)


def test_presets_are_found_by_name():
    from osp_megatron.config import load_config, presets

    assert "demo_cpu" in presets() and "osp_14b_720p" in presets()
    assert load_config("osp_14b_720p").model.size == "wan_14b"


def test_tools_is_not_an_installed_package():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import tools"], cwd="/tmp", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "No module named 'tools'" in proc.stderr, proc.stderr


def test_console_scripts_live_in_osp_megatron_cli():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
               if e.name.startswith("osp-")}
    assert set(scripts) >= {"osp-train", "osp-grpo", "osp-sample", "osp-convert", "osp-shards", "osp-cache"}
    assert all(v.startswith("osp_megatron.cli.") and v.endswith(":main") for v in scripts.values()), scripts
