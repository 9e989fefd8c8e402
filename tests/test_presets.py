"""Every shipped preset passes its entry point's `--dry-run --world-size N` (N = one model replica), with the
placeholder input paths pointed at existing folders; the OSP-Next presets resolve OSP-Next's training shift."""
from __future__ import annotations

from pathlib import Path

import pytest

from osp_megatron.config import PRESETS_DIR, load_config, presets

PATH_KEYS = ("data.shards", "train.init_from", "encoders.vae", "encoders.text_encoder", "encoders.tokenizer")


def _overrides(name: str, tmp_path: Path):
    cfg = load_config(name)
    out = []
    for key in PATH_KEYS:
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value and value != "tiny" and not Path(value).exists():
            target = tmp_path / key
            target.mkdir()
            out.append(f"{key}={target}")
    if cfg.grpo.prompts_file and not Path(cfg.grpo.prompts_file).exists():
        (tmp_path / "prompts.txt").write_text("a prompt\n")
        out.append(f"grpo.prompts_file={tmp_path / 'prompts.txt'}")
    p = cfg.parallel
    return cfg, out, p.tensor_parallel * p.pipeline_parallel * p.ssp * p.ulysses


@pytest.mark.parametrize("name", presets())
def test_preset_dry_run(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg, overrides, world = _overrides(name, tmp_path)
    is_grpo = "grpo:" in (PRESETS_DIR / f"{name}.yaml").read_text()
    if is_grpo:
        from osp_megatron.cli.grpo import main
    else:
        from osp_megatron.cli.train import main
    code = main([name, *overrides, "--dry-run", "--world-size", str(world)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if not is_grpo:
        assert "timestep shift" in captured.out


@pytest.mark.parametrize("name,bucket,shift", [("osp_1_3b_720p", "81x720x1280", "2.9039"),
                                               ("osp_14b_720p", "81x720x1280", "2.9039"),
                                               ("osp_14b_768p", "81x768x1280", "3.0243"),
                                               ("osp_14b_480p", "81x480x832", "2.0559")])
def test_osp_next_presets_train_with_osp_next_recipe(name, bucket, shift, tmp_path, capsys, monkeypatch):
    from osp_megatron.cli.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, overrides, world = _overrides(name, tmp_path)
    assert main([name, *overrides, "--dry-run", "--world-size", str(world)]) == 0
    assert f"{bucket} (latents" in capsys.readouterr().out.split("timestep shift")[1]
    t = cfg.train
    assert (t.warmup_steps, t.adam_eps, t.weight_decay, t.ema_decay, t.clip_mode, t.lr) == (
        0, 1e-15, 0.0, 0.9999, "adaptive", 2e-5)
    assert (t.shift_rule, t.sample_preset, cfg.data.caption_dropout) == ("per_frame", "osp-next", 0.1)
    from osp_megatron.cli.train import shift_plan

    assert f"shift {shift}" in shift_plan(cfg)
