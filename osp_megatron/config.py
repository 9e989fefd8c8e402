"""Typed run configuration: YAML files + `key=value` overrides + validation.

Every section is a dataclass. `load_config(path, overrides)` reads a YAML file, applies dotted
overrides (`train.lr=1e-4`, `parallel.ssp=2`, `data.buckets=[{frames: 17, height: 64, width: 64}]`),
and returns a `Config`. `Config.validate()` collects every problem and raises one `ConfigError`
whose lines each name the field and the fix. Validation never touches torch.distributed, so a bad
plan fails before any collective starts.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from data_pipeline.config import BucketSpec, DataConfig


class ConfigError(ValueError):
    """A configuration problem; the message names each bad field and how to fix it."""


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The DiT. `size` picks a registry entry; any field set here overrides it."""

    size: str = "tiny"  # tiny | wan_1_3b | wan_14b (see osp_megatron/models/registry.py)
    schedule: str = "dual_end"  # full | dual_end | uniform
    num_full_blocks: Optional[int] = None  # default 8 for dual_end (released), 10 for uniform
    sparse_ratio: int = 2  # Skiparse-2D ratio P along H and W
    attention_backend: str = "auto"  # auto | sdpa | flash | te | math
    spec: str = "local"  # local (pure torch + megatron TP layers) | te
    recompute: bool = False  # full activation recompute per block
    # optional explicit overrides of the registry entry
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    text_dim: Optional[int] = None
    freq_dim: Optional[int] = None
    patch_size: Optional[List[int]] = None
    eps: Optional[float] = None
    rope_theta: Optional[float] = None


@dataclass
class ParallelConfig:
    """World = TP x CP x DP x PP, CP = SSP x Ulysses (megatron-core order)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    ssp: int = 1  # sparse sequence parallel degree, divides P^2
    ulysses: int = 1  # Ulysses degree (heads split) inside the context-parallel group
    sequence_parallel: bool = False  # megatron TP sequence parallel
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False

    @property
    def context_parallel(self) -> int:
        return self.ssp * self.ulysses


@dataclass
class PrecisionConfig:
    """Parameter dtype and quantized-training recipe."""

    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    recipe: str = "none"  # none | hif8_current | hif8_delayed | fp8_delayed | fp8_current | fp8_block
    # HiF8 current scaling (OSP-Next semantics)
    scale_max_fwd: float = 15.0
    scale_max_bwd: float = 224.0
    # delayed scaling (TE DelayedScaling semantics)
    amax_history_len: int = 16
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0
    interval: int = 1
    backward_rounding: str = "ta"  # ta | hybrid (HiF8 hybrid rounding for gradients)
    quantize_attention: bool = False  # HiF8 on Q/K/V (and dQ/dK/dV)
    bf16_first_blocks: int = 0  # keep the first N blocks out of quantization
    bf16_last_blocks: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    global_batch_size: int = 0  # 0 -> micro_batch_size x DP (no accumulation)
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    ema_interval: int = 1
    ema_device: str = "auto"  # auto (next to the model) | cpu (host memory, for large models)
    timestep_sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # static shift (1 = none)
    dynamic_shift: bool = False  # resolution-dependent shift (overrides `shift`)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    seed: int = 1234
    log_interval: int = 1
    save_interval: int = 0  # 0 -> only at the end / on signal
    save_checkpoints: bool = True  # false: never write checkpoints (benchmark and smoke runs; a signal just stops)
    keep_last: int = 3
    async_save: bool = True  # used on GPU; CPU saves synchronously
    sample_interval: int = 0  # 0 -> no periodic sample videos
    sample_prompts: List[str] = field(default_factory=lambda: ["a red square moving right"])
    sample_steps: int = 10
    sample_guidance: float = 5.0  # classifier-free guidance scale (1 = off)
    sample_shift: float = 5.0  # sampling sigma shift
    sample_solver: str = "unipc"  # euler | unipc
    sample_seed: int = 42  # fixed noise for comparable samples across steps
    checkpoint_checksums: bool = True  # CRC32 of every checkpoint file (verified on load); off for huge models
    init_from: str = ""  # checkpoint path to initialise weights from (sparse fine-tune recipe)
    init_format: str = "auto"  # auto | diffusers | wan | megatron
    resume: bool = True  # resume from run_dir/checkpoints/latest if present
    max_nonfinite_steps: int = 5
    exit_after_steps: int = 0  # stop (with a save, exit code 3) after this many steps in this process; 0 = never
    debug_nonfinite_steps: List[int] = field(default_factory=list)  # fault injection: NaN loss at these steps


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    uri: str = ""  # empty -> sqlite store under run_dir
    experiment: str = "osp-megatron"
    run_name: str = ""
    peak_tflops: float = 989.0  # per-device peak used for MFU (H100 SXM bf16 dense)


@dataclass
class EncoderConfig:
    """VAE and text encoder: local paths, or `tiny` stand-ins (random-initialised real classes)."""

    vae: str = "tiny"  # path to a diffusers AutoencoderKLWan folder, or `tiny`
    text_encoder: str = "tiny"  # path to a transformers UMT5EncoderModel folder, or `tiny`
    tokenizer: str = ""  # defaults to the text encoder path
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    extra: Dict[str, Any] = field(default_factory=dict)  # free-form sections owned by tools (grpo, sample)

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> Dict[str, Any]:
        """Dotted key -> value (for tracking params)."""
        out: Dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(obj) if isinstance(obj, (list, tuple)) else obj

        walk("", self.to_dict())
        return out

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Raise ConfigError naming every bad field; returns self when all is well."""
        errors: List[str] = []
        from osp_megatron.models.registry import validate_model_config

        validate_model_config(self.model, errors)
        _validate_parallel(self, errors, world_size)
        _validate_precision(self.precision, self.model, errors)
        self.data.validate(errors)
        _validate_train(self.train, errors)
        if self.tracking.backend not in ("mlflow", "none"):
            errors.append(f"tracking.backend={self.tracking.backend!r}: use mlflow or none")
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self


