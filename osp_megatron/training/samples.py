"""Periodic sample videos during training: fixed prompts, fixed noise, Euler/UniPC + CFG, VAE decode, mp4, and a
frame-strip PNG of each video (a preview that any image viewer or tracker UI shows).

Collective: every rank of the model-parallel group runs the (TP/CP-sharded) model; rank 0 writes the files.
Needs pipeline_parallel = 1 (the velocity is only complete on one stage otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from osp_megatron.diffusion import samplers
from osp_megatron.diffusion.presets import sample_preset


def write_mp4(path: str | Path, video: torch.Tensor, fps: float) -> Path:
    """video [3, F, H, W] in [-1, 1] -> H.264 mp4 at `path` (tmp + rename). Returns the path."""
    import os

    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _uint8_frames(video)
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


def _uint8_frames(video: torch.Tensor) -> np.ndarray:
    """video [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def frame_strip(video: torch.Tensor, num_frames: int = 5, scale: int = 1, gap: int = 2) -> np.ndarray:
    """video [3, F, H, W] in [-1, 1] -> uint8 image [H*scale, n*(W*scale+gap)-gap, 3]: `num_frames` evenly spaced
    frames (first and last included) side by side, nearest-upscaled by `scale`, white gaps between them."""
    frames = _uint8_frames(video)
    f = frames.shape[0]
    n = max(1, min(num_frames, f))
    picks = [round(i * (f - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]
    tiles = [frames[i].repeat(scale, axis=0).repeat(scale, axis=1) for i in picks]
    h, w = tiles[0].shape[:2]
    strip = np.full((h, n * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        strip[:, k * (w + gap): k * (w + gap) + w] = tile
    return strip


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """uint8 RGB image [H, W, 3] -> PNG at `path` (zlib, no imaging library needed; tmp + rename)."""
    import os
    import struct
    import zlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, c = image.shape
    if c != 3:
        raise ValueError(f"write_png: expected an RGB image [H, W, 3], got {image.shape}")
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    tmp = path.with_name(path.stem + ".tmp.png")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path


def write_frame_strip(path: str | Path, video: torch.Tensor, num_frames: int = 5, scale: int = 1) -> Path:
    """video [3, F, H, W] in [-1, 1] -> frame-strip PNG at `path` (see `frame_strip`)."""
    return write_png(path, frame_strip(video, num_frames, scale))


def read_mp4(path: str | Path) -> torch.Tensor:
    """mp4 -> float32 video [3, F, H, W] in [-1, 1] (every frame, decoded by imageio-ffmpeg)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return video / 127.5 - 1.0


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
    """Sample one video per prompt; rank 0 (`write=True`) writes `out_dir/step_XXXXXXX_<i>.mp4` and its frame strip
    `step_XXXXXXX_<i>.png`. Returns the paths (mp4, png, mp4, png, ...)."""
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
            paths.append(write_frame_strip(out_dir / f"step_{step:07d}_{i}.png", video[i]))
    return paths
