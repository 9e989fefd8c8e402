"""The hand-written backward passes of the fused elementwise pieces equal plain autograd (fp64)."""
import torch
import torch.nn.functional as F

from osp_megatron.models import fused


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def _check(fast, ref, *inputs):
    o1, g1 = _grads(fast, *inputs)
    o2, g2 = _grads(ref, *inputs)
    assert torch.allclose(o1, o2, rtol=1e-10, atol=1e-10)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_modulated_and_affine_layernorm():
    x = torch.randn(7, 3, 16, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)
    _check(lambda a, b, c: fused.modulated_layernorm(a, b, c, 1e-6),
           lambda a, b, c: F.layer_norm(a, (16,), eps=1e-6) * (1 + c) + b, x, shift, scale)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    _check(lambda a, b, c: fused.affine_layernorm(a, b, c, 1e-6),
           lambda a, b, c: F.layer_norm(a, (16,), b, c, 1e-6), x, w, bias)


def test_gated_residual_rms_and_rope():
    x = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(1, 2, 12, dtype=torch.float64, requires_grad=True)
    _check(fused.gated_residual, lambda a, b, c: a + b * c, x, y, gate)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    _check(lambda a, b: fused.rms_scale(a, fused.sum_of_squares(a), b, 24, 1e-6),
           lambda a, b: a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) / 24 + 1e-6) * b, x, w)
    q = torch.randn(5, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(5, 2, 1, 4, dtype=torch.float64)

    def ref(t):
        x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1).flatten(-2)

    _check(lambda t: fused.rotate_pairs(t, ang.cos(), ang.sin()).double(), ref, q)


def test_fused_rms_norm_and_bias_gelu():
    x = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    _check(lambda a, b: fused.rms_norm(a, b, 1e-6),
           lambda a, b: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * b, x, w)
    h = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    _check(fused.bias_gelu, lambda a, b: F.gelu(a + b, approximate="tanh"), h, bias)
    # the hand-written backward of the compiled path (eager here) against autograd
    g = torch.randn(5, 2, 12, dtype=torch.float64)
    gh, gb = fused._bias_gelu_bwd(g, h.detach(), bias.detach())
    ref_h, ref_b = torch.autograd.grad(F.gelu(h + bias, approximate="tanh"), (h, bias), g)
    assert torch.allclose(gh, ref_h, rtol=1e-10, atol=1e-12) and torch.allclose(gb, ref_b, rtol=1e-10, atol=1e-12)
    out = fused._BiasGelu.apply(h, bias)
    assert torch.allclose(out, F.gelu(h + bias, approximate="tanh"), rtol=1e-12)