def _validate_parallel(cfg: Config, errors: List[str], world_size: Optional[int]) -> None:
    from osp_megatron.models.registry import resolve_model_dims

    p = cfg.parallel
    for name in ("tensor_parallel", "pipeline_parallel", "ssp", "ulysses"):
        if getattr(p, name) < 1:
            errors.append(f"parallel.{name}={getattr(p, name)}: must be >= 1")
    if errors:
        return
    ratio = cfg.model.sparse_ratio
    sparse = cfg.model.schedule != "full"
    if p.ssp > 1:
        if not sparse:
            errors.append(
                f"parallel.ssp={p.ssp} with model.schedule=full: SSP needs sparse blocks; use parallel.ulysses instead"
            )
        elif (ratio * ratio) % p.ssp != 0:
            divisors = [d for d in range(1, ratio * ratio + 1) if (ratio * ratio) % d == 0]
            errors.append(
                f"parallel.ssp={p.ssp} does not divide P^2={ratio * ratio} (model.sparse_ratio={ratio}): "
                f"use one of {divisors} and put the rest of the context parallelism in parallel.ulysses"
            )
    try:
        dims = resolve_model_dims(cfg.model)
    except Exception:  # reported by validate_model_config
        return
    heads = dims["num_attention_heads"]
    tp, cp = p.tensor_parallel, p.context_parallel
    if heads % (tp * p.ulysses) != 0:
        errors.append(
            f"parallel: {heads} attention heads are not divisible by tensor_parallel x ulysses = "
            f"{tp} x {p.ulysses} = {tp * p.ulysses}; choose TP x Ulysses among the divisors of {heads}"
        )
    if heads % (tp * cp) != 0:
        errors.append(
            f"parallel: full blocks run Ulysses over the whole context-parallel group: {heads} heads are not "
            f"divisible by tensor_parallel x ssp x ulysses = {tp * cp}; lower parallel.ssp/ulysses or tensor_parallel"
        )
    if dims["ffn_hidden_size"] % tp != 0 or dims["hidden_size"] % tp != 0:
        errors.append(
            f"parallel.tensor_parallel={tp} does not divide hidden_size={dims['hidden_size']} / "
            f"ffn_hidden_size={dims['ffn_hidden_size']}"
        )
    if dims["num_layers"] % p.pipeline_parallel != 0:
        errors.append(
            f"parallel.pipeline_parallel={p.pipeline_parallel} does not divide model.num_layers={dims['num_layers']}: "
            "choose a divisor of the layer count"
        )
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 (set it false)")
    if world_size is not None:
        mp = tp * p.pipeline_parallel * cp
        if world_size % mp != 0:
            errors.append(
                f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {p.pipeline_parallel} x {cp} = {mp}; "
                "launch a multiple of that many processes or change parallel.*"
            )
        else:
            dp = world_size // mp
            gbs = cfg.train.global_batch_size
            mbs = cfg.data.micro_batch_size
            if gbs and gbs % (mbs * dp) != 0:
                errors.append(
                    f"train.global_batch_size={gbs} is not divisible by data.micro_batch_size x DP = {mbs} x {dp}; "
                    f"use a multiple of {mbs * dp}"
                )


