"""`grpo.recipe` presets: every `grpo.*` value a reference run used, with the file it comes from.

`grpo.recipe: osp-next` resolves to OSP-Next's Mix-GRPO (its `train/train_osp_RL.py` and the released
`configs/train/gpu/osp_14b_RL.yaml`), `grpo.recipe: mixgrpo` to MixGRPO's FLUX run
(`scripts/finetune/finetune_flux_grpo_MixGRPO.sh` with `fastvideo/train_grpo_flux.py`). Keys written in the config
(or as overrides) win over the recipe. `recipe_table(name)` is the markdown table in docs/grpo.md
(`python -m osp_megatron.config.grpo_recipes` prints both).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, NamedTuple

# Wan2.1's default negative prompt (OSP-Next: ospnext.utils.constant.NEGATIVE_PROMPT, used in rollouts, the
# training forward and evaluation).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                       "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class RecipeValue(NamedTuple):
    key: str  # dotted key inside `grpo`
    value: Any
    source: str  # where the reference sets it


_T = "OSP-Next train/train_osp_RL.py"
_C = "OSP-Next configs/train/gpu/osp_14b_RL.yaml"
_S = "MixGRPO scripts/finetune/finetune_flux_grpo_MixGRPO.sh"
_F = "MixGRPO fastvideo/train_grpo_flux.py"
_G = "MixGRPO fastvideo/utils/grpo_states.py"

RECIPE_VALUES: Dict[str, List[RecipeValue]] = {
    "osp-next": [
        RecipeValue("iterations", 1000, f"{_C}: num_epochs (one rollout batch + its updates per epoch)"),
        RecipeValue("steps", 25, f"{_C}: rl_config.num_inference_steps"),
        RecipeValue("shift", 1.0, f"{_T}: the grid is shifted only by scheduler.shift (default 1.0); the config "
                                  "sets none, so linspace(1, 0, 26)"),
        RecipeValue("noise_level", "osp_next", f"{_T}: sde_step_with_logprob, std = sigma_min + (sigma_max - "
                                               "sigma_min)·sigma = sigma"),
        RecipeValue("cfg_scale", 5.0, f"{_T}: rl_config guidance_scale default 5.0 (rollouts and training)"),
        RecipeValue("cfg_train_uncond", "detached", f"{_T}: compute_log_prob_for_training, unconditional branch under "
                                                    "no_grad, lerp(uncond.detach(), cond, s)"),
        RecipeValue("negative_prompt", WAN_NEGATIVE_PROMPT, f"{_T}: ospnext.utils.constant.NEGATIVE_PROMPT (Wan's "
                                                            "default negative prompt)"),
        RecipeValue("window.strategy", "fixed", f"{_T}: SDE on steps 0..sde_steps-1, ODE after"),
        RecipeValue("window.start", 0, f"{_T}: is_sde_step = i < sde_steps"),
        RecipeValue("window.size", 10, f"{_C}: rl_config.sde_steps"),
        RecipeValue("window.trained_steps", 0, f"{_T}: timestep_fraction default 1.0, every SDE step trained"),
        RecipeValue("flash.enabled", False, f"{_T}: Euler ODE after the SDE steps"),
        RecipeValue("group_size", 4, f"{_C}: rl_config.num_image_per_prompt"),
        RecipeValue("init_same_noise", False, f"{_T}: osp_sample_with_logprob draws torch.randn per sample"),
        RecipeValue("rollout_batch", 2, f"{_C}: rl_config.sample_batch_size"),
        RecipeValue("train_batch", 2, f"{_C}: rl_config.train_batch_size"),
        RecipeValue("updates_per_iteration", 0, f"{_T}: optimizer step every gradient_accumulation_steps x "
                                                "num_train_timesteps backward passes = after every train micro-batch"),
        RecipeValue("grad_accumulation", 1, f"{_C}: gradient_accumulation_steps"),
        RecipeValue("shuffle_train_order", True, f"{_T}: samples permuted (torch.randperm) before the micro-batches"),
        RecipeValue("lr", 2e-5, f"{_C}: optimizer_config.lr"),
        RecipeValue("weight_decay", 0.0, f"{_C}: optimizer_config.weight_decay (the NPU config: 1e-3)"),
        RecipeValue("adam_beta1", 0.9, f"{_T}: AdamW betas default (0.9, 0.999)"),
        RecipeValue("adam_beta2", 0.999, f"{_T}: AdamW betas default (0.9, 0.999)"),
        RecipeValue("adam_eps", 1e-15, f"{_T}: AdamW eps default 1e-15"),
        RecipeValue("clip_grad", 1.0, f"{_C}: init_max_grad_norm (AdaptiveGradClipper's first bound)"),
        RecipeValue("clip_mode", "adaptive", f"{_T}: AdaptiveGradClipper (ospnext/utils/clip_grads.py: EMA 0.99 of "
                                             "the norms + 3 std)"),
        RecipeValue("clip_range", 5e-3, f"{_T}: rl_config clip_range default 5e-3"),
        RecipeValue("adv_clip_max", 5.0, f"{_T}: rl_config adv_clip_max default 5.0"),
        RecipeValue("adv_norm", "group", f"{_T}: PerPromptStatTracker(global_std=False)"),
        RecipeValue("adv_eps", 1e-4, f"{_T}: PerPromptStatTracker, np.std(...) + 1e-4"),
        RecipeValue("adv_unbiased_std", False, f"{_T}: PerPromptStatTracker, np.std (biased)"),
        RecipeValue("zero_adv_filter", True, f"{_T}: mask = advantages != 0, padded to a multiple of "
                                             "num_batches_per_epoch"),
        RecipeValue("kl_beta", 0.004, f"{_C}: rl_config.kl_beta (reference: LoRA disabled)"),
        RecipeValue("ema_decay", 0.9999, f"{_C}: ema_decay, ema_update_interval 1 (LoRA weights only)"),
        RecipeValue("eval_ema", True, f"{_T}: evaluation swaps the EMA weights in (ema_copy_to_model)"),
        RecipeValue("eval_steps", 50, f"{_T}: rl_config eval_num_steps default 50"),
        RecipeValue("lora.rank", 32, f"{_C}: lora_config.rank"),
        RecipeValue("lora.alpha", 64.0, f"{_C}: lora_config.alpha"),
        RecipeValue("lora.init", "gaussian", f"{_T}: LoraConfig(init_lora_weights='gaussian')"),
        RecipeValue("lora.targets", [r"(self_attention|cross_attention)\.linear_(q|k|v|proj)$"],
                    f"{_C}: lora_config.target_modules self_attn/cross_attn q, k, v, o (this model's names)"),
        RecipeValue("reward_mix", "reward_aggr", "OSP-Next ospnext/rewards/rewards.py multi_score: weighted sum of "
                                                 "raw rewards, normalised once"),
    ],
    "mixgrpo": [
        RecipeValue("iterations", 300, f"{_S}: --max_train_steps 300"),
        RecipeValue("steps", 25, f"{_S}: sampling_steps=25"),
        RecipeValue("shift", 3.0, f"{_S}: --shift 3"),
        RecipeValue("noise_level", "flow_grpo", f"{_S}: --flow_grpo_sampling (g = eta·sqrt(sigma/(1-sigma)))"),
        RecipeValue("eta", 0.7, f"{_S}: eta=0.7"),
        RecipeValue("cfg_scale", 1.0, f"{_S}: --cfg 0.0 (FLUX guidance embedding, no CFG)"),
        RecipeValue("window.strategy", "progressive", f"{_S}: sample_strategy=progressive"),
        RecipeValue("window.start", 0, f"{_G}: cur_timestep = 0"),
        RecipeValue("window.size", 4, f"{_S}: group_size=4 (the window, not the GRPO group)"),
        RecipeValue("window.shift_interval", 25, f"{_S}: iters_per_group=25"),
        RecipeValue("window.stride", 1, f"{_S}: --prog_overlap --prog_overlap_step 1"),
        RecipeValue("window.roll_back", True, f"{_S}: --roll_back"),
        RecipeValue("window.limit", 23, f"{_F}: max_timesteps = sampling_steps - 2"),
        RecipeValue("window.tail", "mixgrpo", f"{_G}: get_current_timesteps range(cur, min(cur+size, max)), "
                                              "roll back once cur > max_timesteps"),
        RecipeValue("window.decay_max_interval", 10, f"{_S}: --max_iters_per_group 10 (decay strategy)"),
        RecipeValue("window.decay_min_interval", 1, f"{_S}: --min_iters_per_group 1 (decay strategy)"),
        RecipeValue("window.exp_decay_k", 0.1, f"{_G}: exp_decay_k = 0.1"),
        RecipeValue("window.exp_decay_start", 13, f"{_G}: exp_decay_thre_timestep = 13"),
        RecipeValue("window.trained_steps", 0, f"{_S}: training_strategy=part, every window step trained"),
        RecipeValue("flash.enabled", False, f"{_S}: dpm_algorithm_type=null (MixGRPO-Flash: dpm-solver++)"),
        RecipeValue("flash.compression", 0.4, f"{_S}: dpm_post_compress_ratio=0.4"),
        RecipeValue("flash.min_points", 1, "MixGRPO fastvideo/utils/sampling_utils.py: max(int((N - L)·ratio), 1)"),
        RecipeValue("group_size", 12, f"{_S}: --num_generations 12"),
        RecipeValue("init_same_noise", True, f"{_S}: --init_same_noise"),
        RecipeValue("rollout_batch", 1, f"{_F}: sample_reference_model samples one at a time"),
        RecipeValue("train_batch", 1, f"{_S}: --train_batch_size 1"),
        RecipeValue("updates_per_iteration", 0, f"{_F}: optimizer step every gradient_accumulation_steps samples"),
        RecipeValue("grad_accumulation", 3, f"{_S}: gradient_accumulation_steps=3 (4 steps per 12 samples)"),
        RecipeValue("shuffle_train_order", False, f"{_F}: samples trained in rollout order"),
        RecipeValue("lr", 1e-5, f"{_S}: --learning_rate 1e-5"),
        RecipeValue("weight_decay", 1e-4, f"{_S}: --weight_decay 0.0001"),
        RecipeValue("adam_beta1", 0.9, f"{_F}: AdamW betas (0.9, 0.999)"),
        RecipeValue("adam_beta2", 0.999, f"{_F}: AdamW betas (0.9, 0.999)"),
        RecipeValue("adam_eps", 1e-8, f"{_F}: AdamW eps 1e-8"),
        RecipeValue("clip_grad", 1.0, f"{_S}: --max_grad_norm 1.0"),
        RecipeValue("clip_mode", "norm", f"{_F}: clip_grad_norm_ to max_grad_norm"),
        RecipeValue("clip_range", 1e-4, f"{_S}: --clip_range 1e-4"),
        RecipeValue("adv_clip_max", 5.0, f"{_S}: --adv_clip_max 5.0"),
        RecipeValue("adv_norm", "group", f"{_S}: --use_group"),
        RecipeValue("adv_eps", 1e-8, f"{_F}: (r - mean) / (std + 1e-8)"),
        RecipeValue("adv_unbiased_std", True, f"{_F}: torch.std (unbiased)"),
        RecipeValue("zero_adv_filter", False, f"{_F}: every sample trained"),
        RecipeValue("kl_beta", 0.0, f"{_S}: kl_coeff=0.0"),
        RecipeValue("ema_decay", 0.0, f"{_F}: no EMA"),
        RecipeValue("reward_mix", "advantage_aggr", f"{_S}: multi_reward_mix=advantage_aggr"),
        RecipeValue("save_interval", 50, f"{_S}: --checkpointing_steps 50"),
    ],
}


def recipe_dict(name: str) -> Dict[str, Any]:
    """The recipe as nested plain data (`{"window": {"size": 10}, ...}`), fresh copies."""
    out: Dict[str, Any] = {}
    for entry in RECIPE_VALUES[name]:
        node = out
        *parents, leaf = entry.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(entry.value)
    return out


def _under(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """`over` merged onto `base`, mappings merged key by key (the config's keys win)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _under(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def expand_recipe(data: Dict[str, Any]) -> Dict[str, Any]:
    """`grpo` data with its recipe's values filled in below the keys it sets (unknown recipes pass through: the
    parser reports them with the valid choices)."""
    name = data.get("recipe", "custom")
    if not isinstance(name, str) or name not in RECIPE_VALUES:
        return data
    return _under(recipe_dict(name), data)


def _cell(value: Any) -> str:
    if isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, list):
        text = ", ".join(str(v) for v in value)
    else:
        text = repr(value)
    return "`" + text.replace("|", "\\|") + "`"


def recipe_table(name: str) -> str:
    """Markdown table `| key | value | source |` of one recipe (docs/grpo.md)."""
    lines = ["| key | value | source |", "|---|---|---|"]
    for e in RECIPE_VALUES[name]:
        lines.append(f"| `grpo.{e.key}` | {_cell(e.value)} | {e.source.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for recipe in RECIPE_VALUES:
        print(f"### `grpo.recipe: {recipe}`\n\n{recipe_table(recipe)}\n")
