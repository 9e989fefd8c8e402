"""Detect a checkpoint's format, read its model config and weights, load it into a model, write it out.

Formats:
* `megatron`: torch_dist (`paths.find_checkpoint_dir`: run dir, folder with `latest`, step dir); config and
  precision recipe from the stored run Config; EMA weights under `ema.`.
* `diffusers`: a `WanTransformer3DModel` folder (config.json + diffusion_pytorch_model safetensors, sharded with
  an index when large) or a diffusers *pipeline* folder (`model_index.json` + `transformer/`).
* `wan`: the original Wan2.1 layout (`WanModel` config.json: dim, num_heads, ...).
* `osp-next`: OSP-Next's `OSPNextModel` folder, its training output (`config.yaml` + `iter_*/`), an `iter_*`
  folder, or one of its `model_state_dict.pt` / `ema_model_state_dict.pt` (`adapters.osp_next` has the details).
Bare weight files without a config (a `.safetensors` / `.pt` file or a folder of them) are recognised by their
key names (diffusers or Wan); they carry no model config, so the caller gives one (the trainer's `model:`).

diffusers / wan folders written here carry the layout schedule under `_osp_model` (`schedule`, `num_full_blocks`,
`sparse_ratio`; diffusers ignores `_` keys), and every reader applies it: a sparse model never comes back dense.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from osp_megatron.config import PrecisionConfig, updated
from osp_megatron.models.adapters import diffusers as ad, osp_next as ao, wan as aw
from osp_megatron.models.adapters.diffusers import config_from_diffusers, from_diffusers
from osp_megatron.models.adapters.osp_next import (config_from_osp_next, from_osp_next, is_osp_next_config,
                                                   precision_from_osp_next)
from osp_megatron.models.adapters.wan import config_from_wan, from_wan
from osp_megatron.weights import megatron
from osp_megatron.weights.files import WEIGHT_SUFFIXES, StateDict, read_state_dict, save_safetensors_dir, weight_keys
from osp_megatron.weights.paths import WeightsError, find_checkpoint_dir, is_megatron_dir, latest_iteration_dir

FORMATS = ("megatron", "diffusers", "wan", "osp-next")
EMA_FORMATS = ("megatron", "osp-next")
LAYOUT_KEY = "_osp_model"
LAYOUT_FIELDS = ("schedule", "num_full_blocks", "sparse_ratio")
WEIGHTS_BASENAME = "diffusion_pytorch_model"
OSP_NEXT_WEIGHTS = "model_state_dict.pt"  # ospnext/distributed/checkpoint.py: MODEL_CHECKPOINT
OSP_NEXT_EMA = "ema_model_state_dict.pt"  # ... and `ema_` + MODEL_CHECKPOINT (save_ema_model)
OSP_NEXT_RUN_CONFIG = "config.yaml"  # train/train_osp.py: yaml.dump(config) into output_dir


@dataclass(frozen=True)
class Checkpoint:
    """What `open_checkpoint` found (no tensors read yet).

    path: as given; format: one of FORMATS; where: the megatron step dir, the weights folder or the weights file;
    model: the checkpoint's own ModelConfig incl. the layout schedule (None for bare weight files);
    precision: the PrecisionConfig it was trained with (megatron run config, OSP-Next `quant` fields), or None
    when the format does not say."""

    path: Path
    format: str
    where: Path
    model: Any = None
    precision: Any = None

    def describe(self) -> str:
        text = f"{self.format} {self.where}"
        if self.model is not None:
            m, d = self.model, self.model.resolve()
            text += f", {d.num_layers} blocks, schedule {m.schedule}"
            if m.schedule != "full":
                text += f" ({d.num_full_blocks} full, P={m.sparse_ratio})"
        if self.precision is not None and self.precision.recipe != "none":
            text += f", trained with precision.recipe={self.precision.recipe}"
        return text

    def differences(self, model_config, precision=None) -> List[str]:
        """Where this checkpoint's own layout schedule / precision recipe differs from a run's `model:` /
        `precision:` (e.g. the dense weights of a sparse fine-tune), one line each."""
        out = []
        if self.model is not None and layout_fields(self.model) != layout_fields(model_config):
            out.append(f"the checkpoint's layout {layout_fields(self.model)} differs from model.* "
                       f"{layout_fields(model_config)}")
        if self.precision is not None and precision is not None and self.precision.recipe != precision.recipe:
            out.append(f"the checkpoint was trained with precision.recipe={self.precision.recipe}, not "
                       f"{precision.recipe}")
        return out


# ------------------------------------------------------------------------------------------ detection
def _json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None


def _model_folder(path: Path) -> Optional[Path]:
    """The folder whose config.json describes the model: `path`, or a pipeline folder's `transformer/`."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _config_format(config: Dict[str, Any]) -> Optional[str]:
    if is_osp_next_config(config):
        return "osp-next"
    if config.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in config:
        return "diffusers"
    if config.get("_class_name") == "WanModel" or "dim" in config:
        return "wan"
    return None


