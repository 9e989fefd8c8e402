"""Checkpoint safety: re-saving a step, missing or damaged `latest`, torn metrics lines, replayed tracker steps,
the run-directory lock and a dying writer process (real torch_dist saves in a one-process gloo world)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from osp_megatron.training import checkpoint as ckpt_mod
from osp_megatron.training.checkpoint import CheckpointError, Checkpointer, RunDirLock, shutdown_writer_manager
from osp_megatron.training.tracking import MetricsLog, Tracker


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

    return {"w": ShardedTensor.from_rank_offsets("w", torch.full((4, 3), value), replica_id=0), "osp": {"step": step}}


def _load(ck: Checkpointer, path):
    return float(ck.load(path, _state(0.0, 0), verified=True)["w"][0, 0])


def test_killed_resave_of_a_step_keeps_a_complete_copy(world, tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1.0, 1))
    ck.save(2, _state(2.0, 2))
    real_replace = os.replace

    def killed_before_the_new_copy_takes_its_name(src, dst):
        if str(src).endswith("step_0000002.tmp"):
            raise KeyboardInterrupt("simulated SIGKILL")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", killed_before_the_new_copy_takes_its_name)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, _state(5.0, 2))
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    # the next run: cleanup restores the complete old copy under its name and resumes from it
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.remove_stale_tmp()
    path = ck.resume_dir()
    assert path.name == "step_0000002" and _load(ck, path) == 2.0
    # an uninterrupted re-save replaces the copy and leaves no .old behind
    ck.save(2, _state(6.0, 2))
    assert _load(ck, ck.resume_dir()) == 6.0 and not list(ck.root.glob("*.old"))


def test_missing_or_damaged_latest_names_the_newest_intact_checkpoint(world, tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ck.save(step, _state(float(step), step))
    (ck.root / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"latest is missing.*step_0000003.*train.resume_from=step_0000003"):
        ck.resume_dir()
    (ck.root / "latest").write_text("step_0000003\n")
    shard = sorted((ck.root / "step_0000003").glob("*.distcp"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"CRC32.*newest intact checkpoint is .*step_0000002.*"
                                              r"train.resume_from=step_0000002"):
        ck.resume_dir()
    path = ck.resume_dir("step_0000002")
    assert _load(ck, path) == 2.0
    with pytest.raises(CheckpointError, match="CRC32"):
        ck.resume_dir("step_0000003")


def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert MetricsLog(path).truncate_after(2) == 2
    assert [r["step"] for r in MetricsLog(path).read()] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        MetricsLog(path).truncate_after(3)


def test_steps_replayed_after_a_resume_reach_the_tracker_once(tmp_path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(backend="mlflow", uri="", experiment="e", run_name="")
    tr = Tracker(cfg, tmp_path, enabled=True)
    for step in range(1, 6):
        tr.log_metrics({"loss": float(step)}, step)
    run_id = tr.run_id
    # crash after step 5, resume from the step-3 checkpoint, as the trainer does it
    tr = Tracker(cfg, tmp_path, enabled=True, run_id=run_id)
    tr.logged_until = tr.metrics_log.truncate_after(3)
    for step in range(4, 8):
        tr.log_metrics({"loss": float(step)}, step)
    history = tr.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 8))
    assert [r["step"] for r in tr.metrics_log.read()] == list(range(1, 8))


def test_run_dir_lock_refuses_a_second_live_trainer(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from osp_megatron.training.checkpoint import RunDirLock
        lock = RunDirLock({str(tmp_path)!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"in use by another trainer \(pid {holder.pid} on "):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)  # the kernel released the dead holder's lock
    lock.acquire()
    lock.release()


def test_writer_process_killed_mid_save_is_an_error_not_a_hang(tmp_path):
    script = textwrap.dedent("""
        import multiprocessing as mp, os, signal, time
        from osp_megatron.training.checkpoint import WriterWatchdog

        with WriterWatchdog("step_0000007.tmp", poll_s=0.05):
            p = mp.get_context("fork").Process(target=time.sleep, args=(60,))
            p.start()
            os.kill(p.pid, signal.SIGKILL)
            time.sleep(30)  # megatron would now wait forever on the writer's queue
        print("not reached")
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not reached" not in out.stdout, out
    assert "checkpoint writer process" in out.stderr and "killed by signal 9" in out.stderr
    assert "step_0000007.tmp" in out.stderr and time.monotonic() - t0 < 30


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(world, tmp_path, monkeypatch):
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    from osp_megatron.training.checkpoint import write_marker
    from osp_megatron.weights import safe_pickle

    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1.0, 1))
    step = ck.root / "step_0000001"
    assert _load(ck, step) == 1.0  # a real checkpoint passes the restricted unpickler
    (step / ".metadata").write_bytes(pickle.dumps(_Boom()))
    write_marker(step, 1, checksums=True)  # the attacker recomputes the CRCs too
    with pytest.raises(CheckpointError, match=r"refused: .metadata: refusing to load posix.system"):
        ck.resume_dir()
    safe_pickle.install()
    with pytest.raises(safe_pickle.UnsafeCheckpointError):
        FileSystemReader(str(step)).read_metadata()
    assert not (tmp_path / "PWNED").exists()


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(world, tmp_path):
    from types import SimpleNamespace

    from osp_megatron.training.loop import NonFiniteStop, Trainer

    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1.0, 1))
    trainer = Trainer.__new__(Trainer)  # only what save() reads before it writes anything
    trainer.cfg = SimpleNamespace(train=SimpleNamespace(save_checkpoints=True))
    trainer.model, trainer.ema, trainer.device, trainer.step, trainer.checkpointer = (
        torch.nn.Linear(3, 2), None, torch.device("cpu"), 2, ck)
    assert trainer.weights_finite()
    with torch.no_grad():
        trainer.model.weight[0, 1] = float("inf")
    with pytest.raises(NonFiniteStop, match=r"weights after step 2 are not finite; not saved: the last good "
                                            r"checkpoint is .*step_0000001"):
        trainer.save()
    assert ck.committed_steps() == [1] and (ck.root / "latest").read_text().strip() == "step_0000001"


def test_stop_signals_to_the_group_while_the_writer_manager_starts_do_not_kill_it(tmp_path):
    # the Manager is a spawned interpreter that imports for seconds before it can ignore anything; a stop signal
    # to the process group in that window (Ctrl-C right as the first periodic save begins) must not kill it
    script = textwrap.dedent("""
        import sys
        from osp_megatron.training.signals import StopRequest
        from osp_megatron.training.checkpoint import shutdown_writer_manager, start_writer_manager
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

        stop = StopRequest().install()
        print("starting", flush=True)
        start_writer_manager()
        fa._results_queue.put("alive")
        assert fa._results_queue.get(timeout=30) == "alive"
        manager = fa._results_queue._manager
        print("manager up; signals seen:", stop.signum is not None, flush=True)
        shutdown_writer_manager()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        head = ""
        while "starting" not in head and proc.poll() is None:
            head += proc.stdout.readline()
        sent = 0
        while proc.poll() is None and sent < 400:  # a signal every 10 ms for up to 4 s while the Manager starts
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                os.killpg(proc.pid, sig)
            sent += 1
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "manager up; signals seen: True" in out, head + out
