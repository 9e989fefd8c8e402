"""One full / token / group DiT block at Wan-1.3B and Wan-14B widths on the 81x720P grid, composed into
the `dual_end` OSP-Next model vs the dense Wan model (forward and forward+backward, bf16, one GPU).

Sparse blocks are timed including their token<->group layout switch; the full blocks of the OSP-Next
model run on the padded token layout (valid tokens compacted for attention), the dense model's blocks
on the raster sequence. Composed times: OSP-Next = sum over its 40 (30) blocks, dense = L x dense block.

    python benchmarks/blocks.py [--sizes wan_14b wan_1_3b] [--grid 21 45 80]
"""
from __future__ import annotations

import argparse

import torch

from _common import add_out_dir, matmul_peak_tflops, peak_row, print_table, row, time_fn, write_results
from osp_megatron import cpu_shims
from osp_megatron.config import ModelConfig, PrecisionConfig
from osp_megatron.models.attention import SequenceContext
from osp_megatron.models.specs import get_block_spec
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState, TokenPlacement
from osp_megatron.skiparse import BlockStep, block_schedule
from megatron.core.transformer.spec_utils import build_module

GOALS = {"wan_14b": (">= 1.64", ">= 1.70"), "wan_1_3b": ("(probe 1.76)", "(probe 1.79)")}


def bench_size(size, grid, dev, dtype, parallel, text_len=512, tiny=False):
    mc = ModelConfig(size=size, schedule="full")
    if tiny:
        mc.num_layers = 8
    cfg = make_osp_config(mc, None, PrecisionConfig(dtype="bf16" if dtype == torch.bfloat16 else "fp32"), dtype)
    c, d = cfg.hidden_size, cfg.head_dim
    dense_plan = SequenceContext(TokenPlacement(grid, 2, ["full"], parallel, torch.device(dev)), d, cfg.rope_theta)
    sched = block_schedule(cfg.num_layers, "dual_end", 8 if not tiny else 4)
    sparse_plan = SequenceContext(TokenPlacement(grid, 2, sched, parallel, torch.device(dev)), d, cfg.rope_theta)
    n = grid[0] * grid[1] * grid[2]
    s_tok = sparse_plan.placement.local_len("token")
    torch.manual_seed(0)
    e = torch.randn(1, 6, c, device=dev, dtype=dtype) * 0.1
    text = torch.randn(text_len, 1, c, device=dev, dtype=dtype)
    x_dense = torch.randn(n, 1, c, device=dev, dtype=dtype, requires_grad=True)
    x_tok = torch.randn(s_tok, 4, c, device=dev, dtype=dtype, requires_grad=True)
    cases = {
        "dense": (x_dense, dense_plan, BlockStep("raster", None, "full")),
        "full_on_token_layout": (x_tok, sparse_plan, BlockStep("token", None, "full")),
        "token_with_switch": (x_tok, sparse_plan, BlockStep("token", "group", "sparse")),
        "group_with_switch": (x_tok, sparse_plan, BlockStep("group", "token", "sparse")),
        "token_no_switch": (x_tok, sparse_plan, BlockStep("token", None, "sparse")),
        "token_from_raster": (x_dense, sparse_plan, BlockStep("token", "raster", "sparse")),
        "raster_from_group": (x_tok, sparse_plan, BlockStep("raster", "group", "full")),
    }
    times = {}
    for name, (x, plan, step) in cases.items():
        kind = "full" if step.attention == "full" else step.layout
        block = build_module(get_block_spec(kind=kind, attention_backend=cfg.attention_backend), config=cfg,
                             layer_number=0, parallel=parallel, step=step).to(dev)
        with torch.no_grad():
            go = torch.randn_like(block(x, e, text, plan))
            f = time_fn(lambda: block(x, e, text, plan), warmup=2, iters=5)
        fb = time_fn(lambda: block(x, e, text, plan).backward(go), warmup=2, iters=5)
        times[name] = (f, fb)
        del block
        x.grad = None
    # compose the dual_end model: full blocks + first sparse block (no switch) + switching sparse blocks
    steps = sparse_plan.placement.steps
    comp = [0.0, 0.0]
    keys = {(None, "raster"): "dense", ("raster", "token"): "token_from_raster", ("group", "token"): "token_with_switch",
            ("token", "group"): "group_with_switch", ("group", "raster"): "raster_from_group",
            (None, "token"): "full_on_token_layout"}
    for st in steps:  # the single-device plan: full blocks on raster, sparse blocks in token/group
        key = keys[(st.switch_from, st.layout)]
        for i in range(2):
            comp[i] += times[key][i]
    dense = [cfg.num_layers * times["dense"][i] for i in range(2)]
    return cfg, times, comp, dense, n


