"""Block schedules of OSP-Next: which blocks attend fully and which run token-/group-wise, and which layout the
hidden state is in at every block (`plan_blocks`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


def block_schedule(num_layers: int, kind: str, num_full: int = 8) -> List[str]:
    """Per-block layout kind: 'full' | 'token' | 'group'.

    - full: every block full attention (Wan2.1).
    - dual_end(num_full): full blocks [0, num_full/2) and the last num_full/2, sparse between;
      even index -> token, odd index -> group (released: 8 full blocks).
    - uniform(num_full): pairs of full blocks every num_layers/(num_full/2) layers
      (e.g. {0,1,6,7,12,13,18,19,24,25} for 30 layers, 10 full), the rest alternate token/group.
    """
    if kind == "full":
        return ["full"] * num_layers
    if num_full < 0 or num_full > num_layers:
        raise ValueError(f"num_full={num_full} must be in [0, num_layers={num_layers}]")
    if kind == "dual_end":
        if num_full % 4 != 0:
            raise ValueError(
                f"dual_end needs num_full_blocks divisible by 4 (got {num_full}) so that the first sparse block "
                "is token-wise and the last group-wise; use 4 or 8"
            )
        half = num_full // 2
        sched = []
        for i in range(num_layers):
            if i < half or i >= num_layers - half:
                sched.append("full")
            else:
                sched.append("token" if i % 2 == 0 else "group")
        _check_alternation(sched)
        return sched
    if kind == "uniform":
        if num_full % 2 != 0 or num_full == 0:
            raise ValueError(f"uniform needs an even, positive num_full_blocks (got {num_full})")
        pairs = num_full // 2
        if num_layers % pairs != 0:
            raise ValueError(f"uniform: num_layers={num_layers} is not divisible by num_full_blocks/2={pairs}")
        stride = num_layers // pairs
        if stride < 2:
            raise ValueError("uniform: too many full blocks for the layer count")
        full = {k * stride + j for k in range(pairs) for j in (0, 1)}
        sched, nxt = [], "token"
        for i in range(num_layers):
            if i in full:
                sched.append("full")
                nxt = "token"  # each sparse run starts token-wise
            else:
                sched.append(nxt)
                nxt = "group" if nxt == "token" else "token"
        return sched
    raise ValueError(f"unknown schedule {kind!r}; use full, dual_end or uniform")


def _check_alternation(sched: List[str]) -> None:
    sparse = [s for s in sched if s != "full"]
    if sparse and (sparse[0] != "token" or sparse[-1] != "group"):
        raise ValueError("schedule must start its sparse run token-wise and end it group-wise")


@dataclass(frozen=True)
class BlockStep:
    """How one block runs: the layout it sees, the layout to switch from first (None: no switch), its attention."""

    layout: str  # raster | token | group
    switch_from: Optional[str]
    attention: str  # full | sparse


def plan_blocks(schedule: Sequence[str], layout_native: bool = True) -> Tuple[str, List[BlockStep], str]:
    """Block kinds ('full'|'token'|'group') -> (entry layout, per-block steps, final layout).

    layout_native (any context/sequence parallelism): the hidden state enters in the token layout and
    never returns to raster, so full<->sparse boundaries need no communication. On one device the full
    blocks run on the unpadded raster sequence instead (switches there are local copies).
    """
    sparse = any(k != "full" for k in schedule)
    current = "token" if (sparse and layout_native) else "raster"
    entry = current
    steps = []
    for kind in schedule:
        if kind == "full":
            want = current if layout_native else "raster"
            steps.append(BlockStep(want, None if want == current else current, "full"))
            current = want
        else:
            steps.append(BlockStep(kind, None if kind == current else current, "sparse"))
            current = kind
    return entry, steps, current
