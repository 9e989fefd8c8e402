"""`osp-convert`: DiT weights between diffusers, original Wan2.1, OSP-Next and megatron `torch_dist` checkpoints.

    osp-convert --from diffusers --to megatron --input Wan2.1-T2V-1.3B-Diffusers --output ckpt --tp 2 \
                [--model schedule=dual_end] [--check]
    osp-convert --from megatron --to diffusers --input runs/x --output export --ema --lora runs/grpo --dtype bf16
    osp-convert --from osp-next --to megatron --input OSP-Next-14B --output ckpt
    osp-convert --from megatron --to osp-next --input runs/x --output osp_next_export

Formats (osp_megatron.weights). diffusers: a folder with `config.json` (WanTransformer3DModel) +
`diffusion_pytorch_model.safetensors` or shards + `*.safetensors.index.json` (a pipeline folder's `transformer/`
is found by itself). wan: the same files with the original Wan2.1 key names and config (`dim`, `num_heads`, ...).
osp-next: OSP-Next's OSPNextModel folder (its config.json with skiparse_model_type / sparse_ratio /
num_full_blocks / quant fields, Wan key names), its training output or an iter_* folder / .pt (`--ema`:
ema_model_state_dict.pt); written as a folder OSP-Next's `OSPNextModel.from_pretrained` loads. megatron: a
torch_dist checkpoint (a run dir, a folder with `latest`, or a step folder) written by osp-train or osp-convert;
it loads under any TP/PP/CP layout; `--tp/--pp/--ssp/--ulysses` choose the layout that writes it.

Every path goes through one full state dict in our parameter names (adapters in osp_megatron.models.adapters),
so round trips are bitwise. The layout schedule always travels: OSP-Next's own fields, `_osp_model` in
diffusers/wan config.json (diffusers ignores `_` keys; every reader here applies it), the megatron checkpoint's
config; `--model KEY=VALUE` changes it. HiF8 training settings travel between OSP-Next (`quant`, `quant_attn`,
`scale_max_*`) and megatron (`precision.*`). `--ema` takes EMA weights (megatron, osp-next); `--lora` folds
adapters in (W += alpha/r * B @ A; from a GRPO run the LoRA EMA when it kept one, `--lora-weights live` for the
live adapters); `--dtype` casts (default: keep). `--check` runs the source and the written
model on one random input and fails (exit 1) when they differ by more than `--check-tol`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from osp_megatron.config import ParallelConfig, updated
from osp_megatron.config.validate import FLAG_NAMES, layout_errors
from osp_megatron.models.adapters.osp_next import osp_next_config
from osp_megatron.rl.lora import merge_lora
from osp_megatron.weights import (EMA_FORMATS, FORMATS, check, detect_format, layout_fields, open_checkpoint,
                                  read_weights, write_weights)
from osp_megatron.weights.lora import read_lora
from osp_megatron.weights.megatron import read_run_config

LAYOUT_FIELDS = ("schedule", "num_full_blocks", "sparse_ratio")
MODEL_OVERRIDES = LAYOUT_FIELDS + ("attention_backend", "spec")


class ConvertError(ValueError):
    """Bad arguments or inputs; the message names the argument and the fix."""


# ------------------------------------------------------------------------------------------ arguments
def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes, e.g. 5G or 500M") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--from", dest="src", choices=FORMATS, required=True, help="input format")
    p.add_argument("--to", dest="dst", choices=FORMATS, required=True, help="output format")
    p.add_argument("--input", required=True, help="input folder (or megatron run/step dir, OSP-Next .pt)")
    p.add_argument("--output", required=True, help="output folder (must be empty or new; see --overwrite)")
    for name in ("tp", "pp", "ssp", "ulysses"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"megatron output: {name.upper()} degree of the ranks "
                                                               "that write the checkpoint (default 1)")
    p.add_argument("--ema", action="store_true", help="megatron / osp-next input: take the EMA weights")
    p.add_argument("--lora", help="LoRA adapters to merge: a PEFT adapter folder, a GRPO run/iter dir, or a "
                                  ".pt/.safetensors file")
    p.add_argument("--lora-weights", choices=["auto", "ema", "live"], default="auto",
                   help="GRPO checkpoint adapters: auto = the LoRA EMA when the run kept one (default), ema, live")
    p.add_argument("--dtype", choices=["keep", "fp32", "bf16"], default="keep", help="output dtype (default keep)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help=f"set a model field in the output: {', '.join(MODEL_OVERRIDES)} (repeatable)")
    p.add_argument("--max-shard-size", type=_size, default=5 << 30, help="safetensors shard size (default 5G)")
    p.add_argument("--check", action="store_true", help="compare source and output models on one random input")
    p.add_argument("--check-tol", type=float, default=1e-5, help="max relative difference for --check (default 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    return p


def parse_model_overrides(items: List[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in MODEL_OVERRIDES:
            raise ConvertError(f"--model {item!r}: use KEY=VALUE with KEY one of {', '.join(MODEL_OVERRIDES)}")
        out[key] = yaml.safe_load(value)
    return out


def validate_args(args) -> Dict[str, int]:
    """Cheap checks before anything is read; returns the megatron output layout."""
    layout = {"tp": args.tp, "pp": args.pp, "ssp": args.ssp, "ulysses": args.ulysses}
    if args.dst != "megatron" and any(v != 1 for v in layout.values()):
        raise ConvertError("--tp/--pp/--ssp/--ulysses apply to --to megatron only; drop them for " + args.dst)
    if args.ema and args.src not in EMA_FORMATS:
        raise ConvertError(f"--ema: EMA weights exist only in {' and '.join(EMA_FORMATS)} checkpoints, not in "
                           f"{args.src} folders; drop --ema")
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise ConvertError(f"--input {src}: does not exist")
    if out.resolve() == src.resolve():
        raise ConvertError("--output must differ from --input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConvertError(f"--output {out}: exists and is not empty; choose a new folder or pass --overwrite")
    if args.check_tol <= 0:
        raise ConvertError(f"--check-tol {args.check_tol}: must be > 0")
    found = detect_format(src)
    if found != args.src:
        raise ConvertError(f"--input {src} is a {found} checkpoint; use --from {found}")
    return layout


# ------------------------------------------------------------------------------------------ main
def convert(args) -> Dict[str, Any]:
    layout = validate_args(args)
    overrides = parse_model_overrides(args.model)
    ckpt = open_checkpoint(args.input, args.src)
    if ckpt.model is None:
        raise ConvertError(f"--input {args.input}: bare {args.src} weights without a config.json; give the model's "
                           "folder (config.json + weights)")
    model_config = updated(ckpt.model, overrides)
    errors: List[str] = []
    model_config.check(errors)
    if args.dst == "megatron":
        errors += layout_errors(model_config, ParallelConfig(tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"],
                                                             ssp=layout["ssp"], ulysses=layout["ulysses"]),
                                names=FLAG_NAMES)
    if args.dst == "osp-next":
        try:
            osp_next_config(model_config, ckpt.precision)
        except ValueError as exc:
            errors.append(f"--to osp-next: {exc}")
    if errors:
        raise ConvertError("the resulting model config / layout is invalid:\n  - " + "\n  - ".join(errors))
    sd = read_weights(ckpt, ema=args.ema, model_config=model_config)
    if args.lora:
        adapters = read_lora(args.lora, sd, ema={"auto": None, "ema": True, "live": False}[args.lora_weights])
        unknown = sorted({k.rsplit(".", 1)[0] + ".weight" for k in adapters} - set(sd))
        if unknown:
            raise ConvertError(f"--lora {args.lora}: adapters for weights the model lacks, e.g. {unknown[:3]}")
        sd = merge_lora({**sd, **adapters})
    if args.dtype != "keep":
        target = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        sd = {k: v.to(target) for k, v in sd.items()}
    dtype = args.dtype if args.dtype != "keep" else ("bf16" if all(v.dtype == torch.bfloat16 for v in sd.values())
                                                     else "fp32")
    step = _source_step(ckpt)
    written = write_weights(sd, model_config, args.output, args.dst, precision=ckpt.precision, layout=layout,
                            step=step, dtype=dtype, source=f"{args.src}:{Path(args.input).resolve()}",
                            max_shard_bytes=args.max_shard_size)
    report: Dict[str, Any] = {"from": args.src, "to": args.dst, "input": args.input, "weights": str(ckpt.where),
                              "output": str(written), "tensors": len(sd), "params": sum(v.numel() for v in sd.values()),
                              "dtype": dtype, "model": {"size": model_config.size, **layout_fields(model_config)}}
    if ckpt.precision is not None and ckpt.precision.recipe != "none":
        report["precision"] = {"recipe": ckpt.precision.recipe, "quantize_attention": ckpt.precision.quantize_attention}
    if args.dst == "megatron":
        report["layout"] = layout
    if args.check:
        report["check"] = run_check(args, sd, model_config, ckpt.where)
    return report


def _source_step(ckpt) -> int:
    if ckpt.format != "megatron":
        return 0

    return int(read_run_config(ckpt.where)[1].get("step", 0))


def run_check(args, sd, model_config, where) -> Dict[str, Any]:
    inputs = check.random_inputs(model_config.resolve())
    dense = model_config.schedule == "full"
    untouched = not args.lora and args.dtype == "keep" and not args.ema
    if args.src == "diffusers" and dense and untouched:
        ref, ref_name = check.run_diffusers(str(where), inputs), "diffusers WanTransformer3DModel (input)"
    else:
        ref, ref_name = check.run_ours(sd, model_config, inputs), f"osp DiT ({args.src} weights)"
    if args.dst == "diffusers" and dense:
        got, got_name = check.run_diffusers(args.output, inputs), "diffusers WanTransformer3DModel (output)"
    else:
        out = open_checkpoint(args.output, args.dst)
        got = check.run_ours(read_weights(out), out.model, inputs)
        got_name = f"osp DiT ({args.dst} output read back)"
    result = check.compare(got, ref)
    result.update(reference=ref_name, converted=got_name, tol=args.check_tol, ok=result["rel"] <= args.check_tol)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args)
    except ConvertError as exc:
        print(f"osp-convert: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as exc:  # adapter / format errors name the keys and files
        print(f"osp-convert: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1, default=str))
    if "check" in report and not report["check"]["ok"]:
        c = report["check"]
        print(f"osp-convert: --check failed: relative difference {c['rel']:.3e} > {c['tol']:.1e} "
              f"(max abs {c['max_abs']:.3e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
