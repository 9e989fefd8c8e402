"""One Wan2.1 / OSP-Next DiT block (6-way AdaLN modulation, self-attn, text cross-attn, GELU-tanh FFN).

    e = modulation + time_emb          -> shift, scale, gate, c_shift, c_scale, c_gate
    x = x + gate   * SelfAttn(LN(x) * (1 + scale) + shift)
    x = x +          CrossAttn(LN_affine(x), text)
    x = x + c_gate * FFN(LN(x) * (1 + c_scale) + c_shift)

The block works on the layout its input is in (`[S, G*b, C]`, class-major batch): every op but
self-attention is per token, so the Skiparse permutation is invisible to them; the per-sample
modulation is repeated over the G classes held here. Padding-free placements hold the sparse layouts packed
(`[N, b, C]`, the real tokens only, G = 1: `parallel.plan.TokenPlacement`), so the per-token ops never see
a padding slot and the modulation broadcasts over the sequence as in full blocks. Its attention kind (`full` | `token` | `group`) comes
from its spec; its `BlockStep` (the layout it runs in, and the one to switch from first when the previous
block left the hidden state elsewhere) from the model's block plan (`skiparse.plan_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from osp_megatron.models.fused import affine_layernorm, bias_gelu, gated_residual, modulated_layernorm
from osp_megatron.parallel import ParallelState, comm_stats
from osp_megatron.skiparse import BlockStep


@dataclass
class MLPSubmodules:
    linear_fc1: Union[ModuleSpec, type]
    linear_fc2: Union[ModuleSpec, type]


@dataclass
class BlockSubmodules:
    self_attention: Union[ModuleSpec, type]
    cross_attention: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]


class FeedForward(MegatronModule):
    """fc1 (column-parallel, bias added by the fused GELU) -> GELU(tanh) -> fc2 (row-parallel)."""

    def __init__(self, config, submodules: MLPSubmodules, tp_group=None):
        super().__init__(config)
        c, f = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, c, f, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=True, is_expert=False, tp_group=tp_group,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2, f, c, config=config, init_method=config.init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )

    def forward(self, x):
        h, b = self.linear_fc1(x)
        h = bias_gelu(h, b)
        out, b = self.linear_fc2(h)
        return out if b is None else out + b


def _tag_sequence_parallel(module: torch.nn.Module, enabled: bool) -> None:
    """Params replicated over TP but used on sequence-parallel chunks: megatron all-reduces their grads over TP."""
    for p in module.parameters():
        p.sequence_parallel = enabled


class OSPNextBlock(MegatronModule):
    """One block; `kind` (spec param): full | token | group; `step`: where it runs (see module docstring)."""

    def __init__(self, config, submodules: BlockSubmodules, layer_number: int, parallel: ParallelState, kind: str,
                 step: BlockStep):
        super().__init__(config)
        attention = "full" if kind == "full" else "sparse"
        if step.attention != attention or (attention == "sparse" and step.layout != kind):
            raise ValueError(f"block {layer_number}: spec kind {kind!r} does not match its step {step}")
        self.layer_number, self.kind, self.step = layer_number, kind, step
        c = config.hidden_size
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number,
                                           parallel=parallel, layout=step.layout, kind=attention)
        self.cross_attention = build_module(submodules.cross_attention, config=config, parallel=parallel,
                                            layer_number=layer_number)
        self.mlp = build_module(submodules.mlp, config=config, tp_group=parallel.tp_group)
        self.norm2 = torch.nn.LayerNorm(c, eps=config.layernorm_epsilon, elementwise_affine=True, dtype=config.params_dtype)
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, c, dtype=config.params_dtype) / c**0.5)
        _tag_sequence_parallel(self.norm2, config.sequence_parallel)
        self.modulation.sequence_parallel = config.sequence_parallel

    def forward(self, x, e, text, seq):
        """x [S, G*b, C] in `step.layout` (or in step.switch_from, switched first), e [b, 6, C], text [L, b, C];
        `seq`: the forward's `attention.SequenceContext` (token placement + RoPE tables)."""
        step = self.step
        if step.switch_from is not None:
            x = seq.placement.switch(x, step.switch_from, step.layout)
        g = seq.placement.classes_per_rank(step.layout)
        mod = (self.modulation.float() + e.float()).repeat(g, 1, 1)  # [G*b, 6, C], class-major
        shift, scale, gate, c_shift, c_scale, c_gate = (m.unsqueeze(0) for m in mod.unbind(1))
        eps = self.config.layernorm_epsilon
        with comm_stats.scope(step.attention):
            n = modulated_layernorm(x, shift, scale, eps)
            x = gated_residual(x, self.self_attention(n, seq), gate)
            n = affine_layernorm(x, self.norm2.weight, self.norm2.bias, self.norm2.eps)
            x = x + self.cross_attention(n, text, g)
            n = modulated_layernorm(x, c_shift, c_scale, eps)
            x = gated_residual(x, self.mlp(n), c_gate)
        return x
