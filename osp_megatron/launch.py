"""One launcher for every entry point (osp-train, osp-grpo, osp-sample, osp-cache, the converters' workers).

`DistEnv.from_environ()` reads torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM
(`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` exported by
`slurm/launcher.sh`) variables; nothing is set up by reading it, so a CLI can validate its config against
`env.world_size` before any process group exists. `distributed(env, ...)` then does, once and in one place:
device choice (`cuda:LOCAL_RANK` or CPU), backend (nccl / gloo), the CPU shims megatron-core needs on gloo,
`init_process_group` with the configured timeout, and teardown. `run_ranks(prog, body)` turns a rank's exception
into one line naming the rank and exit code 1 (the process leaves at once: peers cannot be relied on for a clean
collective shutdown), and returns the body's exit code otherwise. `run_trainer(prog, env, make_trainer)` is the
run body of every training entry point (osp-train, osp-grpo) on top of both: process group, trainer, exit code,
teardown.

Exit codes shared by the entry points: 0 done, 1 error, 2 invalid config or arguments, 3 stopped by a signal after a
checkpoint (requeue to continue), 4 stopped after too many non-finite steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import os
import signal
import socket
import sys
import traceback
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from osp_megatron import cpu_shims

EXIT_OK, EXIT_ERROR, EXIT_BAD_CONFIG, EXIT_REQUEUE, EXIT_NONFINITE = 0, 1, 2, 3, 4
DEFAULT_TIMEOUT_MINUTES = 30
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # a stop request: checkpoint, then EXIT_REQUEUE


class LaunchError(ValueError):
    """The environment cannot start the requested job (a missing port, a rank outside the world)."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: rank of world_size, its local rank on the node, the rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env or "WORLD_SIZE" in env:
            rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
            local = _int(env, "LOCAL_RANK", rank)
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = _int(env, "SLURM_PROCID", 0), _int(env, "SLURM_NTASKS", 1)
            local = _int(env, "SLURM_LOCALID", 0)
        else:
            rank, world, local = 0, 1, 0
        port = env.get("MASTER_PORT")
        out = cls(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), None if port in (None, "") else
                  _int(env, "MASTER_PORT", 0))
        if world < 1 or not 0 <= rank < world:
            raise LaunchError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return out

    @classmethod
    def for_command(cls, world_size: Optional[int] = None, dry_run: bool = False) -> "DistEnv":
        """The launched environment; with `--dry-run --world-size N` the one N launched processes would see."""
        env = cls.from_environ()
        if world_size is None:
            return env
        if not dry_run:
            raise LaunchError("--world-size is only for --dry-run; launch N processes with torchrun/srun instead")
        return env.planned(world_size)

    def planned(self, world_size: int) -> "DistEnv":
        """This environment as if `world_size` processes were launched (`--dry-run --world-size N`)."""
        if world_size < 1:
            raise LaunchError(f"--world-size {world_size}: must be >= 1")
        return dataclasses.replace(self, world_size=int(world_size))

    def with_port(self) -> "DistEnv":
        """A rendezvous port: MASTER_PORT, or any free local port for a single process."""
        if self.master_port is not None:
            return self
        if self.world_size > 1:
            raise LaunchError("MASTER_PORT is not set for a multi-process launch: use torchrun, slurm/launcher.sh, "
                              "or export MASTER_ADDR and MASTER_PORT")
        return dataclasses.replace(self, master_port=free_port())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={raw!r} is not an integer (check the launcher's environment)") from None


def free_port() -> int:
    """A free TCP port on the loopback interface (single-process and test rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(env: DistEnv, spec: str = "auto") -> torch.device:
    """`auto`: this rank's GPU (`LOCAL_RANK` modulo the visible devices) when CUDA is present, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def quiet_library_warnings() -> None:
    """megatron's start-up notices (TE/Apex fallbacks, deprecations) repeat on every rank."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")


@contextlib.contextmanager
def distributed(env: DistEnv, *, device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                always: bool = True) -> Iterator[torch.device]:
    """Initialise torch.distributed for this rank, yield its device, tear the group down afterwards.

    `always=False` starts no process group for a single process (tools that only need one when launched
    with several ranks). A group that already exists (tests, notebooks) is used as it is and left alone.
    """
    faulthandler.enable()
    quiet_library_warnings()
    cpu_shims.apply()
    dev = pick_device(env, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owned = False
    if not dist.is_initialized() and (always or env.world_size > 1):
        env = env.with_port()
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            timeout=datetime.timedelta(minutes=float(timeout_minutes)),
        )
        owned = True
    try:
        yield dev
    except BaseException:
        # no teardown after an error with peers: destroying the group can wait on ranks that are inside a
        # collective; `run_ranks` leaves the process at once and the OS frees the group
        if owned and dist.is_initialized() and env.world_size == 1:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise
    else:
        if owned and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(prog: str, env: DistEnv, body: Callable[[], int],
              expected: tuple = ()) -> int:
    """Run `body()` and return its exit code. Exceptions of the `expected` types (bad arguments found late) print
    one line and return 2; any other exception prints `[rank R] prog failed: ...` with its traceback and leaves
    the process at once with code 1, so a failed rank never waits on its peers."""
    try:
        return int(body())
    except expected as exc:  # type: ignore[misc]
        print(f"{prog} rank {env.rank}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    except Exception as exc:  # noqa: BLE001 - surface every rank's error with its id
        print(f"[rank {env.rank}] {prog} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_available() and dist.is_initialized() and env.world_size > 1:
            os._exit(EXIT_ERROR)
        return EXIT_ERROR


def ignore_stop_signals(*_args) -> None:
    """Ignore the stop signals in this process (a helper process, or a rank tearing down after an agreed stop;
    `*_args` takes a worker id)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_trainer(prog: str, env: DistEnv, make_trainer: Callable[[torch.device], Any], *,
                timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                start: Callable[[Any], None] = lambda trainer: trainer.start()) -> int:
    """The run of a training entry point: process group (`distributed`) -> `make_trainer(device)` -> `start(trainer)`
    -> `trainer.train()` (its exit code) -> `trainer.close(failed=...)`, all under `run_ranks`.

    `start` runs inside the guarded part, so what it sets up is released by `close` when it fails (osp-train
    passes `Trainer.setup`, which builds and starts). After a stop every rank agreed on (exit code != 0) the
    rank ignores further stop signals and waits for its peers, so a launcher's SIGTERM (sent once the first rank
    exits) cannot turn the agreed code into -15 while the others tear down."""

    def body() -> int:
        with distributed(env, timeout_minutes=timeout_minutes) as device:
            trainer = make_trainer(device)
            failed = True
            try:
                start(trainer)
                code = int(trainer.train())
                if code != EXIT_OK:
                    ignore_stop_signals()
                    dist.barrier()
                failed = False
                return code
            finally:
                try:
                    trainer.close(failed=failed)
                except Exception:  # noqa: BLE001 - a cleanup error must not hide the one that ended the run
                    traceback.print_exc()

    return run_ranks(prog, env, body)


__all__ = [
    "DistEnv", "LaunchError", "distributed", "run_ranks", "run_trainer", "free_port", "pick_device",
    "quiet_library_warnings", "ignore_stop_signals", "STOP_SIGNALS",
    "EXIT_OK", "EXIT_ERROR", "EXIT_BAD_CONFIG", "EXIT_REQUEUE", "EXIT_NONFINITE", "DEFAULT_TIMEOUT_MINUTES",
]
