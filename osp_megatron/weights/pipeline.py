"""A complete diffusers `WanPipeline` folder around the DiT: `osp-convert --to diffusers-pipeline`.

    out/model_index.json   WanPipeline + each component's [library, class] ([null, null] when not exported)
    out/transformer/       the `--to diffusers` export itself (`formats.write_weights(..., "diffusers")`: config.json
                           with the `_osp_model` layout block + safetensors shards)
    out/scheduler/         UniPCMultistepScheduler(prediction_type=flow_prediction, use_flow_sigmas=True,
                           flow_shift=S), the scheduler of Wan's diffusers pipelines
    out/vae/, out/text_encoder/, out/tokenizer/   copied from the given folders, or the `tiny` random stand-ins
    out/README.md          model card (YAML front matter + what the checkpoint records)

The folder is built as `<out>.tmp-XXXX` beside `out` and renamed into place when complete, so `out` is either the
old folder or the whole new pipeline. Without a VAE / text encoder the pipeline still opens with
`WanPipeline.from_pretrained(out, vae=..., text_encoder=..., tokenizer=...)`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from osp_megatron.diffusion.presets import sample_preset
from osp_megatron.encoders.text import tiny_text_model
from osp_megatron.encoders.tokenizer import byte_tokenizer_fast
from osp_megatron.encoders.vae import tiny_vae_model
from osp_megatron.weights.files import StateDict
from osp_megatron.weights.formats import layout_fields, write_weights

PIPELINE_FORMAT = "diffusers-pipeline"
PIPELINE_CLASS = "WanPipeline"
SCHEDULER = ("diffusers", "UniPCMultistepScheduler")
TRANSFORMER = ("diffusers", "WanTransformer3DModel")
VAE = ("diffusers", "AutoencoderKLWan")
TEXT_ENCODER = ("transformers", "UMT5EncoderModel")
TINY_TOKENIZER = ("transformers", "PreTrainedTokenizerFast")
COMPONENTS = ("vae", "text_encoder", "tokenizer")
FLAGS = {"vae": "--vae", "text_encoder": "--text-encoder", "tokenizer": "--tokenizer"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
DEFAULT_SHIFT_PRESET = "osp-next"
PUBLIC_WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # only named in the card's usage snippet for missing components


class PipelineError(ValueError):
    """A component folder or option that cannot make the pipeline; the message names the flag and the fix."""


@dataclass(frozen=True)
class Component:
    """One pipeline component: `source` is "tiny" or the folder copied as `out/<name>/`."""

    name: str
    source: str
    library: str
    class_name: str


# ------------------------------------------------------------------------------------------ components
def _json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None


def _pipeline_root(path: Path) -> Optional[Path]:
    return path if (path / "model_index.json").is_file() else None


def _config_folder(spec: str, name: str) -> Path:
    """`spec` itself when it holds config.json, else its `<name>/` subfolder (a pipeline folder)."""
    p = Path(spec)
    for folder in (p, p / name):
        if (folder / "config.json").is_file():
            return folder
    raise PipelineError(f"{FLAGS[name]} {spec}: neither a {name} folder (config.json) nor a diffusers pipeline folder "
                        f"with {name}/; give one (e.g. a local {PUBLIC_WAN} folder) or {FLAGS[name]} tiny for the "
                        "random stand-in")


def _tokenizer_folder(spec: str) -> Optional[Path]:
    p = Path(spec)
    for folder in (p, p / "tokenizer"):
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def _tokenizer_class(folder: Path) -> tuple:
    """[library, class] of a tokenizer folder: its pipeline's model_index entry, else tokenizer_config.json's
    tokenizer_class when transformers has it, else AutoTokenizer."""
    import transformers

    root = _pipeline_root(folder.parent)
    if root is not None and folder.name == "tokenizer":
        entry = _json(root / "model_index.json").get("tokenizer")
        if isinstance(entry, list) and len(entry) == 2 and entry[0]:
            return tuple(entry)
    if (folder / "tokenizer_config.json").is_file():
        name = _json(folder / "tokenizer_config.json").get("tokenizer_class")
        if isinstance(name, str) and hasattr(transformers, name):
            return ("transformers", name)
    return ("transformers", "AutoTokenizer")


def resolve_components(model_config, input_path: str, vae: Optional[str] = None, text_encoder: Optional[str] = None,
                       tokenizer: Optional[str] = None) -> Dict[str, Optional[Component]]:
    """{vae, text_encoder, tokenizer: Component or None}, checked against the DiT (VAE z_dim = in_channels, umT5
    d_model = text_dim) before anything is written. A flag wins; else the input's own pipeline folder (when it has
    `vae/` / `text_encoder/` / `tokenizer/`, as osp-sample resolves them); `tiny` only when given; the tokenizer
    defaults to the one beside the text encoder."""
    dims = model_config.resolve()
    root = _pipeline_root(Path(input_path))
    given = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    specs: Dict[str, Optional[str]] = {}
    for name in ("vae", "text_encoder"):
        specs[name] = given[name] or (str(root / name) if root is not None and (root / name).is_dir() else None)
    out: Dict[str, Optional[Component]] = {}

    spec = specs["vae"]
    if spec is None:
        out["vae"] = None
    elif spec == "tiny":
        z_dim = int(tiny_vae_model().config.z_dim)
        if z_dim != dims.in_channels:
            raise PipelineError(f"--vae tiny: {z_dim} latent channels, but the DiT takes {dims.in_channels}")
        out["vae"] = Component("vae", "tiny", *VAE)
    else:
        folder = _config_folder(spec, "vae")
        config = _json(folder / "config.json")
        if config.get("_class_name") != VAE[1]:
            raise PipelineError(f"--vae {spec}: {folder / 'config.json'} is a {config.get('_class_name')!r}, not a "
                                f"{VAE[1]} (the Wan VAE)")
        if int(config.get("z_dim", -1)) != dims.in_channels:
            raise PipelineError(f"--vae {spec}: z_dim={config.get('z_dim')} latent channels, but the DiT takes "
                                f"in_channels={dims.in_channels}")
        out["vae"] = Component("vae", str(folder), *VAE)

    spec = specs["text_encoder"]
    if spec is None:
        out["text_encoder"] = None
    elif spec == "tiny":
        out["text_encoder"] = Component("text_encoder", "tiny", *TEXT_ENCODER)
    else:
        folder = _config_folder(spec, "text_encoder")
        config = _json(folder / "config.json")
        if TEXT_ENCODER[1] not in (config.get("architectures") or []) and config.get("model_type") != "umt5":
            raise PipelineError(f"--text-encoder {spec}: {folder / 'config.json'} is not a {TEXT_ENCODER[1]} (umT5) "
                                f"config (architectures={config.get('architectures')})")
        if int(config.get("d_model", -1)) != dims.text_dim:
            raise PipelineError(f"--text-encoder {spec}: d_model={config.get('d_model')}, but the DiT takes "
                                f"text_dim={dims.text_dim}")
        out["text_encoder"] = Component("text_encoder", str(folder), *TEXT_ENCODER)

    spec = tokenizer
    if spec is None and out["text_encoder"] is not None:
        te = out["text_encoder"].source
        spec = "tiny" if te == "tiny" else next(
            (str(f) for f in (Path(te).parent / "tokenizer", Path(te)) if _tokenizer_folder(str(f)) == f), None)
        if spec is None:
            raise PipelineError(f"--tokenizer: no tokenizer beside the text encoder {te} (no tokenizer/ folder next to "
                                f"it, no {' / '.join(TOKENIZER_FILES)} in it); give --tokenizer DIR")
    if spec is None:
        out["tokenizer"] = None
    elif spec == "tiny":
        if out["text_encoder"] is not None and out["text_encoder"].source != "tiny":
            raise PipelineError("--tokenizer tiny: the byte-level tiny tokenizer only fits --text-encoder tiny")
        out["tokenizer"] = Component("tokenizer", "tiny", *TINY_TOKENIZER)
    else:
        folder = _tokenizer_folder(spec)
        if folder is None:
            raise PipelineError(f"--tokenizer {spec}: no {' / '.join(TOKENIZER_FILES)} in it or in its tokenizer/")
        out["tokenizer"] = Component("tokenizer", str(folder), *_tokenizer_class(folder))
    if out["text_encoder"] is not None and out["text_encoder"].source == "tiny" and out["tokenizer"].source != "tiny":
        raise PipelineError("--text-encoder tiny: the tiny umT5 reads byte-level ids; drop --tokenizer (or pass "
                            "--tokenizer tiny)")
    if (out["text_encoder"] is None) != (out["tokenizer"] is None):
        missing = "text_encoder" if out["text_encoder"] is None else "tokenizer"
        raise PipelineError(f"{FLAGS[missing]}: a pipeline needs the text encoder and its tokenizer together; give "
                            f"{FLAGS[missing]} too (or neither)")
    return out


def missing_components(components: Dict[str, Optional[Component]]) -> List[str]:
    return [n for n in COMPONENTS if components.get(n) is None]


# ------------------------------------------------------------------------------------------ scheduler
def default_flow_shift(run_config=None, converted: bool = False) -> tuple:
    """(shift, where it comes from): a training run's sample settings (`train.sample_preset`'s shift, else
    `train.sample_shift`), else the osp-next preset's (OSP-Next's released inference, 7.0)."""
    if run_config is not None and not converted:
        train = run_config.train
        if train.sample_preset:
            return float(sample_preset(train.sample_preset)["shift"]), f"train.sample_preset={train.sample_preset}"
        return float(train.sample_shift), "train.sample_shift"
    return float(sample_preset(DEFAULT_SHIFT_PRESET)["shift"]), f"osp-sample --preset {DEFAULT_SHIFT_PRESET}"


def make_scheduler(flow_shift: float):
    """Wan's diffusers scheduler: UniPC on flow sigmas with a static shift, velocity (flow) prediction."""
    from diffusers import UniPCMultistepScheduler

    if flow_shift <= 0:
        raise PipelineError(f"--flow-shift {flow_shift}: must be > 0 (Wan: 5.0 at 720p, 3.0 at 480p)")
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=float(flow_shift))


