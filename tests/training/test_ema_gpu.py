"""Host EMA twin of a GPU model (train.ema_device=cpu) against a synchronous reference, bit for bit."""
import pytest
import torch

from osp_megatron.training.ema import EMA

pytestmark = pytest.mark.gpu


def _blocks(device, dtype, layers=16, width=512):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_twin_equals_synchronous_reference(dtype):
    dev = torch.device("cuda")
    model = _blocks(dev, dtype)
    ema = EMA(lambda: _blocks("cpu", torch.float32), model, decay=0.9, interval=1)
    ref = {k: v.detach().float().cpu().clone() for k, v in model.named_parameters()}
    gen = torch.Generator(device=dev).manual_seed(1)
    for step in range(1, 5):
        ema.fence()  # as the trainer does before each optimizer step
        with torch.no_grad():
            for p in model.parameters():  # an "optimizer step" that rewrites every weight in place
                p.mul_(0.5).add_(torch.randn(p.shape, device=dev, generator=gen, dtype=dtype))
        torch.cuda.synchronize()
        weights = {k: v.detach().float().cpu() for k, v in model.named_parameters()}
        for k in ref:
            torch._foreach_lerp_([ref[k]], [weights[k]], 0.1)
        assert ema.update(model, step)
        # more GPU work queued right behind the update, as the next training step would
        big = torch.randn(4096, 4096, device=dev)
        for _ in range(3):
            big = big @ big / 64
    bad = [k for k, e in ema.module.named_parameters() if not torch.equal(e, ref[k])]
    assert len(ref) == 32 and not bad, f"{len(bad)} of {len(ref)} EMA tensors differ: {bad[:4]}"
    stats = ema.stats()
    assert stats["ema_copy_s"] > 0 and stats["ema_update_s"] > 0
