"""ModuleSpecs for the DiT blocks, one per layer (megatron's `TransformerBlockSubmodules.layer_specs`).

Every per-block choice is in its spec, built once from the config by `get_layer_specs(config)`:
- attention kind (`params["kind"]`): full | token | group, from the block schedule;
- linears: `local` (megatron tensor-parallel linears, pure torch, runs on CPU), the same with quantized
  GEMMs (`precision.recipe=hif8_*` or the native `fp8_current` / `fp8_delayed`, except the bf16 first/last blocks), or `te` (TransformerEngine, GPU only);
- Q/K/V quantizer of self- and cross-attention: HiF8 (`precision.quantize_attention`) or none;
- core attention kernel: `model.attention_backend` (sdpa | flash | math | te).
"""
from __future__ import annotations

from typing import List, Tuple

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from osp_megatron.models.attention import (
    AttentionSubmodules,
    CrossAttention,
    QKVIdentity,
    SelfAttention,
    SelfAttentionSubmodules,
)
from osp_megatron.models.block import BlockSubmodules, FeedForward, MLPSubmodules, OSPNextBlock
from osp_megatron.models.core_attention import kernel_spec
from osp_megatron.quant.modules import HiF8ColumnParallelLinear, HiF8QKV, HiF8RowParallelLinear
from osp_megatron.skiparse import block_schedule


def _linears(spec_name: str, quantized: bool) -> Tuple[type, type]:
    if spec_name == "te":
        try:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
        except Exception as exc:  # pragma: no cover - GPU + TE only
            raise RuntimeError(
                f"model.spec=te needs TransformerEngine (pip install 'osp-megatron[te]' on a CUDA machine): {exc}. "
                "Use model.spec=local instead."
            ) from exc
        return TEColumnParallelLinear, TERowParallelLinear
    if spec_name != "local":
        raise ValueError(f"model.spec={spec_name!r}: use local or te")
    if quantized:
        return HiF8ColumnParallelLinear, HiF8RowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def get_block_spec(spec_name: str = "local", kind: str = "full", quantized: bool = False, quantize_qkv: bool = False,
                   attention_backend: str = "sdpa") -> ModuleSpec:
    """One block's spec. `quantized`: HiF8 linears (x, W forward; grad_output backward) in the local spec;
    `quantize_qkv`: HiF8 Q/K/V (and dQ/dK/dV) in self- and cross-attention."""
    if kind not in ("full", "token", "group"):
        raise ValueError(f"block kind {kind!r}: use full, token or group")
    column, row = _linears(spec_name, quantized)
    kernel = kernel_spec(attention_backend)
    quantizer = HiF8QKV if quantize_qkv else QKVIdentity
    return ModuleSpec(
        module=OSPNextBlock,
        params={"kind": kind},
        submodules=BlockSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, submodules=SelfAttentionSubmodules(
                linear_q=column, linear_k=column, linear_v=column, linear_proj=row, core_attention=kernel,
                qkv_quantizer=quantizer)),
            cross_attention=ModuleSpec(module=CrossAttention, submodules=AttentionSubmodules(
                linear_q=column, linear_k=column, linear_v=column, linear_proj=row, core_attention=kernel,
                qkv_quantizer=quantizer)),
            mlp=ModuleSpec(module=FeedForward, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_layer_specs(config) -> List[ModuleSpec]:
    """Per-layer block specs (global layer order) from an `OSPNextConfig`: schedule, num_full_blocks,
    spec_name, attention_backend, quant_recipe, quantize_attention, bf16_first_blocks, bf16_last_blocks."""
    kinds = block_schedule(config.num_layers, config.schedule, config.num_full_blocks)
    # quantized linears: HiF8 recipes, and the native FP8 ones with the local spec (TE owns FP8 in the te spec)
    hif8 = config.quant_recipe.startswith("hif8") or config.quant_recipe in ("fp8_current", "fp8_delayed")
    first, last = config.bf16_first_blocks, config.bf16_last_blocks
    return [
        get_block_spec(config.spec_name, kind, quantized=hif8 and not (i < first or i >= config.num_layers - last),
                       quantize_qkv=config.quantize_attention, attention_backend=config.attention_backend)
        for i, kind in enumerate(kinds)
    ]
