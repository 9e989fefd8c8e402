"""tools/install_te.sh refuses, before installing anything, what cannot work, and says what to change."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "install_te.sh"


def _run(*args, python=sys.executable):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": python})


def test_cpu_torch_is_refused_with_the_reason():
    import torch

    r = _run("--check")
    if torch.version.cuda:  # a CUDA build of torch gets past this check
        assert r.returncode in (0, 2) and "install_te:" in (r.stdout + r.stderr)
        return
    assert r.returncode == 2
    assert "has no CUDA (a CPU build): TE needs a CUDA build of torch" in r.stderr, r.stderr


def test_missing_python_and_unknown_flag_are_refused_and_help_lists_the_offline_set(tmp_path):
    r = _run("--check", python=str(tmp_path / "no-python"))
    assert r.returncode == 2 and "set PYTHON to the interpreter that holds torch" in r.stderr
    r = _run("--bogus")
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
    r = _run("--help")
    assert r.returncode == 0 and "pip download --no-deps -d DIR transformer-engine==" in r.stdout
