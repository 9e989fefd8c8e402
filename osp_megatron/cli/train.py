"""`osp-train CONFIG [key=value ...] [--dry-run]`: flow-matching training of an OSP-Next / Wan DiT.

Launch with torchrun (`torchrun --nproc_per_node N -m osp_megatron.cli.train CONFIG` or the `osp-train`
script with `--no-python`), with srun (RANK/WORLD_SIZE from SLURM_PROCID/SLURM_NTASKS, see
slurm/launcher.sh), or plainly for one process. Backend: nccl with CUDA, gloo on CPU.
The config is validated against the world size before any process group starts.

Exit codes: 0 done, 1 error, 2 invalid config/arguments, 3 stopped by SIGTERM/SIGUSR1 after a checkpoint
(requeue to continue), 4 stopped after train.max_nonfinite_steps non-finite steps in a row.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import socket
import sys
import traceback
from typing import Dict, Optional, Sequence

EXIT_BAD_CONFIG = 2


def dist_env(environ=None) -> Dict[str, object]:
    """rank, world_size, local_rank, master_addr, master_port from torchrun or SLURM variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT")
    return {"rank": rank, "world_size": world, "local_rank": local, "master_addr": addr,
            "master_port": None if port is None else int(port)}


def _resolve_port(env: Dict[str, object]) -> int:
    if env["master_port"] is not None:
        return int(env["master_port"])
    if int(env["world_size"]) > 1:
        raise ValueError(
            "MASTER_PORT is not set for a multi-process launch: use torchrun, slurm/launcher.sh, "
            "or export MASTER_ADDR and MASTER_PORT"
        )
    with socket.socket() as s:  # single process: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_plan(cfg, world_size: int) -> str:
    """Human-readable parallel plan: group sizes, micro-batching, pipeline split, per-block layouts."""
    from osp_megatron.skiparse import block_schedule
    from osp_megatron.training.flops import forward_flops

    p = cfg.parallel
    dims = cfg.model.resolve()
    tp, pp, ssp, uly = p.tensor_parallel, p.pipeline_parallel, p.ssp, p.ulysses
    cp = ssp * uly
    dp = world_size // (tp * pp * cp)
    mbs = cfg.data.micro_batch_size
    gbs = cfg.train.global_batch_size or mbs * dp
    nmb = gbs // (mbs * dp)
    layouts = block_schedule(dims.num_layers, cfg.model.schedule, dims.num_full_blocks)
    per_stage = dims.num_layers // pp
    sched = "no pipelining (forward_backward_no_pipelining)" if pp == 1 else \
        f"1F1B (forward_backward_pipelining_without_interleaving), {nmb} micro-batches over {pp} stages"
    lines = [
        f"world size {world_size} = TP {tp} x CP {cp} (SSP {ssp} x Ulysses {uly}) x DP {dp} x PP {pp}",
        f"global batch {gbs} = micro-batch {mbs} x DP {dp} x {nmb} accumulation step(s)",
        f"pipeline schedule: {sched}",
        f"sequence parallel: {p.sequence_parallel}, distributed optimizer: {p.distributed_optimizer}, "
        f"recompute: {cfg.model.recompute}",
        f"model {cfg.model.size}: {dims.num_layers} blocks, hidden {dims.hidden_size}, "
        f"{dims.num_attention_heads} heads, schedule {cfg.model.schedule} "
        f"({sum(k == 'full' for k in layouts)} full), P={cfg.model.sparse_ratio}",
        "blocks (index: layout):",
    ]
    for s in range(pp):
        chunk = layouts[s * per_stage : (s + 1) * per_stage]
        items = ", ".join(f"{s * per_stage + i}:{k}" for i, k in enumerate(chunk))
        lines.append(f"  stage {s}: {items}")
    b = cfg.data.buckets[0]
    if cfg.data.kind == "synthetic":
        shape = list(cfg.data.synthetic_latent_shape)
    else:
        shape = [dims.in_channels, (b.frames - 1) // 4 + 1, b.height // 8, b.width // 8]
    padded = cp > 1 or (p.sequence_parallel and tp > 1)  # layout-native plans run sparse blocks padded
    f = forward_flops(cfg.model, shape, cfg.data.text_len, padded)
    full_recompute = cfg.model.recompute == "full"
    lines.append(
        f"per sample (latents {shape}): {int(f['tokens'])} tokens"
        + (f" ({int(f['tokens_padded'])} in the padded Skiparse layout)" if padded and cfg.model.schedule != "full" else "")
        + ", "
        f"forward {f['total'] / 1e12:.3f} TFLOP, training {(4 if full_recompute else 3) * f['total'] / 1e12:.3f} "
        f"TFLOP executed{' (with full recompute)' if full_recompute else ''}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="osp-train",
        description="Flow-matching training of OSP-Next / Wan2.1 DiTs on megatron-core (run under torchrun or srun).",
        epilog="Exit codes: 0 done, 1 error, 2 invalid config, 3 checkpointed after SIGTERM/SIGUSR1 (requeue), "
               "4 too many non-finite steps in a row. Every config key: osp-train --help-config.",
    )
    ap.add_argument("config", nargs="?", help="YAML recipe or preset name (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 parallel.ssp=2")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate (inputs included), print the resolved config and the parallel plan, and exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="with --dry-run: plan for this many processes (default: the launched world size)")
    ap.add_argument("--help-config", action="store_true", help="print every config key (type, default, meaning)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from osp_megatron.config import ConfigError, load_config
    from osp_megatron.config.reference import config_reference

    if args.help_config:
        print(config_reference())
        return 0
    if args.config is None:
        ap.error("the config argument is required (a YAML file or a preset name)")
    try:
        env = dist_env()
        if args.world_size is not None:
            if not args.dry_run:
                raise ValueError("--world-size is only for --dry-run; launch N processes with torchrun/srun instead")
            if args.world_size < 1:
                raise ValueError(f"--world-size {args.world_size}: must be >= 1")
            env["world_size"] = args.world_size
        cfg = load_config(args.config, args.overrides)
        cfg.validate(world_size=env["world_size"], check_paths=args.dry_run)
    except (ConfigError, ValueError) as exc:
        print(f"osp-train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.dry_run:
        if env["rank"] == 0:
            print("# resolved config")
            print(cfg.to_yaml())
            print("# parallel plan")
            print(parallel_plan(cfg, env["world_size"]))
        return 0
    try:
        env["master_port"] = _resolve_port(env)
    except ValueError as exc:
        print(f"osp-train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run(cfg, env)


def run(cfg, env: Dict[str, object]) -> int:
    """Initialise torch.distributed, train, tear down. Returns the exit code."""
    import torch
    import torch.distributed as dist

    faulthandler.enable()
    import warnings

    # megatron's start-up notices (TE/Apex fallbacks, deprecations) repeat on every rank; keep the console readable
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    rank = env["rank"]
    os.environ.setdefault("MASTER_ADDR", str(env["master_addr"]))
    os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(env["local_rank"] % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, rank=rank, world_size=env["world_size"],
        init_method=f"tcp://{env['master_addr']}:{env['master_port']}",
        timeout=datetime.timedelta(minutes=int(os.environ.get("OSP_DIST_TIMEOUT_MIN", "30"))),
    )
    from osp_megatron.training.trainer import Trainer

    trainer = None
    code = 1
    try:
        trainer = Trainer(cfg, device)
        trainer.setup()
        code = trainer.train()
    except Exception as exc:  # noqa: BLE001 - surface every rank's error with its id
        print(f"[rank {rank}] osp-train failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc()
        code = 1
    finally:
        if trainer is not None:
            try:
                trainer.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        if code == 1:
            sys.stdout.flush()
            sys.stderr.flush()
            # a failed rank cannot rely on peers for a clean collective shutdown
            os._exit(1)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    return code


if __name__ == "__main__":  # guard: megatron's checkpoint writer spawns processes that re-import __main__
    sys.exit(main())
