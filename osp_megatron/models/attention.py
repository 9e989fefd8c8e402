"""Wan2.1 self- and cross-attention on megatron-core tensor-parallel linears.

Self-attention: q/k/v/o with bias, RMSNorm on q and k across *all* heads (the sum of squares is
all-reduced over TP, so TP > 1 equals TP = 1), 3D RoPE from the layout's permuted tables, then the Skiparse
attention of the block's layout:

    q, k, v = placement.seq_to_heads(.)          Ulysses all-to-all (parallel/)
    q, k, v = qkv_quantizer(q, k, v)             the kernel's inputs (identity unless the spec puts HiF8 there)
    o = grouped_attention(q, k, v, problems, core_attention)   per class (sparse) / per sample (full), padding-free
    o = placement.heads_to_seq(o)

Cross-attention: queries from the local tokens, text K/V projected once per sample (never repeated
over the P^2 classes: the classes of a sample are merged into its query sequence), the same Q/K/V quantizer
on the kernel's inputs.
Shapes: x [S, G*b, C] (SP: [S/TP, G*b, C]), text [L, b, C]. Submodules (linears, core attention kernel,
Q/K/V quantizer) come from the spec (`models/specs.py`); process groups from the injected `ParallelState`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from osp_megatron.models.core_attention import DenseAttention
from osp_megatron.models.fused import rms_norm, rms_scale, sum_of_squares
from osp_megatron.models.rope import apply_rope, rope_tables
from osp_megatron.parallel import ParallelState, TokenPlacement
from osp_megatron.parallel.collectives import all_reduce_sum
from osp_megatron.skiparse import AttentionProblems, grouped_attention


class SequenceContext:
    """One latent grid on one device: the token placement (parallel/) and what the model gathers with its
    positions: RoPE tables per layout, attention problems per (layout, kind)."""

    def __init__(self, placement: TokenPlacement, head_dim: int, rope_theta: float):
        self.placement = placement
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self._rope: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._problems: Dict[Tuple[str, str], AttentionProblems] = {}

    def rope(self, layout: str, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this rank's slots of `layout`: [S_loc, G, 1, 1, d/2] (broadcast over b and heads)."""
        if layout not in self._rope:
            p = self.placement
            cos, sin = rope_tables(p.grid, self.head_dim, self.rope_theta, p.positions(layout))
            self._rope[layout] = (cos[:, :, None, None, :], sin[:, :, None, None, :])
        cos, sin = self._rope[layout]
        return cos.to(dtype), sin.to(dtype)

    def problems(self, layout: str, kind: str) -> AttentionProblems:
        """The attention problems of the sequence `placement.seq_to_heads` gives the kernel (kind full | sparse)."""
        if (layout, kind) not in self._problems:
            if self.placement.packed and kind == "sparse":  # each class's rows (contiguous runs on one rank)
                problems = self.placement.packed_problems(layout)
            else:
                pos = self.placement.attention_positions(layout, kind)
                problems = AttentionProblems.from_positions(pos, kind, self.placement.device)
            self._problems[(layout, kind)] = problems
        return self._problems[(layout, kind)]


class QKVIdentity(torch.nn.Module):
    """The default Q/K/V quantizer: none."""

    def __init__(self, key=None, group=None):
        super().__init__()

    def forward(self, q, k, v):
        return q, k, v


@dataclass
class AttentionSubmodules:
    linear_q: Union[ModuleSpec, type]
    linear_k: Union[ModuleSpec, type]
    linear_v: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]
    core_attention: Union[ModuleSpec, type] = DenseAttention  # dense kernel [B, S, h, d] -> [B, S, h, d]
    qkv_quantizer: Union[ModuleSpec, type] = QKVIdentity  # (q, k, v) -> (q, k, v), e.g. quant.modules.HiF8QKV


@dataclass
class SelfAttentionSubmodules(AttentionSubmodules):
    pass


