"""Small pure pieces of the trainer: EMA math, init_from format detection."""
import json

import pytest
import torch

from osp_megatron.training.ema import EMA
from osp_megatron.weights import detect_format


def test_ema_update_interval_and_copy():
    torch.manual_seed(0)
    src = torch.nn.Linear(3, 2)
    ema = EMA(lambda: torch.nn.Linear(3, 2), src, decay=0.9, interval=2)
    w0 = src.weight.detach().clone()
    assert torch.equal(ema.module.weight, w0) and not ema.module.weight.requires_grad
    with torch.no_grad():
        src.weight.add_(1.0)
    assert ema.update(src, step=1) is False and torch.equal(ema.module.weight, w0)  # off-interval
    assert ema.update(src, step=2) is True
    torch.testing.assert_close(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    with pytest.raises(ValueError, match="train.ema_decay"):
        EMA(lambda: torch.nn.Linear(3, 2), src, decay=1.0)
    with pytest.raises(RuntimeError, match="EMA twin does not match"):
        EMA(lambda: torch.nn.Linear(3, 4, bias=False), src, decay=0.5)


def test_init_format_detection(tmp_path):
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "config.json").write_text(json.dumps({"dim": 1536}))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000001\n")
    assert detect_format(tmp_path / "diffusers", "auto") == "diffusers"
    assert detect_format(tmp_path / "wan", "auto") == "wan"
    assert detect_format(tmp_path / "run", "auto") == "megatron"
    assert detect_format(tmp_path / "wan", "diffusers") == "diffusers"  # explicit wins
