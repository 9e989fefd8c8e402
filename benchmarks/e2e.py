"""The whole model on one GPU: OSP-Next (dual_end, P=2, 8 full blocks) vs our dense Wan (schedule full) vs
diffusers' WanTransformer3DModel (random weights, the same dims, bf16, SDPA attention), same run.
Ablation variant `OSP-Next-padded` (in `--variants`): OSP-Next with `model.padding_free=false`, its sparse blocks on
the padded Skiparse grid instead of the packed real tokens (rows `OSP-Next vs OSP-Next-padded`).

    python benchmarks/e2e.py [--sizes 14b,1.3b] [--res 480p,720p] [--train 1.3b@480p] [--warmup 1] [--iters 3]
    python benchmarks/e2e.py --quick          # tiny model, small grid, fp32 (CPU; checks the script end to end)

Forward: one denoising forward `model(latents [b,16,T,H,W], timestep [b], text [b,512,4096])` at batch 1 and
at the CFG batch 2. Default cases: 14B 720P (81x720x1280 -> latents 21x90x160), 1.3B 480P (81x480x832 ->
21x60x104) and 1.3B 720P; `--sizes` / `--res` pick others (`--res` alone: both sizes). Each 14B variant holds
28 GB of bf16 weights; a 14B run takes about 7 minutes on one H200 at the defaults.
Train step: forward + MSE loss + backward + torch.optim.AdamW step on the bf16 parameters at batch 1 (default
1.3B 480P); the same plain optimizer for all three (no megatron DDP or distributed optimizer). With
`--recompute auto` a variant that runs out of memory makes all three run again with full activation recompute.
Ours is built through the public path (`load_config` + `build_model`, single process); OSP-Next and dense
compute their loss inside the model (`target=`, on each token in its final layout), diffusers on its output.
Diffusers keeps its `_keep_in_fp32_modules` in fp32, as `from_pretrained(torch_dtype=torch.bfloat16)` does.
Variants are built, timed and freed one at a time; peak memory is torch.cuda.max_memory_allocated from the end
of the build to the last timed call (weights included, construction transients not). MFU = model FLOPs of the
trainer's formula (osp_megatron/training/flops.py) / step time / the matmul peak measured in the same run.
Rows `<size> <res> forward [CFG batch 2] A vs B` and `<size> <res> train step A vs B` hold A's ms (value), B's
ms (baseline_value), ratio = B / A, and both peak memories (`memory_gib`, `baseline_memory_gib`).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_out_dir, free_memory, matmul_peak_tflops, peak_memory_gib, peak_row,  # noqa: E402
                     print_table, row, time_fn, write_results)

SIZES = {"14b": "wan_14b", "1.3b": "wan_1_3b", "tiny": "tiny"}
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280), "tiny": (5, 128, 128)}  # frames, height, width
DEFAULT_RES = {"14b": ["720p"], "1.3b": ["480p", "720p"]}
DEFAULT_CASES = [("14b", "720p"), ("1.3b", "480p"), ("1.3b", "720p")]
VARIANTS = ("OSP-Next", "dense", "diffusers", "OSP-Next-padded")
DEFAULT_VARIANTS = ("OSP-Next", "dense", "diffusers")
PAIRS = (("OSP-Next", "dense"), ("OSP-Next", "diffusers"), ("dense", "diffusers"), ("OSP-Next", "OSP-Next-padded"))
GOALS = {
    ("14b", "720p", "forward", "OSP-Next", "dense"): ">= 1.75",
    ("14b", "720p", "forward", "OSP-Next", "diffusers"): ">= 1.80",
    ("14b", "720p", "forward", "dense", "diffusers"): ">= 1.08",
    ("1.3b", "480p", "train step", "OSP-Next", "dense"): ">= 1.65",
    ("1.3b", "480p", "train step", "dense", "diffusers"): ">= 1.15 (fwd+bwd)",
}
TRAIN_GOALS = {("1.3b", "480p"): {"mfu": ">= 0.57", "memory": "<= 70 (micro-batch 1)"}}

Case = Tuple[str, str]  # (size, resolution)


def latent_shape(res: str) -> List[int]:
    """Wan VAE latents [16, T, H, W] of a pixel clip (4x in time after the first frame, 8x in space)."""
    frames, height, width = RESOLUTIONS[res]
    return [16, 1 + (frames - 1) // 4, height // 8, width // 8]


# ---------------------------------------------------------------------------------------------- models
def model_config(variant: str, size: str, recompute: bool = False, dtype: torch.dtype = torch.bfloat16):
    """Our Config for a variant (OSP-Next: dual_end, P=2, 8 full blocks; -padded: model.padding_free=false; dense:
    schedule full)."""
    from osp_megatron.config import load_config

    overrides = [f"model.size={SIZES[size]}", f"model.recompute={'full' if recompute else 'none'}", "data.kind=synthetic",
                 f"precision.dtype={'bf16' if dtype == torch.bfloat16 else 'fp32'}"]
    if variant.startswith("OSP-Next"):
        overrides += ["model.schedule=dual_end", "model.sparse_ratio=2",
                      f"model.num_full_blocks={4 if size == 'tiny' else 8}",
                      f"model.padding_free={'false' if variant == 'OSP-Next-padded' else 'null'}"]
    else:
        overrides += ["model.schedule=full"]
    return load_config(None, overrides)


def build(variant: str, size: str, device: torch.device, dtype: torch.dtype, recompute: bool = False):
    """The variant's model on `device` and its call `(x, t, text, target=None) -> velocity | loss`."""
    if variant == "diffusers":
        from diffusers import WanTransformer3DModel

        from osp_megatron.models.adapters.diffusers import diffusers_config

        cfg = diffusers_config(model_config("dense", size, dtype=dtype).model)
        cfg.pop("_class_name")
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        try:  # built in `dtype` on the device, then the dtypes from_pretrained(torch_dtype=dtype) leaves
            torch.set_default_dtype(dtype)
            with torch.device(device):
                model = WanTransformer3DModel.from_config(cfg)
        finally:
            torch.set_default_dtype(default)
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
        if recompute:
            model.enable_gradient_checkpointing()

        def call(x, t, text, target=None):
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            return out if target is None else F.mse_loss(out.float(), target.float())

        return model, call
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState

    torch.manual_seed(0)
    cfg = model_config(variant, size, recompute, dtype)
    model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, device=device)

    def call(x, t, text, target=None):
        return model(x, t, text) if target is None else model(x, t, text, target=target)

    return model, call


