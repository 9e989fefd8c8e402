"""Sample keys for tar shards: safe characters only, no path traversal, unique within a dataset.

WebDataset splits a member name at the first dot of its basename into key and extension, and a
slash would make directories inside the tar; keys therefore keep only `[A-Za-z0-9_-]`.
"""
from __future__ import annotations

import re
from typing import Set

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 120


def sanitize_key(name: str) -> str:
    """`a/b c/../clip.v2.mp4` -> `a_b_c_clip_v2` (extension dropped, unsafe runs collapsed to `_`)."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    key = _UNSAFE.sub("_", stem).strip("_-")
    key = re.sub(r"_+", "_", key)
    return key[:MAX_KEY_LEN] or "sample"


def unique_key(name: str, used: Set[str]) -> str:
    """A sanitised key for `name` not in `used` (suffix `_1`, `_2`, ... on collision); adds it to `used`."""
    base = sanitize_key(name)
    key, n = base, 0
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


__all__ = ["sanitize_key", "unique_key"]
