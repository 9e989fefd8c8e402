"""HiF8 megatron TP layers: TP=2 (gloo, 2 processes, with and without sequence parallel) equals TP=1."""
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("tp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_equals_tp1():
    port = _free_port()
    # CPU + gloo even on a GPU machine (megatron's SP collectives allocate on the current CUDA device otherwise)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=600)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"rank {rank} OK" in out, out[-4000:]
