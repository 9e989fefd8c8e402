"""Dense attention kernels as modules, chosen by spec (`kernel_spec(backend)`): torch SDPA, flash-attn,
TransformerEngine, math.

All take `q, k, v: [B, S, heads, d]` (the flash-attn layout; padding already compacted away by the
caller, see `osp_megatron.skiparse.grouped_attention`) and return `[B, S, heads, d]`. On GPU the bf16/fp16
SDPA path is restricted to the cuDNN and flash backends: if neither can run the call, it raises instead of
silently falling back to the masked "efficient"/"math" kernels. fp32 (debug and reference runs) has no
cuDNN/flash kernel and uses SDPA's own choice.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec


def _sdpa(q, k, v):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


def _sdpa_flash_only(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _math(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    p = s.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


def _flash_attn(q, k, v):
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:  # pragma: no cover - GPU only
        raise RuntimeError(
            "model.attention_backend=flash needs the flash-attn package (pip install 'osp-megatron[flash]'); "
            "use attention_backend=sdpa instead"
        ) from exc
    return flash_attn_func(q, k, v)


_FUNCTIONS: Dict[str, Callable] = {"sdpa": _sdpa, "math": _math, "flash": _flash_attn, "sdpa_flash": _sdpa_flash_only}
BACKENDS = (*_FUNCTIONS, "te")


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r}: use one of auto, {', '.join(BACKENDS)}")
    return name


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over full sequences. q/k/v [B, S, h, d] -> [B, S, h, d] (function backends)."""
    if backend not in _FUNCTIONS:
        raise ValueError(f"dense_attention: backend {backend!r} is not a function kernel; use one of "
                         f"{', '.join(_FUNCTIONS)} (TransformerEngine runs as the TEDotProductAttention module)")
    return _FUNCTIONS[backend](q, k, v)


class DenseAttention(torch.nn.Module):
    """A function kernel (sdpa | sdpa_flash | flash | math) as the core-attention submodule."""

    def __init__(self, config=None, num_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 backend: str = "sdpa"):
        super().__init__()
        if backend not in _FUNCTIONS:
            raise ValueError(f"DenseAttention: backend {backend!r}: use one of {', '.join(_FUNCTIONS)}")
        self.backend = backend
        self._fn = _FUNCTIONS[backend]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._fn(q, k, v)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


class TEDotProductAttention(torch.nn.Module):
    """TransformerEngine's DotProductAttention (bshd, no mask) for `num_heads` heads of `head_dim`, kept in the
    module tree."""

    def __init__(self, config=None, num_heads: int = 1, head_dim: int = 64):
        super().__init__()
        try:
            import transformer_engine.pytorch as te
        except Exception as exc:  # pragma: no cover - GPU only
            raise RuntimeError(
                f"model.attention_backend=te needs TransformerEngine (pip install 'osp-megatron[te]'): {exc}; "
                "use attention_backend=sdpa instead"
            ) from exc
        self.attention = te.DotProductAttention(num_heads, head_dim, qkv_format="bshd", attn_mask_type="no_mask")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - GPU
        return self.attention(q, k, v).view(q.shape)


def kernel_spec(backend: str) -> ModuleSpec:
    """The core-attention submodule spec for `model.attention_backend` (already resolved: no `auto`)."""
    if backend == "te":
        return ModuleSpec(module=TEDotProductAttention)
    return ModuleSpec(module=DenseAttention, params={"backend": resolve_backend(backend)})