def inputs(size: str, res: str, batch: int, device, dtype, text_len: int):
    """Latents, timesteps, text embeddings and a velocity target, identical for every variant."""
    from osp_megatron.models.adapters.diffusers import diffusers_config

    text_dim = diffusers_config(model_config("dense", size).model)["text_dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *latent_shape(res), generator=g).to(device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    text = torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    return x, t, text, target


def measure(variant: str, fn: Callable[[], Dict], device) -> Dict:
    """Run one variant's measurement with its memory freed after it. Out of memory becomes
    {"error": "out of memory"}; any other failure is printed and becomes {"error": ..., "failed": True}, so the
    other variants still run (the script then exits with 1)."""
    free_memory(device)
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as exc:
        print(f"  {variant}: out of memory ({str(exc).splitlines()[0]})", flush=True)
        return {"error": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - reported, recorded, and turned into the exit code
        traceback.print_exc()
        print(f"  {variant}: failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}", "failed": True}
    finally:
        free_memory(device)


# ---------------------------------------------------------------------------------------------- runs
def run_forward(variant: str, case: Case, batches: List[int], args, device, dtype) -> Dict[int, Dict]:
    size, res = case

    def go():
        model, call = build(variant, size, device, dtype)
        model.eval()
        out = {}
        for b in batches:
            def one(b=b):
                x, t, text, _ = inputs(size, res, b, device, dtype, args.text_len)
                free_memory(device)  # the peak counter restarts with the weights resident
                with torch.no_grad():
                    ms = time_fn(lambda: call(x, t, text), args.warmup, args.iters)
                print(f"  {variant:9s} {size} {res} forward batch {b}: {ms:9.1f} ms  "
                      f"{_gib(peak_memory_gib(device))}", flush=True)
                return {"ms": ms, "memory_gib": peak_memory_gib(device)}

            out[b] = measure(f"{variant} batch {b}", one, device)
        return out

    got = measure(variant, go, device)
    return {b: got for b in batches} if "error" in got else got


def run_train(variant: str, case: Case, args, device, dtype, recompute: bool) -> Dict:
    size, res = case

    def go():
        model, call = build(variant, size, device, dtype, recompute)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=device.type == "cuda")
        x, t, text, target = inputs(size, res, 1, device, dtype, args.text_len)
        free_memory(device)

        def step():
            loss = call(x, t, text, target=target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = time_fn(step, args.warmup, args.iters)
        out = {"ms": ms, "memory_gib": peak_memory_gib(device)}
        print(f"  {variant:9s} {size} {res} train step{' (recompute)' if recompute else ''}: {ms:9.1f} ms  "
              f"{_gib(out['memory_gib'])}", flush=True)
        return out

    return measure(variant, go, device)


def _gib(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.1f} GiB"


# ---------------------------------------------------------------------------------------------- rows
def pair_rows(label: str, case: Case, kind: str, got: Dict[str, Dict], **fields) -> List[Dict]:
    rows = []
    for new, base in PAIRS:
        if new not in got or base not in got:
            continue
        a, b = got[new], got[base]
        err = "; ".join(f"{v}: {got[v]['error']}" for v in (new, base) if "error" in got[v]) or None
        rows.append(row(f"{label} {new} vs {base}", a.get("ms"), "ms", f"{base} ms", b.get("ms"),
                        GOALS.get((*case, kind, new, base)), higher_is_better=False,
                        memory_gib=a.get("memory_gib"), baseline_memory_gib=b.get("memory_gib"),
                        **({"error": err} if err else {}), **fields))
    return rows


def train_rows(case: Case, got: Dict[str, Dict], peak: float, text_len: int, recompute: bool) -> List[Dict]:
    from osp_megatron.training.flops import model_flops_per_sample

    size, res = case
    label = f"{size} {res} train step"
    rows = pair_rows(label, case, "train step", got, recompute=recompute)
    goals = TRAIN_GOALS.get(case, {})
    for variant, r in got.items():
        ours = variant != "diffusers"
        mc = model_config("OSP-Next" if variant.startswith("OSP-Next") else "dense", size).model
        flops = model_flops_per_sample(mc, latent_shape(res), text_len)
        mfu = flops / (r["ms"] * 1e-3) / 1e12 / peak if r.get("ms") else None
        rows.append(row(f"{label} MFU {variant}", mfu, "fraction", None, None,
                        goals.get("mfu") if ours else None, model_tflop_per_step=flops / 1e12, recompute=recompute))
        rows.append(row(f"{label} peak memory {variant}", r.get("memory_gib"), "GiB", None, None,
                        goals.get("memory") if ours else None, higher_is_better=False, recompute=recompute))
    return rows


# ---------------------------------------------------------------------------------------------- main
def parse_list(text: Optional[str], allowed, what: str) -> Optional[List[str]]:
    if text is None:
        return None
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"e2e.py: {what}={text!r}: use a comma list of {', '.join(allowed)}")
    return items


def parse_cases(args) -> Tuple[List[Case], List[Case]]:
    sizes = parse_list(args.sizes, ("14b", "1.3b"), "--sizes")
    res = parse_list(args.res, ("480p", "720p"), "--res")
    if sizes is None and res is None:
        forward = list(DEFAULT_CASES)
    else:
        forward = [(s, r) for s in (sizes or ["14b", "1.3b"]) for r in (res or DEFAULT_RES[s])]
    train = []
    for item in [s.strip().lower() for s in args.train.split(",") if s.strip() and s.strip().lower() != "none"]:
        size, _, r = item.partition("@")
        if size not in ("14b", "1.3b") or r not in ("480p", "720p"):
            raise SystemExit(f"e2e.py: --train {item!r}: use SIZE@RES with SIZE 14b|1.3b and RES 480p|720p, or none")
        if (sizes is None or size in sizes) and (res is None or r in res):
            train.append((size, r))
    return forward, train


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma list of 14b, 1.3b (default: 14b at 720p, 1.3b at 480p and 720p)")
    ap.add_argument("--res", default=None, help="comma list of 480p, 720p")
    ap.add_argument("--train", default="1.3b@480p", help="train-step cases SIZE@RES (comma list) or none")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma list of OSP-Next, dense, diffusers, OSP-Next-padded (ablation: model.padding_free=false)")
    ap.add_argument("--label", default="", help="appended to the result name: e2e[-cases]-<label>-<device>-<date>")
    ap.add_argument("--batches", default="1,2", help="forward batch sizes (2 = the CFG batch)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement (the first compiles)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--recompute", choices=["auto", "off", "on"], default="auto",
                    help="train step activation recompute (auto: off, on for all three if one runs out of memory)")
    ap.add_argument("--quick", action="store_true", help="tiny model, small grid, fp32 (CPU smoke of the script)")
    add_out_dir(ap)
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.text_len < 1:
        ap.error("--warmup >= 0, --iters >= 1, --text-len >= 1")
    by_lower = {v.lower(): v for v in VARIANTS}
    variants = [by_lower[v] for v in parse_list(args.variants, tuple(by_lower), "--variants")]
    batches = [int(b) for b in parse_list(args.batches, ("1", "2", "3", "4"), "--batches")]
    forward, train = parse_cases(args)
    cuda = torch.cuda.is_available()
    if args.quick:
        forward, train = [("tiny", "tiny")], [("tiny", "tiny")]
        args.text_len, dtype = 8, torch.float32
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    else:
        if not cuda:
            print("e2e.py needs a CUDA GPU for the real sizes; pass --quick for the CPU smoke run", file=sys.stderr)
            return 2
        dtype = torch.bfloat16
    if "diffusers" in variants:
        try:
            import diffusers  # noqa: F401
        except ImportError as exc:
            print(f"diffusers is not importable ({exc}): pip install 'diffusers>=0.35', or leave it out with "
                  "--variants OSP-Next,dense", file=sys.stderr)
            return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    peak = matmul_peak_tflops(device)
    print(f"matmul peak (measured): {peak:.1f} TFLOP/s; forward cases {forward}, train cases {train}, "
          f"variants {variants}", flush=True)

    rows: List[Dict] = []
    raw: Dict[str, Dict] = {"forward": {}, "train": {}}
    for case in forward:
        got = {v: run_forward(v, case, batches, args, device, dtype) for v in variants}
        for b in batches:
            label = f"{case[0]} {case[1]} forward" + ("" if b == 1 else f" CFG batch {b}" if b == 2 else f" batch {b}")
            rows += pair_rows(label, case, "forward", {v: got[v][b] for v in variants}, batch=b)
        raw["forward"][" ".join(case)] = {v: {str(b): got[v][b] for b in batches} for v in variants}
    for case in train:
        recompute = args.recompute == "on"
        got = {v: run_train(v, case, args, device, dtype, recompute) for v in variants}
        if args.recompute == "auto" and any(r.get("error") == "out of memory" for r in got.values()):
            print(f"  {' '.join(case)} train step: measuring all variants again with activation recompute", flush=True)
            recompute = True
            got = {v: run_train(v, case, args, device, dtype, recompute) for v in variants}
        rows += train_rows(case, got, peak, args.text_len, recompute)
        raw["train"][" ".join(case)] = {"recompute": recompute, **got}
    rows.append(peak_row(peak, device))

    default = not args.quick and args.sizes is None and args.res is None
    name = "e2e-smoke" if args.quick else "e2e" if default else "e2e-" + "_".join(
        "-".join(c) for c in dict.fromkeys(forward + train))
    if args.label:
        name += f"-{args.label}"
    shapes = {"latents": {" ".join(c): latent_shape(c[1]) for c in dict.fromkeys(forward + train)},
              "pixels": {c[1]: list(RESOLUTIONS[c[1]]) for c in forward + train}, "text_len": args.text_len,
              "forward_batches": batches, "train_batch": 1, "dtype": str(dtype)}
    extra = {
        "variants": {
            "OSP-Next": "ours, model.schedule=dual_end, sparse_ratio 2, 8 full blocks (tiny: 4), padding-free sparse "
                        "blocks (model.padding_free default)",
            "OSP-Next-padded": "the same with model.padding_free=false (sparse blocks on the padded grid)",
            "dense": "ours, model.schedule=full (dense Wan2.1)",
            "diffusers": "diffusers WanTransformer3DModel, random weights, SDPA attention, _keep_in_fp32_modules in fp32",
        },
        "optimizer": "torch.optim.AdamW(lr=1e-5, fused on CUDA) on the model's parameters; no megatron DDP, no "
                     "distributed optimizer, no fp32 master weights; the same for all three variants",
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median, CUDA events"},
        "raw": raw,
    }
    try:
        path = write_results(name, rows, extra, shapes=shapes, out_dir=args.out_dir, device=device, argv=argv)
        print(f"\nwrote {path}\n")
    except OSError:
        traceback.print_exc()
        print("could not write the result JSON (the table follows)", file=sys.stderr)
    print_table(rows)
    if _failed(raw):
        print("\nsome variants failed (tracebacks above; their rows carry the error)", file=sys.stderr)
        return 1
    return 0


def _failed(tree) -> bool:
    if isinstance(tree, dict):
        return bool(tree.get("failed")) or any(_failed(v) for v in tree.values())
    return False


if __name__ == "__main__":
    sys.exit(main())
