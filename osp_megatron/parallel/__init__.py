"""Parallelism: process groups (`ParallelState`), token placement and movement (`TokenPlacement`: SSP and
Ulysses exchanges), collectives, TP weight helpers and comm counters. Imports `osp_megatron.skiparse`, never
`osp_megatron.models`."""
from osp_megatron.parallel.groups import ContextParallel, ParallelState, initialize_parallel
from osp_megatron.parallel.plan import TokenPlacement

__all__ = ["ContextParallel", "ParallelState", "TokenPlacement", "initialize_parallel"]
