"""Elementwise pieces of the block with hand-written backward passes, fused by torch.compile on CUDA.

Wan's block does its norms, modulation, residuals, RMSNorm and RoPE in fp32: ~50 memory passes per block
when run op by op, a third of a dense 14B block's time, and a large share of its saved activations.
Each piece here is an autograd Function whose forward and backward are pure tensor functions (compiled on
CUDA with `OSP_COMPILE` != 0, eager otherwise), saving only its bf16 inputs. Shapes: x [S, B, C];
modulation vectors broadcast as [1, B, C]; RMS statistics [S, B, 1]; RoPE tables broadcast to [..., 1, d/2].
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_ENABLED = os.environ.get("OSP_COMPILE", "1") != "0"


def _maybe_compiled(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if _ENABLED and args[0].is_cuda:
            if compiled is None:
                import torch._dynamo

                # one static graph per (layout, width) shape: a model sees a handful; keep them all compiled
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                compiled = torch.compile(fn, dynamic=False)
            return compiled(*args)
        return fn(*args)

    return wrapper


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, for exact tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the dims that were broadcast to reach g's shape."""
    dims = [i for i, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1]
    return g.sum(dims, keepdim=True) if dims else g


# ----------------------------------------------------------------------------- LN * (1 + scale) + shift
@_maybe_compiled
def _modln_fwd(x, shift, scale, eps: float):
    return (F.layer_norm(_up(x), (x.shape[-1],), eps=eps) * (1 + scale) + shift).type_as(x)


@_maybe_compiled
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
    return _ModulatedLayerNorm.apply(x, shift.contiguous(), scale.contiguous(), eps)


def affine_layernorm(x, weight, bias, eps: float):
    """LN(x) * weight + bias (fp32 math), back in x's dtype."""
    return _ModulatedLayerNorm.apply(x, _up(bias).view(1, 1, -1), (_up(weight) - 1).view(1, 1, -1), eps)


# ----------------------------------------------------------------------------- x + y * gate
@_maybe_compiled
def _gres_fwd(x, y, gate):
    return (_up(x) + _up(y) * gate).type_as(x)


@_maybe_compiled
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
    return _GatedResidual.apply(x, y, gate.contiguous())


# ----------------------------------------------------------------------------- RMSNorm across heads
def sum_of_squares(x):
    """[.., D] -> fp32 [.., 1] (autograd by torch; one reduction)."""
    return _up(x).pow(2).sum(-1, keepdim=True)


@_maybe_compiled
def _rms_fwd(x, ss, weight, full_dim: int, eps: float):
    return (_up(x) * torch.rsqrt(ss / full_dim + eps) * _up(weight)).type_as(x)


@_maybe_compiled
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
    return _RMSScale.apply(x, ss, weight, full_dim, eps)


# ----------------------------------------------------------------------------- RoPE (interleaved pairs)
@_maybe_compiled
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
    return _Rotate.apply(x, _up(cos), _up(sin))
