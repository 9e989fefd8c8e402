"""Process groups: megatron-core parallel_state (TP x CP x DP x PP) + the SSP / Ulysses split of CP.

`ParallelState` is the one collection of groups and ranks that every module gets injected (megatron's
`ProcessGroupCollection` pattern); no module reads a global group. It comes from
`initialize_parallel(parallel_cfg)` (after `torch.distributed.init_process_group`, and after the config was
validated for this world size, so no impossible plan reaches a collective) or, for one process (tools,
tests, single-GPU sampling), from `ParallelState.single()`.
Inside each context-parallel group (ranks ordered by CP rank), Ulysses groups are contiguous runs of
`ulysses` ranks and SSP groups take every `ulysses`-th rank: cp_rank = ssp_rank * ulysses + ulysses_rank.
Full blocks run Ulysses over the whole CP group, or, when the heads of a TP rank are not divisible by the CP
size, over U = gcd(heads / TP, CP) ranks (`ParallelState.full_ulysses`): contiguous runs of U CP ranks, with
keys and values gathered over the ranks at the same position of the other runs (`ContextParallel.full_groups`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from osp_megatron import cpu_shims
from osp_megatron.launch import free_port


@dataclass
class ContextParallel:
    """Process groups of one context-parallel group (CP = SSP x Ulysses). All None/1 on one device."""

    ssp: int = 1
    ulysses: int = 1
    ssp_rank: int = 0
    ulysses_rank: int = 0
    ssp_group: Optional[object] = None  # ranks with the same ulysses_rank
    ulysses_group: Optional[object] = None  # ranks with the same ssp_rank
    cp_group: Optional[object] = None  # the whole CP group, ordered by cp rank
    # U -> (Ulysses group: cp ranks [j*U, (j+1)*U) holding this rank, key/value group: cp ranks = this one mod U),
    # for every divisor U < size of the CP size (full blocks at gcd(heads, CP) < CP)
    full_groups: Dict[int, Tuple[Optional[object], Optional[object]]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.ssp * self.ulysses

    @property
    def rank(self) -> int:
        return self.ssp_rank * self.ulysses + self.ulysses_rank


@dataclass
class ParallelState:
    """Sizes, ranks and process groups of one rank (TP x CP x DP x PP). `ParallelState()` is one device with
    no groups at all (enough for token placement; the model's megatron layers need `single()`'s groups)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: ContextParallel = field(default_factory=ContextParallel)
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    dp_group: Optional[object] = None
    dp_cp_group: Optional[object] = None
    tp_cp_group: Optional[object] = None  # tensors sharded over heads (TP) and tokens (CP), e.g. HiF8 amax

    @classmethod
    def single(cls) -> "ParallelState":
        """The single-process world, set up explicitly: rank 0 of 1 (gloo, or nccl on a GPU) with megatron
        parallel_state at TP = PP = CP = 1. Refuses to run inside a multi-process job."""
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        if dist.get_world_size() > 1:
            raise RuntimeError("ParallelState.single() called inside a multi-process job: use initialize_parallel(...)")
        return _initialize(tp=1, pp=1, ssp=1, ulysses=1, sequence_parallel=False)

    @property
    def sp_size(self) -> int:
        """Ranks a sequence is split over by TP sequence parallelism (1 without it)."""
        return self.tp if self.sequence_parallel else 1

    @property
    def splits_sequence(self) -> bool:
        """Whether a sample's tokens are split over ranks (context parallelism or TP sequence parallelism)."""
        return self.cp.size > 1 or self.sp_size > 1

    def full_ulysses(self, num_heads: int) -> int:
        """Ulysses degree of full blocks: the CP size, or gcd(heads / TP, CP) when the heads do not divide."""
        return math.gcd(num_heads // self.tp, self.cp.size)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (
            f"TP={self.tp} PP={self.pp} CP={self.cp.size} (SSP={self.cp.ssp} x Ulysses={self.cp.ulysses}) DP={self.dp}"
            f"{' +SP' if self.sequence_parallel else ''}"
        )


