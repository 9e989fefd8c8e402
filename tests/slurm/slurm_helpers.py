"""Helpers for the SLURM template tests: the cluster handle, waits with timeouts, job environment.

The session fixture (conftest.py) starts `slurm/local_cluster.sh` on free ports under a temporary folder and always
stops it (also when a test fails). Every wait has a timeout; a job that does not finish in time is
cancelled and its log is shown in the failure.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _have_slurm() -> bool:
    return all(shutil.which(d) or os.path.exists(f"/usr/sbin/{d}") for d in ("slurmctld", "slurmd")) \
        and shutil.which("sbatch") is not None


def _free_ports(count: int, consecutive: bool = False, start: int = 23000) -> List[int]:
    """Ports that nobody listens on now (consecutive if asked)."""
    def free(p: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
                return True
            except OSError:
                return False

    base = start + (os.getpid() * 7) % 2000
    for p in range(base, base + 4000):
        cand = list(range(p, p + count)) if consecutive else [p]
        if all(free(c) for c in cand):
            return cand
    raise RuntimeError("no free ports for the test cluster")


@dataclass
class Cluster:
    dir: Path
    conf: Path
    env: Dict[str, str]

    def run(self, args: List[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd or REPO,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def states(self, job: str) -> List[Dict[str, str]]:
        """JobState/ExitCode/Restarts of a job (one entry per array task)."""
        out = self.run(["scontrol", "-o", "show", "job", job], check=False)
        rows = []
        for line in out.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            rows.append(fields)
        return rows

    def in_queue(self, job: str) -> bool:
        out = self.run(["squeue", "-h", "-j", job, "-o", "%i %T"], check=False)
        return bool(out.stdout.strip())

    def wait(self, job: str, timeout: float, logs: List[Path] = ()) -> List[Dict[str, str]]:
        """Wait until the job (all array tasks, across requeues) has left the queue; cancel it on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.in_queue(job):
                states = self.states(job)
                if states and all(s.get("JobState") in FINAL_STATES for s in states):
                    return states
            time.sleep(0.5)
        self.run(["scancel", job], check=False)
        pytest.fail(f"job {job} not finished after {timeout}s; states {self.states(job)}\n" + read_logs(logs))

    def wait_for(self, predicate, timeout: float, what: str, job: str, logs: List[Path] = ()) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.in_queue(job):
                break
            time.sleep(0.3)
        self.run(["scancel", job], check=False)
        pytest.fail(f"job {job}: {what} did not happen within {timeout}s\n" + read_logs(logs))


def read_logs(paths) -> str:
    text = []
    for p in paths:
        for f in sorted(Path(p).parent.glob(Path(p).name)) if "*" in str(p) else [Path(p)]:
            if f.is_file():
                text.append(f"--- {f} ---\n{f.read_text(errors='replace')[-6000:]}")
    return "\n".join(text)


def job_env() -> Dict[str, str]:
    """This environment minus any SLURM_* of an enclosing job, with this interpreter's bin/ first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["OSP_PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


