"""Probe one video file: frames, fps, width, height, duration, codec; decodes the first and last frame.

The decoder is chosen like the loader's (`auto`: decord, else torchcodec, else PyAV); PyAV also gives the
codec name. A file that cannot be opened or whose first/last frame does not decode raises `ProbeError`
with a short reason.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from data_pipeline.decode import mp4_box_problem, resolve_decoder, short_error


class ProbeError(Exception):
    """A file that is not a usable video; `str(exc)` starts with the reject category."""


def _codec_name(path: str) -> str:
    try:
        import av
    except ImportError:
        return "unknown"
    try:
        with av.open(path) as container:
            streams = container.streams.video
            return streams[0].codec_context.name if streams else "none"
    except Exception:  # noqa: BLE001 - codec name is informative only
        return "unknown"


def _probe_decord(path) -> Dict[str, Any]:
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        raise ProbeError(f"not_a_video: cannot open ({short_error(exc)})") from None
    try:
        frames = len(vr)
        if frames <= 0:
            raise ProbeError("zero_length: no frames")
        fps = float(vr.get_avg_fps())
        try:
            first = vr[0].shape
            vr.seek(0)
            vr[frames - 1]
        except ProbeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ProbeError(f"decode_failed: ({short_error(exc)})") from None
        height, width = int(first[0]), int(first[1])
    finally:
        del vr
    return {"frames": frames, "fps": fps, "width": width, "height": height}


def _probe_torchcodec(path) -> Dict[str, Any]:
    from torchcodec.decoders import VideoDecoder

    try:
        dec = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"not_a_video: cannot open ({short_error(exc)})") from None
    md = dec.metadata
    frames = int(md.num_frames or 0)
    if frames <= 0:
        raise ProbeError("zero_length: no frames")
    try:
        dec[0]
        dec[frames - 1]
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"decode_failed: ({short_error(exc)})") from None
    return {"frames": frames, "fps": float(md.average_fps or 0), "width": int(md.width), "height": int(md.height)}


def _probe_av(path) -> Dict[str, Any]:
    import av

    try:
        container = av.open(path)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"not_a_video: cannot open ({short_error(exc)})") from None
    try:
        if not container.streams.video:
            raise ProbeError("not_a_video: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames, width, height = 0, stream.codec_context.width, stream.codec_context.height
        try:
            for _ in container.decode(stream):
                frames += 1
        except Exception as exc:  # noqa: BLE001
            raise ProbeError(f"decode_failed: ({short_error(exc)})") from None
        if frames <= 0:
            raise ProbeError("zero_length: no frames")
    finally:
        container.close()
    return {"frames": frames, "fps": fps, "width": width, "height": height}


_PROBES = {"decord": _probe_decord, "torchcodec": _probe_torchcodec, "pyav": _probe_av}


def probe_video(path: str, decoder: str = "auto") -> Dict[str, Any]:
    """{frames, fps, width, height, duration, codec, bytes} of the video at `path` (raises ProbeError).

    `decoder`: auto | decord | torchcodec | pyav (DecoderUnavailable if it does not import).
    """
    backend = resolve_decoder(decoder)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.read(1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ProbeError(f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
    if size == 0:
        raise ProbeError("zero_length: empty file")
    with open(path, "rb") as f:
        problem = mp4_box_problem(f, size)
    if problem:
        raise ProbeError(f"truncated: {problem}")
    try:
        path.encode("utf-8")
        info = _PROBES[backend](path)
    except UnicodeEncodeError:  # a file name that is not UTF-8: decord / torchcodec take a file object instead
        with open(path, "rb") as f:
            info = _PROBES[backend](f)
    if info["fps"] <= 0:
        raise ProbeError("bad_fps: the container reports no frame rate")
    info["duration"] = info["frames"] / info["fps"]
    info["codec"] = _codec_name(path)
    info["bytes"] = size
    return info


__all__ = ["ProbeError", "probe_video"]
