"""Checkpoints: megatron `dist_checkpointing` (torch_dist) directories with an atomic `latest` pointer.

Layout under `<run_dir>/checkpoints/`:
    step_0000100/            one torch_dist checkpoint (`*.distcp`, `.metadata`, `common.pt`, `metadata.json`)
        osp_checkpoint.json  completion marker: step, time, every file with its size and CRC32
    step_0000100.tmp/        a save in progress (never read; removed by the next save or resume)
    latest                   text file holding the name of the newest complete step directory

Commit protocol: write into `step_X.tmp` -> all ranks done (sync save, or the async writer finalised) ->
rank 0 writes the marker, renames `step_X.tmp` -> `step_X`, writes `latest.tmp` and renames it over `latest`,
then prunes to the newest `keep_last`. A save killed at any point leaves `latest` on the previous checkpoint.
Loading checks the marker (sizes always, CRC32 when recorded) before megatron reads anything and refuses a
partial or corrupt checkpoint with a message naming the file and the fix.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from osp_megatron.weights.paths import read_latest

MARKER = "osp_checkpoint.json"
LATEST = "latest"
CKPT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_marker(ckpt_dir: Path, step: int, checksums: bool) -> None:
    files = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name != MARKER:
            entry = {"size": p.stat().st_size}
            if checksums:
                entry["crc32"] = _crc32(p)
            files[str(p.relative_to(ckpt_dir))] = entry
    _atomic_write_text(ckpt_dir / MARKER, json.dumps({"step": step, "time": time.time(), "files": files}, indent=1))


def verify_checkpoint(ckpt_dir: str | Path) -> Dict[str, Any]:
    """Check the completion marker and every listed file; return the marker or raise CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    fix = "delete this directory (and fix `latest` to name an older step_* directory) or start a new run_dir"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist; {fix}")
    marker_path = ckpt_dir / MARKER
    if not marker_path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is incomplete: no {MARKER} (the save did not finish); {fix}"
        )
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: unreadable {MARKER} ({exc}); {fix}") from None
    for rel, entry in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: file {rel} is missing; {fix}")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} is corrupt: file {rel} has {size} bytes, expected {entry['size']}; {fix}"
            )
        if "crc32" in entry and _crc32(p) != entry["crc32"]:
            raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: file {rel} fails its CRC32 check; {fix}")
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is not a megatron dist_checkpointing directory; {fix}")
    return marker


def shutdown_writer_manager() -> None:
    """Stop the `spawn` multiprocessing Manager that megatron's torch_dist writer starts (else it outlives us)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover
        return
    queue = getattr(fa, "_results_queue", None)
    if queue is None:
        return
    manager = getattr(queue, "_manager", None)
    fa._results_queue = None
    if manager is not None:
        try:
            manager.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Checkpointer:
    """Saves and loads full training state under `<run_dir>/checkpoints` (collective: call on every rank)."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, async_save: bool = False, checksums: bool = True,
                 dp_group=None):
        self.root = Path(run_dir) / CKPT_SUBDIR
        self.keep_last = keep_last
        self.async_save = async_save
        self.checksums = checksums
        self.dp_group = dp_group
        self._queue = None
        self.last_committed: Optional[int] = None

    # ------------------------------------------------------------------ discovery
    def latest_dir(self) -> Optional[Path]:
        """The directory `latest` points at, or None for a fresh run. Raises if `latest` is dangling."""
        return read_latest(self.root, error=CheckpointError)

    def committed_steps(self) -> List[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and (p / MARKER).is_file():
                out.append(int(p.name[5:]))
        return sorted(out)

    # ------------------------------------------------------------------ save
    def _strategy(self):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            strategy = FullyParallelSaveStrategyWrapper(strategy, self.dp_group)
        return strategy

    def save(self, step: int, state: Dict[str, Any], before_commit: Optional[Callable[[Path], None]] = None) -> None:
        """Save `state` (sharded model/optimizer/EMA entries + common python objects) as step `step`.

        Sync: returns after `latest` points at it. Async (GPU): returns after staging to host memory; the commit
        happens in `finalize(...)`, called by the trainer every step and at exit. `before_commit(tmp_dir)` runs on
        rank 0 after all data is written, right before the marker/rename (a fault-injection point for tests).
        """
        from megatron.core import dist_checkpointing

        self.finalize(blocking=True)  # one save in flight at a time
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()

        def commit() -> None:
            _barrier()
            if _rank() == 0:
                if before_commit is not None:
                    before_commit(tmp)
                self._commit(step, tmp)
            _barrier()
            self.last_committed = step

        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(state, str(tmp), sharded_strategy=self._strategy(),
                                              async_sharded_save=True)
            request.add_finalize_fn(commit)
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(state, str(tmp), sharded_strategy=self._strategy())
            commit()

    def _commit(self, step: int, tmp: Path) -> None:
        write_marker(tmp, step, self.checksums)
        final = self.root / step_dir_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(keep=final.name)

    def _prune(self, keep: str) -> None:
        steps = self.committed_steps()
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            name = step_dir_name(s)
            if name != keep:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def finalize(self, blocking: bool = False) -> None:
        """Commit finished async saves (collective). `blocking=True` waits for the one in flight."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        shutdown_writer_manager()

    def remove_stale_tmp(self) -> None:
        """Delete `*.tmp` step directories left by a killed save (rank 0)."""
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ load
    def load(self, ckpt_dir: Path, sharded_state: Dict[str, Any]) -> Dict[str, Any]:
        """Verify `ckpt_dir` (rank 0, result broadcast) and load `sharded_state` from it (collective)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        problem = [None]
        if _rank() == 0:
            try:
                verify_checkpoint(ckpt_dir)
            except CheckpointError as exc:
                problem[0] = str(exc)
        if dist.is_initialized():
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(problem[0])
        try:
            strategy = get_default_load_sharded_strategy(str(ckpt_dir))
            # the fully-parallel loader exchanges shards through CUDA tensors: GPU only
            if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1 and torch.cuda.is_available():
                strategy = FullyParallelLoadStrategyWrapper(strategy, self.dp_group)
            return dist_checkpointing.load(sharded_state, str(ckpt_dir), sharded_strategy=strategy)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - turn megatron/torch errors into one clear message
            raise CheckpointError(
                f"checkpoint {ckpt_dir} could not be loaded into this model ({type(exc).__name__}: {exc}); "
                "check that model.* matches the run that wrote it, or delete the checkpoint"
            ) from exc