def _validate_precision(pr: PrecisionConfig, model: ModelConfig, errors: List[str]) -> None:
    if pr.dtype not in ("auto", "fp32", "bf16"):
        errors.append(f"precision.dtype={pr.dtype!r}: use auto, fp32 or bf16")
    recipes = ("none", "hif8_current", "hif8_delayed", "fp8_delayed", "fp8_current", "fp8_block")
    if pr.recipe not in recipes:
        errors.append(f"precision.recipe={pr.recipe!r}: use one of {', '.join(recipes)}")
    if pr.recipe.startswith("fp8") and model.spec != "te":
        errors.append(
            f"precision.recipe={pr.recipe} is a TransformerEngine FP8 recipe: set model.spec=te (needs TE on a GPU) "
            "or use hif8_current / hif8_delayed"
        )
    if pr.amax_compute_algo not in ("max", "most_recent"):
        errors.append(f"precision.amax_compute_algo={pr.amax_compute_algo!r}: use max or most_recent")
    if pr.amax_history_len < 1:
        errors.append(f"precision.amax_history_len={pr.amax_history_len}: must be >= 1")
    if pr.backward_rounding not in ("ta", "hybrid"):
        errors.append(f"precision.backward_rounding={pr.backward_rounding!r}: use ta or hybrid")
    if pr.scale_max_fwd <= 0 or pr.scale_max_bwd <= 0:
        errors.append("precision.scale_max_fwd/scale_max_bwd must be > 0")
    if pr.bf16_first_blocks < 0 or pr.bf16_last_blocks < 0:
        errors.append("precision.bf16_first_blocks/bf16_last_blocks must be >= 0")
    if pr.interval < 1:
        errors.append(f"precision.interval={pr.interval}: must be >= 1 (delayed scaling recomputes the scale every N steps)")
    if pr.recipe.startswith("hif8") and model.spec == "te":
        errors.append(
            f"precision.recipe={pr.recipe} with model.spec=te: the HiF8 linears are built by the local spec; "
            "set model.spec=local (or use an fp8_* recipe with TE)"
        )


