"""Checkpoints: megatron `dist_checkpointing` (torch_dist) directories with an atomic `latest` pointer.

Layout under `<run_dir>/checkpoints/` (a trainer may name the folder and the step prefix, e.g. GRPO's
`grpo_checkpoints/iter_XXXXXXX`):
    step_0000100/            one torch_dist checkpoint (`*.distcp`, `.metadata`, `common.pt`, `metadata.json`)
        osp_checkpoint.json  completion marker: step, time, every file with its size and CRC32
    step_0000100.tmp/        a save in progress (never read; removed by the next save or resume)
    step_0000100.old/        the previous copy while step 100 is saved again (restored by a resume if the
                             save was killed before the new copy took the name, else deleted)
    latest                   text file holding the name of the newest complete step directory

Commit protocol: write into `step_X.tmp` -> all ranks done (sync save, or the async writer finalised) ->
rank 0 writes the marker, renames an existing `step_X` -> `step_X.old`, `step_X.tmp` -> `step_X`, writes
`latest.tmp` and renames it over `latest`, deletes `step_X.old`, then prunes to the newest `keep_last`. A save
killed at any point leaves a complete checkpoint that `latest` names (or that a resume restores to that name).
A resume never starts fresh next to complete checkpoints when `latest` is missing, and refuses a damaged
`latest`; both errors name the newest intact checkpoint and `train.resume_from=...`.
Loading checks the marker (sizes always, CRC32 when recorded) before megatron reads anything and refuses a
partial or corrupt checkpoint with a message naming the file and the fix.
"""
from __future__ import annotations

import json
import multiprocessing.context as _mp_context
import os
import shutil
import signal
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from osp_megatron.training.signals import HANDLED_SIGNALS, ignore_stop_signals
from osp_megatron.weights.paths import read_latest

MARKER = "osp_checkpoint.json"
LATEST = "latest"
CKPT_SUBDIR = "checkpoints"
OLD_SUFFIX = ".old"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def step_dir_name(step: int, prefix: str = "step_") -> str:
    return f"{prefix}{step:07d}"


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
    if (ckpt_dir / ".metadata").is_file():
        from osp_megatron.weights.safe_pickle import load_dcp_metadata

        try:
            load_dcp_metadata(ckpt_dir / ".metadata")
        except Exception as exc:  # noqa: BLE001 - refused class or unreadable pickle: one message
            raise CheckpointError(f"checkpoint {ckpt_dir} is refused: .metadata: {exc}") from None
    return marker


