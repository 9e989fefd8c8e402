"""Reward interface: `scorer(videos [b,3,T,H,W] in [-1,1], prompts: list[str]) -> scores [b]` (higher = better).

Built-in computable rewards (tests, demo): `brightness`, `colourfulness`, `target_colour`. User reward models
(VideoAlign, HPS-style scorers, ...) are loaded by path and kept behind the same interface:
`path: my_rewards.py:VideoAlignScorer` (a python file), `path: pkg.module:Scorer` (an importable module), or
`path: pkg.module` (uses its `Scorer` attribute). The class is built with the spec's `kwargs` and must be callable
as above; outputs are checked for shape and finiteness. `MultiReward` evaluates several weighted rewards and
returns each one's scores (combination into advantages: `osp_megatron.rl.advantages.combine_rewards`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

Tensor = torch.Tensor


def _to_unit(videos: Tensor) -> Tensor:
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [b, 3, T, H, W] in [-1, 1]; got {tuple(videos.shape)}")
    return ((videos.float() + 1.0) * 0.5).clamp(0.0, 1.0)


class Brightness:
    """Mean Rec.601 luma in [0, 1]."""

    name = "brightness"

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        v = _to_unit(videos)
        luma = 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]
        return luma.flatten(1).mean(1)


class Colourfulness:
    """Hasler–Süsstrunk colourfulness `sqrt(σ_rg²+σ_yb²) + 0.3·sqrt(μ_rg²+μ_yb²)` over all pixels, RGB in [0, 1]."""

    name = "colourfulness"

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        v = _to_unit(videos)
        rg = (v[:, 0] - v[:, 1]).flatten(1)
        yb = (0.5 * (v[:, 0] + v[:, 1]) - v[:, 2]).flatten(1)
        std = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
        mean = torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
        return std + 0.3 * mean


class TargetColour:
    """`1 - mean ||rgb - target||² / 3` with RGB and `target` in [0, 1] (1 = every pixel is the target colour)."""

    name = "target_colour"

    def __init__(self, rgb: Sequence[float] = (1.0, 0.0, 0.0)) -> None:
        if len(rgb) != 3 or not all(0.0 <= float(c) <= 1.0 for c in rgb):
            raise ValueError(f"target_colour rgb={list(rgb)}: give three values in [0, 1], e.g. [1, 0, 0] for red")
        self.rgb = torch.tensor([float(c) for c in rgb])

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        v = _to_unit(videos)
        target = self.rgb.to(v.device).view(1, 3, 1, 1, 1)
        return 1.0 - ((v - target) ** 2).sum(1).flatten(1).mean(1) / 3.0


BUILTIN: Dict[str, Callable[..., Callable]] = {
    "brightness": Brightness,
    "colourfulness": Colourfulness,
    "colorfulness": Colourfulness,
    "target_colour": TargetColour,
    "target_color": TargetColour,
}


def _load_class(path: str):
    target, _, attr = path.partition(":")
    attr = attr or "Scorer"
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise FileNotFoundError(f"reward path {path!r}: file {str(file)!r} not found")
        mod_name = f"osp_reward_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ImportError(f"reward path {path!r}: cannot import module {target!r} ({exc}); "
                              "give `file.py:Class` or an importable `package.module:Class`") from exc
    if not hasattr(module, attr):
        raise AttributeError(f"reward path {path!r}: {target} has no attribute {attr!r}; name the scorer class "
                             "after a colon, e.g. my_rewards.py:MyScorer")
    return getattr(module, attr)


class CheckedReward:
    """Wraps a scorer: checks `[b]` finite output, returns float32 on the videos' device."""

    def __init__(self, name: str, scorer: Callable) -> None:
        self.name = name
        self.scorer = scorer

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"reward {self.name}: {len(prompts)} prompts for {videos.shape[0]} videos")
        out = self.scorer(videos, list(prompts))
        out = torch.as_tensor(out, dtype=torch.float32).reshape(-1).to(videos.device)
        if out.numel() != videos.shape[0]:
            raise ValueError(f"reward {self.name} returned {out.numel()} scores for {videos.shape[0]} videos; "
                             "a scorer must return one score per video")
        if not torch.isfinite(out).all():
            raise ValueError(f"reward {self.name} returned non-finite scores {out.tolist()}")
        return out


def load_reward(spec) -> CheckedReward:
    """Build one reward from a `RewardSpec` (built-in `name`, or `path` to a user scorer class)."""
    kwargs = dict(spec.kwargs or {})
    if spec.path:
        cls = _load_class(spec.path)
        scorer = cls(**kwargs)
        name = spec.name if spec.name and spec.name not in BUILTIN else getattr(scorer, "name", cls.__name__)
        return CheckedReward(str(name), scorer)
    if spec.name not in BUILTIN:
        raise ValueError(f"reward name {spec.name!r} is not built in ({', '.join(sorted(BUILTIN))}); "
                         "set `path: file.py:Class` to load your own scorer")
    return CheckedReward(spec.name, BUILTIN[spec.name](**kwargs))


class MultiReward:
    """Several weighted rewards. `__call__` -> {name: scores [b]}; `weights` -> {name: weight}."""

    def __init__(self, specs: Sequence) -> None:
        self.rewards: List[CheckedReward] = []
        self.weights: Dict[str, float] = {}
        for spec in specs:
            r = load_reward(spec)
            name, k = r.name, 2
            while name in self.weights:
                name, k = f"{r.name}_{k}", k + 1
            r.name = name
            self.rewards.append(r)
            self.weights[name] = float(spec.weight)

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Dict[str, Tensor]:
        return {r.name: r(videos, prompts) for r in self.rewards}


class LatentPreviewDecoder:
    """Cheap stand-in decoder for demos without a VAE: a fixed, seeded linear map of the C latent channels to RGB,
    `tanh` into [-1, 1], at latent resolution. `[b,C,T,H,W] -> [b,3,T,H,W]`. Not a VAE: use `decoder: vae` for
    real videos."""

    def __init__(self, channels: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, channels, generator=gen) / channels ** 0.5

    def __call__(self, latents: Tensor) -> Tensor:
        w = self.weight.to(device=latents.device, dtype=torch.float32)
        return torch.tanh(torch.einsum("oc,bcthw->bothw", w, latents.float()))
