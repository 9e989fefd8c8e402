"""Named sampling settings (`osp-sample --preset NAME`, `train.sample_preset` for in-training samples).

`osp-next`: OSP-Next's released inference settings, as its public code runs them (PKU-YuanGroup/OSP-Next):
- Euler on `linspace(1, 0, N+1)` with a static shift, timesteps 1000·σ as floats
  (`ospnext/schedulers/flow_matching.py`, `FlowMatchingScheduler.sample` / `_set_sigmas` / `_step`);
- 50 steps, shift 7.0, CFG 5.0 (`configs/infer/gpu/osp_14b.yaml`, `osp_1_3b.yaml`: `scheduler_config`);
- Wan's default (Chinese) negative prompt whenever the negative prompt is empty (`ospnext/utils/constant.py`
  `NEGATIVE_PROMPT`, used by `ospnext/pipelines/t2v_pipeline.py` `__call__`);
- seed 1024 for every prompt batch, noise from a CPU `torch.Generator().manual_seed(seed)` (`configs/infer/gpu/*.yaml`
  `seed`, `infer/infer_osp.py` passes the same seed to every batch, `t2v_pipeline.py` `__call__`);
- 81 frames at 720x1280, 16 fps (`configs/infer/gpu/*.yaml` `num_frames/height/width/save_fps`);
- latents in bf16 between steps: the noise is drawn in the text embedding's dtype and every Euler update is
  computed in fp32 and cast back (`t2v_pipeline.py` `prepare_latents(dtype=prompt_embeds.dtype)`,
  `flow_matching.py` `_step`);
- umT5 in bf16 (`infer/infer_osp.py`: `text_encoder_config.dtype` defaults to `weight_dtype: "bf16"`), VAE in fp32
  (`vae_config.dtype: "fp32"`).
"""
from __future__ import annotations

from typing import Any, Dict

# Wan2.1's default negative prompt, as OSP-Next uses it (ospnext/utils/constant.py NEGATIVE_PROMPT)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

SAMPLE_PRESETS: Dict[str, Dict[str, Any]] = {
    "osp-next": {
        "sampler": "euler", "steps": 50, "shift": 7.0, "guidance": 5.0, "negative_prompt": WAN_NEGATIVE_PROMPT,
        "seed": 1024, "seed_mode": "same", "frames": 81, "height": 720, "width": 1280, "fps": 16.0,
        "latent_dtype": "bf16", "text_dtype": "bf16",
    },
}


def sample_preset(name: str) -> Dict[str, Any]:
    """The settings of preset `name` (a copy); ValueError naming the known presets otherwise."""
    if name not in SAMPLE_PRESETS:
        raise ValueError(f"sample preset {name!r}: use one of {', '.join(SAMPLE_PRESETS)}")
    return dict(SAMPLE_PRESETS[name])


__all__ = ["SAMPLE_PRESETS", "WAN_NEGATIVE_PROMPT", "sample_preset"]