def start_writer_manager() -> None:
    """Start the results queue of megatron's torch_dist writer in a Manager process that ignores the stop
    signals (megatron would start one with the default actions: a SIGTERM/SIGUSR1 to the process group would kill
    it and break the final save with BrokenPipeError), also while it starts (`_SpawnProcessIgnoringStopSignals`).
    No-op once a queue exists."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover
        return
    if getattr(fa, "_results_queue", None) is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=_SpawnContextIgnoringStopSignals())
    manager.start(initializer=ignore_stop_signals)
    fa._results_queue = manager.Queue()


class _SpawnProcessIgnoringStopSignals(_mp_context.SpawnProcess):
    """A `spawn` process that starts with the stop signals ignored.

    A spawned interpreter imports for seconds before an initializer can run; a stop signal to the process group
    in that window (Ctrl-C just as the first periodic save begins) would kill it. An ignored disposition survives
    fork and exec (a blocked mask does not survive Python's start-up), so the parent ignores the stop signals
    for the few milliseconds of the fork + exec itself. A stop signal landing in exactly that window is lost;
    the trainer therefore starts the Manager during set-up, before its stop handlers are installed.
    """

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return super().start()  # signal dispositions can only be changed from the main thread
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in HANDLED_SIGNALS}
        try:
            super().start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _SpawnContextIgnoringStopSignals(_mp_context.SpawnContext):
    Process = _SpawnProcessIgnoringStopSignals


class WriterWatchdog:
    """While a save runs: if a helper process started during it (megatron's forked writers) dies from a signal
    or with an error before the save returns, print which and exit this rank with status 1 at once, instead of
    waiting forever on the writer's queue (and the peers for the distributed timeout)."""

    def __init__(self, what: str, poll_s: float = 0.5):
        import threading

        self.what = what
        self.poll_s = poll_s
        self._done = threading.Event()
        self._before = self._children()
        self._thread = threading.Thread(target=self._watch, name="checkpoint-writer-watchdog", daemon=True)

    @staticmethod
    def _children():
        import multiprocessing.process as mpp

        while True:
            try:
                return set(mpp._children)  # noqa: SLF001 - the Process objects this process started
            except RuntimeError:  # changed size while copied (a process started or was reaped): again
                continue

    def _watch(self) -> None:
        import sys

        while not self._done.wait(self.poll_s):
            for proc in self._children() - self._before:
                popen = getattr(proc, "_popen", None)
                code = None if popen is None else popen.poll()
                if code is not None and code != 0 and not self._done.is_set():
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                    print(f"[rank {_rank()}] osp-train failed: the checkpoint writer process {proc.pid} {how} "
                          f"while saving {self.what} (out of memory? killed?); the save is abandoned, `latest` "
                          "still names the previous checkpoint. Resume the run.", file=sys.stderr, flush=True)
                    os._exit(1)

    def __enter__(self) -> "WriterWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


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


class RunDirLock:
    """An exclusive lock on `<run_dir>/.lock` (POSIX record lock, released by the kernel when the holder dies),
    taken by rank 0 for as long as a trainer uses the run directory. The file names the holder (pid, host,
    start time), so a second trainer on the same run directory (e.g. a rerun while the orphaned ranks of a
    killed launcher still train) is refused with who holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fh = None

    def acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
        except OSError as exc:
            raise CheckpointError(f"cannot write to train.run_dir={self.run_dir}: {exc.strerror} ({exc.filename}); "
                                  "give a writable directory") from None
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "owner unknown"
            fh.close()
            raise CheckpointError(
                f"train.run_dir={self.run_dir} is in use by another trainer ({owner}; lock {self.path}): stop that "
                "run first (after a killed launcher its ranks may still be running) or use another train.run_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.lockf(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class Checkpointer:
    """Saves and loads full training state under `<run_dir>/checkpoints` (collective: call on every rank)."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, async_save: bool = False, checksums: bool = True,
                 dp_group=None, subdir: str = CKPT_SUBDIR, prefix: str = "step_"):
        self.root = Path(run_dir) / subdir
        self.prefix = prefix
        self.keep_last = keep_last
        self.async_save = async_save
        self.checksums = checksums
        self.dp_group = dp_group
        self._queue = None
        self.last_committed: Optional[int] = None

    # ------------------------------------------------------------------ discovery
    def dir_name(self, step: int) -> str:
        return step_dir_name(step, self.prefix)

    def latest_dir(self) -> Optional[Path]:
        """The directory `latest` points at, or None for a fresh run. Raises if `latest` is dangling."""
        return read_latest(self.root, error=CheckpointError)

    def committed_steps(self) -> List[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if (p.is_dir() and p.name.startswith(self.prefix) and p.name[len(self.prefix):].isdigit()
                    and (p / MARKER).is_file()):
                out.append(int(p.name[len(self.prefix):]))
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
        tmp = self.root / (self.dir_name(step) + ".tmp")
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

            start_writer_manager()
            request = dist_checkpointing.save(state, str(tmp), sharded_strategy=self._strategy(),
                                              async_sharded_save=True)
            request.add_finalize_fn(commit)
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        else:
            start_writer_manager()
            with WriterWatchdog(tmp.name):
                dist_checkpointing.save(state, str(tmp), sharded_strategy=self._strategy())
            commit()

    def _commit(self, step: int, tmp: Path) -> None:
        write_marker(tmp, step, self.checksums)
        final = self.root / self.dir_name(step)
        old = self.root / (final.name + OLD_SUFFIX)
        if final.exists():  # re-saving a step: keep the complete copy until the new one holds its name
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            _fsync_dir(self.root)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write_text(self.root / LATEST, final.name + "\n")
        if old.exists():
            shutil.rmtree(old)
        self._prune(keep=final.name)

    def _prune(self, keep: str) -> None:
        steps = self.committed_steps()
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            name = self.dir_name(s)
            if name != keep:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def finalize(self, blocking: bool = False) -> None:
        """Commit finished async saves (collective). `blocking=True` waits for the one in flight."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self, collective: bool = True) -> None:
        """Finish the async save in flight and stop the writer. `collective=False` (after an error on this rank)
        abandons it without waiting on the other ranks."""
        if collective:
            self.finalize(blocking=True)
            if self._queue is not None:
                self._queue.close()
        self._queue = None
        shutdown_writer_manager()

    def remove_stale_tmp(self) -> None:
        """Clean up after a killed save (rank 0): delete `*.tmp` step directories; a `step_X.old` left by a
        re-save of step X goes back to its name when `step_X` is missing or incomplete, else it is deleted."""
        if _rank() == 0 and self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if p.is_dir() and p.name.endswith(OLD_SUFFIX):
                    final = self.root / p.name[: -len(OLD_SUFFIX)]
                    if (final / MARKER).is_file():
                        shutil.rmtree(p, ignore_errors=True)
                    elif (p / MARKER).is_file():
                        if final.exists():
                            shutil.rmtree(final)
                        os.replace(p, final)
                        _fsync_dir(self.root)
            for p in self.root.iterdir():
                if p.is_dir() and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def intact_steps(self) -> List[int]:
        """Committed steps whose files pass `verify_checkpoint`, oldest first (reads every file: rank 0 only)."""
        out = []
        for step in self.committed_steps():
            try:
                verify_checkpoint(self.root / self.dir_name(step))
            except CheckpointError:
                continue
            out.append(step)
        return out

    def _resume_problem(self, what: str) -> str:
        intact = self.intact_steps()
        if not intact:
            return f"{what}; no intact checkpoint is left in {self.root}: use a new train.run_dir for a fresh run"
        newest = self.root / self.dir_name(intact[-1])
        return (f"{what}; the newest intact checkpoint is {newest}: resume from it with "
                f"train.resume_from={newest.name} (or use a new train.run_dir for a fresh run)")

    def resume_dir(self, resume_from: str = "") -> Optional[Path]:
        """The checkpoint a resume starts from, verified (collective; rank 0 checks, the answer is broadcast).

        `resume_from` (a step_* name under the checkpoint root, or a path) wins over `latest`. None: nothing to
        resume (no `latest` and no committed step). A missing `latest` next to complete checkpoints, a dangling
        or damaged `latest` raise CheckpointError naming the newest intact checkpoint and the override."""
        answer: List[Any] = [None, None]
        if _rank() == 0:
            try:
                path = self._find(resume_from)
                answer[0] = None if path is None else str(path)
            except CheckpointError as exc:
                answer[1] = str(exc)
        if dist.is_initialized():
            dist.broadcast_object_list(answer, src=0)
        if answer[1] is not None:
            raise CheckpointError(answer[1])
        return None if answer[0] is None else Path(answer[0])

    def _find(self, resume_from: str) -> Optional[Path]:
        if resume_from:
            path = Path(resume_from)
            if not path.is_absolute() and not path.exists():
                path = self.root / resume_from
            verify_checkpoint(path)
            return path
        pointer = self.root / LATEST
        if not pointer.is_file():
            if self.committed_steps():
                raise CheckpointError(self._resume_problem(
                    f"{pointer} is missing but {self.root} holds checkpoints (a fresh start would overwrite them)"))
            return None
        try:
            path = self.latest_dir()
            verify_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(self._resume_problem(f"`latest` cannot be used: {exc}")) from None
        return path

    # ------------------------------------------------------------------ load
    def load(self, ckpt_dir: Path, sharded_state: Dict[str, Any], verified: bool = False) -> Dict[str, Any]:
        """Verify `ckpt_dir` (rank 0, result broadcast; skipped when `resume_dir` just did) and load
        `sharded_state` from it (collective)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        from osp_megatron.weights import safe_pickle

        safe_pickle.install()  # checkpoints are data: no code runs from .metadata or byte items

        problem = [None]
        if _rank() == 0 and not verified:
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
