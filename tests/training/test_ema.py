"""EMA arithmetic on the CPU against a plain per-tensor reference (decay * ema + (1 - decay) * w)."""
import pytest
import torch

from osp_megatron.training import ema as ema_mod
from osp_megatron.training.ema import EMA, lerp_into


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_matches_plain_reference_over_updates(dtype, monkeypatch):
    monkeypatch.setattr(ema_mod, "CHUNK_NUMEL", 100)  # several cast chunks for the bf16 model
    src = _net(dtype)
    ema = EMA(lambda: _net(), src, decay=0.9, interval=1)
    ref = {k: v.detach().float().clone() for k, v in src.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(dtype))
        assert ema.update(src, step)
        for k, p in src.named_parameters():
            ref[k] = 0.9 * ref[k] + 0.1 * p.detach().float()
    for k, e in ema.module.named_parameters():
        assert e.dtype == torch.float32
        torch.testing.assert_close(e, ref[k], rtol=1e-6, atol=1e-6)
    stats = ema.stats()
    assert stats["ema_interval"] == 1.0 and stats["ema_update_s"] >= 0.0


def test_lerp_into_is_foreach_lerp():
    a = [torch.randn(5), torch.randn(3, 2)]
    b = [torch.randn(5), torch.randn(3, 2)]
    want = [x + 0.25 * (y - x) for x, y in zip(a, b)]
    lerp_into(a, b, 0.25)
    for x, y in zip(a, want):
        torch.testing.assert_close(x, y)
