"""OSPNextConfig: megatron-core's TransformerConfig plus the DiT / Skiparse fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from osp_megatron.config import ConfigError, ParallelConfig, PrecisionConfig, layout_errors, resolved_dtype
from osp_megatron.models.core_attention import resolve_backend


@dataclass
class OSPNextConfig(TransformerConfig):
    """One config for the whole DiT (Wan2.1 T2V dims + OSP-Next layout schedule)."""

    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
    rope_theta: float = 10000.0
    schedule: str = "full"  # full | dual_end | uniform
    num_full_blocks: int = 8
    sparse_ratio: int = 2
    attention_backend: str = "sdpa"
    spec_name: str = "local"
    quant_recipe: str = "none"
    quantize_attention: bool = False
    amax_scope: str = "local"  # local | tp | tp_cp (quant.modules.set_amax_scope)
    bf16_first_blocks: int = 0
    bf16_last_blocks: int = 0
    padding_free: Optional[bool] = None  # sparse blocks on the real tokens only (None: on one device; parallel.plan)
    offload_blocks: int = 0  # the first N blocks of each stage keep their saved activations in host memory

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def make_osp_config(model_cfg, parallel_cfg=None, precision_cfg=None, dtype=None) -> OSPNextConfig:
    """ModelConfig (+ ParallelConfig, PrecisionConfig) -> OSPNextConfig with CPU-safe megatron settings.

    Raises ConfigError (naming the field and the fix) when the model or its parallel layout is invalid: the same
    checks as `Config.validate`, so every way of building a model refuses the same plans."""
    parallel_cfg = parallel_cfg or ParallelConfig()
    precision_cfg = precision_cfg or PrecisionConfig()
    errors = []
    model_cfg.check(errors)
    errors += layout_errors(model_cfg, parallel_cfg)
    precision_cfg.check(errors, model_cfg)
    if errors:
        raise ConfigError("invalid model configuration:\n  - " + "\n  - ".join(errors))
    dims = model_cfg.resolve()
    dtype = dtype or resolved_dtype(precision_cfg)
    cuda = torch.cuda.is_available()
    return OSPNextConfig(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        layernorm_epsilon=dims.eps,
        in_channels=dims.in_channels,
        out_channels=dims.out_channels,
        text_dim=dims.text_dim,
        freq_dim=dims.freq_dim,
        patch_size=list(dims.patch_size),
        rope_theta=dims.rope_theta,
        schedule=model_cfg.schedule,
        num_full_blocks=dims.num_full_blocks,
        sparse_ratio=model_cfg.sparse_ratio,
        attention_backend=resolve_backend(model_cfg.attention_backend),
        spec_name=model_cfg.spec,
        quant_recipe=precision_cfg.recipe,
        quantize_attention=precision_cfg.quantize_attention,
        amax_scope=precision_cfg.amax_scope,
        bf16_first_blocks=precision_cfg.bf16_first_blocks,
        bf16_last_blocks=precision_cfg.bf16_last_blocks,
        padding_free=model_cfg.padding_free,
        offload_blocks=model_cfg.offload_blocks,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        sequence_parallel=parallel_cfg.sequence_parallel,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=partial(F.gelu, approximate="tanh"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not cuda,
        perform_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # unused (no MoE); megatron rejects variable_seq_lengths with allgather
        recompute_granularity=None if model_cfg.recompute == "none" else model_cfg.recompute,
        recompute_method="uniform" if model_cfg.recompute == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute == "full" else None,
        recompute_modules=["layernorm"] if model_cfg.recompute == "selective" else None,
        init_method=torch.nn.init.xavier_uniform_,
        output_layer_init_method=torch.nn.init.xavier_uniform_,
    )
