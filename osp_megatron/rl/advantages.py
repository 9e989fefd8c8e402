"""GRPO advantages from rewards of per-prompt groups.

`A_i = (r_i - mean_group(i)) / (std + eps)`, clamped to ±clip. `norm="group"`: std of the sample's own group
(MixGRPO/DanceGRPO: unbiased std, eps 1e-8); `norm="global"`: std over the whole gathered batch (Flow-GRPO
`global_std`). Groups never mix prompts: `group_ids[i]` is the prompt slot of sample i. All tensors are `[n]`.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

Tensor = torch.Tensor


def group_advantages(rewards: Tensor, group_ids: Tensor, norm: str = "group", eps: float = 1e-8,
                     clip: float = 5.0, unbiased: bool = True) -> Tensor:
    """Normalised, clamped advantages `[n]` (float64 inside, returned in float32)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [n]")
    if norm not in ("group", "global"):
        raise ValueError(f"advantage norm {norm!r}: use group or global")
    r = rewards.detach().to(torch.float64)
    adv = torch.empty_like(r)
    global_std = r.std(unbiased=unbiased) if r.numel() > 1 else r.new_zeros(())
    for gid in torch.unique(group_ids):
        idx = (group_ids == gid).nonzero(as_tuple=True)[0]
        rg = r[idx]
        if idx.numel() < 2:
            raise ValueError(f"group {int(gid)} has {idx.numel()} sample: GRPO needs >= 2 samples per prompt")
        std = rg.std(unbiased=unbiased) if norm == "group" else global_std
        adv[idx] = (rg - rg.mean()) / (std + eps)
    return adv.clamp(-clip, clip).to(torch.float32)


def combine_rewards(per_reward: Mapping[str, Tensor], weights: Mapping[str, float], group_ids: Tensor,
                    mode: str = "advantage_aggr", **adv_kwargs) -> Tuple[Tensor, Tensor]:
    """Weighted multi-reward -> (advantages [n], combined reward [n]). Weights are normalised to sum to 1.

    advantage_aggr: each reward is normalised separately and the advantages summed with the weights (then clamped);
    reward_aggr: the weighted raw rewards are summed first, then normalised once.
    """
    total = float(sum(weights[k] for k in per_reward))
    if total <= 0:
        raise ValueError("reward weights sum to 0: give at least one reward a positive weight")
    w = {k: weights[k] / total for k in per_reward}
    combined = sum(w[k] * per_reward[k].to(torch.float64) for k in per_reward)
    if mode == "reward_aggr":
        return group_advantages(combined, group_ids, **adv_kwargs), combined.to(torch.float32)
    if mode != "advantage_aggr":
        raise ValueError(f"reward mix {mode!r}: use advantage_aggr or reward_aggr")
    clip = adv_kwargs.pop("clip", 5.0)
    adv = sum(w[k] * group_advantages(per_reward[k], group_ids, clip=float("inf"), **adv_kwargs).to(torch.float64)
              for k in per_reward)
    return adv.clamp(-clip, clip).to(torch.float32), combined.to(torch.float32)


def shuffled(adv: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Control experiment: the same advantages permuted across samples (breaks the reward-sample link)."""
    return adv[torch.randperm(adv.numel(), generator=generator)]


def reward_stats(per_reward: Mapping[str, Tensor]) -> Dict[str, float]:
    """`reward/<name>/mean` and `/std` for logging."""
    out: Dict[str, float] = {}
    for k, v in per_reward.items():
        v = v.detach().to(torch.float64)
        out[f"reward/{k}/mean"] = float(v.mean())
        out[f"reward/{k}/std"] = float(v.std()) if v.numel() > 1 else 0.0
    return out