def _keys_format(keys: Sequence[str]) -> Optional[str]:
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith("time_embedding.0.") or ".self_attn." in k for k in keys):
        return "wan"
    return None


def _osp_next_iteration(path: Path) -> Optional[Path]:
    """An OSP-Next `iter_*` folder (`path` itself, or the newest one of a training output dir)."""
    if (path / OSP_NEXT_WEIGHTS).is_file() or (path / OSP_NEXT_EMA).is_file():
        return path
    if (path / OSP_NEXT_RUN_CONFIG).is_file():
        it = latest_iteration_dir(path)
        if it is not None and ((it / OSP_NEXT_WEIGHTS).is_file() or (it / OSP_NEXT_EMA).is_file()):
            return it
    return None


def _osp_next_config_near(folder: Path) -> Optional[Dict[str, Any]]:
    """OSP-Next model config for weights in `folder`: its config.json, else the `model_config:` of the
    training run's config.yaml in the folder or up to two levels above (output_dir/iter_*/file.pt)."""
    import yaml


    if (folder / "config.json").is_file():
        config = _json(folder / "config.json")
        return config if is_osp_next_config(config) else None
    for d in (folder, folder.parent, folder.parent.parent):
        f = d / OSP_NEXT_RUN_CONFIG
        if f.is_file():
            data = yaml.safe_load(f.read_text()) or {}
            config = data.get("model_config") if isinstance(data, dict) else None
            if isinstance(config, dict) and "dim" in config:
                return config
    return None


