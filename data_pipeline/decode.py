"""Decode a clip from bytes into a bucket: `uint8 [C=3, T, H, W]` RGB.

Backends (`data.decoder`): decord, torchcodec, PyAV, or `auto` (the first of those that imports). A backend
only decodes the wanted frames, at their native size, into RGB24 (in chunks of `CHUNK` frames, so a long
bucket never holds all native frames at once). Cropping and resizing are one shared step: the centre
region with the bucket's aspect ratio is cut out of the native frame and resized to the bucket with torch's
antialiased bilinear filter (uint8). So the backends differ only in their YUV -> RGB conversion (all use
libswscale; identical on the test clips). Frames are sampled at the target fps from a random or centred
window; readers are closed right after use.

Sizes are never taken on trust from a shard's json: the stream's own header (PyAV, no decode) gives width,
height, frame rate and frame count; a json that disagrees is skipped as `bad_metadata`, a stream larger than
`max_frame_pixels` as `too_large`.
"""
from __future__ import annotations

import functools
import importlib
import io
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.buckets import available_frames, choose_bucket, source_offsets
from data_pipeline.config import DEFAULT_MAX_FRAME_PIXELS, BucketSpec, is_finite_number

BACKENDS = ("decord", "torchcodec", "pyav")  # the order `auto` tries them in
_MODULES = {"decord": "decord", "torchcodec": "torchcodec.decoders", "pyav": "av"}
_INSTALL = {
    "decord": "pip install decord==0.6.0 (x86_64 wheels only)",
    "torchcodec": "install the torchcodec build that matches your torch (it needs FFmpeg 4-8 shared libraries)",
    "pyav": "pip install av",
}
CHUNK = 8  # native frames decoded per step


class SkipSample(Exception):
    """A sample that cannot be used; `category` names the counter it goes to."""

    def __init__(self, category: str, message: str):
        super().__init__(f"{category}: {message}")
        self.category = category


class DecoderUnavailable(RuntimeError):
    """The requested decoder does not import; the message says how to install one or what to pick."""


# ------------------------------------------------------------------------------------------ backend choice
@functools.lru_cache(maxsize=None)
def _import_problem(backend: str) -> Optional[str]:
    try:
        importlib.import_module(_MODULES[backend])
    except Exception as exc:  # noqa: BLE001 - a broken build raises OSError/RuntimeError, not ImportError
        return f"{type(exc).__name__}: {short_error(exc, 160)}"
    return None


def decoder_unavailable(name: str) -> Optional[str]:
    """None if decoder `name` (auto | decord | torchcodec | pyav) can be used here, else why not and the fix."""
    if name == "auto":
        if any(_import_problem(b) is None for b in BACKENDS):
            return None
        return ("no video decoder imports (" + "; ".join(f"{b}: {_import_problem(b)}" for b in BACKENDS)
                + "); pip install 'osp-megatron[data]'")
    problem = _import_problem(name)
    if problem is None:
        return None
    others = [b for b in BACKENDS if b != name and _import_problem(b) is None]
    alt = f" or use data.decoder=auto (here: {others[0]})" if others else ""
    return f"{name} does not import ({problem}); {_INSTALL[name]}{alt}"


def resolve_decoder(name: str) -> str:
    """The backend `name` stands for (`auto` -> first importable of decord, torchcodec, pyav)."""
    problem = decoder_unavailable(name)
    if problem:
        raise DecoderUnavailable(f"decoder={name}: {problem}")
    if name == "auto":
        return next(b for b in BACKENDS if _import_problem(b) is None)
    return name


# ------------------------------------------------------------------------------------------ geometry
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


