"""Dense attention kernels at the shapes the models run, forward and forward+backward, bf16, one GPU.

    python benchmarks/attention_kernels.py [--iters 5]

Each case is one kernel call as `grouped_attention` issues it: q/k/v `[B, S, heads, 128]` handed to SDPA as the
transposed `[B, heads, S, 128]` view (the model's layout). Cases: 1.3B 480P (12 heads) full blocks (B 1, S 32,760)
and token/group blocks (4 classes of 8,190 valid tokens); 14B 720P (40 heads) full (S 75,600) and sparse (2 classes
of 19,320 + 2 of 18,480). Kernels: SDPA's cuDNN and flash (FlashAttention-2 inside torch) backends, and the
flash-attn package (`flash_attn_func`, FA2/FA3 API, or FA4's `flash_attn.cute`) where it is importable. TFLOP/s
count 4*B*S^2*heads*d forward and 2.5x that for forward+backward.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_out_dir, print_table, row, time_fn, write_results  # noqa: E402

CASES = {  # name: (heads, [(B, S), ...])
    "1.3b 480p full": (12, [(1, 32760)]),
    "1.3b 480p sparse": (12, [(4, 8190)]),
    "14b 720p full": (40, [(1, 75600)]),
    "14b 720p sparse": (40, [(2, 19320), (2, 18480)]),
}


def sdpa_kernel_fn(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return fn


def kernels():
    from torch.nn.attention import SDPBackend

    out = {"cudnn": sdpa_kernel_fn(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa_kernel_fn(SDPBackend.FLASH_ATTENTION)}
    missing = {}
    for name, mod in (("flash_attn", "flash_attn"), ("flash_attn_4", "flash_attn.cute")):
        try:
            m = __import__(mod, fromlist=["flash_attn_func"])
            f = m.flash_attn_func
            out[name] = (lambda f: lambda q, k, v: (lambda o: o[0] if isinstance(o, tuple) else o)(f(q, k, v)))(f)
        except Exception as exc:  # noqa: BLE001 - reported as a row
            missing[name] = f"{type(exc).__name__}: {exc}"
    return out, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    add_out_dir(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    fns, missing = kernels()
    rows, raw = [], {}
    g = torch.Generator(device=dev).manual_seed(0)
    for case, (heads, problems) in CASES.items():
        tensors = []
        for b, s in problems:
            qkv = [torch.randn(b, s, heads, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3)]
            tensors.append((qkv, torch.randn(b, s, heads, 128, device=dev, dtype=torch.bfloat16, generator=g)))
        flop = sum(4 * b * s * s * heads * 128 for b, s in problems)
        ref = None
        times = {}
        for name, fn in fns.items():
            try:
                outs = [fn(*qkv).float() for qkv, _ in tensors]
                if ref is None:
                    ref = outs
                err = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))

                def fwd():
                    with torch.no_grad():
                        for qkv, _ in tensors:
                            fn(*qkv)

                def fwd_bwd():
                    for qkv, go in tensors:
                        torch.autograd.grad(fn(*qkv), qkv, go)

                f_ms = time_fn(fwd, 2, args.iters)
                fb_ms = time_fn(fwd_bwd, 2, args.iters)
                times[name] = {"fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "rel_err_vs_cudnn": err,
                               "fwd_tflops": flop / f_ms / 1e9, "fwd_bwd_tflops": 3.5 * flop / fb_ms / 1e9}
                print(f"  {case:18s} {name:12s} fwd {f_ms:8.2f} ms ({flop / f_ms / 1e9:5.0f} TFLOP/s)  fwd+bwd "
                      f"{fb_ms:8.2f} ms ({3.5 * flop / fb_ms / 1e9:5.0f} TFLOP/s)  err {err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run this shape is a row, not a crash
                times[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"  {case:18s} {name:12s} failed: {times[name]['error']}", flush=True)
        raw[case] = times
        base = times.get("cudnn", {})
        for name, t in times.items():
            if "error" in t:
                rows.append(row(f"{case} {name} fwd+bwd", None, "ms", error=t["error"]))
                continue
            rows.append(row(f"{case} {name} fwd", t["fwd_ms"], "ms", "cudnn", base.get("fwd_ms"), higher_is_better=False))
            rows.append(row(f"{case} {name} fwd+bwd", t["fwd_bwd_ms"], "ms", "cudnn", base.get("fwd_bwd_ms"),
                            higher_is_better=False, bwd_over_fwd=(t["fwd_bwd_ms"] - t["fwd_ms"]) / t["fwd_ms"]))
        del tensors
        torch.cuda.empty_cache()
    for name, why in missing.items():
        rows.append(row(f"{name} kernel", None, "not importable", error=why))
    path = write_results("attention_kernels", rows, {"raw": raw, "not_importable": missing},
                         shapes={k: {"heads": h, "problems": p, "head_dim": 128} for k, (h, p) in CASES.items()},
                         out_dir=args.out_dir, device=dev, argv=argv)
    print(f"\nwrote {path}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
