"""FP8 on one GPU: the TE spec against the local spec, FP8 training losses, and FP8 block speed.

    python benchmarks/fp8.py [--loss-steps 200] [--sections check,loss,block]

Variants (the same names as `benchmarks/train_step.py --precision`): `bf16` (local spec, megatron linears),
`fp8_current` / `fp8_delayed` (native FP8 in our linears: E4M3 forward, E5M2 gradients, torch._scaled_mm GEMMs, no
TransformerEngine), `te` (TE spec in bf16) and `te:fp8_delayed` / `te:fp8_current` / `te:fp8_block` (TE spec under
TE's own FP8 recipes; needs TE: tools/install_te.sh). Attention itself is bf16 in every variant.

Sections:
  check  one 1.3B-width full block (dim 1536, FFN 8960, 12 heads) built with the te spec and with the local spec,
         the same weights, bf16, 4x32x32 latent tokens: forward output, input gradient and every weight gradient
         compared (relative L2 error; bf16 GEMMs in both, so ~1e-3 is agreement).
  loss   `--loss-steps` training steps of a 1.3B-width slice (6 blocks: 2 full, token, group, 2 full; the real trainer,
         distributed AdamW, LR 3e-4) on synthetic latents [16, 4, 32, 32] with 512 random text tokens, and 30 steps of
         the tiny model, per variant from the same seed and data: first / last-20-mean loss and the gap to bf16.
  block  one Wan-14B-width block (dim 5120, FFN 13824) on the 81x720P token grid (21x45x80 = 75600 tokens), full
         attention, forward+backward per variant: time, executed TFLOP/s (linears + attention) and peak memory.
Prints a table and writes benchmarks/results/fp8-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, add_out_dir, free_memory, free_port, peak_memory_gib, print_table, row,  # noqa: E402
                     time_fn, write_results)
from train_step import PRECISIONS  # noqa: E402

LOSS_LATENT = [16, 4, 32, 32]
BLOCK_GRID = [21, 45, 80]
CHECK_GRID = [4, 16, 16]


def _spec_and_recipe(variant: str):
    """variant -> (model.spec, recipe name or "none")."""
    spec = "te" if variant.startswith("te") else "local"
    recipe = variant.split(":", 1)[1] if ":" in variant else (variant if variant.startswith("fp8") else "none")
    return spec, recipe


def _block_context(variant: str):
    """(recipe context factory, quantized local linears?) for one standalone block."""
    from osp_megatron.config import PrecisionConfig
    from osp_megatron.quant.recipes import autocast, recipe_from_config

    spec, name = _spec_and_recipe(variant)
    if name == "none":
        return (lambda: contextlib.nullcontext()), False
    recipe = recipe_from_config(PrecisionConfig(dtype="bf16", recipe=name), spec)
    if spec == "te":
        import transformer_engine.pytorch as te

        return (lambda: te.autocast(enabled=True, recipe=recipe)), False
    return (lambda: autocast(enabled=True, recipe=recipe)), True


def _build_block(size: str, spec: str, quantized: bool, grid, dev):
    from megatron.core.transformer.spec_utils import build_module

    from osp_megatron.config import ModelConfig, PrecisionConfig
    from osp_megatron.models.attention import SequenceContext
    from osp_megatron.models.specs import get_block_spec
    from osp_megatron.models.transformer_config import make_osp_config
    from osp_megatron.parallel import ParallelState, TokenPlacement
    from osp_megatron.quant.modules import assign_hif8_keys
    from osp_megatron.skiparse import BlockStep

    mc = ModelConfig(size=size, schedule="full", spec=spec)
    cfg = make_osp_config(mc, None, PrecisionConfig(dtype="bf16"), torch.bfloat16)
    parallel = ParallelState.single()
    plan = SequenceContext(TokenPlacement(grid, 2, ["full"], parallel, torch.device(dev)), cfg.head_dim,
                           cfg.rope_theta)
    block = build_module(get_block_spec(spec, kind="full", quantized=quantized,
                                        attention_backend=cfg.attention_backend),
                         config=cfg, layer_number=0, parallel=parallel, step=BlockStep("raster", None, "full"))
    block = block.to(device=dev, dtype=torch.bfloat16)
    assign_hif8_keys(block)
    return cfg, block, plan


def _inputs(cfg, n, dev, seed=0, text_len=512):
    g = torch.Generator(device=dev).manual_seed(seed)
    c = cfg.hidden_size
    e = (torch.randn(1, 6, c, device=dev, generator=g) * 0.1).bfloat16()
    text = torch.randn(text_len, 1, c, device=dev, generator=g).bfloat16()
    x = torch.randn(n, 1, c, device=dev, generator=g).bfloat16().requires_grad_(True)
    return x, e, text


def check_te_equals_local(dev) -> List[Dict]:
    """The te spec's block against the local spec's with the same weights (bf16)."""
    cfg, local, plan = _build_block("wan_1_3b", "local", False, CHECK_GRID, dev)
    _, te_block, _ = _build_block("wan_1_3b", "te", False, CHECK_GRID, dev)
    missing, unexpected = te_block.load_state_dict(local.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"te block state dict differs from local: missing {missing[:4]}, unexpected {unexpected[:4]}")
    n = CHECK_GRID[0] * CHECK_GRID[1] * CHECK_GRID[2]
    x, e, text = _inputs(cfg, n, dev)
    go = torch.randn(n, 1, cfg.hidden_size, device=dev).bfloat16()
    got = {}
    for name, block in (("local", local), ("te", te_block)):
        x.grad = None
        block.zero_grad(set_to_none=True)
        y = block(x, e, text, plan)
        y.backward(go)
        got[name] = {"output": y.detach().float(), "input grad": x.grad.float(),
                     **{f"grad {k}": p.grad.float() for k, p in block.named_parameters() if p.grad is not None}}
    worst, worst_name = 0.0, ""
    rows = []
    for key, want in got["local"].items():
        have = got["te"].get(key)
        if have is None:
            raise RuntimeError(f"te block has no {key}")
        rel = ((have - want).norm() / want.norm().clamp_min(1e-30)).item()
        if key in ("output", "input grad"):
            rows.append(row(f"check te vs local 1.3B-width block: {key} rel error", rel, "rel L2", goal="<= 1e-2 (bf16)",
                            higher_is_better=False))
        if rel > worst:
            worst, worst_name = rel, key
    rows.append(row(f"check te vs local 1.3B-width block: worst weight/bias grad rel error ({worst_name})", worst,
                    "rel L2", goal="<= 1e-2 (bf16)", higher_is_better=False))
    for r in rows:
        print(f"  {r['name']}: {r['value']:.2e}", flush=True)
    return rows


def _train_losses(variant: str, steps: int, dev, tiny: bool) -> List[float]:
    from megatron.core import parallel_state

    from osp_megatron.config import load_config
    from osp_megatron.training.trainer import DiffusionTrainer

    spec, recipe = _spec_and_recipe(variant)
    size = (["model.size=tiny", "model.num_full_blocks=4", "data.text_len=32",
             "data.synthetic_latent_shape=[16,4,16,16]"] if tiny else
            ["model.num_layers=6", "model.num_full_blocks=4", f"data.synthetic_latent_shape={LOSS_LATENT}"])
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "osp_1_3b_480p.yaml", [
            *size, f"model.spec={spec}", f"precision.recipe={recipe}", "data.kind=synthetic", "data.num_workers=0",
            "data.micro_batch_size=1", "train.global_batch_size=1", "train.ema_decay=0", "train.sample_interval=0",
            f"train.steps={steps}", "train.lr=3e-4", "train.min_lr=3e-5", f"train.warmup_steps={min(10, steps - 1)}",
            "train.init_from=''", "train.resume=false", f"train.run_dir={run_dir}", "tracking.backend=none",
            "parallel.overlap_grad_reduce=false", "train.seed=1234",
        ])
        cfg.validate(world_size=1)
        torch.manual_seed(1234)
        trainer = DiffusionTrainer(cfg, dev, log=lambda s: None)
        try:
            trainer.setup()
            losses = []
            for step in range(1, steps + 1):
                losses.append(float(trainer.run_step(trainer.next_microbatches(step))["loss"]))
        finally:
            trainer.close()
            del trainer
            parallel_state.destroy_model_parallel()
            free_memory(dev)
    return losses


def loss_rows(variants: List[str], steps: int, dev, tiny_steps: int = 30) -> (List[Dict], Dict):
    rows, raw = [], {}
    for tiny, n in ((True, tiny_steps), (False, steps)):
        if n <= 0:
            continue
        what = "tiny model" if tiny else "1.3B-width slice (6 blocks)"
        base = None
        for v in variants:
            try:
                losses = _train_losses(v, n, dev, tiny)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the others still run
                traceback.print_exc()
                rows.append(row(f"loss {what} {v}: failed", None, f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            raw[f"{what} {v}"] = losses
            tail = sum(losses[-20:]) / len(losses[-20:])
            finite = all(map(lambda l: l == l and abs(l) != float("inf"), losses))
            if v == "bf16":
                base = tail
            print(f"  {what} {v:15s} loss {losses[0]:.4f} -> {tail:.4f} (mean of the last 20 of {n}), "
                  f"finite {finite}", flush=True)
            rows.append(row(f"loss {what} {v}: mean of the last 20 of {n} steps", tail, "loss",
                            f"loss {what} bf16" if v != "bf16" else None, base if v != "bf16" else None,
                            "within 2% of bf16, below the first step's", higher_is_better=False,
                            first_loss=losses[0], finite=finite))
    return rows, raw


def block_rows(variants: List[str], dev) -> List[Dict]:
    from blocks import block_flops

    rows = []
    base: Optional[float] = None
    n = BLOCK_GRID[0] * BLOCK_GRID[1] * BLOCK_GRID[2]
    for v in variants:
        spec, _ = _spec_and_recipe(v)
        try:
            ctx, quantized = _block_context(v)
            free_memory(dev)
            cfg, block, plan = _build_block("wan_14b", spec, quantized, BLOCK_GRID, dev)
            x, e, text = _inputs(cfg, n, dev)
            go = torch.randn(n, 1, cfg.hidden_size, device=dev).bfloat16()

            def fwd_bwd():
                with ctx():
                    y = block(x, e, text, plan)
                y.backward(go)

            torch.cuda.reset_peak_memory_stats(dev)
            ms = time_fn(fwd_bwd, warmup=2, iters=5)
            mem = peak_memory_gib(dev)
            flops = 3 * block_flops(cfg, n, n * n)
            del block, x, e, text, go
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append(row(f"block wan_14b 720P {v}: failed", None, f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        if v == "bf16":
            base = ms
        print(f"  block wan_14b 720P {v:15s} {ms:8.1f} ms fwd+bwd  {flops / ms / 1e9:.0f} TFLOP/s  {mem:.1f} GiB",
              flush=True)
        rows.append(row(f"block wan_14b 720P {v}: fwd+bwd time", ms, "ms", "block wan_14b 720P bf16" if v != "bf16"
                        else None, base if v != "bf16" else None, "informational: FP8 GEMMs, bf16 attention",
                        higher_is_better=False, tflops=flops / ms / 1e9, peak_memory_gib=mem))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="check,loss,block")
    ap.add_argument("--variants", default=",".join(PRECISIONS), help="comma list of " + ", ".join(PRECISIONS))
    ap.add_argument("--loss-steps", type=int, default=200)
    ap.add_argument("--tiny-steps", type=int, default=30, help="tiny-model steps per variant (0: skip)")
    add_out_dir(ap)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if set(variants) - set(PRECISIONS) or "bf16" not in variants or sections - {"check", "loss", "block"}:
        ap.error("--variants: a comma list of " + ", ".join(PRECISIONS) + " including bf16; --sections: of "
                 "check, loss, block")
    if not torch.cuda.is_available():
        print("fp8.py needs a CUDA GPU of compute capability >= 8.9", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from osp_megatron import cpu_shims
    from osp_megatron.quant.recipes import te_version

    cpu_shims.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=0, world_size=1)
    te = te_version()
    if te is None:
        print("TransformerEngine not importable: the te variants are left out", flush=True)
        variants = [v for v in variants if not v.startswith("te")]
    rows: List[Dict] = []
    raw: Dict = {}
    def save():  # after every section, so a run cut short keeps what it measured
        return write_results("fp8", rows, {"variants": variants, "te_version": te and f"{te[0]}.{te[1]}",
                                           "losses": raw, "sections": sorted(done)},
                             shapes={"check_grid": CHECK_GRID, "loss_latent": LOSS_LATENT, "block_grid": BLOCK_GRID,
                                     "text_len": 512}, out_dir=args.out_dir, device=dev, argv=argv)

    done: set = set()
    if "check" in sections and te is not None:
        print("check: te spec vs local spec, 1.3B-width block", flush=True)
        try:
            rows += check_te_equals_local(dev)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append(row("check te vs local 1.3B-width block: failed", None, f"{type(exc).__name__}: {exc}"[:240]))
        free_memory(dev)
        done.add("check")
        save()
    if "loss" in sections:
        print(f"loss: {args.loss_steps} steps per variant", flush=True)
        got, losses = loss_rows(variants, args.loss_steps, dev, args.tiny_steps)
        rows += got
        raw.update(losses)
        done.add("loss")
        save()
    if "block" in sections:
        print("block: wan_14b width, 720P grid, fwd+bwd", flush=True)
        rows += block_rows(variants, dev)
        done.add("block")
    path = save()
    print(f"\nwrote {path}\n")
    print_table(rows)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