def crop_box(src_w: int, src_h: int, width: int, height: int) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of the centred source region that a cover resize + centre crop to (width, height) keeps."""
    cw, ch = cover_size(src_w, src_h, width, height)
    w = min(src_w, max(1, round(width * src_w / cw)))
    h = min(src_h, max(1, round(height * src_h / ch)))
    return (src_w - w) // 2, (src_h - h) // 2, w, h


def center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """[T, h, w, 3] -> [T, height, width, 3] from the centre."""
    h, w = frames.shape[1:3]
    top, left = (h - height) // 2, (w - width) // 2
    return frames[:, top: top + height, left: left + width]


def crop_resize(frames: torch.Tensor, box: Tuple[int, int, int, int], width: int, height: int) -> torch.Tensor:
    """uint8 [t, h, w, 3] native frames -> uint8 [t, 3, height, width]: crop `box`, antialiased bilinear resize."""
    left, top, w, h = box
    x = frames[:, top: top + h, left: left + w].permute(0, 3, 1, 2)  # NCHW view of NHWC data (channels_last)
    if (w, h) != (width, height):  # the uint8 antialias kernel is fastest on dense channels_last input
        x = torch.nn.functional.interpolate(x.contiguous(memory_format=torch.channels_last), size=(height, width),
                                            mode="bilinear", antialias=True, align_corners=False)
    return x


# ------------------------------------------------------------------------------------------ stream header
@dataclass
class StreamInfo:
    """What the container header says about the first video stream (`frames` 0 = not recorded)."""

    frames: int
    fps: float
    width: int
    height: int


def stream_header(data: bytes) -> StreamInfo:
    """Header of the first video stream in `data` (PyAV; no frame is decoded)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise SkipSample("decode_error", "no video stream")
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0)
        return StreamInfo(int(s.frames or 0), fps, int(s.codec_context.width), int(s.codec_context.height))


