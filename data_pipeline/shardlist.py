"""Shard lists: resolve `data.shards`, order them per epoch, split them over (DP rank, loader worker).

Every process `p = rank * num_workers + worker` of `P = world_size * num_workers` takes shards
`order[p::P]` of the epoch's seeded order. With fewer shards than processes, every process reads all
shards and keeps the samples whose position in the epoch stream is `p` modulo `P` (sample-level split).
Both give disjoint and complete coverage of an epoch.
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


class ShardListError(ValueError):
    """`data.shards` resolves to nothing usable; the message says what to fix."""


def resolve_shards(spec: str) -> List[str]:
    """Directory (its `shard-*.tar`), brace pattern (`dir/shard-{000000..000009}.tar`), glob, or a comma list."""
    if not spec:
        raise ShardListError("data.shards is empty: give a shard directory or pattern (or data.kind=synthetic)")
    urls: List[str] = []
    for part in [p for p in spec.split(",") if p.strip()] if "{" not in spec else [spec]:
        part = part.strip()
        if os.path.isdir(part):
            urls.extend(sorted(glob.glob(os.path.join(part, "shard-*.tar"))))
        elif "{" in part:
            import braceexpand

            urls.extend(braceexpand.braceexpand(part))
        elif any(c in part for c in "*?["):
            urls.extend(sorted(glob.glob(part)))
        else:
            urls.append(part)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not urls:
        raise ShardListError(f"data.shards={spec!r}: no shard-*.tar files found; run osp-shards (or osp-cache) "
                             "first or fix the path")
    if missing:
        raise ShardListError(f"data.shards={spec!r}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    return urls


def read_manifest(spec: str) -> Optional[Dict[str, Any]]:
    """manifest.json of the shard directory named by `spec` (None when there is none)."""
    first = spec.split(",")[0].strip()
    folder = first if os.path.isdir(first) else os.path.dirname(first.split("{")[0])
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def epoch_order(urls: List[str], seed: int, epoch: int, shuffle: bool) -> List[str]:
    """The shard order of `epoch` (same on every rank)."""
    order = list(urls)
    if shuffle:
        random.Random(f"osp-shards/{seed}/{epoch}").shuffle(order)
    return order


@dataclass
class Split:
    """What one process reads in an epoch: its shards, and (sample-level split) which positions it keeps."""

    shards: List[str]
    sample_modulo: int = 1
    sample_residue: int = 0

    def keeps(self, position: int) -> bool:
        return position % self.sample_modulo == self.sample_residue


def split_for(urls: List[str], seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
              worker: int, num_workers: int) -> Split:
    order = epoch_order(urls, seed, epoch, shuffle)
    procs = world_size * max(1, num_workers)
    proc = rank * max(1, num_workers) + worker
    if len(order) >= procs:
        return Split(order[proc::procs])
    return Split(order, procs, proc)


__all__ = ["resolve_shards", "read_manifest", "epoch_order", "split_for", "Split", "ShardListError"]
