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
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

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


# --------------------------------------------------------------------------------------------
# VideoAlign (VideoReward): a Qwen2-VL scorer of visual quality, motion quality and text alignment
# --------------------------------------------------------------------------------------------
VIDEOALIGN_DIMS = ("VQ", "MQ", "TA")
VIDEOALIGN_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
_QWEN_FACTOR, _FRAME_FACTOR = 28, 2  # Qwen2-VL patch merge (14 x 2) and temporal patch
_TEMPLATE_NAMES = {"simple": "SIMPLE_PROMPT", "video_score": "VIDEOSCORE_QUERY_PROMPT",
                   "detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "detailed": "DETAILED_PROMPT"}


def videoalign_frames(total: int, video_fps: float, fps: float = 2.0, nframes: Optional[int] = None) -> List[int]:
    """Indices of the frames the scorer sees: `nframes`, or `total / video_fps · fps` clamped to [4, min(768,
    total)], rounded to a multiple of 2 (at most `total`), spread uniformly over the clip (Qwen2-VL's rule)."""
    def round_to(x):
        return int(round(x / _FRAME_FACTOR)) * _FRAME_FACTOR

    if nframes is not None:
        n = round_to(nframes)
    else:
        low = math.ceil(4 / _FRAME_FACTOR) * _FRAME_FACTOR
        high = (min(768, total) // _FRAME_FACTOR) * _FRAME_FACTOR
        n = round_to(min(max(total / video_fps * fps, low), high))
    n = min(n, total)
    if n < _FRAME_FACTOR:
        raise ValueError(f"VideoAlign needs >= {_FRAME_FACTOR} frames; the video has {total}")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def videoalign_size(height: int, width: int, max_pixels: int, min_pixels: int = 128 * 28 * 28) -> tuple:
    """(h, w) multiples of 28 with min_pixels <= h·w <= max_pixels, aspect ratio kept (Qwen2-VL's smart resize)."""
    f = _QWEN_FACTOR
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def read_prompt_templates(path: str) -> Dict[str, Any]:
    """String constants and DIMENSION_DESCRIPTIONS of VideoAlign's `prompt_template.py`, read as data (ast)."""
    import ast

    tree = ast.parse(Path(path).read_text())
    out: Dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


class VideoAlign:
    """VideoAlign's VideoReward scorer on transformers' Qwen2-VL: videos + prompts -> VQ, MQ, TA and "Overall" =
    VQ + MQ + TA after each is normalised with the checkpoint's `inference_config` means and stds.

    Checkpoint folder (KwaiVGI/VideoReward, weights supplied by the user): `model_config.json` with
    `data_config` (fps | num_frames, max_frame_pixels, eval_dim, prompt_template_type), `model_config`
    (model_name_or_path of the Qwen2-VL base, output_dim, use_special_tokens, reward_token), `peft_lora_config`,
    `inference_config` (VQ_mean, VQ_std, ...); and `checkpoint-<step>/` with `model.pth` (full state dict) or
    `adapter_model.safetensors` + `non_lora_state_dict.pth`. `base_model` overrides model_name_or_path (a local
    Qwen2-VL-2B-Instruct folder: its config, processor and tokenizer). The text prompt is built with VideoAlign's
    template named by prompt_template_type, read from `templates` (a path to VideoAlign's prompt_template.py) or
    given as `template` (a string with `{text_prompt}`); type `none` uses the prompt itself.

    `__call__(videos [b,3,T,H,W] in [-1,1], prompts)` -> Overall `[b]`; `score` returns every dimension. Videos are
    taken at `video_fps` (the generator's frame rate), sampled to the checkpoint's fps, resized to max_frame_pixels.
    """

    name = "videoalign"

    def __init__(self, checkpoint: str = "", base_model: str = "", step: int = -1, video_fps: float = 16.0,
                 templates: str = "", template: str = "", device: str = "auto", dtype: str = "bf16",
                 model=None, tokenizer=None, config: Optional[Dict[str, Any]] = None, use_norm: bool = True,
                 image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)) -> None:
        import json

        if config is None:
            if not checkpoint:
                raise ValueError("videoalign reward: set kwargs.checkpoint to the VideoReward folder (model_config.json "
                                 "+ checkpoint-*/); its weights are not shipped and must be downloaded by the user")
            path = Path(checkpoint) / "model_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"videoalign reward: {path} not found (give the VideoReward folder)")
            config = json.loads(path.read_text())
        self.data = dict(config.get("data_config") or {})
        self.model_cfg = dict(config.get("model_config") or {})
        self.norm = config.get("inference_config") if use_norm else None
        self.video_fps = float(video_fps)
        self.template = self._template(template, templates)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        if model is None or tokenizer is None:
            model, tokenizer = self._load(checkpoint, base_model or self.model_cfg.get("model_name_or_path", ""),
                                          step, torch.bfloat16 if dtype == "bf16" else torch.float32)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.head = model.rm_head
        vision = model.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.special_ids = tokenizer.convert_tokens_to_ids(list(VIDEOALIGN_TOKENS)) if self._special() else None
        import inspect

        self._takes_token_types = "mm_token_type_ids" in inspect.signature(model.model.forward).parameters

    # ---------------------------------------------------------------- loading
    def _special(self) -> bool:
        return bool(self.model_cfg.get("use_special_tokens")) or self.model_cfg.get("reward_token") == "special"

    def _template(self, template: str, templates: str) -> str:
        kind = self.data.get("prompt_template_type", "none")
        if template:
            return template
        if kind == "none":
            return "{text_prompt}"
        if not templates:
            raise ValueError(f"videoalign reward: the checkpoint uses prompt_template_type={kind!r}; set "
                             "kwargs.templates to VideoAlign's prompt_template.py (or kwargs.template)")
        consts = read_prompt_templates(templates)
        if kind not in _TEMPLATE_NAMES or _TEMPLATE_NAMES[kind] not in consts:
            raise ValueError(f"videoalign reward: no template for prompt_template_type={kind!r} in {templates}")
        text = consts[_TEMPLATE_NAMES[kind]]
        if "{dimension_name}" in text:  # the per-dimension templates: VideoAlign's wording for several dimensions
            dims = self.data.get("eval_dim", list(VIDEOALIGN_DIMS))
            names = consts.get("DIMENSION_DESCRIPTIONS", {})
            dims = dims if isinstance(dims, list) else [dims]
            if len(dims) > 1:
                name = f"overall performance({', '.join(names[d][0] for d in dims)})"
                desc = "the overall performance of the video"
            else:
                name, desc = names[dims[0]]
            text = text.replace("{dimension_name}", name).replace("{dimension_description}", desc)
        return text

    def _load(self, checkpoint: str, base: str, step: int, dtype):
        import json

        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

        if not base or not Path(base).exists():
            raise FileNotFoundError(f"videoalign reward: the Qwen2-VL base {base!r} is not a local folder; set "
                                    "kwargs.base_model to a downloaded Qwen2-VL-2B-Instruct")
        tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        if not getattr(tokenizer, "chat_template", None):  # Qwen2-VL keeps it beside the processor
            for name in ("chat_template.json", "chat_template.jinja"):
                f = Path(base) / name
                if f.is_file():
                    text = f.read_text()
                    tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
        pre = Path(base) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            self.image_mean, self.image_std = cfg.get("image_mean", self.image_mean), cfg.get("image_std", self.image_std)
        if self._special():
            tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEOALIGN_TOKENS)})
        model = Qwen2VLForConditionalGeneration.from_pretrained(base, torch_dtype=dtype)
        if self._special():
            model.resize_token_embeddings(len(tokenizer))
        model.rm_head = torch.nn.Linear(model.config.get_text_config().hidden_size,
                                        int(self.model_cfg.get("output_dim", 3)), bias=False, dtype=dtype)
        load_videoalign_weights(model, checkpoint, step)
        return model, tokenizer

    def patches(self, frames: Tensor) -> Tensor:
        """`[T, 3, h, w]` in [0, 255] -> Qwen2-VL video patches `[t·(h/p)·(w/p), 3·tp·p·p]` (rescaled 1/255,
        normalised with the image mean/std, T padded to a multiple of the temporal patch by repeating the last
        frame; patches ordered in 2x2 merge groups, as Qwen2-VL's processor lays them out)."""
        x = frames.float() / 255.0
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        x = (x - mean) / std
        if x.shape[0] % self.temporal:
            x = torch.cat([x, x[-1:].expand(self.temporal - x.shape[0] % self.temporal, -1, -1, -1)])
        t, c, h, w = x.shape
        p, m, tp = self.patch, self.merge, self.temporal
        gt, gh, gw = t // tp, h // p, w // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p)

    # ---------------------------------------------------------------- scoring
    def inputs(self, videos: Tensor, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Model inputs: frames sampled and resized as VideoAlign's reader does, Qwen2-VL video patches, the
        chat-formatted prompt with one video token per merged patch (what Qwen2-VL's processor produces)."""
        import torch.nn.functional as F

        v = _to_unit(videos) * 255.0  # [b,3,T,H,W]
        total, height, width = v.shape[2], v.shape[3], v.shape[4]
        idx = videoalign_frames(total, self.video_fps, float(self.data.get("fps") or 2.0),
                                self.data.get("num_frames"))
        h, w = videoalign_size(height, width, int(self.data.get("max_frame_pixels", 240 * 320)),
                               int(self.data.get("min_frame_pixels", 128 * 28 * 28)))
        pixels, grids, texts = [], [], []
        for clip, prompt in zip(v, prompts):
            frames = clip[:, idx].permute(1, 0, 2, 3)  # [T',3,H,W]
            frames = F.interpolate(frames, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pixels.append(self.patches(frames.clamp(0, 255).cpu()))
            grid = torch.tensor([-(-len(idx) // self.temporal), h // self.patch, w // self.patch])
            grids.append(grid)
            chat = [{"role": "user", "content": [{"type": "video"},
                                                  {"type": "text", "text": self.template.replace("{text_prompt}", prompt)}]}]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace("<|video_pad|>", "<|video_pad|>" * int(grid.prod() // self.merge ** 2)))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.stack(grids)}
        if self._takes_token_types:  # newer transformers: modality of each token for M-RoPE (2 = video)
            video_id = self.model.config.video_token_id
            batch["mm_token_type_ids"] = (enc["input_ids"] == video_id).int() * 2
        return {k: t.to(self.device) for k, t in batch.items()}

    @torch.no_grad()
    def raw_scores(self, batch: Dict[str, Tensor]) -> Tensor:
        """`[b, 3]` VQ, MQ, TA before normalisation: the reward head on the last hidden states, pooled at the
        three reward tokens (special) or at the last non-padding token."""
        out = self.model.model(**batch, use_cache=False)
        hidden = out.last_hidden_state
        logits = self.head(hidden.to(self.head.weight.dtype)).float()  # [b, L, N]
        ids = batch["input_ids"]
        b = ids.shape[0]
        if self.special_ids is not None:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for t in self.special_ids:
                mask |= ids == t
            pooled = logits[mask].view(b, len(VIDEOALIGN_TOKENS), -1)
            if pooled.shape[-1] == len(VIDEOALIGN_DIMS):
                pooled = pooled.diagonal(dim1=1, dim2=2)
            return pooled.reshape(b, -1)[:, : len(VIDEOALIGN_DIMS)]
        pad = self.tokenizer.pad_token_id
        if self.model_cfg.get("reward_token", "last") == "mean":
            mask = batch["attention_mask"].bool()
            return ((logits * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))[:, : len(VIDEOALIGN_DIMS)]
        last = (torch.eq(ids, pad).int().argmax(-1) - 1) % ids.shape[-1] if pad is not None else ids.new_full((b,), -1)
        return logits[torch.arange(b, device=logits.device), last][:, : len(VIDEOALIGN_DIMS)]

    def score(self, videos: Tensor, prompts: Sequence[str]) -> Dict[str, Tensor]:
        """{VQ, MQ, TA, Overall}: each `[b]`; normalised with inference_config when the checkpoint has one."""
        raw = self.raw_scores(self.inputs(videos, prompts))
        out = {}
        for k, d in enumerate(VIDEOALIGN_DIMS):
            x = raw[:, k]
            if self.norm:
                x = (x - float(self.norm[f"{d}_mean"])) / float(self.norm[f"{d}_std"])
            out[d] = x
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out

    def __call__(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.score(videos, prompts)["Overall"]


def load_videoalign_weights(model, checkpoint: str, step: int = -1) -> int:
    """Load `checkpoint-<step>/` (newest when step = -1) of a VideoReward folder into `model` (a
    Qwen2VLForConditionalGeneration with `rm_head`): `model.pth`, or LoRA `adapter_model.safetensors` merged into
    the base weights + `non_lora_state_dict.pth`. Keys of older transformers (`model.layers.*`, `visual.*`) are
    mapped to the current layout (`model.language_model.*`, `model.visual.*`). Returns the step."""
    import json
    import re

    folders = sorted(Path(checkpoint).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not folders:
        raise FileNotFoundError(f"videoalign reward: no checkpoint-<step>/ in {checkpoint}")
    chosen = next((f for f in folders if f.name == f"checkpoint-{step}"), folders[-1])
    own = model.state_dict()

    def ours(key: str) -> str:
        key = re.sub(r"^(base_model\.model\.)", "", key)
        if key in own:
            return key
        for old, new in ((r"^model\.(?!language_model\.|visual\.)", "model.language_model."), (r"^visual\.", "model.visual.")):
            cand = re.sub(old, new, key)
            if cand in own:
                return cand
        return key

    full = chosen / "model.pth"
    if full.is_file():
        state = {ours(k): v for k, v in torch.load(str(full), map_location="cpu", weights_only=True).items()}
    else:
        from safetensors.torch import load_file

        cfg_path = chosen / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        scale = float(adapter_cfg.get("lora_alpha", 1)) / float(adapter_cfg.get("r", 1))
        state = {ours(k): v for k, v in torch.load(str(chosen / "non_lora_state_dict.pth"), map_location="cpu",
                                                   weights_only=True).items()}
        adapters = load_file(str(chosen / "adapter_model.safetensors"))
        for key, a in adapters.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            b = adapters[key.replace(".lora_A.", ".lora_B.")]
            wkey = ours(f"{module}.weight")
            base = state.get(wkey, own[wkey])
            state[wkey] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
    missing = sorted(set(own) - set(state) - {k for k in own if k.startswith("lm_head")})
    unexpected = sorted(set(state) - set(own))
    if unexpected or (full.is_file() and missing):
        raise KeyError(f"videoalign reward: {chosen} does not fit the Qwen2-VL model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return int(chosen.name.split("-")[-1])


BUILTIN: Dict[str, Callable[..., Callable]] = {
    "brightness": Brightness,
    "colourfulness": Colourfulness,
    "colorfulness": Colourfulness,
    "target_colour": TargetColour,
    "target_color": TargetColour,
    "videoalign": VideoAlign,
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
