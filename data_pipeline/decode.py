"""Decode a clip from bytes into a bucket: `uint8 [C=3, T, H, W]` RGB.

decord reads from `io.BytesIO` (no temp files) and resizes inside the decoder to the smallest size that
covers the bucket while keeping the aspect ratio; the centre crop then cuts the bucket out. Frames are
sampled at the target fps from a random or centred window. The reader is deleted right after use.
PyAV is the fallback when decord is not importable.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.buckets import available_frames, choose_bucket, source_offsets
from data_pipeline.config import BucketSpec


class SkipSample(Exception):
    """A sample that cannot be used; `category` names the counter it goes to."""

    def __init__(self, category: str, message: str):
        super().__init__(f"{category}: {message}")
        self.category = category


def frame_indices(num_src_frames: int, src_fps: float, num_frames: int, fps: float, window: str,
                  rng: random.Random) -> List[int]:
    """Source indices of `num_frames` frames at `fps` from a `random` or `center` window."""
    offsets = source_offsets(num_frames, src_fps, fps)
    max_start = num_src_frames - 1 - offsets[-1]
    if max_start < 0:
        raise SkipSample("too_short", f"{num_src_frames} frames at {src_fps:g} fps < {num_frames} at {fps:g} fps")
    start = rng.randint(0, max_start) if window == "random" else max_start // 2
    return [start + o for o in offsets]


def cover_size(src_w: int, src_h: int, width: int, height: int) -> Tuple[int, int]:
    """Smallest (w, h) with the source aspect ratio that covers (width, height)."""
    scale = max(width / src_w, height / src_h)
    return max(width, int(math.ceil(src_w * scale - 1e-6))), max(height, int(math.ceil(src_h * scale - 1e-6)))


def center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """[T, h, w, 3] -> [T, height, width, 3] from the centre."""
    h, w = frames.shape[1:3]
    top, left = (h - height) // 2, (w - width) // 2
    return frames[:, top: top + height, left: left + width]


def _decode_decord(data: bytes, indices: Sequence[int], size: Optional[Tuple[int, int]]) -> np.ndarray:
    """`size=None` keeps the native size (an in-decoder resize to the same size still costs a scaler pass)."""
    import decord

    resize = {} if size is None else {"width": size[0], "height": size[1]}
    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, **resize)
    try:
        return vr.get_batch(list(indices)).asnumpy()
    finally:
        del vr


def _decode_av(data: bytes, indices: Sequence[int], size: Optional[Tuple[int, int]]) -> np.ndarray:
    import av

    wanted = sorted(set(indices))
    got: Dict[int, np.ndarray] = {}
    resize = {} if size is None else {"width": size[0], "height": size[1]}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one core per loader worker
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24", **resize)
            if i >= wanted[-1]:
                break
    if len(got) != len(wanted):
        raise SkipSample("decode_error", f"stream ended before frame {wanted[-1]}")
    return np.stack([got[i] for i in indices])


def mp4_box_problem(f, total: int) -> Optional[str]:
    """Walk the top-level MP4/MOV boxes of file-like `f` (`total` bytes) by seeking; a reason if they do not
    fit the data (truncated or corrupt), None if fine or not an MP4."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8 or head[4:8] != b"ftyp":
        return None
    pos = 0
    while pos + 8 <= total:
        f.seek(pos)
        hdr = f.read(16)
        size = int.from_bytes(hdr[0:4], "big")
        box = hdr[4:8].decode("latin-1")
        if size == 1:
            if len(hdr) < 16:
                break
            size = int.from_bytes(hdr[8:16], "big")
        elif size == 0:
            return None  # extends to the end of the file
        if size < 8:
            return f"corrupt mp4: box {box!r} at {pos} has size {size}"
        if pos + size > total:
            return f"truncated mp4: box {box!r} needs {pos + size} bytes, {total} present"
        pos += size
    if pos != total:
        return f"truncated mp4: {total - pos} trailing bytes after the last box"
    return None


def check_mp4_boxes(data: bytes) -> None:
    """Cheap truncation check for MP4/MOV bytes (no decode).

    A truncated file can still open and decode the frames before the cut, which would silently train on
    a partial clip; raises SkipSample(decode_error) instead. Non-MP4 data is left to the decoder.
    """
    problem = mp4_box_problem(io.BytesIO(data), len(data))
    if problem:
        raise SkipSample("decode_error", problem)


def _open_info(data: bytes) -> Tuple[int, float, int, int]:
    """(frames, fps, width, height) of the clip in `data`."""
    try:
        import decord
    except ImportError:
        import av

        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            n = s.frames or sum(1 for _ in c.decode(video=0))
            return n, float(s.average_rate or 0), s.codec_context.width, s.codec_context.height
    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    try:
        h, w = vr[0].shape[:2]
        return len(vr), float(vr.get_avg_fps()), int(w), int(h)
    finally:
        del vr


def decode_clip(data: bytes, buckets: Sequence[BucketSpec], fps: float, window: str, rng: random.Random,
                meta: Optional[Dict[str, Any]] = None,
                decoder: str = "decord") -> Tuple[torch.Tensor, int, Dict[str, Any]]:
    """Bytes -> (uint8 [3, T, H, W], bucket index, info {frame_indices, src_frames, src_fps, src_size}).

    `meta` (the shard's json: frames, fps, width, height) saves one open of the clip when present.
    `decoder`: "decord" (PyAV when decord is not importable) or "pyav".
    Raises SkipSample (too_short / decode_error) for clips that cannot fill any bucket or do not decode.
    """
    check_mp4_boxes(data)
    try:
        if meta and all(k in meta for k in ("frames", "fps", "width", "height")):
            n, src_fps, w, h = int(meta["frames"]), float(meta["fps"]), int(meta["width"]), int(meta["height"])
        else:
            n, src_fps, w, h = _open_info(data)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt bytes surface as many exception types
        raise SkipSample("decode_error", _short(exc)) from None
    if n <= 0 or src_fps <= 0 or w <= 0 or h <= 0:
        raise SkipSample("decode_error", f"bad stream info: {n} frames, {src_fps} fps, {w}x{h}")
    avail = available_frames(n, src_fps, fps)
    index = choose_bucket(buckets, w, h, avail)
    if index is None:
        smallest = min(b.frames for b in buckets)
        raise SkipSample("too_short", f"{n} frames at {src_fps:g} fps give {avail} frames at {fps:g} fps "
                                      f"< {smallest} (smallest bucket)")
    bucket = buckets[index]
    indices = frame_indices(n, src_fps, bucket.frames, fps, window, rng)
    size = cover_size(w, h, bucket.width, bucket.height)
    resize = None if size == (w, h) else size
    try:
        use_decord = decoder == "decord"
        if use_decord:
            try:
                import decord  # noqa: F401
            except ImportError:
                use_decord = False
        frames = _decode_decord(data, indices, resize) if use_decord else _decode_av(data, indices, resize)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SkipSample("decode_error", _short(exc)) from None
    if frames.shape[1:3] != (size[1], size[0]):  # metadata disagreed with the stream: resize here
        t = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                            align_corners=False)
        frames = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    frames = center_crop(frames, bucket.width, bucket.height)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()  # crop view -> [3, T, H, W] in one copy
    info = {"frame_indices": indices, "src_frames": n, "src_fps": src_fps, "src_size": [w, h], "bucket": index}
    return video, index, info


def to_unit_range(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return video_u8.float().div_(127.5).sub_(1.0)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


__all__ = ["SkipSample", "decode_clip", "check_mp4_boxes", "frame_indices", "cover_size", "center_crop", "to_unit_range"]