def block_flops(cfg, n_tokens, attn_pairs, text_len=512):
    """Forward FLOPs of one block: QKVO + FFN + cross-attn projections + attention (4*pairs*C) + cross attention."""
    c, f = cfg.hidden_size, cfg.ffn_hidden_size
    linears = 2 * n_tokens * (4 * c * c + 2 * c * f + 2 * c * c) + 2 * text_len * 2 * c * c
    return linears + 4 * attn_pairs * c + 4 * n_tokens * text_len * c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["wan_14b", "wan_1_3b"])
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny widths (writes no JSON)")
    add_out_dir(ap)
    args = ap.parse_args(argv)
    cpu_shims.apply()
    parallel = ParallelState.single()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    grid = tuple(args.grid)
    peak = matmul_peak_tflops()
    rows, extra = [], {"blocks_ms": {},
                       "kernel_backend": "sdpa(cudnn|flash)" if dev == "cuda" else "sdpa(cpu)",
                       "fused_elementwise": "torch.compile" if dev == "cuda" else "eager"}
    for size in (["tiny"] if args.tiny else args.sizes):
        cfg, times, comp, dense, n = bench_size(size, grid, dev, dtype, parallel, tiny=args.tiny)
        extra["blocks_ms"][size] = {k: {"fwd": v[0], "fwd_bwd": v[1]} for k, v in times.items()}
        g_f, g_fb = GOALS.get(size, (None, None))
        rows.append(row(f"{size} dual_end model fwd speedup (composed)", dense[0] / comp[0], "x", "dense Wan", 1.0, g_f))
        rows.append(row(f"{size} dual_end model fwd+bwd speedup (composed)", dense[1] / comp[1], "x", "dense Wan", 1.0, g_fb))
        rows.append(row(f"{size} dual_end model fwd ms", comp[0], "ms", "dense fwd ms", dense[0], higher_is_better=False))
        rows.append(row(f"{size} dual_end model fwd+bwd ms", comp[1], "ms", "dense fwd+bwd ms", dense[1], higher_is_better=False))
        # overhead of layouts: a switching sparse block vs the same block without the switch
        sw = times["token_with_switch"][1] / times["token_no_switch"][1] - 1
        rows.append(row(f"{size} layout switch overhead per sparse block (fwd+bwd)", 100 * sw, "%", None, None, "< 3"))
        dense_fl = block_flops(cfg, n, n * n)
        rows.append(row(f"{size} dense block fwd+bwd TFLOP/s", 3 * dense_fl / times["dense"][1] / 1e9, "TFLOP/s",
                        "measured matmul peak", peak))
        print(f"{size}: " + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f} ms" for k, v in times.items()))
    rows.append(peak_row(peak))
    if not args.tiny:
        shapes = {"grid": grid, "batch": 1, "text_len": 512, "dtype": str(dtype)}
        print(f"wrote {write_results('blocks', rows, extra, shapes=shapes, out_dir=args.out_dir, argv=argv)}")
    print_table(rows)


if __name__ == "__main__":
    main()
