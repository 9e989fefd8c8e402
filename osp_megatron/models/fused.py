"""Elementwise pieces of the block with hand-written backward passes, fused by torch.compile on CUDA.

Wan's block does its norms, modulation, residuals, RMSNorm and RoPE in fp32: ~50 memory passes per block
when run op by op, a third of a dense 14B block's time, and a large share of its saved activations.
Each piece here is an autograd Function whose forward and backward are pure tensor functions (compiled on
CUDA with `OSP_COMPILE` != 0, eager otherwise), saving only its bf16 inputs. Shapes: x [S, B, C];
modulation vectors broadcast as [1, B, C]; RMS statistics [S, B, 1]; RoPE tables broadcast to [..., 1, d/2].

Compiled pieces take their sequence and batch dims as dynamic sizes (only the channel dims are baked in), so
every grid, layout and batch of a model shares one graph per piece instead of one per shape.
With `selective_recompute` (models/recompute.py) active, the outputs of the cheap pieces (norms, modulation,
RMSNorm + RoPE, bias + GELU) are registered as recomputable: their consumers save a recipe instead of them.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from osp_megatron.models import recompute

_ENABLED = os.environ.get("OSP_COMPILE", "1") != "0"


def set_compile(enabled: bool) -> None:
    """Turn the torch.compile path on or off for later calls (benchmarks' ablation; default: OSP_COMPILE)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def compile_enabled() -> bool:
    return _ENABLED


def _dynamo():
    import torch._dynamo as dynamo

    return dynamo


def _maybe_compiled(static_tail: int = 1):
    """Compile fn on CUDA; the dims of tensor arguments before their last `static_tail` are marked dynamic."""

    def deco(fn):
        compiled = None

        @functools.wraps(fn)
        def wrapper(*args):
            nonlocal compiled
            if _ENABLED and args[0].is_cuda:
                if compiled is None:
                    cfg = _dynamo().config
                    for key, floor in (("recompile_limit", 64), ("cache_size_limit", 64),
                                       ("accumulated_recompile_limit", 1024)):
                        if hasattr(cfg, key):
                            setattr(cfg, key, max(getattr(cfg, key), floor))
                    compiled = torch.compile(fn, dynamic=None)
                for a in args:
                    if isinstance(a, torch.Tensor):
                        for d in range(a.dim() - static_tail):
                            if a.shape[d] > 1:
                                _dynamo().maybe_mark_dynamic(a, d)
                return compiled(*args)
            return fn(*args)

        return wrapper

    return deco


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for exact tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the dims that were broadcast to reach g's shape."""
    dims = [i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1]
    return g.sum(dims, keepdim=True) if dims else g


# ----------------------------------------------------------------------------- LN * (1 + scale) + shift
@_maybe_compiled()
def _modln_fwd(x, shift, scale, eps: float):
    return (F.layer_norm(_up(x), (x.shape[-1],), eps=eps) * (1 + scale) + shift).type_as(x)


@_maybe_compiled()
def _modln_bwd(gy, x, shift, scale, eps: float):
    xf = _up(x)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    g = _up(gy)
    g_shift = _reduce_to(g, shift.shape)
    g_scale = _reduce_to(g * xhat, scale.shape)
    gh = g * (1 + scale)
    gx = rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))
    return gx.type_as(x), g_shift, g_scale


class _ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps
        return _modln_fwd(x, shift, scale, eps)

    @staticmethod
    def backward(ctx, gy):
        x, shift, scale = ctx.saved_tensors
        gx, gs, gc = _modln_bwd(gy.contiguous(), x, shift, scale, ctx.eps)
        return gx, gs, gc, None


def modulated_layernorm(x, shift, scale, eps: float):
    """LN(x) * (1 + scale) + shift in fp32 (no affine), back in x's dtype. shift/scale fp32 [1, B, C]."""
    shift, scale = shift.contiguous(), scale.contiguous()
    return recompute.recomputable(_ModulatedLayerNorm.apply(x, shift, scale, eps), _modln_fwd, x, shift, scale, eps)


def affine_layernorm(x, weight, bias, eps: float):
    """LN(x) * weight + bias (fp32 math), back in x's dtype."""
    shift, scale = _up(bias).view(1, 1, -1), (_up(weight) - 1).view(1, 1, -1)
    return recompute.recomputable(_ModulatedLayerNorm.apply(x, shift, scale, eps), _modln_fwd, x, shift, scale, eps)


# ----------------------------------------------------------------------------- x + y * gate
@_maybe_compiled()
def _gres_fwd(x, y, gate):
    return (_up(x) + _up(y) * gate).type_as(x)


@_maybe_compiled()
def _gres_bwd(gz, y, gate):
    g = _up(gz)
    return gz, (g * gate).type_as(y), _reduce_to(g * _up(y), gate.shape)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return _gres_fwd(x, y, gate)

    @staticmethod
    def backward(ctx, gz):
        y, gate = ctx.saved_tensors
        return _gres_bwd(gz.contiguous(), y, gate)


