"""The console entry points answer --help in a fresh interpreter (as `osp-shards` / `osp-cache` would)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module,script,needle", [
    ("osp_megatron.cli.shards", "osp-shards", "--shard-size"),
    ("osp_megatron.cli.cache", "osp-cache", "--text-encoder"),
])
def test_help_in_a_fresh_process(module, script, needle):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [shutil.which(script), "--help"] if shutil.which(script) else [sys.executable, "-m", module, "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert needle in proc.stdout and f"usage: {script}" in proc.stdout
