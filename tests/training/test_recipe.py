"""OSP-Next's training recipe: dynamic shift per latent frame, caption dropout (rate, resume), prompt cleaning,
adaptive gradient clipping; each against the rule written out here from OSP-Next's code."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline import build_loader
from data_pipeline.config import DataConfig
from osp_megatron.config import TrainConfig
from osp_megatron.diffusion.flow_matching import FlowMatching
from osp_megatron.encoders import load_text_encoder
from osp_megatron.encoders.text import clean_prompt
from osp_megatron.training.batches import BatchPreparer, caption_dropped
from osp_megatron.training.clipping import GradClipper


def _osp_next_shift(frames, height, width):
    """OSP-Next `FlowMatchingScheduler`: image_seq_len = h*w // 4 of the latent, mu linear through (256, 0.5) and
    (4096, 1.15), shift = exp(mu)."""
    h, w = height // 8, width // 8
    seq = h * w // 4
    k = (1.15 - 0.5) / (4096 - 256)
    return math.exp(seq * k + (0.5 - k * 256))


@pytest.mark.parametrize("frames,height,width,expected", [(81, 720, 1280, 2.904), (81, 480, 832, 2.056)])
def test_per_frame_dynamic_shift_is_osp_next_rule(frames, height, width, expected):
    t = TrainConfig(dynamic_shift=True, shift_rule="per_frame")
    flow = FlowMatching.from_train_config(t)
    shape = [16, (frames - 1) // 4 + 1, height // 8, width // 8]
    got = flow.shift_for(shape)
    assert got == pytest.approx(_osp_next_shift(frames, height, width), rel=1e-12)
    assert round(got, 3) == expected
    per_sample = FlowMatching.from_train_config(TrainConfig(dynamic_shift=True)).shift_for(shape)
    assert per_sample > 100  # the token count per sample with FLUX's defaults: not OSP-Next's rule


def test_dry_run_prints_the_shift_of_every_bucket(monkeypatch, capsys, tmp_path):
    from osp_megatron.cli.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "shards").mkdir()
    buckets = "[{frames: 81, height: 720, width: 1280}, {frames: 81, height: 480, width: 832}]"
    assert main(["configs/demo_cpu.yaml", f"data.shards={tmp_path / 'shards'}", f"data.buckets={buckets}",
                 "train.dynamic_shift=true", "train.shift_rule=per_frame", "train.base_seq_len=256",
                 "train.max_seq_len=4096", "train.base_shift=0.5", "train.max_shift=1.15", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "timestep shift (dynamic, per_frame tokens: 256 -> 0.5, 4096 -> 1.15)" in out
    assert "81x720x1280 (latents [16, 21, 90, 160]): shift 2.9039" in out
    assert "81x480x832 (latents [16, 21, 60, 104]): shift 2.0559" in out


def test_caption_dropout_rate_within_binomial_tolerance():
    n, p = 2000, 0.1
    drops = sum(caption_dropped(1234, f"clip-{i:05d}", 17, p) for i in range(n))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(drops - n * p) <= 4 * sd  # 200 +- 54
    # the same sample at another step is an independent draw; p = 0 / 1 are exact
    again = sum(caption_dropped(1234, f"clip-{i:05d}", 18, p) for i in range(n))
    assert again != drops or any(caption_dropped(1234, f"clip-{i:05d}", 17, p) !=
                                 caption_dropped(1234, f"clip-{i:05d}", 18, p) for i in range(n))
    assert not any(caption_dropped(1, f"k{i}", 1, 0.0) for i in range(50))
    assert all(caption_dropped(1, f"k{i}", 1, 1.0) for i in range(50))


def _drops_over(loader, preparer, steps):
    it = iter(loader)
    return [preparer.dropped(next(it), step, 0) for step in steps]


def test_caption_dropout_is_the_same_after_a_resume():
    cfg = DataConfig(kind="synthetic", synthetic_latent_shape=[16, 1, 4, 4], synthetic_num_samples=7,
                     micro_batch_size=3, text_len=8)
    flow = FlowMatching()
    prep = BatchPreparer(flow, 99, 0, "cpu", torch.float32, caption_dropout=0.5)
    whole = _drops_over(build_loader(cfg, text_dim=32), prep, range(1, 9))
    first = build_loader(cfg, text_dim=32)
    _drops_over(first, prep, range(1, 4))
    resumed = build_loader(cfg, text_dim=32)
    resumed.load_state_dict(first.state_dict())
    fresh = BatchPreparer(flow, 99, 0, "cpu", torch.float32, caption_dropout=0.5)
    assert _drops_over(resumed, fresh, range(4, 9)) == whole[3:]
    assert 0 < sum(map(sum, whole)) < 24


def test_dropped_samples_train_on_the_empty_caption():
    enc = load_text_encoder("tiny", text_len=8, text_dim=32)
    prep = BatchPreparer(FlowMatching(), 5, 0, "cpu", torch.float32, text_encoder=enc, caption_dropout=0.5)
    captions = [f"caption {i}" for i in range(8)]
    drop = [True, False] * 4
    _, text = prep.latents_and_text({"video": None, "latents": torch.zeros(8, 16, 1, 2, 2), "caption": captions},
                                    drop)
    want = enc.encode([("" if d else c) for c, d in zip(captions, drop)])
    assert torch.equal(text, want)
    cached = enc.encode(captions)  # latent batches: the stored embedding is swapped for the embedding of ""
    _, text = prep.latents_and_text({"latents": torch.zeros(8, 16, 1, 2, 2), "text": cached}, drop)
    assert torch.equal(text[0], enc.encode([""])[0]) and torch.equal(text[1], cached[1])


def test_prompt_cleaning_like_wan():
    assert clean_prompt("  a  cat&amp;amp;dog\n\tat &lt;dusk&gt;  ") == "a cat&dog at <dusk>"
    enc = load_text_encoder("tiny", text_len=16, text_dim=32)
    assert torch.equal(enc.encode(["a   red\nsquare"]), enc.encode(["a red square"]))


def _osp_next_adaptive(norms, init=1.0, decay=0.99):
    """OSP-Next `AdaptiveGradClipper.adaptive_clip`, step by step: the bound used at each step."""
    avg, var, bounds = None, 0.0, []
    for g in norms:
        if avg is None:
            avg = min(init, g * 3)
            var = 0.0
        bound = avg + 3.0 * var ** 0.5
        bounds.append(bound)
        if g <= bound:
            avg = decay * avg + (1 - decay) * g
            var = decay * var + (1 - decay) * (avg - g) ** 2
    return bounds


def test_adaptive_clipping_is_osp_next_rule_and_resumes():
    g = torch.Generator().manual_seed(0)
    norms = (0.2 + 0.05 * torch.randn(60, generator=g, dtype=torch.float64)).abs().tolist()
    norms[20], norms[40] = 5.0, 0.9  # spikes are clipped and do not move the bound
    want = _osp_next_adaptive(norms)
    clip = GradClipper("adaptive", 1.0, 0.99)
    got = [clip.bound(n) for n in norms[:30]]
    resumed = GradClipper("adaptive", 1.0, 0.99)
    resumed.load_state_dict(clip.state_dict())
    got += [resumed.bound(n) for n in norms[30:]]
    assert got == pytest.approx(want, rel=1e-12)
    assert want[0] == min(1.0, 3 * norms[0]) and want[21] == want[20] and norms[20] > want[20]
    assert GradClipper("norm", 1.5).bound(7.0) == 1.5 and GradClipper("norm", 0.0).bound(7.0) is None
    with pytest.raises(ValueError, match="clip_mode"):
        GradClipper("ema")


@pytest.mark.slow
def test_training_with_the_recipe_resumes_its_clipping_bound(tmp_path):
    """A tiny run with adaptive clipping, caption dropout and OSP-Next sample settings, stopped after 2 steps and
    resumed: the logged bounds are OSP-Next's rule over the logged gradient norms across the restart (the EMA
    state came back from the checkpoint), and the sample video was written with the preset."""
    import sys

    import yaml

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_launch import metrics, run_world

    cfg = {
        "model": {"size": "tiny", "schedule": "dual_end", "num_full_blocks": 4},
        "data": {"kind": "synthetic", "synthetic_latent_shape": [16, 1, 4, 4], "text_len": 8, "micro_batch_size": 2,
                 "num_workers": 0, "caption_dropout": 0.5},
        "train": {"steps": 4, "lr": 1e-3, "log_interval": 1, "clip_mode": "adaptive", "clip_grad": 1.0,
                  "sample_interval": 4, "sample_preset": "osp-next", "sample_prompts": ["a red square"]},
        "encoders": {"vae": "tiny", "text_encoder": "tiny"},
        "tracking": {"backend": "none"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert run_world(1, str(path), [f"train.run_dir={run}", "train.exit_after_steps=2"], tmp_path / "l1") == [3]
    assert run_world(1, str(path), [f"train.run_dir={run}"], tmp_path / "l2") == [0]
    ms = metrics(run)
    assert [m["step"] for m in ms] == [1, 2, 3, 4]
    assert [m["grad_clip_bound"] for m in ms] == pytest.approx(_osp_next_adaptive([m["grad_norm"] for m in ms]),
                                                               rel=1e-9)
    assert len(list((run / "samples").glob("*.mp4"))) == 1
