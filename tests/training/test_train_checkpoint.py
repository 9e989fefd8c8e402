"""Checkpoint commit protocol: atomic `latest`, keep-last, killed saves, corrupt checkpoints (real torch_dist)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from osp_megatron.training.checkpoint import (
    MARKER,
    CheckpointError,
    Checkpointer,
    shutdown_writer_manager,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    created = False
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        created = True
    yield
    shutdown_writer_manager()
    if created:
        dist.destroy_process_group()


def _state(value: float, step: int):
    from megatron.core.dist_checkpointing import ShardedTensor

    w = torch.full((4, 3), value)
    return {"w": ShardedTensor.from_rank_offsets("w", w, replica_id=0), "osp": {"step": step}}


def _load(ck: Checkpointer, path: Path):
    return ck.load(path, _state(0.0, 0))


def test_save_commit_latest_and_keep_last(world, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    assert ck.latest_dir() is None
    for step in (1, 2, 3):
        ck.save(step, _state(float(step), step))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert ck.committed_steps() == [2, 3]  # step 1 pruned
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    loaded = _load(ck, ck.latest_dir())
    assert torch.equal(loaded["w"], torch.full((4, 3), 3.0)) and loaded["osp"]["step"] == 3
    marker = verify_checkpoint(ck.latest_dir())
    assert marker["step"] == 3 and all("crc32" in e for e in marker["files"].values())


def test_failed_save_never_becomes_latest(world, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1.0, 1))

    def crash(tmp_dir):
        assert tmp_dir.name == "step_0000002.tmp" and any(tmp_dir.iterdir())  # data written, not committed
        raise RuntimeError("simulated crash before commit")

    with pytest.raises(RuntimeError, match="simulated crash"):
        ck.save(2, _state(2.0, 2), before_commit=crash)
    assert ck.latest_dir().name == "step_0000001"
    assert (tmp_path / "checkpoints" / "step_0000002.tmp").is_dir()
    ck.remove_stale_tmp()
    assert not (tmp_path / "checkpoints" / "step_0000002.tmp").exists()
    assert torch.equal(_load(ck, ck.latest_dir())["w"], torch.full((4, 3), 1.0))


def test_sigkill_during_save_keeps_previous_latest(tmp_path):
    """A real SIGKILL between writing the data and the commit (separate process)."""
    script = tmp_path / "save_and_die.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, torch, torch.distributed as dist
        from megatron.core.dist_checkpointing import ShardedTensor
        from osp_megatron import cpu_shims
        from osp_megatron.training.checkpoint import Checkpointer, shutdown_writer_manager

        def state(v):
            return {{"w": ShardedTensor.from_rank_offsets("w", torch.full((4, 3), v), replica_id=0)}}

        if __name__ == "__main__":
            cpu_shims.apply()
            dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
            ck = Checkpointer("{tmp_path}/run")
            ck.save(1, state(1.0))
            shutdown_writer_manager()
            ck.save(2, state(2.0), before_commit=lambda d: os.kill(os.getpid(), signal.SIGKILL))
    """))
    log = tmp_path / "log.txt"
    with open(log, "wb") as fh:  # a file, not a pipe: the writer's Manager child may keep a pipe open
        proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stdout=fh, stderr=fh)
    try:
        proc.wait(timeout=600)
        out = log.read_bytes()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the writer's Manager process, if it outlived its parent
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, out.decode()[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert (root / "step_0000002.tmp").is_dir() and not (root / "step_0000002").exists()
    verify_checkpoint(root / "step_0000001")


def test_corrupt_or_partial_checkpoint_is_refused(world, tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(5, _state(5.0, 5))
    path = ck.latest_dir()
    data = sorted(path.glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte, same size
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{data.name} fails its CRC32 check"):
        _load(ck, path)
    data.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(CheckpointError, match=rf"corrupt: file {data.name} has 100 bytes, expected"):
        _load(ck, path)
    data.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        _load(ck, path)
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete: no osp_checkpoint.json"):
        _load(ck, path)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000099\n")
    with pytest.raises(CheckpointError, match="names 'step_0000099', which does not exist"):
        ck.latest_dir()


def test_async_save_commits_only_after_finalize(world, tmp_path):
    """The GPU path (async torch_dist writer + finalize callback) also works on CPU."""
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, _state(1.0, 1))
    ck.save(2, _state(2.0, 2))  # waits for step 1 to commit first
    assert ck.latest_dir().name == "step_0000001"  # step 2 is written in the background, not committed yet
    assert (tmp_path / "checkpoints" / "step_0000002.tmp").is_dir()
    ck.finalize(blocking=True)
    assert ck.latest_dir().name == "step_0000002" and ck.last_committed == 2
    assert torch.equal(_load(ck, ck.latest_dir())["w"], torch.full((4, 3), 2.0))
    ck.close()