def _validate_train(t: TrainConfig, errors: List[str]) -> None:
    if t.steps < 1:
        errors.append(f"train.steps={t.steps}: must be >= 1")
    if t.lr <= 0:
        errors.append(f"train.lr={t.lr}: must be > 0")
    if t.lr_schedule not in ("cosine", "constant"):
        errors.append(f"train.lr_schedule={t.lr_schedule!r}: use cosine or constant")
    if t.timestep_sampling not in ("uniform", "logit_normal"):
        errors.append(f"train.timestep_sampling={t.timestep_sampling!r}: use uniform or logit_normal")
    if not 0.0 <= t.ema_decay < 1.0:
        errors.append(f"train.ema_decay={t.ema_decay}: must be in [0, 1)")
    if t.ema_device not in ("auto", "cpu"):
        errors.append(f"train.ema_device={t.ema_device!r}: use auto or cpu")
    if t.ema_interval < 1:
        errors.append(f"train.ema_interval={t.ema_interval}: must be >= 1")
    if t.shift <= 0:
        errors.append(f"train.shift={t.shift}: must be > 0")
    if t.init_format not in ("auto", "diffusers", "wan", "megatron"):
        errors.append(f"train.init_format={t.init_format!r}: use auto, diffusers, wan or megatron")
    if t.keep_last < 1:
        errors.append(f"train.keep_last={t.keep_last}: keep at least 1 checkpoint")
    if t.max_nonfinite_steps < 1:
        errors.append(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 1")
    if t.global_batch_size < 0:
        errors.append(f"train.global_batch_size={t.global_batch_size}: must be >= 0 (0 = micro_batch_size x DP)")
    if t.min_lr < 0 or t.min_lr > t.lr:
        errors.append(f"train.min_lr={t.min_lr}: must be in [0, train.lr={t.lr}]")
    if t.warmup_steps < 0 or (t.warmup_steps and t.warmup_steps >= t.steps):
        errors.append(f"train.warmup_steps={t.warmup_steps}: must be in [0, train.steps={t.steps}) (lower it)")
    for name in ("save_interval", "sample_interval", "exit_after_steps", "weight_decay", "clip_grad"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}={getattr(t, name)}: must be >= 0 (0 disables it)")
    if t.log_interval < 1:
        errors.append(f"train.log_interval={t.log_interval}: must be >= 1")
    if t.sample_steps < 1:
        errors.append(f"train.sample_steps={t.sample_steps}: must be >= 1")
    if t.sample_solver not in ("euler", "unipc"):
        errors.append(f"train.sample_solver={t.sample_solver!r}: use euler or unipc")
    if t.sample_interval and not t.sample_prompts:
        errors.append("train.sample_prompts is empty while train.sample_interval > 0: give prompts or set it to 0")
    if t.logit_std <= 0:
        errors.append(f"train.logit_std={t.logit_std}: must be > 0")
    if t.dynamic_shift and t.max_seq_len <= t.base_seq_len:
        errors.append(f"train.max_seq_len={t.max_seq_len} must be > train.base_seq_len={t.base_seq_len} for dynamic_shift")
    if not 0.0 <= t.adam_beta1 < 1.0 or not 0.0 <= t.adam_beta2 < 1.0:
        errors.append(f"train.adam_beta1/adam_beta2 ({t.adam_beta1}, {t.adam_beta2}): must be in [0, 1)")


# --------------------------------------------------------------------------------------------
# construction from dicts / YAML / overrides
# --------------------------------------------------------------------------------------------
def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, path)
    if origin in (list, List, Sequence):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: Any, data: Dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and cls is not Config:
        raise ConfigError(
            f"{path or 'config'}: unknown field(s) {unknown}; valid fields are {sorted(names)}"
        )
    kwargs = {}
    extra = {}
    for key, value in data.items():
        if key not in names:
            extra[key] = value  # only reachable for Config: free-form tool sections
            continue
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else key)
    obj = cls(**kwargs)
    if extra:
        obj.extra.update(extra)
    return obj


def config_from_dict(data: Dict[str, Any]) -> Config:
    return _from_dict(Config, data or {}, "")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {item!r}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + dotted overrides -> Config (not yet validated)."""
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found: pass an existing YAML file (see configs/)")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (model, parallel, ...)")
        data = loaded or {}
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
    "BucketSpec",
    "Config",
    "ConfigError",
    "DataConfig",
    "EncoderConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "resolved_dtype",
]
