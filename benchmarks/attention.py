"""Dense vs Skiparse-2D attention op at 81x720x1280 (grid 21x45x80), bf16, forward and forward+backward.

The Skiparse op includes the rearrangement in (raster -> token layout for q, k, v), the padding-free
per-class kernel, and the rearrangement out; the dense op is one SDPA call over the raster sequence.
Both use the same kernel backend (cuDNN/flash SDPA; the call fails rather than fall back to a masked
kernel). Executed TFLOP/s count only the attention actually computed (valid tokens of each class).

    python benchmarks/attention.py [--grid 21 45 80] [--heads 12 40] [--ratio 2]
"""
from __future__ import annotations

import argparse

import torch

from _common import add_out_dir, matmul_peak_tflops, peak_row, print_table, row, time_fn, write_results
from osp_megatron import skiparse
from osp_megatron.models.core_attention import dense_attention
from osp_megatron.skiparse import AttentionProblems, LayoutGeometry, SkiparseAttention, grouped_attention


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80])
    ap.add_argument("--heads", type=int, nargs="+", default=[12, 40])
    ap.add_argument("--ratio", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    add_out_dir(ap)
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    grid, p, d = tuple(args.grid), args.ratio, args.head_dim
    n = grid[0] * grid[1] * grid[2]
    peak = matmul_peak_tflops()
    dense_problems = AttentionProblems.from_positions(skiparse.positions(grid, p, "raster"), "full", torch.device(dev))
    token_problems = AttentionProblems.from_positions(skiparse.positions(grid, p, "token"), "sparse", torch.device(dev))
    padded_class_len = LayoutGeometry(grid, p).local_len("token")
    skiparse_attention = SkiparseAttention(dense_attention)
    counts = skiparse.valid_mask(grid, p, "token").sum(0).tolist()
    results = []
    for heads in args.heads:
        torch.manual_seed(0)
        q, k, v = (torch.randn(n, 1, heads, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        go = torch.randn(n, 1, heads, d, device=dev, dtype=dtype)

        def dense():
            return grouped_attention(q, k, v, dense_problems, dense_attention)

        def sparse():  # raster in, token-wise Skiparse attention, raster out (rearrangement fused into gathers)
            return skiparse_attention(q, k, v, grid, p, "token")

        def sparse_in_layout():  # the model's path: q/k/v already in the token layout (no rearrangement)
            return grouped_attention(qt, kt, vt, token_problems, dense_attention)

        with torch.no_grad():
            qt, kt, vt = (skiparse.to_layout(t, grid, p, "token") for t in (q, k, v))
            ref = skiparse.from_layout(sparse_in_layout(), grid, p, "token")
            err = ((sparse() - ref).float().norm() / ref.float().norm()).item()
        assert err < 1e-2, f"raster-op and layout-path Skiparse attention disagree: rel err {err}"
        qt, kt, vt = (t.detach().requires_grad_() for t in (qt, kt, vt))
        go_layout = skiparse.to_layout(go, grid, p, "token")

        flops_dense = 4 * n * n * heads * d
        flops_sparse = 4 * sum(c * c for c in counts) * heads * d
        for label, fn, fl in (("dense", dense, flops_dense), ("skiparse", sparse, flops_sparse),
                              ("skiparse_in_layout", sparse_in_layout, flops_sparse)):
            with torch.no_grad():
                t_f = time_fn(fn)
            t_fb = time_fn(lambda: (lambda o: o.backward(go if o.shape == go.shape else go_layout))(fn()))
            q.grad = k.grad = v.grad = qt.grad = kt.grad = vt.grad = None
            results.append((heads, label, t_f, t_fb, fl))
    rows = []
    ideal = n * n / (p * p * padded_class_len ** 2)
    for heads in args.heads:
        (_, _, df, dfb, dfl), (_, _, sf, sfb, sfl), (_, _, lf, lfb, _) = [r for r in results if r[0] == heads]
        rows.append(row(f"attention fwd speedup, {heads} heads", df / sf, "x", "dense SDPA", 1.0, f">= 3.4 (ideal padded {ideal:.2f})"))
        rows.append(row(f"attention fwd+bwd speedup, {heads} heads", dfb / sfb, "x", "dense SDPA", 1.0, f">= 3.4 (ideal padded {ideal:.2f})"))
        rows.append(row(f"in-layout (model path) fwd speedup, {heads} heads", df / lf, "x", "dense SDPA", 1.0, "report"))
        rows.append(row(f"in-layout (model path) fwd+bwd speedup, {heads} heads", dfb / lfb, "x", "dense SDPA", 1.0, "report"))
        rows.append(row(f"skiparse fwd ms, {heads} heads", sf, "ms", "dense fwd ms", df, higher_is_better=False))
        rows.append(row(f"skiparse fwd+bwd ms, {heads} heads", sfb, "ms", "dense fwd+bwd ms", dfb, higher_is_better=False))
        rows.append(row(f"skiparse fwd TFLOP/s executed, {heads} heads", sfl / sf / 1e9, "TFLOP/s", "dense fwd TFLOP/s", dfl / df / 1e9))
        rows.append(row(f"skiparse fwd+bwd TFLOP/s executed, {heads} heads", 3.5 * sfl / sfb / 1e9, "TFLOP/s",
                        "dense fwd+bwd TFLOP/s", 3.5 * dfl / dfb / 1e9))
    rows.append(peak_row(peak))
    shapes = {"grid": grid, "ratio": p, "head_dim": d, "heads": args.heads, "class_valid_tokens": counts, "tokens": n,
              "padded_class_len": padded_class_len, "dtype": str(dtype)}
    path = write_results("attention", rows, {"kernel_backend": "sdpa(cudnn|flash)" if dev == "cuda" else "sdpa(cpu)"},
                         shapes=shapes, out_dir=args.out_dir, argv=argv)
    print(f"wrote {path}")
    print_table(rows)


if __name__ == "__main__":
    main()
