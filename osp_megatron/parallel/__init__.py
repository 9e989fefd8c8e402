"""Parallelism: process groups, the layout-native sequence plan, SSP and Ulysses exchanges, comm counters."""
from osp_megatron.parallel.groups import ParallelState, ensure_single_process, initialize_parallel
from osp_megatron.parallel.plan import ContextParallel, SequencePlan

__all__ = ["ContextParallel", "ParallelState", "SequencePlan", "ensure_single_process", "initialize_parallel"]
