"""A small torch.distributed (gloo) program for testing the SLURM templates.

Reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), checks an
all_reduce, then runs `--steps` steps with the trainer's preemption contract: SIGUSR1/SIGTERM ->
finish the step, save `state.json` (atomic), exit 3; a restart resumes from `state.json`.
With `--hold-at K` the first attempt (SLURM_RESTART_COUNT unset or 0) waits at step K until a
signal arrives (each rank writes `<out>/holding-<rank>` there), so a test can preempt it at a known
step without timing assumptions.
Rank 0 appends one JSON line per attempt to `<out>/attempts.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 3


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--hold-at", type=int, default=-1)
    ap.add_argument("--hold-timeout", type=float, default=120.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    if x.item() != expected:
        print(f"rank {rank}: all_reduce gave {x.item()}, expected {expected}", file=sys.stderr)
        return 1
    ranks_info = [None] * world
    dist.all_gather_object(ranks_info, {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
                                        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname())})

    state_file = out / "state.json"
    start = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    step = start
    exit_code = 0
    while step < args.steps:
        if step == args.hold_at and restart == 0:
            (out / f"holding-{rank}").write_text(str(step))  # handlers are installed: safe to signal now
            deadline = time.monotonic() + args.hold_timeout
            while not stop["flag"] and time.monotonic() < deadline:
                time.sleep(0.1)
            if not stop["flag"]:
                print(f"rank {rank}: no signal within {args.hold_timeout}s at step {step}", file=sys.stderr)
                return 1
        y = torch.tensor([1.0])
        dist.all_reduce(y)
        step += 1
        flag = torch.tensor([1.0 if stop["flag"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() > 0:
            exit_code = REQUEUE_EXIT_CODE
            break
    if rank == 0:
        atomic_write(state_file, json.dumps({"step": step}))
        with open(out / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"restart": restart, "start_step": start, "end_step": step, "exit": exit_code,
                                "world": world, "allreduce": x.item(), "ranks": ranks_info,
                                "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"}) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
