"""Training-step throughput: OSP-Next-1.3B (dual_end, P=2) vs dense Wan-1.3B, one GPU, same run.

    python benchmarks/train_step.py [--steps 10] [--warmup 3] [--res 480p,720p]

Each model is built by the real trainer (`osp_megatron.training.trainer.DiffusionTrainer`: megatron DDP, distributed
AdamW, bf16, the no-pipelining schedule) from configs/osp_1_3b_480p.yaml with synthetic latents
(81x480x832 -> [16,21,60,104], without recompute, falling back to full activation recompute for both
models if either runs out of memory; 720p -> [16,21,90,160] with recompute). One fixed micro-batch is
reused so data generation stays out of the timing; step time is the median of the timed steps (CUDA events).
Reports samples/s and the OSP-Next speedup, executed TFLOP/s (explicit formula in
osp_megatron/training/flops.py, sparse attention counted as executed incl. padding, recompute included), MFU
(model FLOPs, no recompute) against the bf16 matmul peak measured in the same run (_common.matmul_peak_tflops),
and the peak memory of each model (setup, warm-up and timed steps). JSON ->
benchmarks/results/train_step-<device>-<date>.json (`train_step-smoke-...` for --smoke).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, add_out_dir, free_memory, free_port, matmul_peak_tflops, peak_memory_gib,  # noqa: E402
                     peak_row, print_table, row, time_fn, write_results)

RESOLUTIONS = {"480p": ([16, 21, 60, 104], False), "720p": ([16, 21, 90, 160], True)}
MODELS = {"osp_next_1_3b": "dual_end", "wan_dense_1_3b": "full"}


def bench_model(name: str, schedule: str, latent: List[int], recompute: bool, steps: int, warmup: int,
                device, extra=()) -> Dict[str, float]:
    from megatron.core import parallel_state

    from osp_megatron.config import load_config
    from osp_megatron.training.trainer import DiffusionTrainer

    free_memory(device)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "osp_1_3b_480p.yaml", [
            f"model.schedule={schedule}", f"model.recompute={str(recompute).lower()}",
            "data.kind=synthetic", f"data.synthetic_latent_shape={latent}", "data.num_workers=0",
            "data.micro_batch_size=1", "train.global_batch_size=1", "train.ema_decay=0", "train.sample_interval=0",
            "train.init_from=''", "train.resume=false", f"train.run_dir={run_dir}", "tracking.backend=none",
            "parallel.overlap_grad_reduce=false", *extra,
        ])
        cfg.validate(world_size=1)
        trainer = DiffusionTrainer(cfg, device, log=lambda s: None)
        try:
            trainer.setup()
            micro = trainer.next_microbatches(1)
            per_step = []
            dt = time_fn(lambda: per_step.append(trainer.run_step(micro)), warmup, steps,
                         cuda=device.type == "cuda") / 1e3
            flops_exec, flops_model, tokens, samples = trainer._work(micro)
            out = {
                "step_time_s": dt,
                "samples_per_s": samples / dt,
                "tokens_per_s": tokens / dt,
                "tflops_exec": flops_exec / dt / 1e12,
                "tflops_model": flops_model / dt / 1e12,
                "loss_last": per_step[-1]["loss"],
                "max_mem_gib": peak_memory_gib(device),
            }
        finally:
            trainer.close()
            del trainer
            parallel_state.destroy_model_parallel()
            free_memory(device)
    mem = "-" if out["max_mem_gib"] is None else f"{out['max_mem_gib']:.1f}"
    print(f"  {name:18s} {out['step_time_s'] * 1e3:9.1f} ms/step  {out['samples_per_s']:.3f} samples/s  "
          f"{out['tflops_exec']:.1f} TFLOP/s executed  {mem} GiB", flush=True)
    return out


def result_rows(got: Dict[str, Optional[Dict[str, float]]], tag: str, peak: float) -> List[Dict[str, object]]:
    rows = []
    osp, dense = got["osp_next_1_3b"], got["wan_dense_1_3b"]
    if osp and dense:
        rows.append(row(f"osp_next_1_3b {tag} samples/s", osp["samples_per_s"], "samples/s",
                        f"wan_dense_1_3b {tag}", dense["samples_per_s"],
                        "speedup close to the block benchmark's composed figure"))
    for name, r in got.items():
        if r is None:
            rows.append(row(f"{name} {tag}", None, "out of memory"))
            continue
        rows.append(row(f"{name} {tag} executed TFLOP/s", r["tflops_exec"], "TFLOP/s", "measured matmul peak (same run)",
                        peak, ">= 440 TFLOP/s on H100 and >= 0.57 of the measured peak"))
        rows.append(row(f"{name} {tag} model TFLOP/s", r["tflops_model"], "TFLOP/s", "measured matmul peak (same run)",
                        peak, "ratio = MFU"))
        rows.append(row(f"{name} {tag} MFU", r["tflops_model"] / peak, "fraction", goal=">= 0.57 (of the measured peak)"))
        rows.append(row(f"{name} {tag} step time", r["step_time_s"], "s"))
        rows.append(row(f"{name} {tag} tokens/s", r["tokens_per_s"], "tokens/s"))
        rows.append(row(f"{name} {tag} peak memory", r["max_mem_gib"], "GiB", goal="<= 70 (micro-batch 1)",
                        higher_is_better=False))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    ap.add_argument("--res", default="480p,720p", help="comma list of 480p, 720p (720p uses recompute)")
    add_out_dir(ap)
    ap.add_argument("--smoke", action="store_true",
                    help="logic check on any device: tiny model, tiny latents, fp32 (numbers are meaningless)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("train_step.py needs a CUDA GPU (use --smoke for a CPU logic check)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from osp_megatron import cpu_shims

    cpu_shims.apply()
    extra: List[str] = []
    resolutions = dict(RESOLUTIONS)
    if args.smoke:
        extra = ["model.size=tiny", "model.num_full_blocks=4", "precision.dtype=fp32", "data.text_len=8"]
        resolutions = {"480p": ([16, 2, 8, 8], False), "720p": ([16, 2, 12, 16], True)}

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=0, world_size=1)
    peak = matmul_peak_tflops(device)
    print(f"matmul peak (measured): {peak:.2f} TFLOP/s", flush=True)
    results: List[Dict[str, object]] = [peak_row(peak, device)]
    for res in [r.strip() for r in args.res.split(",") if r.strip()]:
        latent, needs_recompute = resolutions[res]
        # without recompute first (unless the resolution needs it); if either model runs out of memory, both
        # models are measured again with full activation recompute so the pair stays comparable
        for recompute in ([True] if needs_recompute else [False, True]):
            print(f"{res} latents {latent}{' (recompute)' if recompute else ''}:", flush=True)
            got: Dict[str, Optional[Dict[str, float]]] = {}
            for name, schedule in MODELS.items():
                try:
                    got[name] = bench_model(name, schedule, latent, recompute, args.steps, args.warmup, device,
                                            extra)
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"  {name}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                    got[name] = None
                free_memory(device)
            results.extend(result_rows(got, f"{res}{'+recompute' if recompute else ''}", peak))
            if all(v is not None for v in got.values()):
                break
    shapes = {res: {"latents": resolutions[res][0], "recompute_only": resolutions[res][1]} for res in resolutions}
    shapes.update(micro_batch=1, text_len=8 if args.smoke else 512)
    path = write_results("train_step-smoke" if args.smoke else "train_step", results,
                         {"config": "configs/osp_1_3b_480p.yaml", "models": MODELS}, shapes=shapes,
                         out_dir=args.out_dir, device=device, argv=argv)
    print(f"\nwrote {path}\n")
    print_table(results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
