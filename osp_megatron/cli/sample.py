"""`osp-sample`: text prompts -> videos (mp4 + a json of every setting) from a DiT checkpoint.

    osp-sample --checkpoint runs/demo_cpu --prompt "a red square moving right" --output samples/
    torchrun --nproc-per-node 4 -m osp_megatron.cli.sample --checkpoint ckpt --prompts prompts.txt \
             --output out/ --ssp 4 --frames 81 --height 480 --width 832 --vae /models/Wan2.1-T2V-1.3B-Diffusers \
             --text-encoder /models/Wan2.1-T2V-1.3B-Diffusers

Checkpoints (`osp_megatron.weights`): megatron torch_dist (a run dir, a folder with `latest`, or a step dir;
loaded shard by shard under any layout), a diffusers (or pipeline) / original Wan2.1 folder, or OSP-Next's
format (an OSPNextModel folder, its training output or iter_* folder, or a model/ema .pt file). The model is
built as the checkpoint describes it, layout schedule included (OSP-Next's skiparse_model_type / sparse_ratio /
num_full_blocks, the `_osp_model` block of our diffusers/wan exports, a megatron run's model config); `--model`
overrides it. `--ema` takes the EMA weights (megatron `ema.`, OSP-Next ema_model_state_dict.pt). A HiF8-trained
checkpoint (OSP-Next `quant: hif8`, a megatron run with precision.recipe=hif8_*) samples with that HiF8
fake-quantization unless `--precision none`; `--precision hif8` forces HiF8 forward fake-quant (OSP-Next-HiF8
inference). VAE and text encoder: read from the checkpoint when it is a diffusers pipeline folder, else given
with --vae / --text-encoder (local folders; `tiny` = the random demo stand-ins, only when asked). Each prompt i is
sampled alone from noise seeded with `seed + i` (`--seed-mode same`: `seed`; results do not depend on how many
prompts run together). UniPC (diffusers' WanPipeline: integer timesteps) or Euler (OSP-Next: float timesteps),
classifier-free guidance with the negative prompt (empty by default), shifted sigma grid. `--preset osp-next`
takes OSP-Next's released inference settings (osp_megatron/diffusion/presets.py says where each comes from).
Under torchrun the
DiT is split over TP x SSP x Ulysses ranks (world size = their product); every rank holds the gathered
velocity, so all ranks run the same sampler and rank 0 decodes and writes `sample_NNNN.mp4` + `.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml

from osp_megatron.config import ParallelConfig, PrecisionConfig, updated
from osp_megatron.config.validate import FLAG_NAMES, layout_errors
from osp_megatron.diffusion import samplers
from osp_megatron.diffusion.presets import SAMPLE_PRESETS, sample_preset
from osp_megatron.encoders import load_text_encoder, load_vae
from osp_megatron.launch import DistEnv, distributed, pick_device
from osp_megatron.models import build_model
from osp_megatron.parallel import ParallelState, initialize_parallel
from osp_megatron.quant.modules import assign_hif8_keys
from osp_megatron.quant.recipes import autocast, recipe_from_config
from osp_megatron.training.samples import sample_latents, write_mp4
from osp_megatron.weights import EMA_FORMATS, FORMATS, load_into, open_checkpoint

MODEL_OVERRIDES = ("schedule", "num_full_blocks", "sparse_ratio", "attention_backend")


class SampleError(ValueError):
    """Bad arguments; the message names the argument and the fix."""


# defaults of the settings a preset may set (None in the parser, so an explicit flag always wins over a preset)
DEFAULTS = {"sampler": "unipc", "steps": 30, "shift": 5.0, "guidance": 5.0, "negative_prompt": "", "seed": 42,
            "seed_mode": "increment", "frames": 17, "height": 64, "width": 64, "fps": 16.0, "latent_dtype": "fp32",
            "text_dtype": "fp32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    d = DEFAULTS
    p.add_argument("--checkpoint", required=True, help="megatron run/step dir, diffusers / Wan2.1 / OSP-Next folder, "
                                                        "or an OSP-Next .pt")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto", help="checkpoint format (default: detect)")
    p.add_argument("--ema", action="store_true", help="sample with the EMA weights (megatron, osp-next)")
    p.add_argument("--preset", choices=sorted(SAMPLE_PRESETS),
                   help="named settings; osp-next = OSP-Next's released inference (Euler, 50 steps, shift 7, CFG 5, "
                        "Wan's negative prompt, seed 1024 for every prompt, 81x720x1280, bf16 latents and umT5); "
                        "explicit flags override it")
    p.add_argument("--precision", "--quant", dest="precision", choices=["checkpoint", "hif8", "none"],
                   default="checkpoint",
                   help="checkpoint: the checkpoint's HiF8 recipe if it was trained with one; hif8: HiF8 forward "
                        "fake-quant (the checkpoint's recipe, else OSP-Next's: scale 15/amax, Q/K/V included); "
                        "none: unquantized")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", help=f"the unconditional prompt of CFG (default {d['negative_prompt']!r})")
    p.add_argument("--output", required=True, help="output folder for sample_NNNN.mp4 / .json")
    p.add_argument("--frames", type=int, help=f"video frames, 4k+1 (default {d['frames']})")
    p.add_argument("--height", type=int, help=f"pixels, multiple of 16 (default {d['height']})")
    p.add_argument("--width", type=int, help=f"pixels, multiple of 16 (default {d['width']})")
    p.add_argument("--fps", type=float, help=f"mp4 frame rate (default {d['fps']:g})")
    p.add_argument("--steps", type=int, help=f"denoising steps (default {d['steps']})")
    p.add_argument("--sampler", choices=["unipc", "euler"], help=f"ODE solver (default {d['sampler']}; unipc feeds "
                   "integer timesteps as diffusers' WanPipeline, euler float ones as OSP-Next)")
    p.add_argument("--shift", type=float, help=f"sigma shift (default {d['shift']}; Wan uses 3-5 at 480p)")
    p.add_argument("--guidance", type=float, help=f"CFG scale (1 = no guidance; default {d['guidance']})")
    p.add_argument("--seed", type=int, help=f"noise seed (default {d['seed']})")
    p.add_argument("--seed-mode", choices=["increment", "same"], help="increment: prompt i uses seed + i; same: "
                   f"every prompt uses seed, as OSP-Next (default {d['seed_mode']})")
    p.add_argument("--latent-dtype", choices=["fp32", "bf16"], help="dtype the latents are kept in between steps "
                   f"(updates in fp32; OSP-Next: bf16; default {d['latent_dtype']})")
    p.add_argument("--text-dtype", choices=["fp32", "bf16"], help=f"umT5 dtype (OSP-Next: bf16; default "
                   f"{d['text_dtype']})")
    p.add_argument("--vae", help="Wan VAE: a diffusers AutoencoderKLWan folder or a pipeline folder, or 'tiny' (the "
                                 "random demo stand-in); default: the checkpoint's pipeline folder, if it is one")
    p.add_argument("--text-encoder", help="umT5 encoder folder or pipeline folder, or 'tiny' (the random demo "
                                          "stand-in); default: the checkpoint's pipeline folder, if it is one")
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
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="per-step progress bar on stderr (auto: only when stderr is a terminal)")
    return p


def resolve_settings(args) -> None:
    """Fill the preset-able settings in place: explicit flag > `--preset` > DEFAULTS."""
    preset = sample_preset(args.preset) if args.preset else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))


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
    if args.ema and args.format not in ("auto",) + EMA_FORMATS:
        raise SampleError(f"--ema: {args.format} checkpoints have no EMA weights; drop --ema")
    if not Path(args.checkpoint).exists():
        raise SampleError(f"--checkpoint {args.checkpoint}: does not exist")
    return overrides


# ------------------------------------------------------------------------------------------ model
SAMPLE_RECIPES = ("hif8_current", "hif8_delayed")  # the recipes our local-spec linears run at inference


def open_dit(args, overrides: Dict[str, Any]):
    """(Checkpoint, ModelConfig with the overrides, PrecisionConfig to sample with); checks before any build."""
    ckpt = open_checkpoint(args.checkpoint, args.format)
    if args.ema and ckpt.format not in EMA_FORMATS:
        raise SampleError(f"--ema: {ckpt.format} checkpoints have no EMA weights; drop --ema")
    if ckpt.model is None:
        raise SampleError(f"--checkpoint {args.checkpoint}: bare {ckpt.format} weights without a config.json; give "
                          "the model's folder (config.json + weights)")
    model_config = updated(ckpt.model, overrides)
    precision = PrecisionConfig()
    if args.precision == "hif8":
        precision = hif8_precision(ckpt)
    elif args.precision == "checkpoint" and ckpt.precision is not None and ckpt.precision.recipe in SAMPLE_RECIPES:
        precision = ckpt.precision
    problem = _layout_problem(model_config, ParallelConfig(tensor_parallel=args.tp, ssp=args.ssp, ulysses=args.ulysses))
    if problem:
        raise SampleError(problem)
    return ckpt, model_config, precision


def encoder_paths(args, ckpt) -> Dict[str, str]:
    """{"vae": spec, "text_encoder": spec}: the flags, else the checkpoint's diffusers pipeline folder (when it holds
    `vae/` / `text_encoder/`); never silently the random `tiny` stand-ins."""
    root = Path(args.checkpoint)
    pipeline = root if (root / "model_index.json").is_file() else None
    out = {}
    for name, flag, sub in (("vae", "--vae", "vae"), ("text_encoder", "--text-encoder", "text_encoder")):
        given = getattr(args, name)
        if given:
            out[name] = given
        elif pipeline is not None and (pipeline / sub).is_dir():
            out[name] = str(pipeline)
        else:
            where = "a diffusers pipeline folder without " + sub + "/" if pipeline else f"a {ckpt.format} checkpoint"
            raise SampleError(f"{flag}: --checkpoint {args.checkpoint} is {where}, so it brings no {sub}; give "
                              f"{flag} PATH (a Wan2.1 diffusers pipeline folder, e.g. "
                              f"Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or its {sub}/ folder), or {flag} tiny for the random "
                              "demo stand-in")
    return out


def hif8_precision(ckpt):
    """OSP-Next-HiF8 inference: the checkpoint's HiF8 recipe, else forward fake-quant with OSP-Next's settings."""
    if ckpt.precision is not None and ckpt.precision.recipe in SAMPLE_RECIPES:
        return ckpt.precision
    return PrecisionConfig(recipe="hif8_current", quantize_attention=True)


def load_dit(args, ckpt, model_config, precision, parallel, dtype: torch.dtype, device):
    """The model in eval mode, TP/CP-sharded by `parallel`, with the checkpoint's weights."""
    model = build_model(model_config, parallel, precision=precision, dtype=dtype, device=device)
    if precision.recipe == "hif8_delayed":
        assign_hif8_keys(model)
    load_into(model, ckpt, ema=args.ema)
    return model.eval()


