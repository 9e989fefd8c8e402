"""`osp-convert`: DiT weights between diffusers, original Wan2.1 and megatron `torch_dist` checkpoints.

    osp-convert --from diffusers --to megatron --input Wan2.1-T2V-1.3B-Diffusers/transformer --output ckpt \
                --tp 2 [--model schedule=dual_end] [--check]
    osp-convert --from megatron --to diffusers --input runs/x --output export --ema --lora runs/grpo --dtype bf16

Formats. diffusers: a folder with `config.json` (WanTransformer3DModel) + `diffusion_pytorch_model.safetensors`
or shards + `*.safetensors.index.json` (a pipeline folder's `transformer/` is found by itself). wan: the same
files with the original Wan2.1 key names and config (`dim`, `num_heads`, ...). megatron: a torch_dist
checkpoint (a run dir, a folder with `latest`, or a step folder) written by osp-train or osp-convert; it loads
under any TP/PP/CP layout; `--tp/--pp/--ssp/--ulysses` choose the layout that writes it (that many local ranks).

Every path goes through one full state dict in our parameter names (adapters in osp_megatron.models.adapters),
so diffusers <-> wan <-> megatron round trips are bitwise. `--ema` takes the EMA weights of a megatron run;
`--lora` folds adapters in (W += alpha/r * B @ A); `--dtype` casts (default: keep). `--check` runs the source
and the written model on one random input and fails (exit 1) when they differ by more than `--check-tol`.
OSP-Next layout fields (schedule, num_full_blocks, sparse_ratio) travel in diffusers/wan config.json under
`_osp_model` (diffusers ignores `_` keys) and in megatron checkpoints' config; `--model KEY=VALUE` sets them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

FORMATS = ("diffusers", "wan", "megatron")
LAYOUT_FIELDS = ("schedule", "num_full_blocks", "sparse_ratio")
MODEL_OVERRIDES = LAYOUT_FIELDS + ("attention_backend", "spec")
WEIGHTS_BASENAME = "diffusion_pytorch_model"


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
    p.add_argument("--input", required=True, help="input folder (or megatron run/step dir)")
    p.add_argument("--output", required=True, help="output folder (must be empty or new; see --overwrite)")
    for name in ("tp", "pp", "ssp", "ulysses"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"megatron output: {name.upper()} degree of the ranks "
                                                               "that write the checkpoint (default 1)")
    p.add_argument("--ema", action="store_true", help="megatron input: take the EMA weights")
    p.add_argument("--lora", help="LoRA adapters to merge: GRPO run/iter dir, or a .pt/.safetensors file")
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
    if args.ema and args.src != "megatron":
        raise ConvertError(f"--ema: EMA weights exist only in megatron checkpoints from osp-train, not in {args.src} "
                           "folders; drop --ema")
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise ConvertError(f"--input {src}: does not exist")
    if out.resolve() == src.resolve():
        raise ConvertError("--output must differ from --input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConvertError(f"--output {out}: exists and is not empty; choose a new folder or pass --overwrite")
    if args.check_tol <= 0:
        raise ConvertError(f"--check-tol {args.check_tol}: must be > 0")
    return layout


# ------------------------------------------------------------------------------------------ reading
def _safetensors_folder(path: Path, fmt: str) -> Path:
    if (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ConvertError(f"--input {path}: no config.json; a {fmt} folder holds config.json + "
                           f"{WEIGHTS_BASENAME}.safetensors (or shards with an index)")
    return path


def read_config(fmt: str, path: str):
    """(ModelConfig, where) from the input's config, without loading weights."""
    from osp_megatron.models.adapters import diffusers as ad
    from osp_megatron.models.adapters import wan as aw

    if fmt == "megatron":
        from tools.megatron_io import find_checkpoint_dir, read_model_config, _ensure_world

        _ensure_world()
        ckpt = find_checkpoint_dir(path)
        return read_model_config(ckpt)[0], ckpt
    folder = _safetensors_folder(Path(path), fmt)
    cfg = json.loads((folder / "config.json").read_text())
    if fmt == "diffusers":
        if cfg.get("_class_name") == "WanModel" or "dim" in cfg and "num_attention_heads" not in cfg:
            raise ConvertError(f"--input {folder}: config.json is an original Wan2.1 config; use --from wan")
        mc = ad.config_from_diffusers(cfg)
    else:
        if "num_attention_heads" in cfg and "dim" not in cfg:
            raise ConvertError(f"--input {folder}: config.json is a diffusers config; use --from diffusers")
        mc = aw.config_from_wan(cfg)
    layout = cfg.get("_osp_model") or {}
    return replace(mc, **{k: v for k, v in layout.items() if k in LAYOUT_FIELDS}), folder


