"""Wan2.1 self- and cross-attention on megatron-core tensor-parallel linears.

Self-attention: q/k/v/o with bias, RMSNorm on q and k across *all* heads (the sum of squares is
all-reduced over TP, so TP > 1 equals TP = 1), 3D RoPE from the layout's permuted tables, then the
sequence plan's attention (per class for sparse blocks, per sample for full blocks).
Cross-attention: queries from the local tokens, text K/V projected once per sample (never repeated
over the P^2 classes: the classes of a sample are merged into its query sequence).
Shapes: x [S, G*b, C] (SP: [S/TP, G*b, C]), text [L, b, C].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from osp_megatron.models.core_attention import dense_attention
from osp_megatron.models.fused import rms_scale, sum_of_squares
from osp_megatron.models.rope import apply_rope
from osp_megatron.parallel.collectives import all_reduce_sum


@dataclass
class AttentionSubmodules:
    linear_q: Union[ModuleSpec, type]
    linear_k: Union[ModuleSpec, type]
    linear_v: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]


class HeadsRMSNorm(torch.nn.Module):
    """RMSNorm over the full q (or k) projection [.., heads*d]; TP-sharded along heads."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, tp_group=None, dtype=torch.float32):
        super().__init__()
        self.full_dim, self.eps, self.tp_group = full_dim, eps, tp_group
        self.weight = torch.nn.Parameter(torch.ones(local_dim, dtype=dtype))
        tp = 1 if tp_group is None else tp_group.size()
        self.weight.tensor_model_parallel = tp > 1
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The weight is split over TP along heads, like the q/k projections it normalises."""
        from megatron.core import parallel_state as mps
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        metadata = metadata or {}
        dp_cp = metadata.get("dp_cp_group") or mps.get_data_parallel_group(with_context_parallel=True)
        tp_group = self.tp_group or mps.get_tensor_model_parallel_group()
        key = f"{prefix}weight"
        return {key: make_tp_sharded_tensor_for_checkpoint(
            self.weight, key, 0, prepend_offsets=sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ss = sum_of_squares(x)
        if self.tp_group is not None and self.tp_group.size() > 1:
            ss = all_reduce_sum(ss, self.tp_group)
        return rms_scale(x, ss, self.weight, self.full_dim, self.eps)


def _linear(spec, config, in_size, out_size, column: bool, tp_group):
    kwargs = dict(config=config, init_method=config.init_method, bias=True, tp_group=tp_group)
    if column:
        kwargs.update(gather_output=False)
    else:
        kwargs.update(input_is_parallel=True, skip_bias_add=False)
    return build_module(spec, in_size, out_size, **kwargs)


class _AttentionBase(MegatronModule):
    def __init__(self, config, submodules: AttentionSubmodules, tp_group=None):
        super().__init__(config)
        c = config.hidden_size
        tp = 1 if tp_group is None else tp_group.size()
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        local = self.heads * self.head_dim
        self.linear_q = _linear(submodules.linear_q, config, c, c, True, tp_group)
        self.linear_k = _linear(submodules.linear_k, config, c, c, True, tp_group)
        self.linear_v = _linear(submodules.linear_v, config, c, c, True, tp_group)
        self.linear_proj = _linear(submodules.linear_proj, config, c, c, False, tp_group)
        self.q_norm = HeadsRMSNorm(local, c, config.layernorm_epsilon, tp_group, config.params_dtype)
        self.k_norm = HeadsRMSNorm(local, c, config.layernorm_epsilon, tp_group, config.params_dtype)

    def _proj(self, linear, x):
        out, bias = linear(x)
        return out if bias is None else out + bias


class SelfAttention(_AttentionBase):
    layer_number = 0
    qkv_amax_group = None  # set by the model: TP x CP group when q/k/v are sharded

    def forward(self, x: torch.Tensor, plan, layout: str, kind: str) -> torch.Tensor:
        q = self.q_norm(self._proj(self.linear_q, x))
        k = self.k_norm(self._proj(self.linear_k, x))
        v = self._proj(self.linear_v, x)
        s, gb = q.shape[0], q.shape[1]
        g = plan.classes_per_rank(layout)
        shape5 = (s, g, gb // g, self.heads, self.head_dim)
        cos, sin = plan.rope(layout)
        q = apply_rope(q.view(shape5), cos, sin).view(s, gb, self.heads, self.head_dim)
        k = apply_rope(k.view(shape5), cos, sin).view(s, gb, self.heads, self.head_dim)
        v = v.view(s, gb, self.heads, self.head_dim)
        if self.config.quantize_attention:
            from osp_megatron.quant.modules import hif8_qkv

            # amax over the whole tensor: heads are split over TP, tokens over CP
            q, k, v = hif8_qkv(q, k, v, group=self.qkv_amax_group, key=f"attn{self.layer_number}")
        o = plan.attention(q, k, v, layout, kind)
        return self._proj(self.linear_proj, o.reshape(s, gb, self.heads * self.head_dim))


class CrossAttention(_AttentionBase):
    def __init__(self, config, submodules: AttentionSubmodules, tp_group=None):
        super().__init__(config, submodules, tp_group)
        # text is replicated over TP ranks, never sequence-parallel: no all-gather on its K/V projections
        for lin in (self.linear_k, self.linear_v):
            if hasattr(lin, "sequence_parallel"):
                lin.sequence_parallel = False

    def forward(self, x: torch.Tensor, text: torch.Tensor, classes: int) -> torch.Tensor:
        """x [S, G*b, C] (G = classes), text [L, b, C] -> [S, G*b, C]."""
        q = self.q_norm(self._proj(self.linear_q, x))
        s, gb = q.shape[0], q.shape[1]
        b = gb // classes
        h, d = self.heads, self.head_dim
        q = q.view(s, classes, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, classes * s, h, d)
        k = self.k_norm(self._proj(self.linear_k, text)).view(-1, b, h, d).transpose(0, 1)
        v = self._proj(self.linear_v, text).view(-1, b, h, d).transpose(0, 1)
        o = dense_attention(q, k.contiguous(), v.contiguous(), self.config.attention_backend)
        o = o.view(b, classes, s, h, d).permute(2, 1, 0, 3, 4).reshape(s, gb, h * d)
        return self._proj(self.linear_proj, o)
