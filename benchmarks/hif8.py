"""HiF8 benchmark: quantize-kernel throughput, HiF8 linear vs bf16 linear, SNR vs FP8 E4M3/E5M2.

    python benchmarks/hif8.py                 # CUDA GPU: 14B shapes (75,600 tokens), Triton kernels
    python benchmarks/hif8.py --cpu-smoke     # any machine: tiny shapes, torch path (checks the script)

Prints a table and writes benchmarks/results/hif8-<device>-<date>.json (`hif8-smoke-...` for --cpu-smoke; rows:
name, value, unit, baseline, baseline_value, ratio, goal; ratio is "higher is better", baseline measured in the
same run).

1. Quantize throughput (bf16 [tokens, 5120] in and out) vs `dst.copy_(src)` of the same bytes, each timed over
   10 back-to-back calls (as in a training step, where the host runs ahead; `--sweep` adds launch shapes):
   - `qdq one-pass (known scale, records amax)`: the delayed-scaling kernel, 1 read + 1 write like the copy
     (goal >= 0.8 of copy throughput);
   - `qdq current scaling (amax + qdq)`: amax kernel then qdq kernel; 2 reads + 1 write, so 2/3 of a copy is
     its bandwidth bound (reported against the same goal, for the record);
   - `amax`: the reduction alone, vs a copy.
2. HiF8 linear forward+backward (HiF8CurrentScaling: x, W, dy quantized; bf16 GEMMs) vs the bf16 linear
   (`F.linear` fwd+bwd) at 5120->5120, 5120->13824, 13824->5120 with 75,600 tokens (goal: <= 1.2x bf16 time,
   i.e. ratio >= 0.833).
3. SNR (dB, 10 log10 |x|^2 / |x - q(x)|^2) of per-tensor scaled HiF8 (amax -> 15 forward / 224 backward, as
   OSP-Next) vs per-tensor scaled FP8 E4M3 (amax -> 448) and E5M2 (amax -> 57344) (torch float8 casts, RNE),
   on activations, weights and gradients captured from the tiny OSP-Next DiT (random init, one flow-matching
   step; hooks on every linear) plus heavy-tailed synthetic tensors shaped like 14B activations. ratio = error
   power of FP8 / error power of HiF8. Also the fraction of non-zero elements flushed to zero by each format
   (gradients additionally with HiF8 amax -> 15).
4. Native FP8 (no TransformerEngine): one 1.3B-width DiT block (Wan2.1 1.3B dims, full attention, 81x480x832
   latents = 32,760 tokens, bf16) fwd+bwd under precision.recipe=fp8_current and fp8_delayed (GEMMs through
   `torch._scaled_mm`, E4M3 forward / E5M2 gradients) vs the same block in bf16, plus the step's TFLOP/s (GEMM
   FLOPs only: 6 x tokens x linear params, both runs). --cpu-smoke runs the tiny block on the fake-quant path.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out_dir, print_table, row, time_fn, write_results  # noqa: E402
from osp_megatron.quant import hif8_kernels as K  # noqa: E402
from osp_megatron.quant.modules import hif8_linear  # noqa: E402
from osp_megatron.quant.recipes import HiF8CurrentScaling, autocast  # noqa: E402

SHAPES_14B = [(5120, 5120), (5120, 13824), (13824, 5120)]
TOKENS_14B = 75_600


# ------------------------------------------------------------------------------------------------
def timeit(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, chain: int = 1) -> float:
    """Median seconds per call (time_fn: CUDA events on a CUDA device, `chain` back-to-back calls per timing)."""
    return time_fn(fn, warmup, iters, cuda=device.type == "cuda", chain=chain) / 1e3


def bench_quantize(device, tokens, hidden, warmup, iters, sweep=False) -> List[Dict[str, object]]:
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()  # read + write
    scale = torch.tensor(15.0 / 4.0, device=device)
    chain = 10 if device.type == "cuda" else 1
    tm = lambda fn: timeit(fn, device, warmup, iters, chain)  # noqa: E731
    t_copy = tm(lambda: dst.copy_(x))
    t_one = tm(lambda: K.qdq_with_scale(x, scale, record_amax=True))
    t_cur = tm(lambda: K.qdq_current(x, 15.0))
    t_amax = tm(lambda: K.hif8_amax(x))
    gbs = lambda t, b=nbytes: b / t / 1e9  # noqa: E731
    shape = f"bf16 [{tokens},{hidden}] {K.LAUNCH['qdq']}"
    cfg = K.LAUNCH["qdq"]
    rows = [
        row(f"qdq one-pass (known scale, records amax) {shape}", gbs(t_one), "GB/s", "d2d copy", gbs(t_copy),
            ">= 0.8"),
        row(f"qdq current scaling (amax + qdq) {shape}", gbs(t_cur), "GB/s", "d2d copy", gbs(t_copy),
            ">= 0.8 (bandwidth bound 0.67: 2 reads + 1 write)"),
        row(f"amax reduction {shape} (read only)", gbs(t_amax, nbytes / 2), "GB/s", "d2d copy", gbs(t_copy),
            "report", ratio=t_copy / t_amax),
    ]
    if sweep and device.type == "cuda":  # launch shapes and variants of the one-pass kernel, for the record
        default = dict(cfg)
        try:
            for block, warps in ((1024, 4), (1024, 8), (2048, 4), (2048, 8)):
                for prefetch in (False, True):
                    for stream in (False, True):
                        for per_sm in (4, 8, 16):
                            K.LAUNCH["qdq"] = dict(block=block, warps=warps, per_sm=per_sm, prefetch=prefetch,
                                                   stream=stream)
                            t = tm(lambda: K.qdq_with_scale(x, scale, record_amax=True))
                            t_c = tm(lambda: dst.copy_(x))  # copy re-timed beside each variant
                            rows.append(row(f"sweep qdq one-pass {K.LAUNCH['qdq']}", gbs(t), "GB/s", "d2d copy",
                                            gbs(t_c), "report"))
        finally:
            K.LAUNCH["qdq"] = default
    return rows


def bench_linear(device, tokens, shapes, warmup, iters) -> List[Dict[str, object]]:
    rows = []
    recipe = HiF8CurrentScaling()
    for k, n in shapes:
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
        dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16) * 1e-3

        def plain():
            y = torch.nn.functional.linear(x, w)
            y.backward(dy)
            x.grad = w.grad = None

        def quant():
            with autocast(recipe=recipe):
                y = hif8_linear(x, w, key="bench")
            y.backward(dy)
            x.grad = w.grad = None

        t_bf16 = timeit(plain, device, warmup, iters)
        t_hif8 = timeit(quant, device, warmup, iters)
        flops = 3 * 2 * tokens * k * n
        rows.append(row(f"HiF8 linear fwd+bwd {k}->{n} x {tokens} tokens", t_hif8 * 1e3, "ms", "bf16 linear fwd+bwd",
                        t_bf16 * 1e3, ">= 0.833 (<= 1.2x bf16)", higher_is_better=False))
        rows.append(row(f"HiF8 linear TFLOP/s {k}->{n}", flops / t_hif8 / 1e12, "TFLOP/s", "bf16 linear",
                        flops / t_bf16 / 1e12, "report"))
        del x, w, dy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
def snr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    x, q = x.double(), q.double()
    err = (x - q).pow(2).sum().item()
    sig = x.pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(sig / err)


def fp8_qdq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    xf = x.float()
    amax = xf.abs().max().clamp_min(1e-30)
    scale = fmax / amax
    return (xf * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def capture_model_tensors(device) -> Dict[str, List[torch.Tensor]]:
    """Inputs, weights and output-grads of every linear of the tiny DiT after one flow-matching fwd+bwd."""
    from osp_megatron.config import load_config
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState

    cfg = load_config(None, ["data.kind=synthetic", "model.size=tiny", "model.schedule=full", "precision.dtype=fp32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, device=device)
    got: Dict[str, List[torch.Tensor]] = {"activations": [], "weights": [], "gradients": []}
    hooks = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and "Linear" in type(m).__name__:
            got["weights"].append(w.detach().clone())
            hooks.append(m.register_forward_hook(lambda mod, inp, out: got["activations"].append(inp[0].detach().clone())))
            hooks.append(m.register_full_backward_hook(
                lambda mod, gin, gout: got["gradients"].append(gout[0].detach().clone()) if gout[0] is not None else None))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 2, 16, 16, generator=g).to(device)
    text = torch.randn(2, 8, 32, generator=g).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.tensor([0.3, 0.7], device=device)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    loss = torch.nn.functional.mse_loss(model(xt, t * 1000, text), eps - x0)
    with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients": expected here
        warnings.simplefilter("ignore", UserWarning)
        loss.backward()
    for h in hooks:
        h.remove()
    return got


def synthetic_tensors(device, tokens, hidden) -> Dict[str, List[torch.Tensor]]:
    """Heavy-tailed stand-ins: Student-t(3) activations with outlier channels, N(0, 0.02) weights,
    gradients whose per-token scale spans 4 decades."""
    g = torch.Generator(device="cpu").manual_seed(5)
    t3 = torch.distributions.StudentT(3.0)
    act = t3.sample((tokens, hidden))
    act[:, torch.randperm(hidden, generator=g)[:8]] *= 30.0
    w = torch.randn(hidden, hidden, generator=g) * 0.02
    grad = torch.randn(tokens, hidden, generator=g) * torch.pow(10.0, -4 * torch.rand(tokens, 1, generator=g)) * 1e-3
    return {"activations": [act.to(device)], "weights": [w.to(device)], "gradients": [grad.to(device)]}


def flushed(x: torch.Tensor, q: torch.Tensor) -> float:
    """Fraction of the non-zero elements of x that quantize to zero."""
    nz = x != 0
    return ((q == 0) & nz).sum().item() / max(nz.sum().item(), 1)


def bench_snr(device, sources: Dict[str, Dict[str, List[torch.Tensor]]]) -> List[Dict[str, object]]:
    rows = []
    fp8 = (("E4M3", torch.float8_e4m3fn), ("E5M2", torch.float8_e5m2))
    for source, groups in sources.items():
        for kind, tensors in groups.items():
            if not tensors:
                continue
            targets = (224.0, 15.0) if kind == "gradients" else (15.0,)
            base = {fmt: [fp8_qdq(t, dtype) for t in tensors] for fmt, dtype in fp8}
            b_snr = {fmt: sum(snr_db(t, q) for t, q in zip(tensors, qs)) / len(tensors) for fmt, qs in base.items()}
            for scale_max in targets:
                hq = [K.qdq_current(t.float(), scale_max)[0] for t in tensors]
                h = sum(snr_db(t, q) for t, q in zip(tensors, hq)) / len(tensors)
                tag = f"{source} {kind} ({len(tensors)} tensors), HiF8 amax->{scale_max:g}"
                for fmt, _ in fp8:
                    rows.append(row(f"SNR {tag}", h, "dB", f"FP8 {fmt} per-tensor", b_snr[fmt], "report",
                                    ratio=10 ** ((h - b_snr[fmt]) / 10)))  # error power FP8 / HiF8
                hf = sum(flushed(t, q) for t, q in zip(tensors, hq)) / len(tensors)
                for fmt, _ in fp8:
                    bf = sum(flushed(t, q) for t, q in zip(tensors, base[fmt])) / len(tensors)
                    rows.append(row(f"flushed-to-zero fraction {tag}", hf, "fraction", f"FP8 {fmt} per-tensor", bf,
                                    "report (ratio: kept fraction HiF8 / FP8)", ratio=(1 - hf) / (1 - bf)))
    return rows


# ------------------------------------------------------------------------------------------------
def bench_fp8_block(device, warmup, iters, smoke: bool) -> List[Dict[str, object]]:
    """bf16 vs native FP8 (current, delayed) fwd+bwd of one DiT block at 1.3B width (tiny on --cpu-smoke)."""
    from osp_megatron.config import load_config
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState
    from osp_megatron.quant.modules import assign_hif8_keys
    from osp_megatron.quant.recipes import recipe_from_config

    size, latents = ("tiny", (1, 16, 2, 16, 16)) if smoke else ("wan_1_3b", (1, 16, 21, 60, 104))
    dtype = "fp32" if smoke else "bf16"
    rows = []
    for name in ("fp8_current", "fp8_delayed"):
        cfg = load_config(None, ["data.kind=synthetic", f"model.size={size}", "model.schedule=full",
                                 "model.num_layers=1", f"precision.dtype={dtype}", f"precision.recipe={name}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, device=device)
        assign_hif8_keys(model)
        recipe = recipe_from_config(cfg.precision, cfg.model.spec)
        wdt = next(model.parameters()).dtype
        x = torch.randn(*latents, device=device, dtype=wdt)
        text = torch.randn(1, 512 if not smoke else 8, model.config.text_dim, device=device, dtype=wdt)
        t = torch.tensor([500.0], device=device)
        target = torch.randn_like(x)

        def step(quantized: bool):
            with autocast(enabled=quantized, recipe=recipe):
                loss = model(x, t, text, target=target)
            loss.backward()
            model.zero_grad(set_to_none=True)

        t_bf16 = timeit(lambda: step(False), device, warmup, iters)
        t_fp8 = timeit(lambda: step(True), device, warmup, iters)
        tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
        block = model.blocks[0]
        linear_params = sum(m.weight.numel() for m in block.modules()
                            if "Linear" in type(m).__name__ and getattr(m, "weight", None) is not None)
        flops = 6 * tokens * linear_params
        base = f"{'tiny' if smoke else '1.3B-width'} block"
        rows.append(row(f"FP8 native {name} {base} fwd+bwd ({tokens} tokens)", t_fp8 * 1e3, "ms",
                        f"bf16 {base} fwd+bwd", t_bf16 * 1e3, "report (FP8 GEMMs ~2x bf16 on H100/H200)",
                        higher_is_better=False))
        rows.append(row(f"FP8 native {name} {base} GEMM TFLOP/s", flops / t_fp8 / 1e12, "TFLOP/s",
                        f"bf16 {base}", flops / t_bf16 / 1e12, "report"))
        del model, x, text, target
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--tokens", type=int, default=TOKENS_14B)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    add_out_dir(ap)
    ap.add_argument("--sweep", action="store_true", help="also time the one-pass kernel over launch shapes")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.iters < 1 or args.warmup < 0:
        ap.error("--tokens and --iters must be >= 1, --warmup >= 0")

    if args.cpu_smoke:
        device = torch.device("cpu")
        tokens, shapes, hidden, iters, warmup = 256, [(64, 64), (64, 128), (128, 64)], 64, 3, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
            return 2
        if not K.HAVE_TRITON:
            print("triton is not importable: the GPU path needs it (it ships with CUDA torch)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        tokens, shapes, hidden, iters, warmup = args.tokens, SHAPES_14B, 5120, args.iters, args.warmup

    results = []
    results += bench_quantize(device, tokens, hidden, warmup, iters, args.sweep)
    results += bench_linear(device, tokens, shapes, warmup, iters)
    sources = {}
    try:
        sources["tiny-DiT"] = capture_model_tensors(device)
    except Exception as exc:  # keep the kernel/linear numbers even if the model cannot be built here
        print(f"warning: could not capture tensors from the tiny DiT ({type(exc).__name__}: {exc}); "
              "SNR rows use synthetic tensors only", file=sys.stderr)
    sources["synthetic"] = synthetic_tensors(device, min(tokens, 8192), min(hidden, 5120))
    results += bench_snr(device, sources)
    results += bench_fp8_block(device, warmup, iters, args.cpu_smoke)

    shape_info = {"tokens": tokens, "hidden": hidden, "linear_shapes": [list(s) for s in shapes], "dtype": "bf16",
                  "qdq_launch": dict(K.LAUNCH["qdq"])}
    path = write_results("hif8-smoke" if args.cpu_smoke else "hif8", results, shapes=shape_info, out_dir=args.out_dir,
                         device=device, argv=argv)
    print(f"wrote {path}\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