def quantization(precision):
    """The region the DiT runs in: the checkpoint's HiF8 recipe (none: a no-op)."""
    recipe = recipe_from_config(precision)
    return autocast(enabled=recipe is not None, recipe=recipe)


def _layout_problem(model_config, pcfg) -> Optional[str]:

    errors = []
    model_config.check(errors)
    errors += layout_errors(model_config, pcfg, names=FLAG_NAMES)
    return "; ".join(errors) or None


# ------------------------------------------------------------------------------------------ run
def run(args) -> int:
    env = DistEnv.from_environ()
    rank, world = env.rank, env.world_size
    resolve_settings(args)
    prompts = read_prompts(args)
    overrides = check_args(args, world)
    ckpt, model_config, precision = open_dit(args, overrides)
    encoders = encoder_paths(args, ckpt)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    latent_dtype = None if args.latent_dtype == "fp32" else dtypes[args.latent_dtype]
    progress = {"on": True, "off": False, "auto": None}[args.progress] if rank == 0 else False
    device = pick_device(env, args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    out_dir = Path(args.output)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    launched = contextlib.ExitStack()
    launched.enter_context(distributed(env, device=str(device), always=False))
    parallel = (initialize_parallel(ParallelConfig(tensor_parallel=args.tp, ssp=args.ssp, ulysses=args.ulysses))
                if world > 1 else ParallelState.single())
    t0 = time.time()
    model = load_dit(args, ckpt, model_config, precision, parallel, dtype, device)
    if rank == 0:
        print(f"osp-sample: {ckpt.describe()}" + (f"; sampling with precision.recipe={precision.recipe}"
                                                  if precision.recipe != "none" else ""), flush=True)
    dims = model_config.resolve()
    vae = load_vae(encoders["vae"], device, torch.float32)
    if vae.z_dim != dims.in_channels:
        raise SampleError(f"--vae {encoders['vae']}: {vae.z_dim} latent channels, but the DiT takes "
                          f"{dims.in_channels}; give the VAE the model was trained with")
    text_encoder = load_text_encoder(encoders["text_encoder"], device, dtypes[args.text_dtype], args.text_len,
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
        seed = args.seed + (i if args.seed_mode == "increment" else 0)
        text = text_encoder.encode([prompt]).to(device=device, dtype=dtype)
        with quantization(precision):
            latents = sample_latents(model, text, null, latent_shape, args.steps, args.guidance, args.shift, seed,
                                     device, dtype, solver=args.sampler, latent_dtype=latent_dtype,
                                     progress=progress, desc=f"sample {i + 1}/{len(prompts)}")
        if rank == 0:
            video = vae.decode(latents)[0]
            mp4 = write_mp4(out_dir / f"sample_{i:04d}.mp4", video, args.fps)
            if args.save_latents:
                tmp = out_dir / f".sample_{i:04d}.latents.pt.tmp"
                torch.save(latents.cpu(), tmp)
                os.replace(tmp, out_dir / f"sample_{i:04d}.latents.pt")
            meta = {
                "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
                "sampler": args.sampler, "shift": args.shift, "guidance": args.guidance, "preset": args.preset,
                "timesteps": samplers.solver_timesteps(args.sampler), "seed_mode": args.seed_mode,
                "latent_dtype": args.latent_dtype, "text_dtype": args.text_dtype,
                "schedule": {"kind": "flow_sigmas" if args.sampler == "euler" else "unipc_flow_sigmas",
                             "sigmas": [round(float(s), 8) for s in sigmas]},
                "frames": args.frames, "height": args.height, "width": args.width, "fps": args.fps,
                "latent_shape": list(latent_shape), "checkpoint": str(args.checkpoint),
                "format": ckpt.format, "weights": str(ckpt.where), "ema": args.ema, "model": asdict(model_config),
                "precision": asdict(precision), "dtype": str(dtype).replace("torch.", ""),
                "parallel": {"tp": args.tp, "ssp": args.ssp, "ulysses": args.ulysses, "world": world},
                "vae": encoders["vae"], "text_encoder": encoders["text_encoder"], "text_len": args.text_len,
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
    launched.close()
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

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