def read_weights(fmt: str, where, model_config, ema: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Full state dict in our names (+ megatron's osp common dict)."""
    from osp_megatron.models.adapters import diffusers as ad
    from osp_megatron.models.adapters import wan as aw
    from osp_megatron.models.adapters.common import load_safetensors_dir

    if fmt == "megatron":
        from tools.megatron_io import read_megatron

        sd, _, osp = read_megatron(where, ema=ema)
        return sd, osp
    raw = load_safetensors_dir(where)
    return (ad.from_diffusers(raw, model_config) if fmt == "diffusers" else aw.from_wan(raw, model_config)), {}


# ------------------------------------------------------------------------------------------ writing
def _layout_json(model_config) -> Dict[str, Any]:
    return {k: getattr(model_config, k) for k in LAYOUT_FIELDS}


def write_output(fmt: str, sd, model_config, out: str, layout: Dict[str, int], step: int, dtype: str,
                 source: str, max_shard: int) -> str:
    from osp_megatron.models.adapters import diffusers as ad
    from osp_megatron.models.adapters import wan as aw
    from osp_megatron.models.adapters.common import save_safetensors_dir

    if fmt == "megatron":
        from tools.megatron_io import write_megatron

        return str(write_megatron(sd, model_config, out, layout, step=step, dtype=dtype, source=source))
    if fmt == "diffusers":
        conf = dict(ad.diffusers_config(model_config), _osp_model=_layout_json(model_config))
        save_safetensors_dir(ad.to_diffusers(sd, model_config), out, WEIGHTS_BASENAME, max_shard, config=conf)
    else:
        conf = dict(aw.wan_config(model_config), _osp_model=_layout_json(model_config))
        save_safetensors_dir(aw.to_wan(sd, model_config), out, WEIGHTS_BASENAME, max_shard, config=conf)
    return out


# ------------------------------------------------------------------------------------------ main
def convert(args) -> Dict[str, Any]:

    from osp_megatron.config import updated

    layout = validate_args(args)
    overrides = parse_model_overrides(args.model)
    model_config, where = read_config(args.src, args.input)
    model_config = updated(model_config, overrides)
    from osp_megatron.config.validate import FLAG_NAMES, layout_errors
    from osp_megatron.config import ParallelConfig

    errors: List[str] = []
    model_config.check(errors)
    if args.dst == "megatron":
        errors += layout_errors(model_config, ParallelConfig(tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"],
                                                             ssp=layout["ssp"], ulysses=layout["ulysses"]),
                                names=FLAG_NAMES)
    if errors:
        raise ConvertError("the resulting model config / layout is invalid:\n  - " + "\n  - ".join(errors))
    sd, osp = read_weights(args.src, where, model_config, args.ema)
    if args.lora:
        from osp_megatron.rl.lora import merge_lora
        from tools.lora_io import read_lora

        adapters = read_lora(args.lora, sd)
        unknown = sorted({k.rsplit(".", 1)[0] + ".weight" for k in adapters} - set(sd))
        if unknown:
            raise ConvertError(f"--lora {args.lora}: adapters for weights the model lacks, e.g. {unknown[:3]}")
        sd = merge_lora({**sd, **adapters})
    if args.dtype != "keep":
        target = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        sd = {k: v.to(target) for k, v in sd.items()}
    dtype = args.dtype if args.dtype != "keep" else ("bf16" if all(v.dtype == torch.bfloat16 for v in sd.values())
                                                     else "fp32")
    step = int(osp.get("step", 0)) if osp else 0
    written = write_output(args.dst, sd, model_config, args.output, layout, step, dtype,
                           f"{args.src}:{Path(args.input).resolve()}", args.max_shard_size)
    report: Dict[str, Any] = {"from": args.src, "to": args.dst, "input": args.input, "output": written,
                              "tensors": len(sd), "params": sum(v.numel() for v in sd.values()), "dtype": dtype,
                              "model": {"size": model_config.size, **_layout_json(model_config)}}
    if args.dst == "megatron":
        report["layout"] = layout
    if args.check:
        report["check"] = run_check(args, sd, model_config, where)
    return report


def run_check(args, sd, model_config, where) -> Dict[str, Any]:
    from tools import model_check

    inputs = model_check.random_inputs(model_config.resolve())
    dense = model_config.schedule == "full"
    untouched = not args.lora and args.dtype == "keep" and not args.ema
    if args.src == "diffusers" and dense and untouched:
        ref, ref_name = model_check.run_diffusers(str(where), inputs), "diffusers WanTransformer3DModel (input)"
    else:
        ref, ref_name = model_check.run_ours(sd, model_config, inputs), f"osp DiT ({args.src} weights)"
    if args.dst == "diffusers" and dense:
        got, got_name = model_check.run_diffusers(args.output, inputs), "diffusers WanTransformer3DModel (output)"
    else:
        out_config, out_where = read_config(args.dst, args.output)
        out_sd, _ = read_weights(args.dst, out_where, out_config, False)
        got, got_name = model_check.run_ours(out_sd, out_config, inputs), f"osp DiT ({args.dst} output read back)"
    result = model_check.compare(got, ref)
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
