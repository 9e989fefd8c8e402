"""GRPO iteration cost: OSP-Next's recipe (SDE window 10 of 25), MixGRPO (4 of 25), MixGRPO-Flash, and an
all-steps-SDE baseline (DanceGRPO style).

One command; the methods run in the same process on the same model size, group size and prompts:
    python benchmarks/grpo.py                      # wan_1_3b on the GPU (bf16), 17 frames 480x832 latents
    python benchmarks/grpo.py --size tiny          # tiny model on CPU (checks the script)
Per method: wall time of one GRPO iteration (rollouts + reward + PPO updates, after warm-up) and model evaluations
(NFE) per iteration. Baseline (DanceGRPO style): SDE on steps 0..23 of 25 (the last is ODE), 14 of them trained at
random (int(24 x 0.6)), constant noise 0.3. MixGRPO: SDE window 0..3 (Flow-GRPO noise 0.7), 4 trained, Euler
elsewhere. Flash: the same window, then DPM-Solver++ (2M) on the compressed grid (ratio 0.4: 7 steps).
OSP-Next (`grpo.recipe: osp-next`): SDE on steps 0..9 (noise std = sigma), all 10 trained, Euler after, unshifted
grid, CFG 5 in rollouts and in the trained forward (the unconditional branch without gradient).
Also reported: MixGRPO with its window late in a run (steps 11..14), where the 11 Euler steps before the window are
run once per group (all members share the initial noise).
Goals: MixGRPO <= 55% of the baseline's time, Flash <= 40% (the MixGRPO paper reports ~52% and ~38%).
Cost model: per sample 25 rollout forwards + k trained steps x c forward-equivalents. With a frozen base (LoRA)
c is ~2 without recompute (forward + input-gradient backward) and ~3 with full recompute (MixGRPO's full-parameter
runs with checkpointing have c ~4), so the MixGRPO/baseline ratio (25+4c)/(25+14c) is ~0.62 without and ~0.55 with
recompute; Flash (11+4c)/(25+14c) is ~0.36 / ~0.34. `--recompute auto` (default) turns it on for GPU sizes.
The reward here is the brightness of a fixed latent->RGB preview (cheap, identical for all methods); a VAE decode
and a large reward model add the same constant to every method and move the ratios towards 1.

Iteration time is the median over the timed iterations. Prints a table and writes
benchmarks/results/grpo-<device>-<date>.json (`grpo-smoke-...` for the tiny model).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out_dir, free_memory, peak_memory_gib, print_table, row, time_fn, write_results  # noqa: E402

SIZES = {
    # latent [T, H, W]: 17 frames x 480 x 832 after the Wan VAE; text 512 x 4096 (umT5) as random embeddings
    "wan_1_3b": dict(latent=[5, 60, 104], text_len=512, group=4, prompts=1, batch=2, dtype="bf16"),
    "tiny": dict(latent=[1, 8, 8], text_len=16, group=8, prompts=2, batch=8, dtype="fp32"),
}


def methods(steps: int) -> Dict[str, Dict]:
    base = dict(steps=steps, shift=3.0)
    return {
        "dancegrpo_all_sde": dict(base, noise_level="dance_grpo", eta=0.3,
                                  window=dict(strategy="fixed", start=0, size=steps - 1, limit=steps - 1,
                                              trained_steps=int((steps - 1) * 0.6), trained_select="random")),
        "mixgrpo": dict(base, noise_level="flow_grpo", eta=0.7,
                        window=dict(strategy="progressive", size=4, shift_interval=25, stride=1)),
        "mixgrpo_flash": dict(base, noise_level="flow_grpo", eta=0.7,
                              window=dict(strategy="progressive", size=4, shift_interval=20, stride=1),
                              flash=dict(enabled=True, compression=0.4, order=2)),
        # OSP-Next's Mix-GRPO as released (grpo.recipe: osp-next): SDE on steps 0..9 of 25 (fixed), every one
        # trained, sigma noise, CFG 5 with the unconditional branch in rollouts and training
        "osp_next": dict(recipe="osp-next", steps=steps),
        # where MixGRPO's progressive window sits late in a run (start 11 at iteration 275 of 300): the 11 steps
        # before it are identical within a group (same initial noise) and run once per group
        "mixgrpo_window11": dict(base, noise_level="flow_grpo", eta=0.7,
                                 window=dict(strategy="fixed", start=11, size=4)),
    }


def run_method(name: str, over: Dict, size: str, spec: Dict, args, device) -> Dict[str, float]:
    from osp_megatron.config import Config
    from osp_megatron.config import GRPOConfig, parse_section
    from osp_megatron.rl.trainer import GRPOTrainer

    cfg = Config()
    cfg.data.kind = "synthetic"
    cfg.model.size = size
    cfg.model.schedule = args.schedule
    full = args.recompute == "on" or (args.recompute == "auto" and size != "tiny")
    cfg.model.recompute = "full" if full else "none"
    cfg.precision.dtype = spec["dtype"]
    cfg.train.run_dir = str(Path(args.run_dir) / name)
    cfg.tracking.backend = "none"
    g = dict(iterations=args.warmup + args.iters, group_size=args.group or spec["group"],
             prompts_per_iteration=args.prompts or spec["prompts"], rollout_batch=args.batch or spec["batch"],
             train_batch=args.batch or spec["batch"], lr=1e-5, latent_shape=spec["latent"], text_len=spec["text_len"],
             prompts=["a red fox running through snow", "a city street at night"], eval_interval=0, save_interval=0,
             lora=dict(rank=32, alpha=64), rewards=[dict(name="brightness")])
    g.update(over)
    cfg.train.seed = 0  # the trainer seeds the base model's init from it: the same model for every method
    trainer = GRPOTrainer(cfg, parse_section(GRPOConfig, g), device=device)
    seen: List[Dict[str, float]] = []

    def iteration():
        m = trainer.run_step()
        seen.append(m)
        i = len(seen) - 1
        print(f"  {name} iteration {i}{' (warm-up)' if i < args.warmup else ''}: rollout {m['time/rollout_s']:.2f} s, "
              f"train {m['time/train_s']:.2f} s, NFE {int(m['nfe/nfe_per_iteration'])}", flush=True)

    ms = time_fn(iteration, warmup=args.warmup, iters=args.iters, cuda=device.type == "cuda")
    timed = seen[args.warmup:]
    out = {"time": ms / 1e3, "nfe": timed[-1]["nfe/nfe_per_iteration"], "nfe_sample": timed[-1]["nfe/nfe_per_sample"],
           "rollout": sum(m["time/rollout_s"] for m in timed) / len(timed),
           "train": sum(m["time/train_s"] for m in timed) / len(timed), "peak_gib": peak_memory_gib(device)}
    trainer.close()
    del trainer, seen
    free_memory(device)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="wan_1_3b (GPU default) or tiny (CPU)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per method")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--group", type=int, default=0, help="samples per prompt (default per size)")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per iteration (default per size)")
    ap.add_argument("--batch", type=int, default=0, help="rollout/train micro-batch (default per size)")
    ap.add_argument("--schedule", default="dual_end", choices=["full", "dual_end", "uniform"])
    ap.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                    help="full activation recompute in the training forward (auto: on for GPU sizes, as in MixGRPO's "
                         "runs, which use activation checkpointing; off for tiny)")
    ap.add_argument("--run-dir", default="/tmp/osp_grpo_bench")
    ap.add_argument("--methods", default="",
                    help="comma-separated subset of the methods (default: all); the baseline always runs")
    add_out_dir(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    size = args.size or ("wan_1_3b" if cuda else "tiny")
    if size != "tiny" and not cuda:
        print(f"--size {size} needs a CUDA GPU; use --size tiny on CPU", file=sys.stderr)
        return 2
    if args.iters < 1 or args.warmup < 0 or args.steps < 6:
        ap.error("--iters >= 1, --warmup >= 0, --steps >= 6")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    spec = SIZES[size]
    free_memory(device)
    res = {}
    chosen = methods(args.steps)
    if args.methods:
        wanted = {"dancegrpo_all_sde", *[m.strip() for m in args.methods.split(",") if m.strip()]}
        unknown = wanted - set(chosen)
        if unknown:
            ap.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    for name, over in chosen.items():
        res[name] = run_method(name, over, size, spec, args, device)

    base = res["dancegrpo_all_sde"]
    goals = {"dancegrpo_all_sde": "baseline", "mixgrpo": "<= 55% of baseline time (ratio >= 1.82)",
             "mixgrpo_flash": "<= 40% of baseline time (ratio >= 2.5)",
             "osp_next": "informational: OSP-Next's recipe (window 10 of 25, CFG 5: two forwards per step)",
             "mixgrpo_window11": "informational: late window, pre-window steps shared per group"}
    rows = []
    for name, r in res.items():
        rows.append(row(f"{name}/time_per_iteration", r["time"], "s", "dancegrpo_all_sde/time_per_iteration",
                        base["time"], goals[name], higher_is_better=False, peak_memory_gib=r["peak_gib"]))
        rows.append(row(f"{name}/nfe_per_iteration", r["nfe"], "NFE", "dancegrpo_all_sde/nfe_per_iteration",
                        base["nfe"], "fewer model evaluations", higher_is_better=False))
        rows.append(row(f"{name}/time_fraction_of_baseline", r["time"] / base["time"], "fraction", "dancegrpo_all_sde",
                        1.0, goals[name], higher_is_better=False))
    print(f"\nsize {size}, {args.steps} steps, G={args.group or spec['group']}, recompute {args.recompute}, device "
          f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}")
    print(f"{'method':<20} {'s/iter':>9} {'rollout s':>10} {'train s':>9} {'NFE/iter':>9} {'NFE/sample':>11} "
          f"{'vs base':>8}")
    for name, r in res.items():
        print(f"{name:<20} {r['time']:>9.3f} {r['rollout']:>10.3f} {r['train']:>9.3f} {int(r['nfe']):>9d} "
              f"{int(r['nfe_sample']):>11d} {r['time'] / base['time']:>8.1%}")
    shapes = {"latent": spec["latent"], "text_len": spec["text_len"], "group": args.group or spec["group"],
              "prompts": args.prompts or spec["prompts"], "batch": args.batch or spec["batch"], "steps": args.steps,
              "dtype": spec["dtype"]}
    path = write_results("grpo-smoke" if size == "tiny" else "grpo", rows,
                         {"size": size, "recompute": args.recompute, "details": res}, shapes=shapes,
                         out_dir=args.out_dir, device=device, argv=argv)
    print(f"wrote {path}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
