"""On CUDA the block's elementwise math runs through torch.compile (models/fused.py) and SDPA picks GPU kernels;
the CPU runs it eagerly. Same weights and inputs in fp32: outputs and every gradient must agree (sparse blocks
packed, `model.padding_free` default, and padded)."""
import pytest
import torch

from osp_megatron.config import ModelConfig
from osp_megatron.models import build_model
from osp_megatron.parallel import ParallelState


def _run(model, device, inputs):
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    x, t, txt, target = (v.to(device) for v in inputs)
    loss = model(x, t, txt, target=target)
    loss.backward()
    out = model(x, t, txt).detach().cpu()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), out, grads


@pytest.mark.gpu
@pytest.mark.parametrize("schedule,padding_free", [("full", None), ("dual_end", None), ("dual_end", False)])
def test_cuda_compiled_block_equals_cpu_eager(schedule, padding_free):
    mc = ModelConfig(size="tiny", schedule=schedule, padding_free=padding_free)
    torch.manual_seed(0)
    model = build_model(mc, ParallelState.single(), device="cpu").float().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 18, 16, generator=g)  # grid 3 x 9 x 8: H padded for the P=2 layouts
    inputs = (x, torch.tensor([100.0, 700.0]), torch.randn(2, 8, 32, generator=g), torch.randn(x.shape, generator=g))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loss_c, out_c, g_c = _run(model, "cpu", inputs)
    loss_g, out_g, g_g = _run(model, "cuda", inputs)
    assert torch.allclose(loss_g, loss_c, rtol=1e-4), (loss_g, loss_c)
    assert ((out_g - out_c).norm() / out_c.norm()).item() < 1e-4
    assert g_g.keys() == g_c.keys() and len(g_c) > 0
    for name in g_c:
        rel = ((g_g[name] - g_c[name]).norm() / g_c[name].norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, (name, rel)
