"""The `grpo:` section: Mix-GRPO post-training (sampling, SDE window, Flash, groups, PPO, LoRA, rewards).

Defaults follow MixGRPO's shipped scripts (25 steps, shift 3, eta 0.7 Flow-GRPO SDE, window 4, G 12, clip 1e-4).
`GRPOConfig.check(errors)` names every bad `grpo.*` field and its fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from osp_megatron.config.schema import option

WINDOW_STRATEGIES = ("fixed", "progressive", "random", "decay", "exp_decay")
RECIPES = ("custom", "osp-next", "mixgrpo")
NOISE_LEVELS = ("flow_grpo", "dance_grpo", "osp_next")
ADV_NORMS = ("group", "global")
REWARD_MIXES = ("advantage_aggr", "reward_aggr")


@dataclass
class WindowConfig:
    """SDE window over the denoising steps."""

    strategy: str = option("progressive", "fixed (always `start`), progressive (start advances by `stride` every "
                           "`shift_interval` iterations), random (a new start every iteration), decay / exp_decay "
                           "(progressive with an interval that shrinks as the window moves, MixGRPO)",
                           choices=WINDOW_STRATEGIES)
    size: int = option(4, "denoising steps in the window", minimum=1)
    start: int = option(0, "first window step (fixed) / initial start (progressive)", minimum=0)
    shift_interval: int = option(25, "progressive: iterations per window move", minimum=1)
    stride: int = option(1, "progressive: steps the window moves (0 freezes it)", minimum=0)
    roll_back: bool = option(True, "progressive: wrap to step 0 after the last full window (else stay there)")
    limit: Optional[int] = option(None, "steps at or after this are never in the window (null: steps - 2, MixGRPO's "
                                  "max_timesteps)")
    tail: str = option("full", "progressive/decay at the end of the grid: full (every window has `size` steps; wrap "
                       "to 0 or stay at limit-size) or mixgrpo (windows shrink to [start, limit), wrap to the initial "
                       "start or stay at limit (an empty window) once start > limit)", choices=("full", "mixgrpo"))
    decay_max_interval: int = option(0, "decay: interval at start 0 (0: shift_interval)", minimum=0)
    decay_min_interval: int = option(0, "decay: interval at the limit (0: max(1, shift_interval // 4))", minimum=0)
    exp_decay_k: float = option(0.1, "exp_decay: interval = ceil(shift_interval · exp(-k · max(0, start - "
                                "exp_decay_start)))", minimum=0)
    exp_decay_start: int = option(13, "exp_decay: window start where the interval begins to shrink", minimum=0)
    trained_steps: int = option(0, "window steps trained per sample (0: all)", minimum=0)
    trained_select: str = option("first", "which window steps are trained: first or random (DanceGRPO-style subset)",
                                 choices=("first", "random"))


@dataclass
class FlashConfig:
    """MixGRPO-Flash: DPM-Solver++ on a compressed grid after the window."""

    enabled: bool = option(False, "run the post-window ODE steps with DPM-Solver++ on a compressed grid")
    compression: float = option(0.4, "fraction of the post-window steps kept (0.4 Flash, 0.2 Flash*)")
    order: int = option(2, "DPM-Solver++ order", choices=(1, 2))
    min_points: int = option(2, "fewest points of the compressed grid after the window (2: at least one step to "
                             "sigma 0; MixGRPO: 1, which can end the grid above 0)", choices=(1, 2))


@dataclass
class LoraConfig:
    """LoRA adapters on the frozen base model."""

    rank: int = option(32, "LoRA rank r", minimum=1)
    alpha: float = option(64.0, "LoRA alpha (scale alpha / r)")
    targets: List[str] = option(help="regexes matched (re.search) against qualified module names",
                                factory=lambda: [r"(self_attn|cross_attn|attn\d?|attention)\.", r"(ffn|mlp)\."])
    dropout: float = option(0.0, "LoRA dropout")
    init: str = option("kaiming", "initialisation of A (B = 0): kaiming (uniform, nn.Linear / PEFT default) or "
                       "gaussian (N(0, 1/r), PEFT init_lora_weights='gaussian')", choices=("kaiming", "gaussian"))


@dataclass
class RewardSpec:
    """One reward: a built-in `name` or `path` to a scorer class; `kwargs` go to its constructor."""

    name: str = option("brightness", "built-in reward (see osp_megatron.rl.rewards.BUILTIN) or a label for `path`")
    weight: float = option(1.0, "weight in the reward mix", minimum=0)
    path: str = option("", "python file or module with a scorer class: `pkg.mod:ClassName` or `file.py:ClassName`")
    kwargs: Dict[str, Any] = option(help="keyword arguments of the scorer's constructor", factory=dict)


@dataclass
class GRPOConfig:
    """Mix-GRPO settings (read by osp-grpo; ignored by osp-train)."""

    recipe: str = option("custom", "preset of every value a reference ran (osp-next: OSP-Next's train_osp_RL.py and "
                         "osp_14b_RL.yaml; mixgrpo: MixGRPO's FLUX script); keys set in the config win; custom: "
                         "the defaults below (docs/grpo.md lists each recipe value and its source)", choices=RECIPES)
    iterations: int = option(300, "GRPO iterations", minimum=1)
    steps: int = option(25, "sampling steps per rollout", minimum=2)
    shift: float = option(3.0, "sigma shift of the rollout grid (1: none)")
    noise_level: str = option("flow_grpo", "SDE noise: flow_grpo (g = eta sqrt(s/(1-s))), dance_grpo (constant eta), "
                              "osp_next (g = sigma)", choices=NOISE_LEVELS)
    eta: float = option(0.7, "SDE noise scale (flow_grpo, dance_grpo)")
    cfg_scale: float = option(1.0, "classifier-free guidance in rollouts and the training forward (1: off)",
                              minimum=1.0)
    cfg_train_uncond: str = option("detached", "CFG in the training forward: detached (unconditional branch under "
                                   "no_grad, gradient s·dv_cond, OSP-Next) or grad (both branches carry gradients: "
                                   "s·dv_cond + (1-s)·dv_uncond)", choices=("detached", "grad"))
    negative_prompt: str = option("", "prompt of the unconditional CFG branch (text_source=encoder; the random "
                                  "embedder uses zeros)")
    window: WindowConfig = option(help="SDE window", factory=WindowConfig)
    flash: FlashConfig = option(help="MixGRPO-Flash", factory=FlashConfig)
    group_size: int = option(12, "G samples per prompt", minimum=2)
    prompts_per_iteration: int = option(1, "prompts per iteration, over all data-parallel ranks", minimum=1)
    init_same_noise: bool = option(True, "every sample of a group starts from the same noise")
    share_prefix: bool = option(True, "with init_same_noise: run the identical pre-window steps once per group")
    rollout_batch: int = option(4, "samples per rollout forward (per rank)", minimum=1)
    train_batch: int = option(4, "samples per training forward (per rank)", minimum=1)
    updates_per_iteration: int = option(1, "optimizer steps per iteration (local samples split evenly); 0: one step "
                                        "per `grad_accumulation` train micro-batches (OSP-Next, MixGRPO)", minimum=0)
    grad_accumulation: int = option(1, "with updates_per_iteration=0: train micro-batches per optimizer step",
                                    minimum=1)
    shuffle_train_order: bool = option(False, "permute the local samples (seeded) before cutting train micro-batches "
                                       "(OSP-Next)")
    lr: float = option(1e-5, "AdamW learning rate of the LoRA parameters", minimum=0)
    weight_decay: float = option(1e-4, "AdamW weight decay", minimum=0)
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "clip the LoRA gradient norm to this (0: off); adaptive: the first bound",
                              minimum=0)
    clip_mode: str = option("norm", "gradient clipping: norm (fixed clip_grad) or adaptive (OSP-Next: bound = EMA "
                            "mean + 3 std of the accepted norms, training/clipping.py)", choices=("norm", "adaptive"))
    clip_range: float = option(1e-4, "PPO clip range of the ratio (MixGRPO 1e-4, OSP-Next 5e-3)")
    adv_clip_max: float = option(5.0, "advantages are clipped to +-this")
    adv_norm: str = option("group", "advantage normalisation: per prompt group or over the whole batch",
                           choices=ADV_NORMS)
    adv_eps: float = option(1e-8, "epsilon added to the reward std")
    adv_unbiased_std: bool = option(True, "unbiased (n-1) std for advantages")
    shuffle_advantages: bool = option(False, "control experiment: permute advantages across samples")
    zero_adv_filter: bool = option(False, "drop samples whose advantage is 0 from training, keeping a multiple of "
                                   "the rollout micro-batch count (zero-advantage samples chosen at random fill it; "
                                   "OSP-Next)")
    kl_beta: float = option(0.0, "KL penalty to the LoRA-disabled model (0: off)", minimum=0)
    ema_decay: float = option(0.0, "EMA of the LoRA weights after every optimizer step (0: off); checkpointed, and "
                              "exports take it by default")
    eval_ema: bool = option(False, "evaluate with the LoRA EMA (when ema_decay > 0; OSP-Next evaluates the EMA)")
    lora: LoraConfig = option(help="LoRA adapters", factory=LoraConfig)
    rewards: List[RewardSpec] = option(help="rewards and their weights", factory=lambda: [RewardSpec()])
    reward_mix: str = option("advantage_aggr", "mix rewards after (advantage_aggr) or before (reward_aggr) "
                             "normalisation", choices=REWARD_MIXES)
    prompts: List[str] = option(help="training prompts", factory=lambda: ["a red square moving right"])
    prompts_file: str = option("", "a text file with one prompt per line (overrides `prompts`)")
    latent_shape: List[int] = option(help="latent [T, H, W] of the rollouts", factory=lambda: [1, 8, 8])
    text_len: int = option(16, "tokens per prompt of the random-embedding text path", minimum=1)
    text_source: str = option("random", "text conditioning: random (fixed per prompt) or encoder (encoders.*)",
                              choices=("random", "encoder"))
    decoder: str = option("preview", "latents -> pixels for rewards: preview (fixed projection) or vae (encoders.vae)",
                          choices=("preview", "vae"))
    save_interval: int = option(50, "checkpoint every N iterations (0: only at the end)", minimum=0)
    eval_interval: int = option(0, "deterministic ODE evaluation every N iterations (0: off)", minimum=0)
    eval_seeds: int = option(4, "fixed-seed samples per evaluation prompt", minimum=1)
    eval_prompts: int = option(8, "the first N prompts are evaluated", minimum=1)
    eval_steps: int = option(0, "Euler steps of the evaluation samples (0: grpo.steps)", minimum=0)
    seed: int = option(1234, "seed of prompts, noise and advantages", minimum=0)
    log_interval: int = option(1, "print a progress line every N iterations", minimum=1)

    @staticmethod
    def expand_preset(data: Dict[str, Any]) -> Dict[str, Any]:
        """Fill in `recipe`'s values below the keys `data` sets (osp_megatron/config/grpo_recipes.py)."""
        from osp_megatron.config.grpo_recipes import expand_recipe

        return expand_recipe(data)

    @property
    def window_limit(self) -> int:
        return self.window.limit if self.window.limit is not None else max(self.steps - 2, 1)

    def check(self, e: List[str]) -> None:
        w = self.window
        if self.shift <= 0:
            e.append(f"grpo.shift={self.shift}: must be > 0 (1 = no shift)")
        if self.eta <= 0 and self.noise_level != "osp_next":
            e.append(f"grpo.eta={self.eta}: must be > 0 (the SDE window needs noise)")
        limit = self.window_limit
        if not 1 <= limit <= self.steps:
            e.append(f"grpo.window.limit={w.limit}: must be in [1, grpo.steps={self.steps}]")
        if w.size > limit:
            e.append(f"grpo.window.size={w.size} exceeds the window limit {limit} (grpo.window.limit or grpo.steps - 2): "
                     "lower the size or raise grpo.window.limit")
        elif w.start + w.size > limit:
            e.append(f"grpo.window.start={w.start}: the window [start, start+size) must lie in [0, {limit})")
        if w.trained_steps > w.size:
            e.append(f"grpo.window.trained_steps={w.trained_steps}: must be in [0, window.size={w.size}] (0 = all)")
        if self.flash.enabled and not 0 < self.flash.compression <= 1:
            e.append(f"grpo.flash.compression={self.flash.compression}: must be in (0, 1] (0.4 Flash, 0.2 Flash*)")
        if self.clip_range <= 0:
            e.append(f"grpo.clip_range={self.clip_range}: must be > 0 (MixGRPO 1e-4, OSP-Next 5e-3)")
        if self.adv_clip_max <= 0:
            e.append(f"grpo.adv_clip_max={self.adv_clip_max}: must be > 0 (5 everywhere upstream)")
        if self.adv_eps <= 0:
            e.append(f"grpo.adv_eps={self.adv_eps}: must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            e.append(f"grpo.ema_decay={self.ema_decay}: must be in [0, 1) (0 = no EMA, e.g. 0.99)")
        if self.clip_mode == "adaptive" and self.clip_grad <= 0:
            e.append("grpo.clip_mode=adaptive needs grpo.clip_grad > 0 (its first bound, OSP-Next: 1.0)")
        if self.adam_eps <= 0:
            e.append(f"grpo.adam_eps={self.adam_eps}: must be > 0")
        if not self.lora.targets:
            e.append("grpo.lora.targets is empty: give regexes of module names, e.g. ['attn', 'ffn']")
        if not self.rewards:
            e.append("grpo.rewards is empty: add at least one, e.g. [{name: brightness, weight: 1.0}]")
        elif sum(r.weight for r in self.rewards) <= 0:
            e.append("grpo.rewards: weights sum to 0; give at least one reward a positive weight")
        if not self.prompts and not self.prompts_file:
            e.append("grpo.prompts is empty: give a list of prompts or grpo.prompts_file")
        if len(self.latent_shape) != 3 or any(int(v) < 1 for v in self.latent_shape):
            e.append(f"grpo.latent_shape={self.latent_shape}: give latent [T, H, W], each >= 1 "
                     "(H, W even for 2x2 patches)")
        elif self.latent_shape[1] % 2 or self.latent_shape[2] % 2:
            e.append(f"grpo.latent_shape={self.latent_shape}: latent H and W must be even (1x2x2 patches)")


__all__ = ["FlashConfig", "GRPOConfig", "LoraConfig", "RewardSpec", "WindowConfig"]
