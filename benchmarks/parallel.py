"""Context parallelism on several GPUs: OSP-Next forward+backward with SSP vs Ulysses vs one GPU, same run.

    torchrun --nproc_per_node 2 benchmarks/parallel.py [--size wan_1_3b] [--grid 21 45 80]
    torchrun --nproc_per_node 4 benchmarks/parallel.py --size wan_14b --layers 8     # 14B slice
    torchrun --nproc_per_node 8 benchmarks/parallel.py --hybrid [--size wan_14b --layers 16]   # + SSP x Ulysses, TP2 x SSP

Every plan processes the same single 81x720P sample: `one_gpu` runs it on each GPU independently (no
communication; the scaling baseline), `ssp` splits its Skiparse classes over the GPUs (one all-to-all per layout
switch, Ulysses in the full blocks), `ulysses` splits heads everywhere (4 all-to-alls per block). Reports step
time, bytes sent per GPU (comm_stats), and scaling efficiency = t_one_gpu / (N * t_plan). Full activation
recompute is on for all plans so the 1.3B model fits at 75,600 tokens. `dense_ulysses` is dense Wan
(schedule full) at Ulysses=N, the baseline of the paper's multi-GPU comparison. The SSP plan is
SSP=min(N, P^2) x Ulysses=rest (on 8 GPUs: SSP=4 x Ulysses=2). `--hybrid` adds TP=2 (sequence parallel) x
SSP=N/2 and, where N <= P^2, SSP=N/2 x Ulysses=2, against Ulysses=N (bytes count the
context-parallel all-to-alls only; TP's all-gathers and reduce-scatters are not in comm_stats). `--tiny` is a
CPU/gloo smoke run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist

from _common import add_out_dir, free_memory, peak_memory_gib, print_table, row, time_fn, write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="wan_1_3b")
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="model slice: this many blocks (e.g. 8 for a 14B slice)")
    ap.add_argument("--num-full", type=int, default=0, help="full blocks of the slice's dual_end pattern (default 8 or 4)")
    ap.add_argument("--hybrid", action="store_true", help="also SSP x Ulysses and TP2 x SSP (needs >= 4 processes)")
    add_out_dir(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    from osp_megatron import cpu_shims

    cpu_shims.apply()
    from osp_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import comm_stats, initialize_parallel

    world = dist.get_world_size()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    size = "tiny" if args.tiny else args.size
    grid = (2, 9, 8) if args.tiny else tuple(args.grid)
    text_dim = 32 if args.tiny else 4096
    results = {}
    classes = ModelConfig().sparse_ratio ** 2  # P^2 Skiparse classes: SSP divides it, Ulysses takes the rest
    ssp_deg = next(d for d in range(min(world, classes), 0, -1) if classes % d == 0 and world % d == 0)
    ssp_label = f"SSP={ssp_deg}" + (f"xUlysses={world // ssp_deg}" if world > ssp_deg else "")
    plans = [("one_gpu", ParallelConfig(), "dual_end"),
             ("ssp", ParallelConfig(ssp=ssp_deg, ulysses=world // ssp_deg), "dual_end"),
             ("ulysses", ParallelConfig(ulysses=world), "dual_end"), ("dense_ulysses", ParallelConfig(ulysses=world), "full")]
    hybrid = []
    if args.hybrid:
        if world < 4 or world % 2 or classes % (world // 2):
            ap.error(f"--hybrid needs an even world size >= 4 with world/2 dividing P^2={classes} (got {world})")
        if world <= classes:  # SSP x Ulysses (at world > P^2 the main SSP plan already is one)
            half = world // 2
            hybrid.append((f"ssp{half}_ulysses2", ParallelConfig(ssp=half, ulysses=2), "dual_end"))
        hybrid.append((f"tp2_ssp{world // 2}", ParallelConfig(tensor_parallel=2, sequence_parallel=True, ssp=world // 2),
                       "dual_end"))
        plans += hybrid
    free_memory(dev)
    for name, pcfg, schedule in plans:
        ps = initialize_parallel(pcfg)
        mc = ModelConfig(size=size, schedule=schedule, recompute="full")
        if args.layers:  # a slice with the released pattern: full blocks at both ends, token/group between
            mc.num_layers = args.layers
            mc.num_full_blocks = args.num_full or (4 if args.layers <= 16 else 8)
        cfg = make_osp_config(mc, pcfg, PrecisionConfig(dtype="bf16" if cuda else "fp32"), dtype)
        torch.manual_seed(0)
        model = build_model(cfg, ps, device=dev).train()
        g = torch.Generator(device="cpu").manual_seed(1)  # identical input on every rank
        x = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], generator=g).to(dev, dtype)
        target = torch.randn(x.shape, generator=g).to(dev, dtype)
        t = torch.tensor([500.0], device=dev)
        txt = torch.randn(1, 512 if not args.tiny else 8, text_dim, generator=g).to(dev, dtype)

        def step():
            loss = model(x, t, txt, target=target)
            (loss * ps.cp.size).backward()

        comm_stats.reset()
        step()
        sent = comm_stats.total(field="sent")
        ms = time_fn(step, warmup=1, iters=args.iters)
        model.zero_grad(set_to_none=True)
        results[name] = (ms, sent, peak_memory_gib(dev))
        del model
        free_memory(dev)
    if dist.get_rank() == 0:
        one, ssp, uly = results["one_gpu"], results["ssp"], results["ulysses"]
        rows = [
            row(f"{size} fwd+bwd step ms, {ssp_label}", ssp[0], "ms", f"Ulysses={world}", uly[0],
                higher_is_better=False),
            row(f"{size} fwd+bwd step ms, one GPU", one[0], "ms"),
            row(f"scaling efficiency {ssp_label}", one[0] / (world * ssp[0]), "fraction", f"Ulysses={world}",
                one[0] / (world * uly[0]), ">= 0.90"),
            row(f"bytes sent per GPU per step, {ssp_label}", ssp[1] / 1e9, "GB", f"Ulysses={world}", uly[1] / 1e9,
                higher_is_better=False),
            row(f"peak memory {ssp_label}", ssp[2], "GiB", f"Ulysses={world}", uly[2], higher_is_better=False),
            row(f"OSP-Next {ssp_label} vs dense Wan Ulysses={world} step speedup", results["dense_ulysses"][0] / ssp[0], "x",
                f"dense Wan Ulysses={world} ({results['dense_ulysses'][0]:.0f} ms)", 1.0),
            row(f"bytes sent per GPU per step, OSP-Next {ssp_label} vs dense Wan Ulysses={world}", ssp[1] / 1e9, "GB",
                f"dense Wan Ulysses={world}", results["dense_ulysses"][1] / 1e9, higher_is_better=False),
        ]
        for name, _, _ in hybrid:
            h = results[name]
            rows += [
                row(f"{size} fwd+bwd step ms, {name}", h[0], "ms", f"Ulysses={world}", uly[0], higher_is_better=False),
                row(f"scaling efficiency {name}", one[0] / (world * h[0]), "fraction", f"Ulysses={world}",
                    one[0] / (world * uly[0]), None),
                row(f"CP bytes sent per GPU per step, {name}", h[1] / 1e9, "GB", f"Ulysses={world}", uly[1] / 1e9,
                    higher_is_better=False),
                row(f"OSP-Next {name} vs dense Wan Ulysses={world} step speedup", results["dense_ulysses"][0] / h[0],
                    "x", f"dense Wan Ulysses={world} ({results['dense_ulysses'][0]:.0f} ms)", 1.0),
            ]
        if not args.tiny:
            tag = f"parallel-{world}gpu" + (f"-{size}-{args.layers}blocks" if args.layers else "") + (
                "-hybrid" if args.hybrid else "")
            shapes = {"grid": grid, "batch": 1, "text_len": 512, "dtype": str(dtype), "processes": world}
            path = write_results(tag, rows, {"size": size, "layers": args.layers or None, "recompute": True},
                                 shapes=shapes, out_dir=args.out_dir, device=dev, argv=argv)
            print(f"wrote {path}")
        print_table(rows)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