class HeadsRMSNorm(torch.nn.Module):
    """RMSNorm over the full q (or k) projection [.., heads*d]; TP-sharded along heads."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, tp_group, dp_cp_group, dtype=torch.float32):
        super().__init__()
        self.full_dim, self.eps, self.tp_group, self.dp_cp_group = full_dim, eps, tp_group, dp_cp_group
        self.weight = torch.nn.Parameter(torch.ones(local_dim, dtype=dtype))
        tp = 1 if tp_group is None else tp_group.size()
        self.weight.tensor_model_parallel = tp > 1
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The weight is split over TP along heads, like the q/k projections it normalises."""
        dp_cp = (metadata or {}).get("dp_cp_group") or self.dp_cp_group
        key = f"{prefix}weight"
        return {key: make_tp_sharded_tensor_for_checkpoint(
            self.weight, key, 0, prepend_offsets=sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None or self.tp_group.size() == 1:
            return rms_norm(x, self.weight, self.eps)  # one fused pass
        ss = sum_of_squares(x)
        if self.tp_group is not None and self.tp_group.size() > 1:
            ss = all_reduce_sum(ss, self.tp_group)
        return rms_scale(x, ss, self.weight, self.full_dim, self.eps)


def _linear(spec, config, in_size, out_size, column: bool, tp_group):
    # skip_bias_add / is_expert are keyword-only without defaults in megatron's TE linears (model.spec=te)
    kwargs = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=False, is_expert=False,
                  tp_group=tp_group)
    if column:
        kwargs.update(gather_output=False)
    else:
        kwargs.update(input_is_parallel=True)
    return build_module(spec, in_size, out_size, **kwargs)


class _AttentionBase(MegatronModule):
    def __init__(self, config, submodules: AttentionSubmodules, parallel: ParallelState, kernel_heads_split: int = 1,
                 quantizer_key: str = "attn"):
        super().__init__(config)
        c = config.hidden_size
        tp_group = parallel.tp_group
        tp = 1 if tp_group is None else tp_group.size()
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        local = self.heads * self.head_dim
        self.linear_q = _linear(submodules.linear_q, config, c, c, True, tp_group)
        self.linear_k = _linear(submodules.linear_k, config, c, c, True, tp_group)
        self.linear_v = _linear(submodules.linear_v, config, c, c, True, tp_group)
        self.linear_proj = _linear(submodules.linear_proj, config, c, c, False, tp_group)
        dtype = config.params_dtype
        self.q_norm = HeadsRMSNorm(local, c, config.layernorm_epsilon, tp_group, parallel.dp_cp_group, dtype)
        self.k_norm = HeadsRMSNorm(local, c, config.layernorm_epsilon, tp_group, parallel.dp_cp_group, dtype)
        # the kernel sees this rank's heads split once more by the Ulysses all-to-all
        self.core_attention = build_module(submodules.core_attention, config=config,
                                           num_heads=self.heads // kernel_heads_split, head_dim=self.head_dim)
        # amax group: set on the built model by quant.modules.set_amax_scope
        self.qkv_quantizer = build_module(submodules.qkv_quantizer, key=quantizer_key)

    def _proj(self, linear, x):
        out, bias = linear(x)
        return out if bias is None else out + bias


class SelfAttention(_AttentionBase):
    """Self-attention of one block in `layout`: kind `full` (all tokens of a sample) or `sparse` (per class)."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int, parallel: ParallelState,
                 layout: str, kind: str):
        if kind not in ("full", "sparse"):
            raise ValueError(f"SelfAttention: kind {kind!r}: use full or sparse")
        split = parallel.cp.ulysses if kind == "sparse" else parallel.full_ulysses(config.num_attention_heads)
        super().__init__(config, submodules, parallel, split, quantizer_key=f"attn{layer_number}")
        self.layer_number, self.layout, self.kind = layer_number, layout, kind

    def forward(self, x: torch.Tensor, seq: SequenceContext) -> torch.Tensor:
        """x [S, G*b, C] in `self.layout` -> [S, G*b, C]."""
        placement = seq.placement
        q = self.q_norm(self._proj(self.linear_q, x))
        k = self.k_norm(self._proj(self.linear_k, x))
        v = self._proj(self.linear_v, x)
        s, gb = q.shape[0], q.shape[1]
        g = placement.classes_per_rank(self.layout)
        shape5 = (s, g, gb // g, self.heads, self.head_dim)
        cos, sin = seq.rope(self.layout)
        q = apply_rope(q.view(shape5), cos, sin).view(s, gb, self.heads, self.head_dim)
        k = apply_rope(k.view(shape5), cos, sin).view(s, gb, self.heads, self.head_dim)
        v = v.view(s, gb, self.heads, self.head_dim)
        q = placement.seq_to_heads(q, self.layout, self.kind)
        k, v = (placement.seq_to_heads(t, self.layout, self.kind, keys=True) for t in (k, v))
        q, k, v = self.qkv_quantizer(q, k, v)
        o = grouped_attention(q, k, v, seq.problems(self.layout, self.kind), self.core_attention)
        o = placement.heads_to_seq(o, self.layout, self.kind)
        return self._proj(self.linear_proj, o.reshape(s, gb, self.heads * self.head_dim))


class CrossAttention(_AttentionBase):
    def __init__(self, config, submodules: AttentionSubmodules, parallel: ParallelState, layer_number: int = 0):
        super().__init__(config, submodules, parallel, quantizer_key=f"xattn{layer_number}")
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
        # queries attend independently, so their order is free: (token, class) keeps this a view when b == 1
        q = q.view(s, classes, b, h, d).permute(2, 0, 1, 3, 4).reshape(b, s * classes, h, d)
        k = self.k_norm(self._proj(self.linear_k, text)).view(-1, b, h, d).transpose(0, 1)
        v = self._proj(self.linear_v, text).view(-1, b, h, d).transpose(0, 1)
        q, k, v = self.qkv_quantizer(q, k.contiguous(), v.contiguous())
        o = self.core_attention(q, k, v)
        o = o.view(b, s, classes, h, d).permute(1, 2, 0, 3, 4).reshape(s, gb, h * d)
        return self._proj(self.linear_proj, o)
