"""Helpers that run `osp-train` as real processes (srun-style env: RANK/WORLD_SIZE/MASTER_*), logs in files.

Files rather than pipes: megatron's checkpoint writer starts a Manager process that inherits pipes.
Every process gets its own session; `stop_all` kills those sessions (and only those).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # generous: a slow or shared CI machine must make the run slower, not red


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """`n` ranks of `python -m <module> CONFIG OVERRIDES` (module: osp_megatron.cli.train or .grpo)."""

    def __init__(self, n: int, config: str, overrides: Sequence[str], logdir: Path, cwd: Path = REPO,
                 module: str = "osp_megatron.cli.train"):
        port = free_port()
        self.logs: List[Path] = []
        self.procs: List[subprocess.Popen] = []
        logdir.mkdir(parents=True, exist_ok=True)
        for rank in range(n):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            log = logdir / f"rank{rank}.{len(list(logdir.glob(f'rank{rank}.*')))}.log"
            self.logs.append(log)
            with open(log, "wb") as fh:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", module, config, *overrides],
                    cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))

    def text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_for_line(self, needle: str, rank: int = 0, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text(rank):
                return
            if self.procs[rank].poll() is not None:
                raise AssertionError(f"rank {rank} exited before printing {needle!r}:\n{self.text(rank)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.text(rank)[-3000:]}")

    def wait(self, timeout: float = TIMEOUT) -> List[int]:
        try:
            end = time.monotonic() + timeout
            codes = []
            for p in self.procs:
                try:
                    codes.append(p.wait(timeout=max(1.0, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"ranks still running after {timeout:.0f} s:\n{self.dump_stacks()}") from None
            return codes
        finally:
            self.stop_all()

    def dump_stacks(self) -> str:
        """SIGABRT to every rank still running (the trainer's faulthandler prints each thread's Python stack),
        then the tail of every rank's log: where a hang sits."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGABRT)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return "\n".join(f"--- rank {r} (exit {p.poll()}) ---\n{self.text(r)[-6000:]}"
                         for r, p in enumerate(self.procs))

    def stop_all(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def run_world(n: int, config: str, overrides: Sequence[str], logdir: Path, cwd: Path = REPO,
              module: str = "osp_megatron.cli.train") -> List[int]:
    return World(n, config, overrides, logdir, cwd, module).wait()


def metrics(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def checkpoint_tensors(step_dir: Path, scratch: Path) -> dict:
    """Every tensor of a torch_dist checkpoint directory (model, optimizer, EMA), read back with torch DCP."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(scratch) / (Path(step_dir).name + ".pt")
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)
