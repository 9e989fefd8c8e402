"""Synthetic H.264 clips: coloured shapes moving on a plain background, with captions that say so.

Each clip is a real mp4 (libx264, yuv420p) made by imageio-ffmpeg's ffmpeg binary, small (64x64 .. 128x96,
1-3 s, 16-24 fps) and fully determined by (seed, index). `make_synthetic_dataset(out_dir, n, seed)` writes
`clip-NNNNNN.mp4` plus `clip-NNNNNN.txt` (the caption) so the folder is a valid `osp-shards --input`.
"""
from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

COLOURS = {
    "red": "0xE02020",
    "green": "0x20C040",
    "blue": "0x2040E0",
    "yellow": "0xF0E020",
    "white": "0xF0F0F0",
    "black": "0x101010",
    "orange": "0xF08020",
    "purple": "0x9030C0",
    "grey": "0x808080",
    "cyan": "0x20D0E0",
}
SHAPES = ("square", "circle", "bar")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
SIZES = ((64, 64), (96, 64), (128, 96), (64, 96), (112, 64))
FPS_CHOICES = (16, 20, 24)
DURATIONS = (1.25, 1.5, 2.0, 2.5, 3.0)  # >= 17 frames at 16 fps


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (no system ffmpeg needed)."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - the `data` extra provides it
        raise RuntimeError("imageio-ffmpeg is missing: pip install 'osp-megatron[data]'") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass
class ClipSpec:
    """One synthetic clip: background, one moving shape, geometry and timing."""

    background: str
    colour: str
    shape: str
    direction: str
    width: int
    height: int
    fps: int
    duration: float

    @property
    def caption(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape} moving {self.direction} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def clip_spec(seed: int, index: int) -> ClipSpec:
    """The deterministic spec of clip `index` for `seed`."""
    rng = random.Random(f"osp-synthetic/{seed}/{index}")
    background, colour = rng.sample(sorted(COLOURS), 2)
    width, height = rng.choice(SIZES)
    return ClipSpec(
        background=background,
        colour=colour,
        shape=rng.choice(SHAPES),
        direction=rng.choice(sorted(DIRECTIONS)),
        width=width,
        height=height,
        fps=rng.choice(FPS_CHOICES),
        duration=rng.choice(DURATIONS),
    )


def _shape_source(spec: ClipSpec) -> Tuple[str, int, int]:
    """lavfi source of the shape with alpha; returns (filter, shape width, shape height)."""
    side = max(8, min(spec.width, spec.height) // 3)
    colour = COLOURS[spec.colour]
    if spec.shape == "bar":
        w, h = side * 2, max(4, side // 2)
        return f"color=c={colour}:s={w}x{h}:r={spec.fps},format=rgba", w, h
    if spec.shape == "circle":
        r = side / 2.0
        alpha = f"if(lte((X-{r}+0.5)*(X-{r}+0.5)+(Y-{r}+0.5)*(Y-{r}+0.5)\\,{r * r})\\,255\\,0)"
        src = f"color=c={colour}:s={side}x{side}:r={spec.fps},format=rgba,geq=r='r(X\\,Y)':g='g(X\\,Y)':b='b(X\\,Y)':a='{alpha}'"
        return src, side, side
    return f"color=c={colour}:s={side}x{side}:r={spec.fps},format=rgba", side, side


def ffmpeg_command(spec: ClipSpec, path: str) -> List[str]:
    """The ffmpeg command line that renders `spec` into `path` (H.264, yuv420p, bit-exact flags)."""
    shape, sw, sh = _shape_source(spec)
    dx, dy = DIRECTIONS[spec.direction]
    # travel from one side to the other over the clip; the cross axis stays centred
    span_x, span_y = spec.width - sw, spec.height - sh
    speed_x = span_x / spec.duration
    speed_y = span_y / spec.duration
    if dx > 0:
        x = f"t*{speed_x:.4f}"
    elif dx < 0:
        x = f"{span_x}-t*{speed_x:.4f}"
    else:
        x = f"{span_x // 2}"
    if dy > 0:
        y = f"t*{speed_y:.4f}"
    elif dy < 0:
        y = f"{span_y}-t*{speed_y:.4f}"
    else:
        y = f"{span_y // 2}"
    bg = f"color=c={COLOURS[spec.background]}:s={spec.width}x{spec.height}:r={spec.fps}:d={spec.duration}"
    graph = f"{bg}[bg];{shape}[fg];[bg][fg]overlay=x='{x}':y='{y}':shortest=1:format=auto,format=yuv420p[out]"
    return [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-filter_complex", graph, "-map", "[out]",
        "-frames:v", str(int(round(spec.fps * spec.duration))),
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-g", str(spec.fps), "-threads", "1",
        "-pix_fmt", "yuv420p", "-movflags", "+faststart",
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
        path,
    ]


def make_clip(spec: ClipSpec, path: str, timeout: float = 60.0) -> str:
    """Render one clip to `path` (written to `path.tmp.mp4` then renamed). Returns `path`."""
    tmp = f"{path}.tmp.mp4"
    proc = subprocess.run(ffmpeg_command(spec, tmp), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise RuntimeError(f"ffmpeg failed for {path}: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
    return path


def make_synthetic_dataset(out_dir: str, num_clips: int, seed: int = 0, workers: int = 1,
                           progress: bool = False) -> List[str]:
    """Write `clip-NNNNNN.mp4` + `.txt` caption for `num_clips` clips into `out_dir`; returns the mp4 paths.

    Existing clips are kept (rerun = resume); the result does not depend on `workers`.
    """
    if num_clips < 1:
        raise ValueError(f"--synthetic {num_clips}: give a number of clips >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(num_clips):
        mp4 = out / f"clip-{i:06d}.mp4"
        jobs.append((seed, i, str(mp4)))
    todo = [j for j in jobs if not os.path.exists(j[2])]
    if workers > 1 and len(todo) > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            for _ in _progress(pool.imap_unordered(_make_one, todo), len(todo), progress):
                pass
    else:
        for _ in _progress(map(_make_one, todo), len(todo), progress):
            pass
    return [j[2] for j in jobs]


def _make_one(job: Tuple[int, int, str]) -> str:
    seed, index, mp4 = job
    spec = clip_spec(seed, index)
    make_clip(spec, mp4)
    txt = mp4[: -len(".mp4")] + ".txt"
    tmp = txt + ".tmp"
    with open(tmp, "w") as f:
        f.write(spec.caption + "\n")
    os.replace(tmp, txt)
    return mp4


def _progress(it, total: int, enabled: bool, desc: str = "synthetic clips"):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="clip")


def ramp_clip(path: str, width: int = 64, height: int = 48, fps: int = 24, frames: int = 48,
              step: int = 4, crf: int = 0) -> str:
    """A clip whose frame i is a flat grey of level `16 + (i * step) % 224` (for frame-index checks)."""
    graph = (f"color=c=black:s={width}x{height}:r={fps},format=yuv444p,"
             f"geq=lum='16+mod(N*{step}\\,224)':cb=128:cr=128,format=yuv420p[out]")
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-filter_complex", graph, "-map", "[out]",
        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-qp", str(crf), "-g", str(fps),
        "-threads", "1", "-pix_fmt", "yuv420p", "-movflags", "+faststart", path,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed for {path}: {proc.stderr.strip()[-2000:]}")
    return path


__all__ = ["ClipSpec", "clip_spec", "make_clip", "make_synthetic_dataset", "ffmpeg_exe", "ramp_clip"]
