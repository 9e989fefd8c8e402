"""`osp-train` with HiF8 recipes: quantization is really active in training, and delayed scaling resumes exactly."""
from pathlib import Path

import pytest

from test_train_runs import _config
from train_launch import metrics, run_world


def _losses(run_dir):
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def test_hif8_current_scaling_trains_close_to_fp32_but_not_identical(tmp_path):
    runs = {}
    for recipe in ("none", "hif8_current"):
        run_dir = tmp_path / recipe
        cfg = _config(tmp_path, train={"run_dir": str(run_dir), "steps": 4}, tracking={"backend": "none"},
                      precision={"recipe": recipe, "quantize_attention": recipe != "none"})
        assert run_world(1, cfg, [], tmp_path / f"log_{recipe}") == [0]
        runs[recipe] = _losses(run_dir)
    ref, q = runs["none"], runs["hif8_current"]
    assert len(ref) == len(q) == 4
    assert q != ref  # the recipe reached the linears and attention
    for a, b in zip(ref, q):
        assert abs(a - b) / a < 0.05


def test_hif8_delayed_scaling_resume_is_exact(tmp_path):
    base = dict(precision={"recipe": "hif8_delayed", "amax_history_len": 4}, tracking={"backend": "none"})
    full = tmp_path / "full"
    cfg = _config(tmp_path, train={"run_dir": str(full), "steps": 6}, **base)
    assert run_world(1, cfg, [], tmp_path / "log_full") == [0]
    part = tmp_path / "part"
    cfg = _config(tmp_path, train={"run_dir": str(part), "steps": 6, "exit_after_steps": 3}, **base)
    assert run_world(1, cfg, [], tmp_path / "log_a") == [3]
    assert run_world(1, cfg, ["train.exit_after_steps=0"], tmp_path / "log_b") == [0]
    assert _losses(part) == _losses(full)
