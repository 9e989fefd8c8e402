"""HiF8 linear / Q-K-V autograd functions vs a hand-written quantize-dequantize reference (single process)."""
import pytest
import torch

from osp_megatron.quant.hif8 import hif8_qdq_reference as qdq
from osp_megatron.quant.modules import hif8_linear, hif8_qkv
from osp_megatron.quant.recipes import HiF8CurrentScaling, HiF8DelayedScaling, active_recipe, autocast


def _data(seed=0, s=6, b=2, k=32, n=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, k, generator=g) * 3.0
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    dy = torch.randn(s, b, n, generator=g) * 1e-3
    return x, w, bias, dy


def test_hif8_linear_forward_backward_equal_the_qdq_reference():
    x, w, bias, dy = _data()
    x.requires_grad_(True)
    w.requires_grad_(True)
    bias.requires_grad_(True)
    with autocast(recipe=HiF8CurrentScaling(scale_max_fwd=15, scale_max_bwd=224)):
        y = hif8_linear(x, w, bias)
    y.backward(dy)
    xq, wq, gq = qdq(x.detach(), 15.0), qdq(w.detach(), 15.0), qdq(dy, 224.0)
    y_ref = torch.matmul(xq, wq.t()) + bias.detach()
    assert torch.equal(y.detach(), y_ref)
    assert torch.equal(x.grad, gq.matmul(wq))
    assert torch.equal(w.grad, gq.reshape(-1, 24).t().matmul(xq.reshape(-1, 32)))
    assert torch.equal(bias.grad, gq.reshape(-1, 24).sum(0))
    # and the quantization is real: HiF8 differs from the plain linear by ~ the HiF8 step (2^-4 relative)
    y_plain = torch.nn.functional.linear(x.detach(), w.detach(), bias.detach())
    rel = ((y.detach() - y_plain).norm() / y_plain.norm()).item()
    assert 1e-3 < rel < 0.1


def test_bf16_operands_keep_bf16():
    x, w, bias, dy = _data(1)
    x, w = x.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    with autocast():
        y = hif8_linear(x, w)
    y.backward(dy.bfloat16())
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert torch.equal(y.detach(), torch.matmul(qdq(x.detach(), 15.0), qdq(w.detach(), 15.0).t()))


def test_no_recipe_means_plain_linear():
    x, w, bias, _ = _data(2)
    assert active_recipe() is None
    assert torch.equal(hif8_linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    with autocast(enabled=False):
        assert active_recipe() is None
        assert torch.equal(hif8_linear(x, w, bias), torch.nn.functional.linear(x, w, bias))


def test_autocast_nesting_and_bad_recipe():
    r1, r2 = HiF8CurrentScaling(), HiF8CurrentScaling(scale_max_fwd=7)
    with autocast(recipe=r1) as got:
        assert got is r1 and active_recipe() is r1
        with autocast(recipe=r2):
            assert active_recipe() is r2
            with autocast(enabled=False):
                assert active_recipe() is None
            assert active_recipe() is r2
        assert active_recipe() is r1
    assert active_recipe() is None
    with pytest.raises(TypeError, match="HiF8CurrentScaling or"):
        with autocast(recipe="hybrid"):
            pass


def test_hif8_qkv_forward_backward():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).requires_grad_(True) for _ in range(3))
    dq, dk, dv = (torch.randn(2, 4, 16, 8, generator=g) * 1e-4 for _ in range(3))
    with autocast():
        qq, kq, vq = hif8_qkv(q, k, v)
    for t_q, t in zip((qq, kq, vq), (q, k, v)):
        assert torch.equal(t_q.detach(), qdq(t.detach(), 15.0))
    torch.autograd.backward([qq, kq, vq], [dq, dk, dv])
    for t, d in zip((q, k, v), (dq, dk, dv)):
        assert torch.equal(t.grad, qdq(d, 224.0))
    # identity without a recipe
    assert hif8_qkv(q, k, v)[0] is q


def test_hif8_qkv_with_delayed_scaling_needs_a_key():
    x = torch.randn(2, 3, 4, 5)
    with autocast(recipe=HiF8DelayedScaling()):
        with pytest.raises(ValueError, match="key="):
            hif8_qkv(x, x, x)
        out = hif8_qkv(x, x, x, key="attn0")
    assert out[0].shape == x.shape
