"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT (SLURM preemption, `scancel`, `--signal=USR1@90`, torchrun's
forwarded SIGTERM, Ctrl-C).

The handler only sets a flag. The trainer checks it after every optimizer step; all ranks agree through a
MAX all-reduce (a signal may reach only some ranks), then the trainer saves a checkpoint and the process
exits with `EXIT_REQUEUE` (3): "checkpointed for requeue". Other exit codes of `osp-train`:
    0  finished train.steps
    1  error (config, data, crash)
    3  stopped by SIGTERM/SIGUSR1/SIGINT after a successful checkpoint: requeue the job to continue
    4  stopped after train.max_nonfinite_steps non-finite steps in a row (the last good checkpoint is kept)

The stop signal usually reaches a rank's whole process group (SLURM `--signal`, `scancel --signal`, torchrun,
a terminal's Ctrl-C), so the rank's helper processes get it too. They call `ignore_stop_signals` when they
start (DataLoader workers through `worker_init_fn`, the checkpoint writer's Manager through its initializer)
and so live until the final save is written; they still exit with their parent (torch's worker watchdog, the
Manager's shutdown). After a stop (exit 3 or 4) the rank ignores further stop signals while it tears down, so a
launcher's follow-up SIGTERM cannot turn the agreed exit code into -15.
"""
from __future__ import annotations

import signal
from typing import Optional

# the exit codes and the stop-signal set belong to the launcher (its `run_trainer` ignores the signals after a stop)
from osp_megatron.launch import (  # noqa: F401 (re-exported)
    EXIT_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, STOP_SIGNALS as HANDLED_SIGNALS, ignore_stop_signals,
)


class StopRequest:
    """Installs handlers for SIGTERM/SIGUSR1/SIGINT that record the signal; `uninstall()` restores the old ones."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def agree_on_stop(local_request: bool, device) -> bool:
    """True on every rank if any rank got a stop signal (MAX all-reduce over the world)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local_request else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
