"""Buckets: which (frames, height, width) a clip goes to, and the frame budget a clip allows.

A clip with `n` source frames at `src_fps`, sampled at `fps`, offers `available_frames(n, src_fps, fps)`
frames. It goes to the bucket with the nearest aspect ratio (|log(w/h) - log(W/H)|) among the buckets
whose frame count fits; ties prefer more frames, then the larger area.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from data_pipeline.config import BucketSpec


def source_offsets(num_frames: int, src_fps: float, fps: float) -> list:
    """Source-frame offsets (from the window start) of `num_frames` frames sampled at `fps`."""
    ratio = src_fps / fps
    return [int(math.floor(i * ratio + 0.5)) for i in range(num_frames)]


def available_frames(num_src_frames: int, src_fps: float, fps: float) -> int:
    """How many frames at `fps` fit into a clip of `num_src_frames` frames at `src_fps` (0 if none)."""
    if num_src_frames <= 0 or src_fps <= 0 or fps <= 0:
        return 0
    ratio = src_fps / fps
    n = int(math.floor((num_src_frames - 1 + 0.5) / ratio)) + 1
    while n > 1 and int(math.floor((n - 1) * ratio + 0.5)) > num_src_frames - 1:
        n -= 1
    while int(math.floor(n * ratio + 0.5)) <= num_src_frames - 1:
        n += 1
    return n


def largest_valid_frames(n: int) -> int:
    """Largest 4k+1 frame count <= n (0 if n < 1)."""
    return 0 if n < 1 else ((n - 1) // 4) * 4 + 1


def choose_bucket(buckets: Sequence[BucketSpec], width: int, height: int, frames_available: int) -> Optional[int]:
    """Index of the bucket for a clip of `width` x `height` offering `frames_available` frames, or None."""
    aspect = math.log(width / height)
    best, best_score = None, None
    for i, b in enumerate(buckets):
        if b.frames > frames_available:
            continue
        score = (round(abs(math.log(b.width / b.height) - aspect), 9), -b.frames, -(b.width * b.height), i)
        if best_score is None or score < best_score:
            best, best_score = i, score
    return best


def bucket_frames_message(buckets: Sequence[BucketSpec], fps: float, max_span_s: float, where: str) -> Optional[str]:
    """A clear error when no bucket fits even the longest clip (max_span_s = (frames-1)/src_fps), else None."""
    if not buckets:
        return None
    smallest = min(b.frames for b in buckets)
    avail = int(math.floor(max_span_s * fps + 1e-6)) + 1
    if smallest <= avail:
        return None
    fit = largest_valid_frames(avail)
    return (
        f"data.buckets: every bucket needs at least {smallest} frames at data.fps={fps:g} "
        f"({(smallest - 1) / fps:.2f} s of video), but the longest clip in {where} spans {max_span_s:.2f} s "
        f"({avail} frames at {fps:g} fps); use buckets with frames <= {fit} (4k+1) or lower data.fps"
    )


__all__ = ["available_frames", "choose_bucket", "source_offsets", "largest_valid_frames", "bucket_frames_message"]
