"""model.recompute=selective: the same loss and gradients as no recompute, with the cheap elementwise outputs of
every block (norms, modulation, RMSNorm + RoPE, GELU) saved for backward as recipes instead of tensors."""
import pytest
import torch

from osp_megatron.config import ModelConfig
from osp_megatron.models import build_model, recompute
from osp_megatron.parallel import ParallelState


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 18, 16, generator=g)  # grid 3 x 9 x 8: H padded for the P=2 layouts
    return x, torch.tensor([100.0, 700.0]), torch.randn(2, 8, 32, generator=g), torch.randn(x.shape, generator=g)


def _loss_and_grads(mode, schedule, inputs, device="cpu"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", schedule=schedule, recompute=mode), ParallelState.single(),
                        device="cpu").float().train().to(device)
    loss = model(*(t.to(device) for t in inputs[:3]), target=inputs[3].to(device))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["full", "dual_end"])
def test_selective_recompute_equals_no_recompute(schedule, monkeypatch):
    inputs = _inputs()
    loss0, g0 = _loss_and_grads("none", schedule, inputs)
    packed = {"recipe": 0, "tensor": 0}
    pack = recompute._Registry.pack

    def counting_pack(self, t):
        out = pack(self, t)
        packed["recipe" if isinstance(out, recompute._View) else "tensor"] += t.numel() * t.element_size()
        return out

    monkeypatch.setattr(recompute._Registry, "pack", counting_pack)
    loss1, g1 = _loss_and_grads("selective", schedule, inputs)
    assert torch.equal(loss1, loss0)
    assert g1.keys() == g0.keys()
    for name in g0:
        assert g0[name] is not None and torch.allclose(g1[name], g0[name], rtol=1e-6, atol=1e-7), name
    # norms, modulation, rope and GELU outputs are a large share of what a block saves
    assert packed["recipe"] > 0.3 * (packed["recipe"] + packed["tensor"]), packed


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["full", "dual_end"])
def test_selective_recompute_equals_no_recompute_cuda_compiled(schedule):
    """On CUDA the recipes are the compiled forward pieces: gradients still equal those without recompute."""
    inputs = _inputs()
    loss0, g0 = _loss_and_grads("none", schedule, inputs, "cuda")
    loss1, g1 = _loss_and_grads("selective", schedule, inputs, "cuda")
    assert torch.allclose(loss1, loss0, rtol=1e-6)
    for name in g0:
        rel = ((g1[name] - g0[name]).norm() / g0[name].norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, (name, rel)


def test_recipe_chain_and_views():
    """An output computed from another registered output stores that one as a recipe too; views are rebuilt."""
    x = torch.randn(4, 6, requires_grad=True)
    with recompute.selective_recompute():
        a = recompute.recomputable(x.detach() * 2, lambda t: t * 2, x.detach())
        b = recompute.recomputable(a + 1, lambda t: t + 1, a)
        y = (b.t() * x.t()).sum()  # saves a transposed view of b
    (gx,) = torch.autograd.grad(y, x)
    assert torch.equal(gx, x.detach() * 2 + 1)


def test_mode_is_checked():
    with pytest.raises(ValueError, match="model.recompute='sometimes'"):
        recompute.check_mode("sometimes")
