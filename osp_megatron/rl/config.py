"""Mix-GRPO settings: the free-form `grpo:` section of a run config (`cfg.extra["grpo"]`) as typed dataclasses.

`grpo_config_from(cfg)` builds and validates; every problem names the field (`grpo.window.size=...`) and the fix.
Defaults follow MixGRPO's shipped scripts (25 steps, shift 3, η 0.7 Flow-GRPO SDE, window 4, G 12, clip 1e-4).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from osp_megatron.config import ConfigError

WINDOW_STRATEGIES = ("fixed", "progressive", "random")
NOISE_LEVELS = ("flow_grpo", "dance_grpo", "osp_next")
ADV_NORMS = ("group", "global")
REWARD_MIXES = ("advantage_aggr", "reward_aggr")


@dataclass
class WindowConfig:
    """SDE window over the denoising steps. progressive: start advances by `stride` every `shift_interval`
    iterations and wraps to 0 (roll_back) or stays at the last full window; random: a new start every iteration.
    `limit`: steps at or after it are never in the window (None -> steps - 2, MixGRPO's max_timesteps)."""

    strategy: str = "progressive"
    size: int = 4
    start: int = 0
    shift_interval: int = 25
    stride: int = 1
    roll_back: bool = True
    limit: Optional[int] = None
    trained_steps: int = 0  # how many window steps are trained per sample; 0 = all
    trained_select: str = "first"  # first | random (DanceGRPO-style random subset)


@dataclass
class FlashConfig:
    """MixGRPO-Flash: DPM-Solver++ on a compressed grid after the window."""

    enabled: bool = False
    compression: float = 0.4  # 0.4 Flash, 0.2 Flash*
    order: int = 2


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 64.0
    # regexes matched (re.search) against qualified module names; defaults: attention and FFN linears
    targets: List[str] = field(default_factory=lambda: [r"(self_attn|cross_attn|attn\d?|attention)\.", r"(ffn|mlp)\."])
    dropout: float = 0.0


@dataclass
class RewardSpec:
    """One reward: a built-in `name` (see osp_megatron.rl.rewards.BUILTIN) or `path` to a python file / module
    (`pkg.mod:ClassName` or `file.py:ClassName`) exposing a scorer class; `kwargs` go to its constructor."""

    name: str = "brightness"
    weight: float = 1.0
    path: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GRPOConfig:
    iterations: int = 300
    steps: int = 25  # sampling steps per rollout
    shift: float = 3.0
    noise_level: str = "flow_grpo"  # flow_grpo | dance_grpo | osp_next
    eta: float = 0.7
    cfg_scale: float = 1.0  # > 1: classifier-free guidance in rollouts and in the training forward
    window: WindowConfig = field(default_factory=WindowConfig)
    flash: FlashConfig = field(default_factory=FlashConfig)
    group_size: int = 12  # G samples per prompt
    prompts_per_iteration: int = 1  # global, over all data-parallel ranks
    init_same_noise: bool = True
    share_prefix: bool = True  # with init_same_noise: run the (identical) pre-window ODE steps once per group
    rollout_batch: int = 4  # samples per rollout forward (per rank)
    train_batch: int = 4  # samples per training forward (per rank); = rollout_batch gives a ratio of exactly 1
    #                       at the first update (other sizes may differ in the last bits)
    updates_per_iteration: int = 1  # optimizer steps per iteration (local samples split evenly)
    lr: float = 1e-5
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    adv_norm: str = "group"  # group | global (std over the whole gathered batch)
    adv_eps: float = 1e-8
    adv_unbiased_std: bool = True
    shuffle_advantages: bool = False  # control experiment: permute advantages across samples
    kl_beta: float = 0.0
    ema_decay: float = 0.0  # EMA of the LoRA weights (OSP-Next keeps one); 0 = off; exported with ema=True
    lora: LoraConfig = field(default_factory=LoraConfig)
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    reward_mix: str = "advantage_aggr"  # advantage_aggr | reward_aggr
    prompts: List[str] = field(default_factory=lambda: ["a red square moving right"])
    prompts_file: str = ""  # one prompt per line; overrides `prompts`
    latent_shape: List[int] = field(default_factory=lambda: [1, 8, 8])  # latent T, H, W
    text_len: int = 16  # tokens per prompt for the random-embedding text path
    text_source: str = "random"  # random (fixed per prompt) | encoder (osp_megatron.encoders)
    decoder: str = "preview"  # preview (fixed latent->RGB projection) | vae (osp_megatron.encoders)
    save_interval: int = 50  # 0: only at the end
    eval_interval: int = 0  # 0: no ODE evaluation
    eval_seeds: int = 4  # fixed-seed ODE samples per evaluation prompt
    eval_prompts: int = 8  # the first N prompts are evaluated
    seed: int = 1234
    log_interval: int = 1


def _from_dict(cls, data: Dict[str, Any], path: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        sub = f"{path}.{key}"
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, sub)
        elif typing.get_origin(tp) in (list, List) and typing.get_args(tp)[0] is RewardSpec:
            if not isinstance(value, list):
                raise ConfigError(f"{sub}: expected a list of rewards like [{{name: brightness, weight: 1.0}}]")
            kwargs[key] = [_from_dict(RewardSpec, v, f"{sub}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(tp, value, sub)
    return cls(**kwargs)


def _coerce(tp, value, path):
    from osp_megatron.config import _coerce as base_coerce

    return base_coerce(tp, value, path)


def validate(c: GRPOConfig) -> GRPOConfig:
    """Raise one ConfigError listing every bad `grpo.*` field and its fix."""
    e: List[str] = []
    w = c.window
    if c.iterations < 1:
        e.append(f"grpo.iterations={c.iterations}: must be >= 1")
    if c.steps < 2:
        e.append(f"grpo.steps={c.steps}: need at least 2 sampling steps")
    if c.shift <= 0:
        e.append(f"grpo.shift={c.shift}: must be > 0 (1 = no shift)")
    if c.noise_level not in NOISE_LEVELS:
        e.append(f"grpo.noise_level={c.noise_level!r}: use one of {', '.join(NOISE_LEVELS)}")
    if c.eta <= 0 and c.noise_level != "osp_next":
        e.append(f"grpo.eta={c.eta}: must be > 0 (the SDE window needs noise)")
    if c.cfg_scale < 1.0:
        e.append(f"grpo.cfg_scale={c.cfg_scale}: use 1 (no guidance) or more")
    if w.strategy not in WINDOW_STRATEGIES:
        e.append(f"grpo.window.strategy={w.strategy!r}: use one of {', '.join(WINDOW_STRATEGIES)}")
    limit = window_limit(c)
    if not 1 <= limit <= c.steps:
        e.append(f"grpo.window.limit={w.limit}: must be in [1, grpo.steps={c.steps}]")
    if w.size < 1:
        e.append(f"grpo.window.size={w.size}: must be >= 1")
    elif w.size > limit:
        e.append(f"grpo.window.size={w.size} exceeds the window limit {limit} (grpo.window.limit or grpo.steps - 2): "
                 "lower the size or raise grpo.window.limit")
    if w.start < 0 or (1 <= w.size <= limit and w.start + w.size > limit):
        e.append(f"grpo.window.start={w.start}: the window [start, start+size) must lie in [0, {limit})")
    if w.shift_interval < 1:
        e.append(f"grpo.window.shift_interval={w.shift_interval}: must be >= 1 iterations")
    if w.stride < 0:
        e.append(f"grpo.window.stride={w.stride}: must be >= 0 (0 freezes the window)")
    if w.trained_steps < 0 or w.trained_steps > w.size:
        e.append(f"grpo.window.trained_steps={w.trained_steps}: must be in [0, window.size={w.size}] (0 = all)")
    if w.trained_select not in ("first", "random"):
        e.append(f"grpo.window.trained_select={w.trained_select!r}: use first or random")
    if c.flash.enabled:
        if not 0 < c.flash.compression <= 1:
            e.append(f"grpo.flash.compression={c.flash.compression}: must be in (0, 1] (0.4 Flash, 0.2 Flash*)")
        if c.flash.order not in (1, 2):
            e.append(f"grpo.flash.order={c.flash.order}: use 1 or 2")
    if c.group_size < 2:
        e.append(f"grpo.group_size={c.group_size}: GRPO needs at least 2 samples per prompt")
    if c.prompts_per_iteration < 1:
        e.append(f"grpo.prompts_per_iteration={c.prompts_per_iteration}: must be >= 1")
    for name in ("rollout_batch", "train_batch", "updates_per_iteration", "eval_seeds", "eval_prompts", "log_interval",
                 "text_len"):
        if getattr(c, name) < 1:
            e.append(f"grpo.{name}={getattr(c, name)}: must be >= 1")
    if c.lr < 0:
        e.append(f"grpo.lr={c.lr}: must be >= 0")
    if c.clip_range <= 0:
        e.append(f"grpo.clip_range={c.clip_range}: must be > 0 (MixGRPO 1e-4, OSP-Next 5e-3)")
    if c.adv_clip_max <= 0:
        e.append(f"grpo.adv_clip_max={c.adv_clip_max}: must be > 0 (5 everywhere upstream)")
    if c.adv_norm not in ADV_NORMS:
        e.append(f"grpo.adv_norm={c.adv_norm!r}: use group or global")
    if c.adv_eps <= 0:
        e.append(f"grpo.adv_eps={c.adv_eps}: must be > 0")
    if not 0.0 <= c.ema_decay < 1.0:
        e.append(f"grpo.ema_decay={c.ema_decay}: must be in [0, 1) (0 = no EMA, e.g. 0.99)")
    if c.kl_beta < 0:
        e.append(f"grpo.kl_beta={c.kl_beta}: must be >= 0")
    if c.lora.rank < 1:
        e.append(f"grpo.lora.rank={c.lora.rank}: must be >= 1")
    if not c.lora.targets:
        e.append("grpo.lora.targets is empty: give regexes of module names, e.g. ['attn', 'ffn']")
    if not c.rewards:
        e.append("grpo.rewards is empty: add at least one, e.g. [{name: brightness, weight: 1.0}]")
    for i, r in enumerate(c.rewards):
        if r.weight < 0:
            e.append(f"grpo.rewards[{i}].weight={r.weight}: must be >= 0")
    if c.rewards and sum(r.weight for r in c.rewards) <= 0:
        e.append("grpo.rewards: weights sum to 0; give at least one reward a positive weight")
    if c.reward_mix not in REWARD_MIXES:
        e.append(f"grpo.reward_mix={c.reward_mix!r}: use advantage_aggr or reward_aggr")
    if not c.prompts and not c.prompts_file:
        e.append("grpo.prompts is empty: give a list of prompts or grpo.prompts_file")
    if len(c.latent_shape) != 3 or any(int(v) < 1 for v in c.latent_shape):
        e.append(f"grpo.latent_shape={c.latent_shape}: give latent [T, H, W], each >= 1 (H, W even for 2x2 patches)")
    elif c.latent_shape[1] % 2 or c.latent_shape[2] % 2:
        e.append(f"grpo.latent_shape={c.latent_shape}: latent H and W must be even (1x2x2 patches)")
    if c.text_source not in ("random", "encoder"):
        e.append(f"grpo.text_source={c.text_source!r}: use random or encoder")
    if c.decoder not in ("preview", "vae"):
        e.append(f"grpo.decoder={c.decoder!r}: use preview or vae")
    if c.save_interval < 0 or c.eval_interval < 0:
        e.append("grpo.save_interval / grpo.eval_interval must be >= 0 (0 = off)")
    if e:
        raise ConfigError("invalid grpo configuration:\n  - " + "\n  - ".join(e))
    return c


def window_limit(c: GRPOConfig) -> int:
    return c.window.limit if c.window.limit is not None else max(c.steps - 2, 1)


def grpo_config_from_dict(data: Optional[Dict[str, Any]]) -> GRPOConfig:
    return validate(_from_dict(GRPOConfig, data or {}, "grpo"))


def grpo_config_from(cfg) -> GRPOConfig:
    """`cfg.extra["grpo"]` of an `osp_megatron.config.Config` -> validated GRPOConfig."""
    unknown = sorted(k for k in cfg.extra if k not in ("grpo", "sample"))
    if unknown:
        raise ConfigError(f"config: unknown top-level section(s) {unknown}; osp-grpo reads model, parallel, precision, "
                          "train, tracking, encoders and grpo")
    return grpo_config_from_dict(cfg.extra.get("grpo"))
