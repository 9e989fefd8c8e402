"""Random state of one rank: one seed derivation, seeding, and the full state for checkpoints.

`derive_seed(base, *ints)` is the project's one way to make a seed for a sub-stream (a step, a data-parallel
rank, a micro-batch, a pipeline stage): a 63-bit value from numpy's SeedSequence over the integers, identical
on every process and platform. `get_rng_state` / `set_rng_state` cover python, numpy, torch CPU, CUDA (when
present) and megatron's tensor-parallel CUDA RNG tracker (when megatron is importable).
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

SEED_MASK = (1 << 63) - 1


def derive_seed(base: int, *ints: int) -> int:
    """A 63-bit seed from (base, *ints); the same integers give the same seed everywhere. As in SeedSequence,
    trailing zeros do not change the seed: `derive_seed(s, a) == derive_seed(s, a, 0)`."""
    state = np.random.SeedSequence([int(base), *(int(i) for i in ints)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & SEED_MASK


def _tracker():
    try:
        from megatron.core import tensor_parallel
    except ImportError:  # pragma: no cover - megatron is a dependency of the trainer only
        return None
    return tensor_parallel.get_cuda_rng_tracker()


def get_rng_state() -> Dict[str, Any]:
    """This rank's RNG state: python, numpy, torch CPU, CUDA (if available), megatron's TP tracker."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    tracker = _tracker()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a state from `get_rng_state` (entries absent on either side are left alone)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _tracker()
    if "tracker" in state and tracker is not None:
        tracker.set_states(state["tracker"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; on CUDA also megatron's per-TP-rank tracker.

    The DiT has no dropout, so on CPU the tracker stays empty (recompute saves/restores an empty set); seeding
    goes through `torch.default_generator` directly, bypassing torch.cuda.* which the CPU shims replace.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import parallel_state, tensor_parallel

        torch.cuda.manual_seed_all(seed)
        if parallel_state.model_parallel_is_initialized():  # else initialize_parallel seeds the tracker later
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
