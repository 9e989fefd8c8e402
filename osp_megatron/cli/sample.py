"""`osp-sample`: text prompts -> videos (mp4 + a json of every setting) from a DiT checkpoint.

    osp-sample --checkpoint runs/demo_cpu --prompt "a red square moving right" --output samples/
    torchrun --nproc-per-node 4 -m osp_megatron.cli.sample --checkpoint ckpt --prompts prompts.txt \
             --output out/ --ssp 4 --frames 81 --height 480 --width 832 --vae /models/Wan2.1-T2V-1.3B-Diffusers \
             --text-encoder /models/Wan2.1-T2V-1.3B-Diffusers

Checkpoints: megatron torch_dist (a run dir, a folder with `latest`, or a step dir; loaded with the training
checkpoint loader under any layout; `--ema` takes the EMA weights), or a diffusers / original Wan2.1 folder
(adapters). VAE and text encoder: local folders or `tiny` (the demo stand-ins). Each prompt i is sampled alone
from noise seeded with `seed + i` (results do not depend on how many prompts run together), Euler or UniPC,
classifier-free guidance with the negative prompt (empty by default), shifted sigma grid. Under torchrun the
DiT is split over TP x SSP x Ulysses ranks (world size = their product); every rank holds the gathered
velocity, so all ranks run the same sampler and rank 0 decodes and writes `sample_NNNN.mp4` + `.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

FORMATS = ("auto", "megatron", "diffusers", "wan")
MODEL_OVERRIDES = ("schedule", "num_full_blocks", "sparse_ratio", "attention_backend")


class SampleError(ValueError):
    """Bad arguments; the message names the argument and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--checkpoint", required=True, help="megatron run/step dir, or a diffusers / Wan2.1 folder")
    p.add_argument("--format", choices=FORMATS, default="auto", help="checkpoint format (default: detect)")
    p.add_argument("--ema", action="store_true", help="megatron checkpoints: sample with the EMA weights")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of CFG (default empty)")
    p.add_argument("--output", required=True, help="output folder for sample_NNNN.mp4 / .json")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k+1 (default 17)")
    p.add_argument("--height", type=int, default=64, help="pixels, multiple of 16 (default 64)")
    p.add_argument("--width", type=int, default=64, help="pixels, multiple of 16 (default 64)")
    p.add_argument("--fps", type=float, default=16.0, help="mp4 frame rate (default 16)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc", help="ODE solver (default unipc)")
    p.add_argument("--shift", type=float, default=5.0, help="sigma shift (default 5.0; Wan uses 3-5 at 480p)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1 = no guidance; default 5.0)")
    p.add_argument("--seed", type=int, default=42, help="noise seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--vae", default="tiny", help="Wan VAE folder or 'tiny' (default tiny)")
    p.add_argument("--text-encoder", default="tiny", help="umT5 encoder folder or 'tiny' (default tiny)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: next to the text encoder)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (Wan: 512)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a model field: {', '.join(MODEL_OVERRIDES)} (repeatable)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (under torchrun)")
    p.add_argument("--ssp", type=int, default=1, help="sparse sequence parallel degree (under torchrun)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (under torchrun)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="DiT dtype (auto: bf16 on "
                                                                                       "GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    p.add_argument("--save-latents", action="store_true", help="also write sample_NNNN.latents.pt")
    return p


# ------------------------------------------------------------------------------------------ checks
def read_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SampleError(f"--prompts {path}: no such file (one prompt per line)")
        prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise SampleError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def check_args(args, world: int) -> Dict[str, Any]:
    """Everything checkable before loading anything; returns the model overrides."""
    import yaml

    if (args.frames - 1) % 4 or args.frames < 1:
        raise SampleError(f"--frames {args.frames}: must be 4k+1 (e.g. 17, 49, 81) for the Wan VAE")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 16 or v % 16:
            raise SampleError(f"--{name} {v}: must be a positive multiple of 16 (VAE stride 8 x patch 2)")
    if args.steps < 1:
        raise SampleError(f"--steps {args.steps}: must be >= 1")
    if args.shift <= 0:
        raise SampleError(f"--shift {args.shift}: must be > 0 (1 = no shift)")
    if args.guidance < 1.0:
        raise SampleError(f"--guidance {args.guidance}: must be >= 1 (1 = no guidance)")
    if args.fps <= 0:
        raise SampleError(f"--fps {args.fps}: must be > 0")
    for name in ("tp", "ssp", "ulysses"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name} {getattr(args, name)}: must be >= 1")
    need = args.tp * args.ssp * args.ulysses
    if need != world:
        raise SampleError(f"--tp {args.tp} x --ssp {args.ssp} x --ulysses {args.ulysses} = {need} ranks, but the "
                          f"world has {world} process(es): launch with torchrun --nproc-per-node {need} (or fix "
                          "the degrees)")
    overrides = {}
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep or key not in MODEL_OVERRIDES:
            raise SampleError(f"--model {item!r}: use KEY=VALUE with KEY one of {', '.join(MODEL_OVERRIDES)}")
        overrides[key] = yaml.safe_load(value)
    if args.ema and args.format in ("diffusers", "wan"):
        raise SampleError(f"--ema: {args.format} folders have no EMA weights; drop --ema")
    if not Path(args.checkpoint).exists():
        raise SampleError(f"--checkpoint {args.checkpoint}: does not exist")
    return overrides


def detect_format(path: str) -> str:
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file() or (p / "latest").is_file() or (p / "metadata.json").is_file():
        return "megatron"
    for folder in (p, p / "transformer"):
        if (folder / "config.json").is_file():
            cfg = json.loads((folder / "config.json").read_text())
            return "wan" if "dim" in cfg and "num_attention_heads" not in cfg else "diffusers"
    raise SampleError(f"--checkpoint {path}: not a megatron checkpoint nor a diffusers/Wan folder (config.json)")


# ------------------------------------------------------------------------------------------ model
def load_dit(args, fmt: str, overrides: Dict[str, Any], parallel, dtype: torch.dtype, device):
    """(model in eval mode, ModelConfig): TP/CP-sharded by `parallel`, weights from the checkpoint."""
    from osp_megatron.config import ParallelConfig, updated
    from osp_megatron.models import build_model
    from osp_megatron.models.transformer_config import make_osp_config
    from tools import convert

    model_config, where = convert.read_config(fmt, args.checkpoint)
    model_config = updated(model_config, overrides)
    pcfg = ParallelConfig(tensor_parallel=args.tp, ssp=args.ssp, ulysses=args.ulysses)
    problem = _layout_problem(model_config, pcfg)
    if problem:
        raise SampleError(problem)
    model = build_model(make_osp_config(model_config, pcfg, None, dtype), parallel, device=device)
    if fmt == "megatron":
        from osp_megatron.training.checkpoint import Checkpointer

        prefix = "ema." if args.ema else ""
        loaded = Checkpointer(where.parent).load(where, {"model": model.sharded_state_dict(prefix=prefix)})
        state = {k[len(prefix):]: v for k, v in loaded["model"].items()}
        with torch.no_grad():
            missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise SampleError(f"--checkpoint {where}: weights missing for {missing[:3]}")
    else:
        sd, _ = convert.read_weights(fmt, where, model_config, False)
        model.load_full_state_dict(sd)
    return model.eval(), model_config


def _layout_problem(model_config, pcfg) -> Optional[str]:
    from osp_megatron.config.validate import FLAG_NAMES, layout_errors

    errors = []
    model_config.check(errors)
    errors += layout_errors(model_config, pcfg, names=FLAG_NAMES)
    return "; ".join(errors) or None


# ------------------------------------------------------------------------------------------ run
def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _device(spec: str, local: int) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def run(args) -> int:
    from osp_megatron import cpu_shims
    from osp_megatron.config import ParallelConfig
    from osp_megatron.diffusion import samplers
    from osp_megatron.encoders import load_text_encoder, load_vae
    from osp_megatron.training.samples import sample_latents, write_mp4

    rank, world, local = _dist_env()
    prompts = read_prompts(args)
    overrides = check_args(args, world)
    fmt = detect_format(args.checkpoint) if args.format == "auto" else args.format
    if args.ema and fmt != "megatron":
        raise SampleError(f"--ema: {fmt} folders have no EMA weights; drop --ema")
    device = _device(args.device, local)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    out_dir = Path(args.output)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    import torch.distributed as dist

    cpu_shims.apply()
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("OSP_DIST_TIMEOUT_MIN", "30"))))
        from osp_megatron.parallel import initialize_parallel

        parallel = initialize_parallel(ParallelConfig(tensor_parallel=args.tp, ssp=args.ssp, ulysses=args.ulysses))
    else:
        from osp_megatron.parallel import ParallelState

        parallel = ParallelState.single()
    t0 = time.time()
    model, model_config = load_dit(args, fmt, overrides, parallel, dtype, device)
    dims = model_config.resolve()
    vae = load_vae(args.vae, device, torch.float32)
    if vae.z_dim != dims.in_channels:
        raise SampleError(f"--vae {args.vae}: {vae.z_dim} latent channels, but the DiT takes {dims.in_channels}")
    text_encoder = load_text_encoder(args.text_encoder, device, torch.float32, args.text_len,
                                     text_dim=dims.text_dim, tokenizer=args.tokenizer)
    latent_shape = vae.latent_shape(args.frames, args.height, args.width)
    null = None
    if args.guidance != 1.0:
        null = text_encoder.encode([args.negative_prompt]).to(device=device, dtype=dtype)
    sigmas = (samplers.flow_sigmas(args.steps, args.shift) if args.sampler == "euler"
              else samplers.unipc_flow_sigmas(args.steps, args.shift))
    load_s = time.time() - t0
    written = []
    for i, prompt in enumerate(prompts):
        t1 = time.time()
        seed = args.seed + i
        text = text_encoder.encode([prompt]).to(device=device, dtype=dtype)
        latents = sample_latents(model, text, null, latent_shape, args.steps, args.guidance, args.shift, seed, device,
                                 dtype, solver=args.sampler)
        if rank == 0:
            video = vae.decode(latents)[0]
            mp4 = write_mp4(out_dir / f"sample_{i:04d}.mp4", video, args.fps)
            if args.save_latents:
                tmp = out_dir / f".sample_{i:04d}.latents.pt.tmp"
                torch.save(latents.cpu(), tmp)
                os.replace(tmp, out_dir / f"sample_{i:04d}.latents.pt")
            meta = {
                "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
                "sampler": args.sampler, "shift": args.shift, "guidance": args.guidance,
                "schedule": {"kind": "flow_sigmas" if args.sampler == "euler" else "unipc_flow_sigmas",
                             "sigmas": [round(float(s), 8) for s in sigmas]},
                "frames": args.frames, "height": args.height, "width": args.width, "fps": args.fps,
                "latent_shape": list(latent_shape), "checkpoint": str(args.checkpoint), "format": fmt,
                "ema": args.ema, "model": asdict(model_config), "dtype": str(dtype).replace("torch.", ""),
                "parallel": {"tp": args.tp, "ssp": args.ssp, "ulysses": args.ulysses, "world": world},
                "vae": args.vae, "text_encoder": args.text_encoder, "text_len": args.text_len,
                "device": str(device), "seconds": round(time.time() - t1, 3), "video": mp4.name,
            }
            tmp = out_dir / f".sample_{i:04d}.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, out_dir / f"sample_{i:04d}.json")
            written.append(mp4)
            print(f"osp-sample: [{i + 1}/{len(prompts)}] {mp4} ({time.time() - t1:.1f} s) {prompt!r}", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f"osp-sample: {len(written)} videos in {out_dir} (load {load_s:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        code = run(args)
    except SampleError as exc:
        print(f"osp-sample rank {rank}: {exc}", file=sys.stderr)
        code = 2
    except (ValueError, KeyError, FileNotFoundError) as exc:  # format / checkpoint errors name the file and fix
        print(f"osp-sample rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
