"""Where a checkpoint is: the `latest` pointer contract and the checkpoint-directory resolution of every format.

`latest` is a text file holding the name of the newest complete checkpoint directory beside it (written by
`training.checkpoint.Checkpointer`, osp-convert and osp-grpo; read only through `read_latest`). A megatron run
directory keeps its checkpoints under `checkpoints/` (`<run>/checkpoints/latest -> step_XXXXXXX`). OSP-Next's
own training output has no pointer: its newest checkpoint is the `iter_XXXXXXXXX` folder with the largest number
(`ospnext/distributed/checkpoint.py`, `get_latest_checkpoint_folder`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Type

LATEST = "latest"
RUN_CHECKPOINTS = "checkpoints"  # megatron run dir: <run_dir>/checkpoints/{step_*,latest}
MEGATRON_METADATA = "metadata.json"  # written by megatron dist_checkpointing into every torch_dist directory


class WeightsError(ValueError):
    """A checkpoint that cannot be found, recognised or read; the message names the path and the fix."""


def read_latest(root: str | os.PathLike, error: Type[Exception] = WeightsError) -> Optional[Path]:
    """`root/latest` -> the directory it names (None when there is no pointer). A pointer naming a missing
    directory raises `error` (the caller's error type, e.g. CheckpointError) with the fix."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = Path(root) / name
    if not name or not path.is_dir():
        raise error(f"{pointer} names {name!r}, which does not exist; point it at an existing checkpoint directory "
                    "or remove it to start from scratch")
    return path


def is_megatron_dir(path: Path) -> bool:
    """A torch_dist step dir, a folder with `latest`, or a run dir with `checkpoints/latest`."""
    return path.is_dir() and ((path / MEGATRON_METADATA).is_file() or (path / LATEST).is_file()
                              or (path / RUN_CHECKPOINTS / LATEST).is_file())


def find_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A megatron run dir (`checkpoints/latest`), a folder with `latest`, or a step dir -> the step dir."""
    p = Path(path)
    if (p / RUN_CHECKPOINTS / LATEST).is_file():
        p = p / RUN_CHECKPOINTS
    step = read_latest(p)
    if step is not None:
        return step
    if (p / MEGATRON_METADATA).is_file():
        return p
    raise WeightsError(f"{path}: not a megatron checkpoint (expected a run dir with checkpoints/latest, a folder "
                       f"with `latest`, or a step_* folder with {MEGATRON_METADATA})")


_ITER = re.compile(r"iter_(\d+)")


def latest_iteration_dir(run_dir: str | os.PathLike) -> Optional[Path]:
    """OSP-Next training output: the `iter_N` folder with the largest N (None when there is none)."""
    best = None
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = _ITER.fullmatch(p.name)
        if m and p.is_dir() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None
