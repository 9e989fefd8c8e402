"""The one launcher: environment parsing (torchrun, SLURM, single), ports, device, error reporting."""
import subprocess
import sys
import textwrap

import pytest

from osp_megatron.launch import EXIT_BAD_CONFIG, EXIT_ERROR, DistEnv, LaunchError, free_port, run_ranks


def test_env_torchrun_slurm_and_single():
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                                "MASTER_PORT": "29500"})
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, master_addr="n1", master_port=29500)
    env = DistEnv.from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_PORT": "20001"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (5, 16, 1, 20001)
    single = DistEnv.from_environ({})
    assert single.world_size == 1 and single.master_port is None and single.is_main
    assert single.with_port().master_port > 0
    assert single.planned(4).world_size == 4


def test_env_errors_name_the_variable():
    with pytest.raises(LaunchError, match="RANK=4, WORLD_SIZE=2"):
        DistEnv.from_environ({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="WORLD_SIZE='two'"):
        DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(LaunchError, match="MASTER_PORT is not set"):
        DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"}).with_port()
    with pytest.raises(LaunchError, match="--world-size 0"):
        DistEnv().planned(0)
    with pytest.raises(LaunchError, match="--world-size is only for --dry-run"):
        DistEnv.for_command(4, dry_run=False)
    assert DistEnv.for_command(4, dry_run=True).world_size == 4 and DistEnv.for_command().world_size >= 1


def test_run_ranks_exit_codes(capsys):
    env = DistEnv()
    assert run_ranks("osp-x", env, lambda: 3) == 3

    def bad_argument():
        raise ValueError("--steps must be > 0")

    def crash():
        raise RuntimeError("boom")

    assert run_ranks("osp-x", env, bad_argument, expected=(ValueError,)) == EXIT_BAD_CONFIG
    assert run_ranks("osp-x", env, crash) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "osp-x rank 0: --steps must be > 0" in err and "[rank 0] osp-x failed: RuntimeError: boom" in err


def test_distributed_single_process_sets_up_and_tears_down():
    """In a fresh process: a group is started and destroyed; `always=False` starts none; an existing group is kept."""
    code = textwrap.dedent("""
        import torch.distributed as dist
        from osp_megatron.launch import DistEnv, distributed
        with distributed(DistEnv(), timeout_minutes=1) as device:
            assert device.type == "cpu" and dist.is_initialized() and dist.get_world_size() == 1
        assert not dist.is_initialized()
        with distributed(DistEnv(), always=False):
            assert not dist.is_initialized()
        with distributed(DistEnv()):
            with distributed(DistEnv()):
                pass
            assert dist.is_initialized()  # the inner block did not own the group
        assert not dist.is_initialized()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_failing_rank_is_named_and_peers_do_not_hang(tmp_path):
    """Two ranks: rank 1 fails before a collective; both processes end (no 30-minute wait) with rank 1 named."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from osp_megatron.launch import DistEnv, distributed, run_ranks
        env = DistEnv.from_environ()
        def body():
            with distributed(env, timeout_minutes=1):
                if env.rank == 1:
                    raise RuntimeError("disk on fire")
                dist.barrier()
            return 0
        raise SystemExit(run_ranks("osp-job", env, body))
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "[rank 1] osp-job failed: RuntimeError: disk on fire" in proc.stderr


def test_run_trainer_exit_codes_teardown_and_signals_after_a_stop():
    """The run body of osp-train and osp-grpo, in a fresh process: the trainer's exit code comes back; `start` runs
    inside the guarded part (a failing start still closes the trainer, as failed); after a stop (code != 0) the
    stop signals are ignored while the rank tears down."""
    code = textwrap.dedent("""
        import os, signal
        import torch.distributed as dist
        from osp_megatron.launch import EXIT_ERROR, EXIT_REQUEUE, DistEnv, run_trainer
        calls = []
        class Fake:
            def __init__(self, device, code=0, fail=False):
                self.code, self.fail = code, fail
                calls.append(("make", device.type, dist.is_initialized()))
            def start(self):
                calls.append("start")
                if self.fail:
                    raise RuntimeError("no weights")
            def train(self):
                calls.append("train")
                return self.code
            def close(self, failed=False):
                calls.append(("close", failed))
        assert run_trainer("osp-x", DistEnv(), Fake, timeout_minutes=1) == 0
        assert calls == [("make", "cpu", True), "start", "train", ("close", False)] and not dist.is_initialized()
        calls.clear()
        assert run_trainer("osp-x", DistEnv(), lambda d: Fake(d, fail=True)) == EXIT_ERROR
        assert calls[1:] == ["start", ("close", True)] and not dist.is_initialized()
        calls.clear()
        assert run_trainer("osp-x", DistEnv(), lambda d: Fake(d, code=EXIT_REQUEUE), start=lambda t: None) == 3
        assert calls[1:] == ["train", ("close", False)]
        os.kill(os.getpid(), signal.SIGTERM)  # ignored after the agreed stop
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[rank 0] osp-x failed: RuntimeError: no weights" in proc.stderr
