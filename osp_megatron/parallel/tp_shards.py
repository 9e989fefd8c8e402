"""Full (unsharded) weights <-> a rank's tensor-parallel shards, by megatron's parameter tags
(`tensor_model_parallel`, `partition_dim`). Used by the model's `load_full_state_dict` / `full_state_dict`."""
from __future__ import annotations

import torch

from osp_megatron.parallel.collectives import all_gather_cat
from osp_megatron.parallel.groups import ParallelState


def tp_slice(full: torch.Tensor, param: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """This TP rank's shard of the full tensor for `param` (the full tensor for parameters not split over TP)."""
    if getattr(param, "tensor_model_parallel", False):
        return full.chunk(parallel.tp, dim=param.partition_dim)[parallel.tp_rank]
    return full


def tp_gather(local: torch.Tensor, param: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """The full tensor of `param` from every TP rank's shard (call on every TP rank; no autograd)."""
    if getattr(param, "tensor_model_parallel", False) and parallel.tp > 1:
        return all_gather_cat(local, parallel.tp_group, dim=param.partition_dim)
    return local
