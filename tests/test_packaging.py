"""Packaging: version, ranges + the CPU constraints file, presets and SLURM templates inside the wheel."""
import subprocess
import sys
import zipfile
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
