"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, `scancel`, `--signal=USR1@90`).

The handler only sets a flag. The trainer checks it after every optimizer step; all ranks agree through a
MAX all-reduce (a signal may reach only some ranks), then the trainer saves a checkpoint and the process
exits with `EXIT_REQUEUE` (3): "checkpointed for requeue". Other exit codes of `osp-train`:
    0  finished train.steps
    1  error (config, data, crash)
    3  stopped by SIGTERM/SIGUSR1 after a successful checkpoint: requeue the job to continue
    4  stopped after train.max_nonfinite_steps non-finite steps in a row (the last good checkpoint is kept)
"""
from __future__ import annotations

import signal
from typing import Optional

from osp_megatron.launch import EXIT_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE  # noqa: F401 (re-exported)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for SIGTERM/SIGUSR1 that record the signal; `uninstall()` restores the old ones."""

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
