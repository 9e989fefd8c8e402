"""The CPU demo visibly learns: after a short run of the demo config (patch VAE, tiny umT5) the sample videos for
its fixed prompts show the prompted background colour, much closer than the same samples from the untrained DiT."""
import re
import subprocess
import sys

import pytest
import torch

from train_launch import REPO, run_world

STEPS = 60


def prompted_background(prompt: str) -> torch.Tensor:
    """'... on a blue background' -> the synthetic clips' RGB of blue in [-1, 1], shape [3]."""
    from data_pipeline.synthetic import COLOURS

    name = re.search(r"on an? (\w+) background", prompt).group(1)
    value = int(COLOURS[name], 16)
    rgb = torch.tensor([(value >> 16) & 255, (value >> 8) & 255, value & 255], dtype=torch.float32)
    return rgb / 127.5 - 1.0


def background_error(video: torch.Tensor, prompt: str) -> float:
    """Distance between the per-channel median of video [3, F, H, W] (the background covers most pixels) and the
    prompted background colour."""
    return float((video.flatten(1).median(dim=1).values - prompted_background(prompt)).norm())


def untrained_samples(cfg, prompts):
    """The same samples (prompts, noise, sampler, encoders) from the DiT at its initial weights."""
    from osp_megatron import cpu_shims
    from osp_megatron.encoders import load_text_encoder, load_vae
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState
    from osp_megatron.training.samples import sample_latents
    from osp_megatron.training.rng import seed_everything

    cpu_shims.apply()
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, ParallelState.single(), precision=cfg.precision, device="cpu").eval()
    vae = load_vae(cfg.encoders.vae)
    text_encoder = load_text_encoder(cfg.encoders.text_encoder, "cpu", torch.float32, cfg.data.text_len, text_dim=32)
    t = cfg.train
    b = cfg.data.buckets[0]
    latents = sample_latents(model, text_encoder.encode(prompts), text_encoder.encode([""]),
                             vae.latent_shape(b.frames, b.height, b.width), t.sample_steps, t.sample_guidance,
                             t.sample_shift, t.sample_seed, "cpu", torch.float32, t.sample_solver)
    return vae.decode(latents)


@pytest.mark.slow
def test_demo_samples_show_the_prompted_background(tmp_path):
    from osp_megatron.config import load_config
    from osp_megatron.training.samples import read_mp4

    subprocess.run([sys.executable, "-m", "osp_megatron.cli.shards", "--synthetic", "8", "--output",
                    "demo_data/shards", "--workers", "1", "--no-progress"], cwd=tmp_path, check=True, timeout=180)
    overrides = ["parallel.ssp=1", f"train.steps={STEPS}", f"train.sample_interval={STEPS}", "train.save_checkpoints=false",
                 "tracking.backend=none", "data.num_workers=0"]
    codes = run_world(1, str(REPO / "configs" / "demo_cpu.yaml"), overrides, tmp_path / "logs", cwd=tmp_path)
    log = next((tmp_path / "logs").glob("rank0.*.log")).read_text()
    assert codes == [0], log[-3000:]
    cfg = load_config(str(REPO / "configs" / "demo_cpu.yaml"), overrides)
    prompts = list(cfg.train.sample_prompts)
    samples = tmp_path / "runs" / "demo_cpu" / "samples"
    trained = [background_error(read_mp4(samples / f"step_{STEPS:07d}_{i}.mp4"), p) for i, p in enumerate(prompts)]
    assert all((samples / f"step_{STEPS:07d}_{i}.png").stat().st_size > 0 for i in range(len(prompts)))
    control = untrained_samples(cfg, prompts)
    untrained = [background_error(control[i], p) for i, p in enumerate(prompts)]
    print(f"background colour error, trained {STEPS} steps: {trained}; untrained: {untrained}")
    for p, a, b in zip(prompts, trained, untrained):
        assert a < 0.5 * b, f"{p!r}: trained error {a:.3f} vs untrained {b:.3f}"
