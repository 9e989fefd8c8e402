"""The installed distribution: only `osp_megatron` and `data_pipeline` are packages (no top-level `tools`), and
every console script points into `osp_megatron.cli`."""
import os
import subprocess
import sys
from importlib import metadata


def test_tools_is_not_an_installed_package():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import tools"], cwd="/tmp", env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "No module named 'tools'" in proc.stderr, proc.stderr


def test_console_scripts_live_in_osp_megatron_cli():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
               if e.name.startswith("osp-")}
    assert set(scripts) >= {"osp-train", "osp-grpo", "osp-sample", "osp-convert", "osp-shards", "osp-cache"}
    assert all(v.startswith("osp_megatron.cli.") and v.endswith(":main") for v in scripts.values()), scripts
