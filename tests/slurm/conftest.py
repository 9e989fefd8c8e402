"""A real 2-node SLURM cluster (slurmctld + two slurmd on this machine) for the template tests.

The session fixture starts `slurm/local_cluster.sh` on free ports under a temporary folder and always
stops it (also when a test fails).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from slurm_helpers import SLURM_DIR, Cluster, _free_ports, _have_slurm, job_env


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if not _have_slurm():
        pytest.skip("SLURM is not installed (slurmctld/slurmd/sbatch missing): apt-get install -y slurm-wlm")
    d = tmp_path_factory.mktemp("cl")
    ctld = _free_ports(1, start=24000)[0]
    nodes = _free_ports(2, consecutive=True, start=26000)
    env = job_env()
    env["SLURM_CONF"] = str(d / "slurm.conf")
    script = str(SLURM_DIR / "local_cluster.sh")
    try:
        out = subprocess.run([script, "start", "--dir", str(d), "--ctld-port", str(ctld), "--node-port", str(nodes[0]),
                              "--timeout", "90"], env=env, capture_output=True, text=True, timeout=150)
        assert out.returncode == 0, f"local cluster did not start:\n{out.stdout}\n{out.stderr}"
        assert f"export SLURM_CONF={d}/slurm.conf" in out.stdout
        yield Cluster(dir=d, conf=d / "slurm.conf", env=env)
    finally:
        subprocess.run(["scancel", "-u", os.environ.get("USER") or "root"], env=env, capture_output=True,
                       timeout=30)
        subprocess.run([script, "stop", "--dir", str(d), "--timeout", "60"], env=env, capture_output=True,
                       timeout=600)