def gated_residual(x, y, gate):
    """x + y * gate in fp32, back in x's dtype. gate fp32 [1, B, C]."""
    gate = gate.contiguous()
    return recompute.recomputable(_GatedResidual.apply(x, y, gate), _gres_fwd, x, y, gate)


# ----------------------------------------------------------------------------- RMSNorm across heads
def sum_of_squares(x):
    """[.., D] -> fp32 [.., 1] (autograd by torch; one reduction)."""
    return _up(x).pow(2).sum(-1, keepdim=True)


@_maybe_compiled()
def _rms_fwd(x, ss, weight, full_dim: int, eps: float):
    return (_up(x) * torch.rsqrt(ss / full_dim + eps) * _up(weight)).type_as(x)


@_maybe_compiled()
def _rms_bwd(gy, x, ss, weight, full_dim: int, eps: float):
    r = torch.rsqrt(ss / full_dim + eps)
    g = _up(gy)
    xf = _up(x)
    w = _up(weight)
    gx = g * r * w
    gss = (g * xf * w).sum(-1, keepdim=True) * (-0.5) * r.pow(3) / full_dim
    gw = (g * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return gx.type_as(x), gss, gw.to(weight.dtype)


class _RMSScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ss, weight, full_dim, eps):
        ctx.save_for_backward(x, ss, weight)
        ctx.full_dim, ctx.eps = full_dim, eps
        return _rms_fwd(x, ss, weight, full_dim, eps)

    @staticmethod
    def backward(ctx, gy):
        x, ss, weight = ctx.saved_tensors
        gx, gss, gw = _rms_bwd(gy.contiguous(), x, ss, weight, ctx.full_dim, ctx.eps)
        return gx, gss, gw, None, None


def rms_scale(x, ss, weight, full_dim: int, eps: float):
    """x * rsqrt(ss / full_dim + eps) * weight (ss = sum of squares over all heads, possibly TP-reduced)."""
    return recompute.recomputable(_RMSScale.apply(x, ss, weight, full_dim, eps), _rms_fwd, x, ss, weight, full_dim, eps)


@_maybe_compiled()
def _rmsn_fwd(x, weight, eps: float):
    xf = _up(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _up(weight)).type_as(x)


@_maybe_compiled()
def _rmsn_bwd(gy, x, weight, eps: float):
    xf = _up(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    gw_in = _up(gy) * _up(weight)
    gx = r * gw_in - xf * r.pow(3) * (gw_in * xf).mean(-1, keepdim=True)
    gw = (_up(gy) * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return gx.type_as(x), gw.to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rmsn_fwd(x, weight, eps)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx, gw = _rmsn_bwd(gy.contiguous(), x, weight, ctx.eps)
        return gx, gw, None


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim in fp32, back in x's dtype (one fused pass; the
    single-shard case of `sum_of_squares` + `rms_scale`)."""
    return recompute.recomputable(_RMSNorm.apply(x, weight, eps), _rmsn_fwd, x, weight, eps)


# ----------------------------------------------------------------------------- GELU(tanh)(h + bias)
@_maybe_compiled()
def _bias_gelu_fwd(h, bias):
    return F.gelu(_up(h) + _up(bias), approximate="tanh").type_as(h)


@_maybe_compiled()
def _bias_gelu_bwd(gy, h, bias):
    a = _up(h) + _up(bias)
    k = 0.7978845608028654  # sqrt(2 / pi)
    inner = k * (a + 0.044715 * a * a * a)
    t = torch.tanh(inner)
    da = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * 0.044715 * a * a)
    gh = _up(gy) * da
    return gh.type_as(h), gh.reshape(-1, h.shape[-1]).sum(0).to(bias.dtype)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return _bias_gelu_fwd(h, bias)

    @staticmethod
    def backward(ctx, gy):
        h, bias = ctx.saved_tensors
        return _bias_gelu_bwd(gy.contiguous(), h, bias)


def bias_gelu(h, bias):
    """GELU(tanh)(h + bias) [.., F] with bias [F] (None: no bias); on CPU exactly `F.gelu(h + bias)`."""
    if bias is None:
        bias = h.new_zeros(h.shape[-1])
    if not (_ENABLED and h.is_cuda):
        out = F.gelu(h + bias, approximate="tanh")
        return recompute.recomputable(out, _plain_bias_gelu, h, bias) if out.is_contiguous() else out
    return recompute.recomputable(_BiasGelu.apply(h, bias), _bias_gelu_fwd, h, bias)


def _plain_bias_gelu(h, bias):
    return F.gelu(h + bias, approximate="tanh")


# ----------------------------------------------------------------------------- RoPE (interleaved pairs)
@_maybe_compiled(static_tail=2)
def _rotate(x, cos, sin):
    x1, x2 = _up(x).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved_tensors
        return _rotate(gy.contiguous(), cos, -sin), None, None


def rotate_pairs(x, cos, sin):
    """Interleaved-pair rotation: x [..., h, d], cos/sin fp32 broadcastable to [..., 1, d/2] (no grad)."""
    cos, sin = _up(cos), _up(sin)
    return recompute.recomputable(_Rotate.apply(x, cos, sin), _rotate, x, cos, sin)
