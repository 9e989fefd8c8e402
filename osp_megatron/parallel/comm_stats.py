"""Byte and call counters around every collective the model issues (tests and benchmarks read them).

Counts are per rank. `bytes` is the size of the local input tensor of the collective; `sent` is what
leaves the rank (for an all-to-all over S ranks: (S-1)/S of the input). The current block kind is a
scope (`with comm_stats.scope("sparse"): ...`) so counters split by full / sparse / boundary / head.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterator, Tuple

_enabled = True
_scope = "other"
_counters: Dict[Tuple[str, str], Dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0, "sent": 0})


def record(collective: str, nbytes: int, group_size: int, sent: float = None) -> None:
    """`sent`: bytes that leave the rank, when not (S-1)/S of the input (uneven all-to-alls)."""
    if not _enabled or group_size <= 1:
        return
    c = _counters[(collective, _scope)]
    c["calls"] += 1
    c["bytes"] += nbytes
    c["sent"] += nbytes * (group_size - 1) / group_size if sent is None else sent


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    global _scope
    prev, _scope = _scope, name
    try:
        yield
    finally:
        _scope = prev


def reset() -> None:
    _counters.clear()


def snapshot() -> Dict[str, Dict[str, float]]:
    """{"all_to_all/sparse": {"calls", "bytes", "sent"}, ...} (a copy)."""
    return {f"{k[0]}/{k[1]}": dict(v) for k, v in _counters.items()}


def total(collective: str = None, scope_name: str = None, field: str = "bytes") -> float:
    return sum(
        v[field] for (c, s), v in _counters.items()
        if (collective is None or c == collective) and (scope_name is None or s == scope_name)
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    global _enabled
    prev, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = prev