def detect_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """The format of a checkpoint path (an explicit `fmt` other than auto is returned as is, once known)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise WeightsError(f"format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
        return fmt
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: does not exist; give a checkpoint folder, a run directory or a weights file")
    if is_megatron_dir(p):
        return "megatron"
    if p.is_dir():
        folder = _model_folder(p)
        if folder is not None:
            kind = _config_format(_json(folder / "config.json"))
            if kind is None:
                raise WeightsError(f"{folder / 'config.json'}: neither a diffusers WanTransformer3DModel, a Wan2.1 "
                                   "WanModel nor an OSP-Next OSPNextModel config")
            return kind
        if _osp_next_iteration(p) is not None:
            return "osp-next"
    else:
        if p.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{p}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}) nor a checkpoint folder")
        if (p.parent / "config.json").is_file():
            kind = _config_format(_json(p.parent / "config.json"))
            if kind is not None:
                return kind
        if _osp_next_config_near(p.parent) is not None:
            return "osp-next"
    kind = _keys_format(weight_keys(p))
    if kind is None:
        raise WeightsError(f"{p}: weights with unknown key names (neither diffusers nor Wan2.1 / OSP-Next)")
    return kind


# ------------------------------------------------------------------------------------------ config
def _with_layout(model_config, config: Dict[str, Any], source: Path):
    """Apply the `_osp_model` layout block of a diffusers / wan config.json."""
    layout = config.get(LAYOUT_KEY) or {}
    if not isinstance(layout, dict):
        raise WeightsError(f"{source}: {LAYOUT_KEY} must be a mapping of {', '.join(LAYOUT_FIELDS)}")
    layout = {k: layout[k] for k in LAYOUT_FIELDS if k in layout}
    return updated(model_config, layout, "model") if layout else model_config


def _open_osp_next(p: Path) -> Checkpoint:
    if p.is_file():
        where, config = p, _osp_next_config_near(p.parent)
    elif _model_folder(p) is not None:
        where = _model_folder(p)
        config = _json(where / "config.json")
    else:
        where = _osp_next_iteration(p)
        if where is None:
            raise WeightsError(f"{p}: not an OSP-Next checkpoint (an OSPNextModel folder with config.json, a training "
                               f"output dir with {OSP_NEXT_RUN_CONFIG} + iter_*/, or an iter_* folder)")
        config = _osp_next_config_near(where)
    if config is None:
        raise WeightsError(f"{p}: OSP-Next weights without their model config: put the OSPNextModel config.json "
                           f"beside them or the training run's {OSP_NEXT_RUN_CONFIG} (model_config:) above them")
    try:
        model = config_from_osp_next(config)
        precision = replace(PrecisionConfig(), **precision_from_osp_next(config))
    except (ValueError, KeyError) as exc:
        raise WeightsError(f"{p}: {exc}") from None
    errors: List[str] = []
    precision.check(errors, model)
    if errors:
        raise WeightsError(f"{p}: " + "; ".join(errors))
    return Checkpoint(p, "osp-next", where, model, precision)


def open_checkpoint(path: str | os.PathLike, fmt: str = "auto") -> Checkpoint:
    """Detect (unless `fmt` is given), resolve and read the model config of a checkpoint; no weights are read."""
    fmt = detect_format(path, fmt)
    p = Path(path)
    if fmt == "megatron":
        where = find_checkpoint_dir(p)
        cfg, _ = megatron.read_run_config(where)
        return Checkpoint(p, fmt, where, cfg.model, cfg.precision)
    if fmt == "osp-next":
        return _open_osp_next(p)
    if not p.exists():
        raise WeightsError(f"{p}: does not exist")
    folder = _model_folder(p) if p.is_dir() else (p.parent if (p.parent / "config.json").is_file() else None)
    if folder is None:  # bare weights: the caller supplies the model config
        return Checkpoint(p, fmt, p, None, None)
    config = _json(folder / "config.json")
    kind = _config_format(config)
    if kind != fmt:
        raise WeightsError(f"{folder / 'config.json'} is a {kind or 'unknown'} config, not {fmt}: "
                           f"use format {kind or 'auto'}")
    try:
        model = config_from_diffusers(config) if fmt == "diffusers" else config_from_wan(config)
    except (ValueError, KeyError) as exc:
        raise WeightsError(f"{folder / 'config.json'}: {type(exc).__name__}: {exc}") from None
    return Checkpoint(p, fmt, folder if p.is_dir() else p, _with_layout(model, config, folder / "config.json"), None)


# ------------------------------------------------------------------------------------------ weights
def _as_checkpoint(source, fmt: str) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source, fmt)


def _osp_next_file(ckpt: Checkpoint, ema: bool) -> Path:
    where = ckpt.where
    if where.is_file():
        if ema and where.name != OSP_NEXT_EMA:
            raise WeightsError(f"--ema with the weights file {where}: give the {OSP_NEXT_EMA} file or its folder")
        return where
    if ema:
        if not (where / OSP_NEXT_EMA).is_file():
            raise WeightsError(f"{where}: no {OSP_NEXT_EMA} (OSP-Next's EMA weights) in this folder; drop --ema")
        return where / OSP_NEXT_EMA
    if not any(where.glob("*.safetensors")) and (where / OSP_NEXT_WEIGHTS).is_file():
        return where / OSP_NEXT_WEIGHTS
    return where


def read_weights(source, ema: bool = False, model_config=None, fmt: str = "auto") -> StateDict:
    """Full (unsharded) state dict in our parameter names. `source`: a path or a Checkpoint; `ema`: the EMA
    weights (megatron, osp-next); `model_config`: used when the checkpoint carries none (bare weight files)."""
    ckpt = _as_checkpoint(source, fmt)
    mc = ckpt.model or model_config
    if mc is None:
        raise WeightsError(f"{ckpt.path}: bare weight files carry no model config; give a folder with its "
                           "config.json (or pass the model config)")
    if ema and ckpt.format not in EMA_FORMATS:
        raise WeightsError(f"{ckpt.path}: {ckpt.format} checkpoints have no EMA weights; drop --ema / ema")
    if ckpt.format == "megatron":
        return megatron.read_full(ckpt.where, mc, ema)
    if ckpt.format == "osp-next":
        return from_osp_next(read_state_dict(_osp_next_file(ckpt, ema)), mc)
    raw = read_state_dict(ckpt.where)
    return from_diffusers(raw, mc) if ckpt.format == "diffusers" else from_wan(raw, mc)


def load_into(model, source, fmt: str = "auto", ema: bool = False, model_config=None) -> Checkpoint:
    """Load a checkpoint's weights into a built (TP/PP-sharded) OSPNextDiT in place; returns what was loaded.
    megatron checkpoints load shard by shard (collective over the model's ranks); the other formats are read in
    full on every rank and sliced by `load_full_state_dict`."""
    ckpt = _as_checkpoint(source, fmt)
    if ckpt.format == "megatron":
        megatron.load_sharded(model, ckpt.where, ema)
    else:
        model.load_full_state_dict(read_weights(ckpt, ema=ema, model_config=model_config))
    return ckpt


# ------------------------------------------------------------------------------------------ writing
def layout_fields(model_config) -> Dict[str, Any]:
    return {k: getattr(model_config, k) for k in LAYOUT_FIELDS}


def write_weights(sd: StateDict, model_config, out: str | os.PathLike, fmt: str, *, precision=None,
                  layout: Optional[Dict[str, int]] = None, step: int = 0, dtype: str = "fp32", source: str = "",
                  max_shard_bytes: int = 5 << 30) -> Path:
    """Write a full state dict (our names) as `fmt`. megatron: a torch_dist checkpoint written by the
    TP x PP x SSP x Ulysses ranks of `layout` (default all 1); diffusers / wan: config.json (+ `_osp_model`) and
    safetensors shards of at most `max_shard_bytes`; osp-next: OSP-Next's config.json (HiF8 fields from
    `precision`) + safetensors in its key names (raises for a layout OSP-Next cannot build)."""
    if fmt == "megatron":
        return megatron.write(sd, model_config, out, layout or {"tp": 1, "pp": 1, "ssp": 1, "ulysses": 1},
                              step=step, dtype=dtype, source=source, precision=precision)
    if fmt == "osp-next":
        config, sd = ao.osp_next_config(model_config, precision), ao.to_osp_next(sd, model_config)
    elif fmt == "diffusers":
        config, sd = ad.diffusers_config(model_config), ad.to_diffusers(sd, model_config)
        config[LAYOUT_KEY] = layout_fields(model_config)
    elif fmt == "wan":
        config, sd = aw.wan_config(model_config), aw.to_wan(sd, model_config)
        config[LAYOUT_KEY] = layout_fields(model_config)
    else:
        raise WeightsError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    save_safetensors_dir(sd, out, WEIGHTS_BASENAME, max_shard_bytes, config=config)
    return Path(out)
