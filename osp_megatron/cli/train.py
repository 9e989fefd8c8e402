"""`osp-train CONFIG [key=value ...] [--dry-run]`: flow-matching training of an OSP-Next / Wan DiT.

Launch with torchrun (`torchrun --nproc_per_node N -m osp_megatron.cli.train CONFIG` or the `osp-train`
script with `--no-python`), with srun (RANK/WORLD_SIZE from SLURM_PROCID/SLURM_NTASKS, see
slurm/launcher.sh), or plainly for one process. Backend: nccl with CUDA, gloo on CPU.
The config is validated against the world size before any process group starts.

Exit codes: 0 done, 1 error, 2 invalid config/arguments, 3 stopped by SIGTERM/SIGUSR1/SIGINT after a checkpoint
(requeue to continue), 4 stopped after train.max_nonfinite_steps non-finite steps in a row.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from osp_megatron.config import ConfigError, load_config
from osp_megatron.config.reference import config_reference
from osp_megatron.diffusion.flow_matching import FlowMatching
from osp_megatron.launch import EXIT_BAD_CONFIG, DistEnv, run_trainer
from osp_megatron.skiparse import block_schedule
from osp_megatron.training.flops import forward_flops, packed_plan
from osp_megatron.training.trainer import DiffusionTrainer


def parallel_plan(cfg, world_size: int) -> str:
    """Human-readable parallel plan: group sizes, micro-batching, pipeline split, per-block layouts."""
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
    packed = packed_plan(cfg.model.padding_free, padded)
    f = forward_flops(cfg.model, shape, cfg.data.text_len, padded, packed)
    full_recompute = cfg.model.recompute == "full"
    lines.append(
        f"per sample (latents {shape}): {int(f['tokens'])} tokens"
        + (f" ({int(f['tokens_padded'])} in the padded Skiparse layout)" if padded and not packed
           and cfg.model.schedule != "full" else "")
        + ", "
        f"forward {f['total'] / 1e12:.3f} TFLOP, training {(4 if full_recompute else 3) * f['total'] / 1e12:.3f} "
        f"TFLOP executed{' (with full recompute)' if full_recompute else ''}"
    )
    return "\n".join(lines)


def shift_plan(cfg) -> str:
    """The training timestep shift each bucket resolves to (dynamic shift: per bucket; static: one value)."""
    t, dims = cfg.train, cfg.model.resolve()
    flow = FlowMatching.from_train_config(t, dims.patch_size)
    rule = (f"dynamic, {t.shift_rule} tokens: {t.base_seq_len} -> {t.base_shift}, {t.max_seq_len} -> {t.max_shift}"
            if t.dynamic_shift else "static")
    lines = [f"timestep shift ({rule}):"]
    if cfg.data.kind == "synthetic":
        shapes = [("synthetic", list(cfg.data.synthetic_latent_shape))]
    else:
        shapes = [(f"{b.frames}x{b.height}x{b.width}", [dims.in_channels, (b.frames - 1) // 4 + 1, b.height // 8,
                                                        b.width // 8]) for b in cfg.data.buckets]
    for name, shape in shapes:
        lines.append(f"  {name} (latents {shape}): shift {flow.shift_for(shape):.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="osp-train",
        description="Flow-matching training of OSP-Next / Wan2.1 DiTs on megatron-core (run under torchrun or srun).",
        epilog="Exit codes: 0 done, 1 error, 2 invalid config, 3 checkpointed after SIGTERM/SIGUSR1/SIGINT (requeue), "
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
    if args.help_config:
        print(config_reference())
        return 0
    if args.config is None:
        ap.error("the config argument is required (a YAML file or a preset name)")
    try:
        env = DistEnv.for_command(args.world_size, args.dry_run)
        cfg = load_config(args.config, args.overrides)
        cfg.validate(world_size=env.world_size, check_paths=args.dry_run)
        if not args.dry_run:
            env = env.with_port()
    except (ConfigError, ValueError) as exc:  # LaunchError is a ValueError
        print(f"osp-train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.dry_run:
        if env.is_main:
            print("# resolved config")
            print(cfg.to_yaml())
            print("# parallel plan")
            print(parallel_plan(cfg, env.world_size))
            print(shift_plan(cfg))
        return 0
    return run(cfg, env)


def run(cfg, env: DistEnv) -> int:
    """Initialise torch.distributed, train, tear down. Returns the exit code."""
    return run_trainer("osp-train", env, lambda device: DiffusionTrainer(cfg, device),
                       timeout_minutes=cfg.parallel.timeout_minutes, start=DiffusionTrainer.setup)


if __name__ == "__main__":  # guard: megatron's checkpoint writer spawns processes that re-import __main__
    sys.exit(main())
