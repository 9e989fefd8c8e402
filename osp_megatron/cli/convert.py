"""`osp-convert`: DiT weights between diffusers, original Wan2.1, OSP-Next and megatron `torch_dist` checkpoints.

    osp-convert --from diffusers --to megatron --input Wan2.1-T2V-1.3B-Diffusers --output ckpt --tp 2 \
                [--model schedule=dual_end] [--check]
    osp-convert --from megatron --to diffusers --input runs/x --output export --ema --lora runs/grpo --dtype bf16
    osp-convert --from osp-next --to megatron --input OSP-Next-14B --output ckpt
    osp-convert --from megatron --to osp-next --input runs/x --output osp_next_export
    osp-convert --from megatron --to diffusers-pipeline --input runs/x --output pipe --ema \
                --vae Wan2.1-T2V-1.3B-Diffusers --text-encoder Wan2.1-T2V-1.3B-Diffusers [--flow-shift 5]

Formats (osp_megatron.weights). diffusers: a folder with `config.json` (WanTransformer3DModel) +
`diffusion_pytorch_model.safetensors` or shards + `*.safetensors.index.json` (a pipeline folder's `transformer/`
is found by itself). wan: the same files with the original Wan2.1 key names and config (`dim`, `num_heads`, ...).
osp-next: OSP-Next's OSPNextModel folder (its config.json with skiparse_model_type / sparse_ratio /
num_full_blocks / quant fields, Wan key names), its training output or an iter_* folder / .pt (`--ema`:
ema_model_state_dict.pt); written as a folder OSP-Next's `OSPNextModel.from_pretrained` loads. megatron: a
torch_dist checkpoint (a run dir, a folder with `latest`, or a step folder) written by osp-train or osp-convert;
it loads under any TP/PP/CP layout; `--tp/--pp/--ssp/--ulysses` choose the layout that writes it.
diffusers-pipeline (output only): a whole diffusers WanPipeline folder that `WanPipeline.from_pretrained(OUT)`
opens: model_index.json, transformer/ (exactly the `--to diffusers` export), scheduler/ (UniPC on flow sigmas,
flow_prediction, `--flow-shift`), vae/ text_encoder/ tokenizer/ copied from `--vae` / `--text-encoder` /
`--tokenizer` (folders or pipeline folders; default: the input's own pipeline folder; `tiny`: the random test
stand-ins, only when asked) and a model card README.md. Components not given are `[null, null]` in model_index.json:
pass them to `WanPipeline.from_pretrained(OUT, vae=..., text_encoder=..., tokenizer=...)`. The folder is built as
OUT.tmp-XXXX and renamed into place; `--overwrite` replaces a non-empty OUT as a whole.

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
import re
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
from osp_megatron.weights.pipeline import (PIPELINE_FORMAT, PipelineError, default_flow_shift, missing_components,
                                           model_card, resolve_components, write_pipeline)

LAYOUT_FIELDS = ("schedule", "num_full_blocks", "sparse_ratio")
MODEL_OVERRIDES = LAYOUT_FIELDS + ("attention_backend", "spec")
OUTPUT_FORMATS = FORMATS + (PIPELINE_FORMAT,)
PIPELINE_ONLY = ("vae", "text_encoder", "tokenizer", "flow_shift", "base_model")


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
    p.add_argument("--to", dest="dst", choices=OUTPUT_FORMATS, required=True,
                   help=f"output format ({PIPELINE_FORMAT}: a whole diffusers WanPipeline folder)")
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
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder (a pipeline output "
                                                            "is replaced as a whole)")
    g = p.add_argument_group(f"--to {PIPELINE_FORMAT}")
    g.add_argument("--vae", help="Wan VAE (AutoencoderKLWan) folder or a pipeline folder with vae/, copied into the "
                                 "pipeline; 'tiny': the random test stand-in; default: the input's pipeline folder, "
                                 "else none (model_index.json says null)")
    g.add_argument("--text-encoder", help="umT5 (UMT5EncoderModel) folder or a pipeline folder with text_encoder/; "
                                          "'tiny': the random test stand-in (with its byte-level tokenizer); default: "
                                          "the input's pipeline folder, else none")
    g.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the text encoder, or the text "
                                       "encoder's folder)")
    g.add_argument("--flow-shift", type=float, help="flow_shift of the UniPC scheduler (default: the checkpoint's "
                                                    "sample settings, train.sample_preset's shift else "
                                                    "train.sample_shift, when it is a training run; else 7.0, the "
                                                    "osp-next preset = OSP-Next's released inference; Wan's own "
                                                    "convention is 5.0 at 720p, 3.0 at 480p)")
    g.add_argument("--base-model", default="", help="hub id for the model card's base_model (e.g. "
                                                    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers); default: none")
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
    if args.dst != PIPELINE_FORMAT:
        given = [f"--{name.replace('_', '-')}" for name in PIPELINE_ONLY if getattr(args, name, None)]
        if given:
            raise ConvertError(f"{', '.join(given)}: apply to --to {PIPELINE_FORMAT} only; drop them for {args.dst}")
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
    if args.dst == PIPELINE_FORMAT and out.exists() and not out.is_dir():
        raise ConvertError(f"--output {out}: is a file; a pipeline is a folder, choose a folder path")
    if args.dst == PIPELINE_FORMAT and args.flow_shift is not None and args.flow_shift <= 0:
        raise ConvertError(f"--flow-shift {args.flow_shift}: must be > 0 (Wan: 5.0 at 720p, 3.0 at 480p)")
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
    components = (resolve_components(model_config, args.input, args.vae, args.text_encoder, args.tokenizer)
                  if args.dst == PIPELINE_FORMAT else {})
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
    run_config, osp = _source_run(ckpt)
    step = int(osp.get("step", 0))
    params = sum(v.numel() for v in sd.values())
    if args.dst == PIPELINE_FORMAT:
        shift, shift_from = ((args.flow_shift, "--flow-shift") if args.flow_shift is not None
                             else default_flow_shift(run_config, converted=bool(osp.get("converted_from"))))
        card = model_card(name=Path(args.output).name, model_config=model_config, params=params, dtype=dtype,
                          source=_source_words(args, ckpt), weights=_weights_words(args), precision=ckpt.precision,
                          step=step if ckpt.format == "megatron" else None, run_config=run_config,
                          converted_from=str(osp.get("converted_from") or ""), iteration=_osp_next_iteration(ckpt),
                          flow_shift=shift, shift_from=shift_from, components=components,
                          base_model=args.base_model)
        written = write_pipeline(sd, model_config, args.output, components=components, flow_shift=shift, card=card,
                                 max_shard_bytes=args.max_shard_size)
    else:
        written = write_weights(sd, model_config, args.output, args.dst, precision=ckpt.precision, layout=layout,
                                step=step, dtype=dtype, source=f"{args.src}:{Path(args.input).resolve()}",
                                max_shard_bytes=args.max_shard_size)
    report: Dict[str, Any] = {"from": args.src, "to": args.dst, "input": args.input, "weights": str(ckpt.where),
                              "output": str(written), "tensors": len(sd), "params": params,
                              "dtype": dtype, "model": {"size": model_config.size, **layout_fields(model_config)}}
    if ckpt.precision is not None and ckpt.precision.recipe != "none":
        report["precision"] = {"recipe": ckpt.precision.recipe, "quantize_attention": ckpt.precision.quantize_attention}
    if args.dst == "megatron":
        report["layout"] = layout
    if args.dst == PIPELINE_FORMAT:
        missing = missing_components(components)
        report["pipeline"] = {"flow_shift": shift, "flow_shift_from": shift_from,
                              "components": {n: (c.source if c else None) for n, c in components.items()},
                              "missing": missing}
        if missing:
            print(f"osp-convert: {args.output} has no {', '.join(missing)} (null in model_index.json); open it with "
                  f"WanPipeline.from_pretrained({str(args.output)!r}, "
                  + ", ".join(f"{n}=..." for n in missing) + "), e.g. from a Wan2.1 T2V diffusers folder, or "
                  "export again with --vae / --text-encoder", file=sys.stderr)
    if args.check:
        report["check"] = run_check(args, sd, model_config, ckpt.where)
    return report


def _source_run(ckpt):
    """(the training run's Config, the checkpoint's `osp` dict) of a megatron checkpoint, else (None, {})."""
    if ckpt.format != "megatron":
        return None, {}
    return read_run_config(ckpt.where)


def _osp_next_iteration(ckpt) -> Optional[int]:
    """N of an OSP-Next `iter_N` checkpoint (folder or a file in it), else None."""
    if ckpt.format != "osp-next":
        return None
    folder = ckpt.where if ckpt.where.is_dir() else ckpt.where.parent
    match = re.fullmatch(r"iter_(\d+)", folder.name)
    return int(match.group(1)) if match else None


def _source_words(args, ckpt) -> str:
    kind = {"megatron": "osp-megatron torch_dist checkpoint", "diffusers": "diffusers WanTransformer3DModel",
            "wan": "Wan2.1 checkpoint", "osp-next": "OSP-Next checkpoint"}[ckpt.format]
    return f"{kind} `{Path(args.input).name}`"


def _weights_words(args) -> str:
    words = "EMA" if args.ema else "live (not EMA)" if args.src in EMA_FORMATS else "as stored"
    if args.lora:
        words += f", LoRA from `{Path(args.lora).name}` merged ({args.lora_weights} adapters)"
    return words


def run_check(args, sd, model_config, where) -> Dict[str, Any]:
    inputs = check.random_inputs(model_config.resolve())
    dense = model_config.schedule == "full"
    untouched = not args.lora and args.dtype == "keep" and not args.ema
    if args.src == "diffusers" and dense and untouched:
        ref, ref_name = check.run_diffusers(str(where), inputs), "diffusers WanTransformer3DModel (input)"
    else:
        ref, ref_name = check.run_ours(sd, model_config, inputs), f"osp DiT ({args.src} weights)"
    if args.dst in ("diffusers", PIPELINE_FORMAT) and dense:
        folder = Path(args.output) / "transformer" if args.dst == PIPELINE_FORMAT else Path(args.output)
        got, got_name = check.run_diffusers(str(folder), inputs), "diffusers WanTransformer3DModel (output)"
    else:
        out = open_checkpoint(args.output, "diffusers" if args.dst == PIPELINE_FORMAT else args.dst)
        got = check.run_ours(read_weights(out), out.model, inputs)
        got_name = f"osp DiT ({args.dst} output read back)"
    result = check.compare(got, ref)
    result.update(reference=ref_name, converted=got_name, tol=args.check_tol, ok=result["rel"] <= args.check_tol)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args)
    except (ConvertError, PipelineError) as exc:
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