def _count_packets(data: bytes) -> int:
    """Frame count of a container that does not record it (one video packet per frame; no decode)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def _int_value(v: Any) -> Optional[int]:
    if isinstance(v, bool) or not is_finite_number(v) or float(v) != int(v):
        return None
    return int(v)


def checked_geometry(hdr: StreamInfo, meta: Optional[Dict[str, Any]],
                     max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> Tuple[int, float]:
    """(frames, fps) to sample from, after checking the stream against the limits and the json against the stream.

    Raises SkipSample: `too_large` (stream over `max_frame_pixels`), `bad_metadata` (a json frames / fps /
    width / height that is not a sane number or disagrees with the stream; the message names the key),
    `decode_error` (the stream itself reports no size or frame rate).
    """
    w, h = hdr.width, hdr.height
    if w <= 0 or h <= 0:
        raise SkipSample("decode_error", f"stream reports size {w}x{h}")
    if w * h > max_frame_pixels:
        raise SkipSample("too_large", f"stream is {w}x{h} = {w * h} pixels per frame > data.max_frame_pixels="
                                      f"{max_frame_pixels}")
    meta = meta if isinstance(meta, dict) else {}
    for key, actual in (("width", w), ("height", h)):
        if key in meta and _int_value(meta[key]) != actual:
            raise SkipSample("bad_metadata", f"json {key}={meta[key]!r} but the stream is {w}x{h}")
    fps = hdr.fps
    if "fps" in meta:
        v = meta["fps"]
        if not is_finite_number(v) or v <= 0 or (fps > 0 and abs(v - fps) > 0.01 * fps):
            raise SkipSample("bad_metadata", f"json fps={v!r} but the stream says {fps:g}")
        fps = fps or float(v)
    if not (math.isfinite(fps) and fps > 0):
        raise SkipSample("decode_error", "the stream reports no frame rate")
    frames = hdr.frames
    if "frames" in meta:
        v = _int_value(meta["frames"])
        if v is None or v < 1 or (frames and v > frames):
            raise SkipSample("bad_metadata", f"json frames={meta['frames']!r} but the stream has "
                                             f"{frames or 'an unrecorded number of'} frames")
        frames = v  # <= the header's count: the probe's (possibly decoded) count is the safer one
    return frames, fps


# ------------------------------------------------------------------------------------------ backends
# each yields uint8 [t, h, w, 3] native RGB frames for `indices` (sorted, repeats allowed), CHUNK at a time
def _frames_decord(data: bytes, indices: Sequence[int]) -> Iterator[np.ndarray]:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    try:
        for s in range(0, len(indices), CHUNK):
            yield vr.get_batch(list(indices[s: s + CHUNK])).asnumpy()
    finally:
        del vr


def _frames_torchcodec(data: bytes, indices: Sequence[int]) -> Iterator[np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC", device="cpu")
    try:
        for s in range(0, len(indices), CHUNK):
            yield dec.get_frames_at(indices=list(indices[s: s + CHUNK])).data.numpy()
    finally:
        del dec


def _frames_pyav(data: bytes, indices: Sequence[int]) -> Iterator[np.ndarray]:
    import av

    pos, buf = 0, []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one core per loader worker
        for i, frame in enumerate(container.decode(stream)):
            if indices[pos] == i:
                rgb = frame.to_ndarray(format="rgb24")
                while pos < len(indices) and indices[pos] == i:
                    buf.append(rgb)
                    pos += 1
                if len(buf) >= CHUNK or pos == len(indices):
                    yield np.stack(buf)
                    buf = []
                if pos == len(indices):
                    return
    raise SkipSample("decode_error", f"stream ended before frame {indices[pos]}")


_FRAMES = {"decord": _frames_decord, "torchcodec": _frames_torchcodec, "pyav": _frames_pyav}


def read_frames(data: bytes, indices: Sequence[int], decoder: str = "auto") -> Iterator[np.ndarray]:
    """Native-size RGB frames `indices` (non-decreasing) of the clip in `data`: uint8 [t, h, w, 3] chunks."""
    if any(b < a for a, b in zip(indices, indices[1:])):
        raise ValueError("read_frames: indices must be non-decreasing")
    return _FRAMES[resolve_decoder(decoder)](data, indices)


# ------------------------------------------------------------------------------------------ the clip
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


def decode_clip(data: bytes, buckets: Sequence[BucketSpec], fps: float, window: str, rng: random.Random,
                meta: Optional[Dict[str, Any]] = None, decoder: str = "auto",
                max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
    """Bytes -> (uint8 [3, T, H, W], bucket index, info {frame_indices, src_frames, src_fps, src_size, bucket}).

    `meta` (the shard's json: frames, fps, width, height) is checked against the stream's header (see
    `checked_geometry`); its frame count saves counting packets of containers that do not record one.
    `decoder`: auto | decord | torchcodec | pyav (raises DecoderUnavailable if it does not import).
    Raises SkipSample (too_short / decode_error / bad_metadata / too_large) for clips that cannot be used.
    """
    backend = resolve_decoder(decoder)
    check_mp4_boxes(data)
    try:
        hdr = stream_header(data)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt bytes surface as many exception types
        raise SkipSample("decode_error", short_error(exc)) from None
    n, src_fps = checked_geometry(hdr, meta, max_frame_pixels)
    if not n:
        try:
            n = _count_packets(data)
        except Exception as exc:  # noqa: BLE001
            raise SkipSample("decode_error", short_error(exc)) from None
    w, h = hdr.width, hdr.height
    avail = available_frames(n, src_fps, fps)
    index = choose_bucket(buckets, w, h, avail)
    if index is None:
        smallest = min(b.frames for b in buckets)
        raise SkipSample("too_short", f"{n} frames at {src_fps:g} fps give {avail} frames at {fps:g} fps "
                                      f"< {smallest} (smallest bucket)")
    bucket = buckets[index]
    indices = frame_indices(n, src_fps, bucket.frames, fps, window, rng)
    box = crop_box(w, h, bucket.width, bucket.height)
    video = torch.empty(3, bucket.frames, bucket.height, bucket.width, dtype=torch.uint8)
    t = 0
    try:
        for chunk in read_frames(data, indices, backend):
            if chunk.shape[1:] != (h, w, 3):
                raise SkipSample("decode_error", f"decoded frames are {chunk.shape[2]}x{chunk.shape[1]}, "
                                                 f"the header said {w}x{h}")
            out = crop_resize(torch.from_numpy(chunk), box, bucket.width, bucket.height)
            video[:, t: t + out.shape[0]] = out.permute(1, 0, 2, 3)
            t += out.shape[0]
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SkipSample("decode_error", short_error(exc)) from None
    if t != len(indices):
        raise SkipSample("decode_error", f"decoded {t} of {len(indices)} frames")
    info = {"frame_indices": indices, "src_frames": n, "src_fps": src_fps, "src_size": [w, h], "bucket": index}
    return video, index, info


def to_unit_range(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return video_u8.float().div_(127.5).sub_(1.0)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line of at most `limit` characters describing `exc`."""
    text = " ".join(str(exc).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__


__all__ = ["SkipSample", "DecoderUnavailable", "BACKENDS", "decode_clip", "read_frames", "stream_header",
           "checked_geometry", "resolve_decoder", "decoder_unavailable", "check_mp4_boxes", "frame_indices",
           "cover_size", "crop_box", "center_crop", "crop_resize", "to_unit_range", "short_error"]