# ------------------------------------------------------------------------------------------ writing
def model_index(components: Dict[str, Optional[Component]]) -> Dict[str, Any]:
    import diffusers

    index: Dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                             "scheduler": list(SCHEDULER), "transformer": list(TRANSFORMER)}
    for name in COMPONENTS:
        c = components.get(name)
        index[name] = [c.library, c.class_name] if c is not None else [None, None]
    return dict(sorted(index.items()))


def _write_component(c: Component, folder: Path, text_dim: int) -> None:
    if c.source != "tiny":
        shutil.copytree(c.source, folder)  # symlinks (hub caches) are followed: the folder stands alone
    elif c.name == "vae":
        tiny_vae_model().save_pretrained(folder)
    elif c.name == "text_encoder":
        tiny_text_model(text_dim).save_pretrained(folder)
    else:
        byte_tokenizer_fast().save_pretrained(folder)
        config = _json(folder / "tokenizer_config.json")  # name a class transformers 4 and 5 both have
        config["tokenizer_class"] = TINY_TOKENIZER[1]
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`; an existing `out` is renamed aside first and then removed."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def write_pipeline(sd: StateDict, model_config, out: str | os.PathLike, *, components: Dict[str, Optional[Component]],
                   flow_shift: float, card: str, max_shard_bytes: int = 5 << 30) -> Path:
    """Write the pipeline folder (see the module docstring); `sd` in our names, `card` the README.md text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scheduler = make_scheduler(flow_shift)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        write_weights(sd, model_config, tmp / "transformer", "diffusers", max_shard_bytes=max_shard_bytes)
        scheduler.save_pretrained(tmp / "scheduler")
        for c in components.values():
            if c is not None:
                _write_component(c, tmp / c.name, model_config.resolve().text_dim)
        (tmp / "model_index.json").write_text(json.dumps(model_index(components), indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ------------------------------------------------------------------------------------------ model card
def _yaml_list(items: List[str]) -> str:
    return "".join(f"\n- {i}" for i in items)


def model_card(*, name: str, model_config, params: int, dtype: str, source: str, weights: str,
               precision=None, step: Optional[int] = None, run_config=None, converted_from: str = "",
               iteration: Optional[int] = None, flow_shift: float, shift_from: str,
               components: Dict[str, Optional[Component]], base_model: str = "") -> str:
    """README.md of the pipeline: front matter, then only what the checkpoint records (dims, layout schedule,
    steps, precision recipe, the run's optimiser settings) and a usage snippet."""
    d, layout = model_config.resolve(), layout_fields(model_config)
    sparse = layout["schedule"] != "full"
    tags = ["text-to-video", "video-generation", "wan", "osp-megatron"] + (["skiparse", "osp-next"] if sparse else [])
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-video", "license: apache-2.0"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:" + _yaml_list(tags), "---", ""]

    lines = [f"# {name}", "", f"A diffusers `{PIPELINE_CLASS}` (text-to-video) exported by `osp-convert --to "
             f"{PIPELINE_FORMAT}` from the {source}.", "", "## Model", "", "| field | value |", "| --- | --- |",
             f"| size | {model_config.size} |", f"| parameters | {params:,} |",
             f"| hidden size | {d.hidden_size} |", f"| blocks | {d.num_layers} |",
             f"| attention heads | {d.num_attention_heads} |", f"| FFN size | {d.ffn_hidden_size} |",
             f"| text dim | {d.text_dim} |", f"| latent channels (in / out) | {d.in_channels} / {d.out_channels} |",
             f"| patch size | {list(d.patch_size)} |", f"| block schedule | {layout['schedule']} |"]
    if sparse:
        lines += [f"| full-attention blocks | {d.num_full_blocks} |", f"| Skiparse sparse ratio P | "
                  f"{layout['sparse_ratio']} |"]
    lines += [f"| weights | {weights} |", f"| dtype | {dtype} |", ""]
    if sparse:
        lines += ["The DiT was trained with Skiparse sparse attention (schedule above). diffusers' "
                  "`WanTransformer3DModel` runs every block with dense attention; the layout is recorded in "
                  "`transformer/config.json` (`_osp_model`), which `osp-sample --checkpoint <this folder>` and "
                  "`osp-convert --from diffusers` apply.", ""]

    training: List[str] = []
    if step is not None and not converted_from:
        training.append(f"- optimizer steps: {step}")
    if iteration is not None:
        training.append(f"- OSP-Next training iteration: {iteration}")
    if converted_from:
        training.append(f"- converted by osp-convert from `{converted_from}` (step {step}); not trained in this "
                        "checkpoint")
    if precision is not None:
        recipe = precision.recipe + (" (attention quantised too)" if precision.recipe != "none"
                                     and precision.quantize_attention else "")
        training.append(f"- precision recipe: {recipe}")
    if run_config is not None and not converted_from:
        t = run_config.train
        training += [f"- planned steps: {t.steps}", f"- learning rate: {t.lr} ({t.lr_schedule}, warm-up "
                     f"{t.warmup_steps})", f"- EMA decay: {t.ema_decay}",
                     f"- training timestep shift: {'dynamic' if t.dynamic_shift else t.shift}"]
        if t.global_batch_size:
            training.append(f"- global batch size: {t.global_batch_size}")
        if t.init_from:
            training.append(f"- initialised from: `{t.init_from}`")
    if training:
        lines += ["## Training", ""] + training + [""]

    present = {n: c for n, c in components.items() if c is not None}
    lines += ["## Pipeline", "", f"- scheduler: `{SCHEDULER[1]}` (flow_prediction, use_flow_sigmas, flow_shift="
              f"{flow_shift:g}; from {shift_from}; Wan's convention: 5.0 at 720p, 3.0 at 480p)"]
    for n in COMPONENTS:
        c = components.get(n)
        if c is None:
            lines.append(f"- {n}: not included (pass it to `from_pretrained`)")
        else:
            what = ("copied" if c.source != "tiny" else "byte-level tiny stand-in (tests only)" if n == "tokenizer"
                    else "random-initialised tiny stand-in (tests only)")
            lines.append(f"- {n}: `{c.class_name}`, {what}")
    lines += ["", "## Usage", "", "```python", "import torch", "from diffusers import WanPipeline"]
    missing = [n for n in COMPONENTS if n not in present]
    if missing:
        lines += ["from diffusers import AutoencoderKLWan", "from transformers import AutoTokenizer, UMT5EncoderModel",
                  "", f"wan = \"{PUBLIC_WAN}\"  # any Wan2.1 T2V diffusers folder with the same VAE / umT5"]
        loaders = {"vae": "AutoencoderKLWan.from_pretrained(wan, subfolder=\"vae\", torch_dtype=torch.float32)",
                   "text_encoder": "UMT5EncoderModel.from_pretrained(wan, subfolder=\"text_encoder\", "
                                   "torch_dtype=torch.bfloat16)",
                   "tokenizer": "AutoTokenizer.from_pretrained(wan, subfolder=\"tokenizer\")"}
        extra = "".join(f", {n}={loaders[n]}" for n in missing)
        lines += [f"pipe = WanPipeline.from_pretrained(\"path/to/{name}\", torch_dtype=torch.bfloat16{extra})"]
    else:
        lines += ["", f"pipe = WanPipeline.from_pretrained(\"path/to/{name}\", torch_dtype=torch.bfloat16)"]
    lines += ["pipe.to(\"cuda\")", "frames = pipe(\"a red fox running through snow\", height=480, width=832, "
              "num_frames=81, num_inference_steps=50, guidance_scale=5.0).frames[0]", "```", ""]
    return "\n".join(front + lines)


__all__ = ["COMPONENTS", "Component", "PIPELINE_FORMAT", "PipelineError", "default_flow_shift", "make_scheduler",
           "missing_components", "model_card", "model_index", "resolve_components", "write_pipeline"]
