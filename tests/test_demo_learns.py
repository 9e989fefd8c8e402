"""The README's demo learns what its sample prompt asks for (slow: two real `osp-train` runs, ~6 minutes on 2 cores).

`osp-shards --synthetic 64`, then `configs/demo_cpu.yaml` as the README runs it (torchrun, 2 processes, SSP 2) and a
control run of the same config stopped after one step (an untrained DiT, same sampler and noise). Each final sample
mp4 is decoded with PyAV; the median RGB of each frame's outer 8-pixel ring is the sample's background. The prompts
"a red square moving right on a blue background" and "a yellow circle moving down on a green background" must give
backgrounds nearest to the synthetic clips' blue and green, each nearer than the control's
(below 3/4 of its distance; measured: blue 12 vs 161, green 64 vs 113).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.synthetic import COLOURS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_cpu.yaml"
RING = 8  # pixels of the frame border that are background in every synthetic clip (the shape moves inside)
RGB = {name: np.array([int(h[2:4], 16), int(h[4:6], 16), int(h[6:8], 16)], dtype=float) for name, h in COLOURS.items()}


def background_rgb(mp4: Path) -> np.ndarray:
    """Median RGB (0..255) of the outer RING pixels over all frames of `mp4` (decoded with PyAV)."""
    import av

    with av.open(str(mp4)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)
    ring = np.ones(frames.shape[1:3], dtype=bool)
    ring[RING:-RING, RING:-RING] = False
    return np.median(frames[:, ring, :].reshape(-1, 3), axis=0)


def distances(rgb: np.ndarray) -> dict:
    return {name: float(np.linalg.norm(rgb - c)) for name, c in RGB.items()}


PROMPTED = ("blue", "green")  # backgrounds of the config's two sample prompts, in order


def _train(run_dir: Path, shards: Path, cwd: Path, *overrides: str) -> list:
    """The README's training command on `shards` into `run_dir`; returns the last step's sample mp4s, prompt order."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "osp_megatron.cli.train",
           str(CONFIG), f"data.shards={shards}", f"train.run_dir={run_dir}", "tracking.backend=none", *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"osp-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    last = sorted((run_dir / "samples").glob("step_*_0.mp4"))
    assert last, f"no sample mp4 under {run_dir / 'samples'}"
    step = last[-1].name.rsplit("_", 1)[0]
    return [run_dir / "samples" / f"{step}_{i}.mp4" for i in range(len(PROMPTED))]


@pytest.mark.slow
def test_demo_samples_show_the_prompted_backgrounds(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shards = tmp_path / "demo_data" / "shards"
    subprocess.run([sys.executable, "-m", "osp_megatron.cli.shards", "--synthetic", "64", "--output", str(shards)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)

    trained = _train(tmp_path / "trained", shards, tmp_path)
    control = _train(tmp_path / "control", shards, tmp_path, "train.steps=1", "train.warmup_steps=0")

    for colour, mp4_t, mp4_c in zip(PROMPTED, trained, control):
        rgb_t, rgb_c = background_rgb(mp4_t), background_rgb(mp4_c)
        d_t, d_c = distances(rgb_t), distances(rgb_c)
        nearest_t = min(d_t, key=d_t.get)
        print(f"\n{colour} prompt: trained {mp4_t.name} background RGB {rgb_t.round()}, nearest {nearest_t}, "
              f"distance {d_t[colour]:.1f}; control {mp4_c.name} RGB {rgb_c.round()}, nearest "
              f"{min(d_c, key=d_c.get)}, distance {d_c[colour]:.1f}")
        assert nearest_t == colour, f"trained sample background {rgb_t.round()} is nearest {nearest_t}, not {colour}: {d_t}"
        assert d_t[colour] < 0.75 * d_c[colour], (
            f"trained distance to {colour} {d_t[colour]:.1f} is not clearly below the untrained control's {d_c[colour]:.1f}")
