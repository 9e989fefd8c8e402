"""ModuleSpecs for the DiT block: `local` (megatron tensor-parallel linears, pure torch, runs on CPU),
`hif8` (the same with HiF8 quantized linears), and `te` (TransformerEngine linears, GPU only)."""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from osp_megatron.models.attention import AttentionSubmodules, CrossAttention, SelfAttention
from osp_megatron.models.block import BlockSubmodules, FeedForward, MLPSubmodules, OSPNextBlock


def _block_spec(column, row) -> ModuleSpec:
    attn = AttentionSubmodules(linear_q=column, linear_k=column, linear_v=column, linear_proj=row)
    return ModuleSpec(
        module=OSPNextBlock,
        submodules=BlockSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, submodules=attn),
            cross_attention=ModuleSpec(module=CrossAttention, submodules=attn),
            mlp=ModuleSpec(module=FeedForward, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_block_spec(spec_name: str = "local", quant_recipe: str = "none") -> ModuleSpec:
    """Block spec by name; HiF8 recipes swap in the quantized linears (x, W forward; grad_output backward)."""
    if spec_name == "te":
        try:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
        except Exception as exc:  # pragma: no cover - GPU + TE only
            raise RuntimeError(
                f"model.spec=te needs TransformerEngine (pip install 'osp-megatron[te]' on a CUDA machine): {exc}. "
                "Use model.spec=local instead."
            ) from exc
        return _block_spec(TEColumnParallelLinear, TERowParallelLinear)
    if spec_name != "local":
        raise ValueError(f"model.spec={spec_name!r}: use local or te")
    if quant_recipe.startswith("hif8"):
        from osp_megatron.quant.modules import HiF8ColumnParallelLinear, HiF8RowParallelLinear

        return _block_spec(HiF8ColumnParallelLinear, HiF8RowParallelLinear)
    return _block_spec(ColumnParallelLinear, RowParallelLinear)
