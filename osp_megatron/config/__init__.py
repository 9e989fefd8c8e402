"""The run configuration: one typed tree, YAML files + `key=value` overrides, validated in one place.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=1e-4", "parallel.ssp=2"])
    cfg.validate(world_size=2)          # one ConfigError listing every bad field and its fix

Sections: model, parallel, precision, data, train, tracking, encoders, grpo. Unknown sections or keys at any
level, non-integer values for integer fields, NaN/inf numbers and duplicate YAML keys are errors that name the
field (and the closest valid key). `CONFIG` may also be a preset name (`demo_cpu`, `osp_14b_720p`, ...) found in
the shipped configs. Validation never touches torch.distributed, so a bad plan fails before any collective.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from data_pipeline.config import BucketSpec, DataConfig
from osp_megatron.config.grpo import FlashConfig, GRPOConfig, LoraConfig, RewardSpec, WindowConfig
from osp_megatron.config.schema import (
    ConfigError,
    apply_overrides,
    build,
    fields_reference,
    flatten,
    from_dict,
    load_yaml,
    option,
)
from osp_megatron.config.sections import (
    EncoderConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    TrackingConfig,
    TrainConfig,
)
from osp_megatron.config.sizes import SIZES, ModelDims
from osp_megatron.config.validate import layout_errors, path_errors

def _presets_dir() -> Path:
    """The shipped YAML presets: `configs/` of a source checkout, else the installed package data."""
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("osp_megatron.presets")))


PRESETS_DIR = _presets_dir()
# the sections each entry point reads (and validates)
TRAIN_SECTIONS = ("model", "parallel", "precision", "data", "train", "tracking", "encoders")
GRPO_SECTIONS = ("model", "parallel", "precision", "train", "tracking", "encoders", "grpo")


@dataclass
class Config:
    model: ModelConfig = option(help="the DiT", factory=ModelConfig)
    parallel: ParallelConfig = option(help="process groups", factory=ParallelConfig)
    precision: PrecisionConfig = option(help="dtype and quantized training", factory=PrecisionConfig)
    data: DataConfig = option(help="data loading", factory=DataConfig)
    train: TrainConfig = option(help="training loop", factory=TrainConfig)
    tracking: TrackingConfig = option(help="experiment tracking", factory=TrackingConfig)
    encoders: EncoderConfig = option(help="VAE and text encoder", factory=EncoderConfig)
    grpo: GRPOConfig = option(help="Mix-GRPO post-training (osp-grpo)", factory=GRPOConfig)

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> Dict[str, Any]:
        """Dotted key -> value (lists as JSON), e.g. for tracking params."""
        return flatten(self.to_dict())

    def errors(self, world_size: Optional[int] = None, sections: Sequence[str] = TRAIN_SECTIONS) -> List[str]:
        """Every problem of the `sections` an entry point reads, one line each naming the field and the fix."""
        errors: List[str] = list(getattr(self, "_deferred", []))  # out-of-range values found when parsing
        if "model" in sections:
            self.model.check(errors)
        if "parallel" in sections:
            self.parallel.check(errors)
            errors += layout_errors(self.model, self.parallel, world_size)
        if "precision" in sections:
            self.precision.check(errors, self.model)
        if "data" in sections:
            self.data.validate(errors)
        if "train" in sections:
            self.train.check(errors)
        if "tracking" in sections:
            self.tracking.check(errors)
        if "grpo" in sections:
            self.grpo.check(errors)
        p = self.parallel
        mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        if "data" in sections and world_size is not None and world_size % mp == 0:
            dp = world_size // mp
            gbs, mbs = self.train.global_batch_size, self.data.micro_batch_size
            if gbs and gbs % (mbs * dp) != 0:
                errors.append(f"train.global_batch_size={gbs} is not divisible by data.micro_batch_size x DP = "
                              f"{mbs} x {dp}; use a multiple of {mbs * dp}")
        return errors

    def validate(self, world_size: Optional[int] = None, check_paths: bool = False,
                 sections: Sequence[str] = TRAIN_SECTIONS) -> "Config":
        """Raise one ConfigError naming every bad field of `sections`; returns self when all is well.
        `check_paths`: also check that the inputs the run reads exist (dry runs)."""
        errors = self.errors(world_size, sections)
        if check_paths:
            errors += path_errors(self, sections)
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self


def parse_section(cls: Any, data: Optional[Dict[str, Any]], path: Optional[str] = None) -> Any:
    """One section from plain data, checked on its own (e.g. `parse_section(GRPOConfig, {...})`); `path` (default:
    the section's key in Config, e.g. `grpo`) prefixes the field names in messages."""
    if path is None:
        hints = typing.get_type_hints(Config)
        path = next((name for name, tp in hints.items() if tp is cls), cls.__name__)
    errors: List[str] = []
    section = build(cls, data or {}, path, errors)
    check = getattr(section, "check", None)
    if check is not None:
        check(errors)
    if errors:
        raise ConfigError(f"invalid {path} configuration:\n  - " + "\n  - ".join(errors))
    return section


def updated(section: Any, changes: Dict[str, Any], path: Optional[str] = None) -> Any:
    """A copy of `section` with `changes` applied through the parser (types, choices and checks as for a config
    file), e.g. `updated(model_config, {"schedule": "dual_end"})`."""
    return parse_section(type(section), {**dataclasses.asdict(section), **changes}, path)


def config_from_dict(data: Optional[Dict[str, Any]]) -> Config:
    """Config from plain data. Unknown keys and unusable values raise here; out-of-range values are reported by
    `validate()` (with every other problem of the config)."""
    deferred: List[str] = []
    try:
        cfg = from_dict(Config, data or {}, "", deferred)
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration:\n  - {exc}") from None
    cfg._deferred = deferred
    return cfg


def preset_path(name: str) -> Optional[Path]:
    """A shipped preset (`demo_cpu`, `osp_14b_720p`, ...) by name, or None."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return None
    path = PRESETS_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def presets() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file or preset name (optional) + dotted overrides -> Config (parsed, not yet validated)."""
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and preset_path(str(path)) is not None:
            p = preset_path(str(path))
        if not p.is_file():
            known = presets()
            raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file"
                              + (f" or a preset name ({', '.join(known)})" if known else ""))
        data = load_yaml(p)
    data = apply_overrides(data, overrides)
    return config_from_dict(data)


def resolved_dtype(precision: PrecisionConfig):
    import torch

    if precision.dtype == "fp32":
        return torch.float32
    if precision.dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


__all__ = [
    "BucketSpec", "Config", "GRPO_SECTIONS", "TRAIN_SECTIONS", "ConfigError", "DataConfig", "EncoderConfig", "FlashConfig", "GRPOConfig", "LoraConfig",
    "ModelConfig", "ModelDims", "ParallelConfig", "PrecisionConfig", "RewardSpec", "SIZES", "TrackingConfig",
    "TrainConfig", "WindowConfig", "apply_overrides", "config_from_dict", "fields_reference", "layout_errors",
    "load_config", "parse_section", "updated", "path_errors", "presets", "resolved_dtype",
]