def initialize_parallel(parallel_cfg, seed: int = 1234) -> ParallelState:
    """Build megatron parallel_state and the SSP/Ulysses groups for `parallel_cfg` (ParallelConfig).

    On GPU this also seeds megatron's CUDA RNG tracker (per-TP-rank streams for weight init / dropout).
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed to be initialised first (torchrun/srun)")
    return _initialize(parallel_cfg.tensor_parallel, parallel_cfg.pipeline_parallel, parallel_cfg.ssp,
                       parallel_cfg.ulysses, bool(parallel_cfg.sequence_parallel), seed)


# the groups built for (default group, TP, PP, SSP, Ulysses): a process that builds several trainers with the same
# plan (tests, notebooks) reuses them; each gloo/NCCL group holds threads and sockets until the process ends
_BUILT: Dict[tuple, ParallelState] = {}


def _initialize(tp: int, pp: int, ssp: int, ulysses: int, sequence_parallel: bool, seed: int = 1234) -> ParallelState:
    from megatron.core import parallel_state as mps

    key = (id(dist.distributed_c10d._get_default_group()), dist.get_world_size(), tp, pp, ssp, ulysses)
    built = _BUILT.get(key)
    if built is not None and mps.model_parallel_is_initialized() and mps.get_tensor_model_parallel_group() is built.tp_group:
        if torch.cuda.is_available():
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return replace(built, sequence_parallel=sequence_parallel)
    _BUILT.clear()

    cpu_shims.apply()  # megatron-core assumes CUDA; on CPU its few CUDA calls are shimmed, once per process

    world = dist.get_world_size()
    ul = ulysses
    cp = ssp * ul
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {tp * pp * cp}")
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    cp_ranks = list(mps.get_context_parallel_global_ranks())
    all_cp = [None] * world
    dist.all_gather_object(all_cp, cp_ranks)
    cp_groups = sorted({tuple(r) for r in all_cp})
    ssp_group = ul_group = None
    me = dist.get_rank()
    divisors = [d for d in range(1, cp) if cp % d == 0]
    full_groups: Dict[int, list] = {d: [None, None] for d in divisors}
    for ranks in cp_groups:  # every rank creates every group, in the same order
        for s in range(ssp):
            g = dist.new_group(list(ranks[s * ul : (s + 1) * ul]))
            if me in ranks[s * ul : (s + 1) * ul]:
                ul_group = g
        for u in range(ul):
            g = dist.new_group(list(ranks[u::ul]))
            if me in ranks[u::ul]:
                ssp_group = g
        for d in divisors:  # full blocks at Ulysses d < CP: runs of d ranks, keys/values over the other runs
            for j in range(cp // d):
                run = list(ranks[j * d : (j + 1) * d])
                g = dist.new_group(run) if d > 1 else None
                if me in run:
                    full_groups[d][0] = g
            for i in range(d):
                g = dist.new_group(list(ranks[i::d]))
                if me in ranks[i::d]:
                    full_groups[d][1] = g
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cp_rank = mps.get_context_parallel_rank()
    ctx = ContextParallel(
        ssp=ssp, ulysses=ul, ssp_rank=cp_rank // ul, ulysses_rank=cp_rank % ul,
        ssp_group=ssp_group, ulysses_group=ul_group, cp_group=mps.get_context_parallel_group(),
        full_groups={d: (inner, outer) for d, (inner, outer) in full_groups.items()},
    )
    state = ParallelState(
        tp=tp, pp=pp, dp=mps.get_data_parallel_world_size(), cp=ctx,
        tp_rank=mps.get_tensor_model_parallel_rank(), pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(), sequence_parallel=sequence_parallel,
        tp_group=mps.get_tensor_model_parallel_group(), pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        dp_cp_group=mps.get_data_parallel_group(with_context_parallel=True),
        tp_cp_group=mps.get_tensor_and_context_parallel_group(),
    )
    _BUILT[key] = state
    return state


