"""Shared test setup: CPU shims, thread limits, GPU marker skipping."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

from osp_megatron import cpu_shims  # noqa: E402

cpu_shims.apply()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Every process a test starts carries this mark in its environment (inherited through torchrun, spawn and
# sbatch --export=ALL); whatever still runs after the test's call phase is a leak (a rank whose launcher was
# killed on a timeout, a checkpoint writer, an array task) and is killed so it cannot slow the tests after it.
_TEST_MARK = "OSP_TEST_PROCESS_MARK"
_DAEMONS = {"slurmctld", "slurmd", "slurmstepd", "wandb-core"}  # session-long services
os.environ.setdefault(_TEST_MARK, str(os.getpid()))


def _marked_processes():
    import psutil

    me = os.getpid()
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "name", "cmdline"]):
        if proc.info["pid"] == me or proc.info["name"] in _DAEMONS:
            continue
        if proc.info["ppid"] == me and "multiprocessing" in " ".join(proc.info["cmdline"] or ()):
            continue  # this process's own pools (the in-process checkpoint writer): they live across tests
        try:
            if proc.environ().get(_TEST_MARK) == os.environ[_TEST_MARK]:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = {p.pid for p in _marked_processes()}
    yield
    import psutil

    leaked = [p for p in _marked_processes() if p.pid not in before]
    if not leaked:
        return
    _, alive = psutil.wait_procs(leaked, timeout=5)
    for proc in alive:
        try:
            print(f"\n[conftest] killing leaked process {proc.pid} after {item.nodeid}: "
                  f"{' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except (psutil.Error, OSError):
            pass
    psutil.wait_procs(alive, timeout=10)
