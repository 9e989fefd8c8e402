"""`osp-grpo CONFIG [key=value ...] [--dry-run]`: Mix-GRPO post-training (LoRA) of an OSP-Next / Wan DiT.

The `grpo:` section of CONFIG (see configs/grpo_*.yaml and osp_megatron/config/grpo.py) sets sampling, the SDE
window, group size, rewards and LoRA; model/parallel/precision/train/tracking/encoders are the usual sections
(`train.init_from` loads the base weights, `train.run_dir` holds checkpoints and the MLflow store).
Launch like osp-train: torchrun / srun for several processes (gloo on CPU, nccl with CUDA), or plainly.
`--dry-run` validates everything, prints the resolved config, the window schedule and NFE per iteration, and exits.

The run uses the shared trainer skeleton (`training.loop.Trainer`): the same progress line, tracker, stop-signal
handling and torch_dist checkpoints as osp-train. Exit codes: 0 done, 1 error, 2 invalid config/arguments,
3 stopped by SIGTERM/SIGUSR1 (or train.exit_after_steps) after a checkpoint (requeue: the next launch resumes from
`<run_dir>/grpo_checkpoints/latest`), 4 too many non-finite updates in a row.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import List, Optional, Sequence

import yaml

from osp_megatron.config import GRPO_SECTIONS, ConfigError, load_config
from osp_megatron.launch import EXIT_BAD_CONFIG, DistEnv, run_trainer
from osp_megatron.rl.rollout import make_plan
from osp_megatron.rl.trainer import GRPOTrainer
from osp_megatron.rl.windows import WindowSchedule, count_nfe, group_prefix_runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp-grpo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config with a grpo: section (e.g. configs/grpo_demo_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. grpo.lr=1e-4 grpo.window.size=3")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and plan, exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many processes (default: the launched world size)")
    return p


def resolve(config: str, overrides: Sequence[str], world_size: int = 1, check_paths: bool = False):
    """-> (Config, GRPOConfig), validated (GRPO reads prompts, not a dataset: the data section is not checked)."""
    cfg = load_config(config, overrides)
    cfg.validate(world_size, check_paths=check_paths, sections=GRPO_SECTIONS)
    problems = []
    if cfg.parallel.pipeline_parallel != 1:
        problems.append("parallel.pipeline_parallel must be 1 for osp-grpo (rollouts step the whole model); "
                        "use tensor_parallel / ssp / ulysses instead")
    if cfg.model.spec != "local":
        problems.append(f"model.spec={cfg.model.spec}: LoRA adapters wrap nn.Linear and megatron Column/Row linears; "
                        "use model.spec=local for osp-grpo")
    if cfg.parallel.sequence_parallel:
        problems.append("parallel.sequence_parallel=true is not supported by the LoRA adapters: set it false")
    p = cfg.parallel
    mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    n = cfg.grpo.prompts_per_iteration * cfg.grpo.group_size
    if world_size % mp == 0 and n % (world_size // mp):
        problems.append(f"grpo.prompts_per_iteration x grpo.group_size = {n} samples are not divisible by the "
                        f"data-parallel size {world_size // mp} (world {world_size} / TP x PP x CP {mp}): choose "
                        "them so that DP divides the product")
    if problems:
        raise ConfigError("invalid configuration for osp-grpo:\n  - " + "\n  - ".join(problems))
    return cfg, cfg.grpo


def plan_text(cfg, gcfg, world_size: int) -> str:
    """Window schedule, rollout plan and NFE per iteration, as printed by --dry-run."""

    sched = WindowSchedule.from_config(gcfg)
    p = cfg.parallel
    mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    dp = max(world_size // mp, 1)
    n = gcfg.prompts_per_iteration * gcfg.group_size
    lines = [f"world {world_size}: TP={p.tensor_parallel} CP={p.context_parallel} (SSP={p.ssp} x Ulysses={p.ulysses}) "
             f"DP={dp}; {n} samples/iteration ({gcfg.prompts_per_iteration} prompts x G={gcfg.group_size}), "
             f"{n // dp if n % dp == 0 else 'NOT DIVISIBLE'} per DP rank"]
    marks = sorted({0, 1, gcfg.window.shift_interval, gcfg.iterations // 2, gcfg.iterations - 1})
    for it in marks:
        if it < 0 or it >= gcfg.iterations:
            continue
        w = sched.window(it)
        plan = make_plan(gcfg.steps, gcfg.shift, w, sched.trained_steps(it), gcfg.noise_level, gcfg.eta,
                         gcfg.flash.enabled, gcfg.flash.compression, gcfg.flash.order,
                         gcfg.flash.min_points)
        shared = gcfg.init_same_noise and gcfg.share_prefix and w.start > 0 and n % dp == 0
        nfe = count_nfe(gcfg.steps, w, len(plan.trained), plan.count("dpm") if gcfg.flash.enabled else None,
                        gcfg.cfg_scale, gcfg.kl_beta > 0, n, group_prefix_runs(n, gcfg.group_size, dp) if shared else -1)
        kinds = "".join({"ode": "o", "sde": "S", "dpm": "d"}[k] for k in plan.kinds)
        lines.append(f"iteration {it}: window {f'{w.steps[0]}..{w.steps[-1]}' if w.steps else 'empty'} trained {list(plan.trained)} "
                     f"steps [{kinds}] NFE/sample {nfe.per_sample} NFE/iteration {nfe.per_iteration}")
    return "\n".join(lines)


def run(cfg, gcfg, env: DistEnv) -> int:
    """Build the trainer (process groups, base weights from `train.init_from`, LoRA, DDP, optimizer), resume or
    start, run the GRPO iterations, tear down. Returns the exit code."""
    return run_trainer("osp-grpo", env, lambda device: GRPOTrainer(cfg, gcfg, device=device),
                       timeout_minutes=cfg.parallel.timeout_minutes)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        env = DistEnv.for_command(args.world_size, args.dry_run)
        cfg, gcfg = resolve(args.config, args.overrides, env.world_size, check_paths=args.dry_run)
        if not args.dry_run:
            env = env.with_port()
    except (ConfigError, ValueError) as exc:
        print(f"osp-grpo: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.dry_run:
        out = {k: v for k, v in cfg.to_dict().items() if k in ("model", "parallel", "precision", "train", "tracking",
                                                              "encoders")}
        out["grpo"] = asdict(gcfg)
        print(yaml.safe_dump(out, sort_keys=False))
        print(plan_text(cfg, gcfg, env.world_size))
        return 0
    return run(cfg, gcfg, env)


if __name__ == "__main__":  # guard: megatron's checkpoint writer spawns processes that re-import __main__
    sys.exit(main())
