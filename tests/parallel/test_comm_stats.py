"""comm_stats: SSP moves 1 all-to-all unit per layout switch, Ulysses 4 per full block, 0 at boundaries."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, nproc, args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("world", [2, 4])
def test_ssp_traffic_is_one_unit_per_switch(world, tmp_path):
    out = tmp_path / "comm.json"
    torchrun(Path(__file__).with_name("comm_worker.py"), world, [out])
    r = json.loads(out.read_text())
    ssp = r["ssp"]["train"]
    # sparse blocks: exactly one all-to-all per layout switch, nothing else
    assert ssp["all_to_all/sparse"]["calls"] == r["ssp"]["switches"] == 3
    # full blocks: Ulysses over the CP group, 4 all-to-alls (q, k, v, out) each
    assert ssp["all_to_all/full"]["calls"] == 4 * r["ssp"]["full_blocks"]
    # no gathers at the full <-> sparse boundaries in training
    assert set(ssp) == {"all_to_all/sparse", "all_to_all/full"}
    per_switch = ssp["all_to_all/sparse"]["bytes"] / 3
    per_ulysses_block = ssp["all_to_all/full"]["bytes"] / r["ssp"]["full_blocks"]
    assert per_switch / per_ulysses_block == pytest.approx(0.25)
    # all-Ulysses on the same sparse model: 4 units in every block
    uly = r["ulysses_sparse"]["train"]
    assert uly["all_to_all/sparse"]["calls"] == 4 * 4 and uly["all_to_all/full"]["calls"] == 4 * 4
    dense = r["ulysses_dense"]["train"]
    assert dense["all_to_all/full"]["calls"] == 4 * 8
    total_ssp = sum(v["bytes"] for v in ssp.values())
    total_dense = sum(v["bytes"] for v in dense.values())
    assert total_ssp / total_dense == pytest.approx((4 * 4 + 3) / (4 * 8))
    # sampling gathers once, at the end
    assert r["ssp"]["infer"]["all_gather/exit"]["calls"] == 1
