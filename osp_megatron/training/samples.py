"""Periodic sample videos during training: fixed prompts, fixed noise, Euler/UniPC + CFG, VAE decode, mp4.

Collective: every rank of the model-parallel group runs the (TP/CP-sharded) model; rank 0 writes the files.
Needs pipeline_parallel = 1 (the velocity is only complete on one stage otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from osp_megatron.diffusion import samplers


def write_mp4(path: str | Path, video: torch.Tensor, fps: float) -> Path:
    """video [3, F, H, W] in [-1, 1] -> H.264 mp4 at `path` (tmp + rename). Returns the path."""
    import os

    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    f, h, w, _ = frames.shape
    tmp = path.with_name(path.stem + ".tmp.mp4")
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
        output_params=["-loglevel", "error"],
    )
    writer.send(None)
    for i in range(f):
        writer.send(np.ascontiguousarray(frames[i]))
    writer.close()
    os.replace(tmp, path)
    return path


def step_progress(total: int, desc: str, enabled: Optional[bool] = None):
    """A tqdm bar over denoising steps on stderr, or None when disabled (default: only when stderr is a TTY)."""
    import sys

    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)


@torch.no_grad()
def sample_latents(model, text: torch.Tensor, null_text: Optional[torch.Tensor], latent_shape: Sequence[int],
                   steps: int, guidance: float, shift: float, seed: int, device, dtype, solver: str = "unipc",
                   latent_dtype: Optional[torch.dtype] = None, progress: Optional[bool] = False,
                   desc: str = "sampling") -> torch.Tensor:
    """Denoise fixed noise [b, *latent_shape] conditioned on `text` [b, L, D]; returns float32 latents.

    Timesteps as the solver's reference feeds them (`samplers.solver_timesteps`: UniPC int as diffusers, Euler
    float as OSP-Next); `latent_dtype` rounds the latents between steps (OSP-Next: bf16); `progress`: a per-step
    tqdm bar (None: only on a TTY).
    """
    b = text.shape[0]
    noise = samplers.seeded_noise((b, *latent_shape), seed, dtype=torch.float32, device=device)

    def call(x, timestep, t):
        return model(x.to(dtype), timestep, t).float()

    fn = samplers.cfg_velocity_fn(call, text, null_text, guidance, timesteps=samplers.solver_timesteps(solver))
    bar = step_progress(steps, desc, progress)
    try:
        return samplers.sample(fn, noise, steps=steps, shift=shift, solver=solver, latent_dtype=latent_dtype,
                               callback=(lambda i, x: bar.update()) if bar is not None else None).float()
    finally:
        if bar is not None:
            bar.close()


def sample_settings(train_cfg) -> dict:
    """The in-training sample settings: `train.sample_preset` when set (e.g. osp-next), else the sample_* keys.
    Keys: steps, guidance, shift, seed, solver, negative_prompt, latent_dtype."""
    from osp_megatron.diffusion.presets import sample_preset

    t = train_cfg
    out = {"steps": t.sample_steps, "guidance": t.sample_guidance, "shift": t.sample_shift, "seed": t.sample_seed,
           "solver": t.sample_solver, "negative_prompt": "", "latent_dtype": None}
    if t.sample_preset:
        p = sample_preset(t.sample_preset)
        out.update(steps=p["steps"], guidance=p["guidance"], shift=p["shift"], seed=p["seed"], solver=p["sampler"],
                   negative_prompt=p["negative_prompt"],
                   latent_dtype=torch.bfloat16 if p["latent_dtype"] == "bf16" else None)
    return out


@torch.no_grad()
def make_sample_videos(model, vae, text_encoder, prompts: List[str], latent_shape: Sequence[int], steps: int,
                       guidance: float, shift: float, seed: int, device, dtype, out_dir: Path, step: int,
                       fps: float, write: bool, solver: str = "unipc", negative_prompt: str = "",
                       latent_dtype: Optional[torch.dtype] = None) -> List[Path]:
    """Sample one video per prompt; rank 0 (`write=True`) writes `out_dir/step_XXXXXXX_<i>.mp4`."""
    was_training = model.training
    model.eval()
    try:
        text = text_encoder.encode(list(prompts)).to(device=device, dtype=dtype)
        null = text_encoder.encode([negative_prompt]).to(device=device, dtype=dtype) if guidance != 1.0 else None
        latents = sample_latents(model, text, null, latent_shape, steps, guidance, shift, seed, device, dtype, solver,
                                 latent_dtype=latent_dtype)
        video = vae.decode(latents.to(device))
    finally:
        model.train(was_training)
    paths = []
    if write:
        for i in range(video.shape[0]):
            paths.append(write_mp4(out_dir / f"step_{step:07d}_{i}.mp4", video[i], fps))
    return paths
