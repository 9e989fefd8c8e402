"""Model construction: `build_model(model_config, parallel, precision=None, dtype=None, device=None)`.

The caller owns the process groups: a `ParallelState` from `osp_megatron.parallel.initialize_parallel(...)`, or
`ParallelState.single()` for one process (tools, tests, single-GPU sampling). The model never creates one.
"""
from __future__ import annotations

from typing import Optional

import torch

from osp_megatron.config import ModelConfig, ParallelConfig
from osp_megatron.models.osp_next import OSPNextDiT
from osp_megatron.models.transformer_config import OSPNextConfig, make_osp_config
from osp_megatron.parallel import ParallelState


def build_model(config, parallel: Optional[ParallelState] = None, *, precision=None, dtype: Optional[torch.dtype] = None,
                device=None, pre_process: Optional[bool] = None, post_process: Optional[bool] = None) -> OSPNextDiT:
    """Build the OSP-Next DiT on this rank's share of `parallel`.

    `config`: a `ModelConfig` (e.g. `cfg.model`, or from `adapters.diffusers.config_from_diffusers`; its
    quantized-training structure comes from `precision`, a `PrecisionConfig`) or a ready `OSPNextConfig`.
    `parallel` (required): the `ParallelState` whose process groups the model uses.
    The model is moved to `device` (default: the current CUDA device if available, else CPU).
    """
    if parallel is None:
        raise ValueError("build_model needs parallel=ParallelState: initialize_parallel(cfg.parallel) in a "
                         "distributed job, or ParallelState.single() for one process")
    if isinstance(config, ModelConfig):
        layout = ParallelConfig(
            tensor_parallel=parallel.tp, pipeline_parallel=parallel.pp, ssp=parallel.cp.ssp,
            ulysses=parallel.cp.ulysses, sequence_parallel=parallel.sequence_parallel,
        )
        ocfg = make_osp_config(config, layout, precision, dtype)
    elif isinstance(config, OSPNextConfig):
        ocfg = config
    else:
        raise TypeError(f"build_model: expected a ModelConfig or an OSPNextConfig, got {type(config).__name__}")
    pre = parallel.is_first_stage if pre_process is None else pre_process
    post = parallel.is_last_stage if post_process is None else post_process
    model = OSPNextDiT(ocfg, parallel=parallel, pre_process=pre, post_process=post)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device)


__all__ = ["build_model"]
