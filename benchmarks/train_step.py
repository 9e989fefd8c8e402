"""Training-step throughput: OSP-Next-1.3B (dual_end, P=2) vs dense Wan-1.3B, one GPU, same run.

    python benchmarks/train_step.py [--steps 10] [--warmup 3] [--res 480p,720p] [--recompute none,selective,full]
                                    [--ablate-compile] [--ablate-padding-free] [--label NAME]
                                    [--precision bf16,fp8_current,fp8_delayed,te,te:fp8_delayed,...]
                                    [--offload 2,4]

Each model is built by the real trainer (`osp_megatron.training.trainer.DiffusionTrainer`: megatron DDP, distributed
AdamW, bf16, the no-pipelining schedule) from configs/osp_1_3b_480p.yaml with synthetic latents
(81x480x832 -> [16,21,60,104]; 720p -> [16,21,90,160], full recompute only), once per `--recompute` mode
(`model.recompute`: none, selective = elementwise outputs recomputed in backward, full = each block's forward
again; a mode that runs out of memory is reported as such). `--ablate-compile` also runs each model without
the compiled elementwise pieces (fused.set_compile(False): op-by-op eager) at the first mode. `--ablate-padding-free`
also runs OSP-Next with `model.padding_free=false` (sparse blocks on the padded Skiparse grid) at every mode, next
to the default packed sparse blocks (rows `... padding-free vs padded`). One fixed micro-batch is
reused so data generation stays out of the timing; step time is the median of the timed steps (CUDA events).
Reports samples/s and the OSP-Next speedup, executed TFLOP/s (explicit formula in
osp_megatron/training/flops.py: the work the placement runs, padding of padded sparse blocks and recompute
included), MFU (model FLOPs: the real tokens only, no recompute) against the bf16 matmul peak measured in the same
run (_common.matmul_peak_tflops),
and the peak memory of each model (setup, warm-up and timed steps). JSON ->
benchmarks/results/train_step[-<label>]-<device>-<date>.json (`train_step-smoke-...` for --smoke). Padding-free
sparse blocks (the default on one device) execute no padding; `--ablate-padding-free` rows count it.
`--precision` runs each model once per precision: bf16, the native FP8 recipes of our linears (fp8_current,
fp8_delayed: E4M3 forward, E5M2 gradients, torch._scaled_mm GEMMs), the TE spec in bf16 (`te`) and with TE's FP8
recipes (`te:fp8_delayed`, `te:fp8_current`, `te:fp8_block`); attention itself stays bf16 in every variant.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, add_out_dir, free_memory, free_port, matmul_peak_tflops, peak_memory_gib,  # noqa: E402
                     peak_row, print_table, row, time_fn, write_results)

RESOLUTIONS = {"480p": ([16, 21, 60, 104], False), "720p": ([16, 21, 90, 160], True)}
MODELS = {"osp_next_1_3b": "dual_end", "wan_dense_1_3b": "full"}
PADDED = "osp_next_1_3b_padded"  # --ablate-padding-free: OSP-Next with model.padding_free=false
MODEL_OVERRIDES = {PADDED: ["model.padding_free=false"]}
# --precision: bf16 (the default), the native FP8 recipes in our linears (torch._scaled_mm), and the TE spec in
# bf16 and with TransformerEngine's FP8 recipes (needs TE: tools/install_te.sh)
PRECISIONS = {
    "bf16": [],
    "fp8_current": ["precision.recipe=fp8_current"],
    "fp8_delayed": ["precision.recipe=fp8_delayed"],
    "te": ["model.spec=te"],
    "te:fp8_delayed": ["model.spec=te", "precision.recipe=fp8_delayed"],
    "te:fp8_current": ["model.spec=te", "precision.recipe=fp8_current"],
    "te:fp8_block": ["model.spec=te", "precision.recipe=fp8_block"],
}


def bench_model(name: str, schedule: str, latent: List[int], recompute: str, steps: int, warmup: int,
                device, extra=(), compiled: bool = True) -> Dict[str, float]:
    from megatron.core import parallel_state

    from osp_megatron.config import load_config
    from osp_megatron.models import fused
    from osp_megatron.training.trainer import DiffusionTrainer

    compile_default = fused.compile_enabled()

    free_memory(device)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "osp_1_3b_480p.yaml", [
            f"model.schedule={schedule}", f"model.recompute={recompute}",
            "data.kind=synthetic", f"data.synthetic_latent_shape={latent}", "data.num_workers=0",
            "data.micro_batch_size=1", "train.global_batch_size=1", "train.ema_decay=0", "train.sample_interval=0",
            "train.init_from=''", "train.resume=false", f"train.run_dir={run_dir}", "tracking.backend=none",
            "parallel.overlap_grad_reduce=false", *extra,
        ])
        cfg.validate(world_size=1)
        trainer = DiffusionTrainer(cfg, device, log=lambda s: None)
        fused.set_compile(compiled)
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
            fused.set_compile(compile_default)
            trainer.close()
            del trainer
            parallel_state.destroy_model_parallel()
            free_memory(device)
    mem = "-" if out["max_mem_gib"] is None else f"{out['max_mem_gib']:.1f}"
    print(f"  {name:18s} {out['step_time_s'] * 1e3:9.1f} ms/step  {out['samples_per_s']:.3f} samples/s  "
          f"{out['tflops_exec']:.1f} TFLOP/s executed  {mem} GiB", flush=True)
    return out


def result_rows(got: Dict[str, Optional[Dict[str, float]]], tag: str, peak: float,
                base: Optional[Dict[str, Optional[Dict[str, float]]]] = None, base_tag: str = "") -> List[Dict[str, object]]:
    """Rows of one (resolution, recompute mode, compile) run of both models; `base`: the same models without
    recompute (speed kept by the mode, `ratio` = base step time / this step time)."""
    rows = []
    osp, dense, padded = got.get("osp_next_1_3b"), got.get("wan_dense_1_3b"), got.get(PADDED)
    if osp and dense:
        rows.append(row(f"osp_next_1_3b {tag} samples/s", osp["samples_per_s"], "samples/s",
                        f"wan_dense_1_3b {tag}", dense["samples_per_s"], ">= 1.65 (480p)"))
    if osp and padded:
        rows.append(row(f"osp_next_1_3b {tag} padding-free vs padded step time", osp["step_time_s"], "s",
                        f"{PADDED} {tag}", padded["step_time_s"], higher_is_better=False,
                        memory_gib=osp["max_mem_gib"], baseline_memory_gib=padded["max_mem_gib"]))
    for name, r in got.items():
        if r is None:
            rows.append(row(f"{name} {tag}", None, "out of memory"))
            continue
        rows.append(row(f"{name} {tag} executed TFLOP/s", r["tflops_exec"], "TFLOP/s", "measured matmul peak (same run)",
                        peak))
        rows.append(row(f"{name} {tag} MFU", r["tflops_model"] / peak, "fraction", goal=">= 0.57 (of the measured peak)"))
        rows.append(row(f"{name} {tag} step time", r["step_time_s"], "s"))
        rows.append(row(f"{name} {tag} tokens/s", r["tokens_per_s"], "tokens/s"))
        rows.append(row(f"{name} {tag} peak memory", r["max_mem_gib"], "GiB", goal="<= 70 (micro-batch 1)",
                        higher_is_better=False))
        b = (base or {}).get(name)
        if b and b is not r:
            rows.append(row(f"{name} {tag} step time vs {base_tag}", r["step_time_s"], "s", f"{name} {base_tag}",
                            b["step_time_s"], ">= 0.95 with <= 70 GiB", higher_is_better=False,
                            memory_gib=r["max_mem_gib"], baseline_memory_gib=b["max_mem_gib"]))
    return rows


def offload_rows(got: Dict[str, Optional[Dict[str, float]]], tag: str) -> List[Dict[str, object]]:
    """`osp_next_1_3b+offloadN <tag> step time vs no offload`, with both peaks."""
    rows, base = [], got.get("osp_next_1_3b")
    for name, r in got.items():
        if name.startswith("osp_next_1_3b+offload") and r and base:
            rows.append(row(f"{name} {tag} step time vs no offload", r["step_time_s"], "s", f"osp_next_1_3b {tag}",
                            base["step_time_s"], ">= 0.95 with <= 70 GiB", higher_is_better=False,
                            memory_gib=r["max_mem_gib"], baseline_memory_gib=base["max_mem_gib"]))
    return rows


def precision_rows(got: Dict[str, Optional[Dict[str, float]]], tag: str) -> List[Dict[str, object]]:
    """`<model>+<precision> <tag> step time vs bf16`: the same model in bf16 (local spec) as the baseline."""
    rows = []
    for name, r in got.items():
        model_name, _, precision = name.partition("+")
        base = got.get(model_name)
        if precision in PRECISIONS and r and base:
            rows.append(row(f"{name} {tag} step time vs bf16", r["step_time_s"], "s", f"{model_name} {tag} (bf16)",
                            base["step_time_s"], "informational (FP8 GEMMs; attention stays bf16)",
                            higher_is_better=False, memory_gib=r["max_mem_gib"],
                            baseline_memory_gib=base["max_mem_gib"], loss_last=r["loss_last"],
                            baseline_loss_last=base["loss_last"]))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    ap.add_argument("--res", default="480p,720p", help="comma list of 480p, 720p (720p: full recompute only)")
    ap.add_argument("--recompute", default="none,selective,full", help="comma list of model.recompute modes")
    ap.add_argument("--ablate-compile", action="store_true",
                    help="also run each model without the compiled elementwise pieces (first mode only)")
    ap.add_argument("--ablate-padding-free", action="store_true",
                    help="also run OSP-Next with model.padding_free=false (padded sparse blocks) at every mode")
    ap.add_argument("--label", default="", help="appended to the result name: train_step-<label>-<device>-<date>")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--offload", default="",
                    help="comma list of model.offload_blocks values: OSP-Next also runs with the first N blocks' "
                         "activations offloaded to host at every mode (rows `... offload N vs no offload`)")
    ap.add_argument("--precision", default="bf16",
                    help="comma list of " + ", ".join(PRECISIONS) + " (each model runs once per entry; rows "
                         "`<model>+<precision> <mode> step time vs bf16` compare with the bf16 run)")
    add_out_dir(ap)
    ap.add_argument("--smoke", action="store_true",
                    help="logic check on any device: tiny model, tiny latents, fp32 (numbers are meaningless)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.recompute.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("none", "selective", "full")]
    models = {m.strip(): MODELS[m.strip()] for m in args.models.split(",") if m.strip() in MODELS}
    offloads = [int(n) for n in args.offload.split(",") if n.strip()]
    if offloads and "osp_next_1_3b" in models:
        for n in offloads:
            models[f"osp_next_1_3b+offload{n}"] = MODELS["osp_next_1_3b"]
            MODEL_OVERRIDES[f"osp_next_1_3b+offload{n}"] = [f"model.offload_blocks={n}"]
    if args.ablate_padding_free and "osp_next_1_3b" in models:
        models = {"osp_next_1_3b": models.pop("osp_next_1_3b"), PADDED: MODELS["osp_next_1_3b"], **models}
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if bad or not modes or not models or not precisions or set(precisions) - set(PRECISIONS):
        ap.error("--recompute: a comma list of none, selective, full; --models: of " + ", ".join(MODELS)
                 + "; --precision: of " + ", ".join(PRECISIONS))
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
    raw: Dict[str, Dict] = {}
    failed: List[Dict[str, object]] = []

    def run(res, latent, mode, compiled):
        tag = f"{res}+{mode}" + ("" if compiled else "+eager")
        print(f"{tag} latents {latent}:", flush=True)
        got: Dict[str, Optional[Dict[str, float]]] = {}
        for model_name, schedule in models.items():
            for precision in precisions:
                name = model_name if precision == "bf16" else f"{model_name}+{precision}"
                try:
                    got[name] = bench_model(name, schedule, latent, mode, args.steps, args.warmup, device,
                                            [*extra, *MODEL_OVERRIDES.get(model_name, []), *PRECISIONS[precision]],
                                            compiled=compiled)
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"  {name}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                    got[name] = None
                except Exception as exc:  # noqa: BLE001 - e.g. a TE variant without TE: reported, the rest runs
                    if precision == "bf16" and not args.smoke:
                        raise
                    traceback.print_exc()
                    failed.append(row(f"{name} {tag}: failed", None, f"{type(exc).__name__}: {str(exc)[:200]}"))
                free_memory(device)
        raw[tag] = got
        return tag, got

    for res in [r.strip() for r in args.res.split(",") if r.strip()]:
        latent, full_only = resolutions[res]
        res_modes = ["full"] if full_only else modes
        base_tag, base = None, None
        for i, mode in enumerate(res_modes):
            tag, got = run(res, latent, mode, True)
            if mode == "none":
                base_tag, base = tag, got
            results.extend(result_rows(got, tag, peak, base, base_tag or ""))
            results.extend(precision_rows(got, tag))
            results.extend(offload_rows(got, tag))
            if args.ablate_compile and i == 0:
                tag, got = run(res, latent, mode, False)
                results.extend(result_rows(got, tag, peak, raw[f"{res}+{mode}"], f"{res}+{mode}"))
    results.extend(failed)
    shapes = {res: {"latents": resolutions[res][0], "full_recompute_only": resolutions[res][1]} for res in resolutions}
    shapes.update(micro_batch=1, text_len=8 if args.smoke else 512)
    name = "train_step-smoke" if args.smoke else "train_step"
    if args.label:
        name += f"-{args.label}"
    path = write_results(name, results,
                         {"config": "configs/osp_1_3b_480p.yaml", "models": models, "raw": raw}, shapes=shapes,
                         out_dir=args.out_dir, device=device, argv=argv)
    print(f"\nwrote {path}\n")
    print_table(results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
