"""Probe one video file: frames, fps, width, height, duration, codec; decodes first and last frame.

decord is used when importable, PyAV otherwise (and for the codec name). A file that cannot be
opened or whose first/last frame does not decode raises `ProbeError` with a short reason.
"""
from __future__ import annotations

import os
from typing import Any, Dict


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


def _probe_decord(path: str) -> Dict[str, Any]:
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        raise ProbeError(f"not_a_video: cannot open ({_short(exc)})") from None
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
            raise ProbeError(f"decode_failed: ({_short(exc)})") from None
        height, width = int(first[0]), int(first[1])
    finally:
        del vr
    return {"frames": frames, "fps": fps, "width": width, "height": height}


def _probe_av(path: str) -> Dict[str, Any]:
    import av

    try:
        container = av.open(path)
    except Exception as exc:  # noqa: BLE001
        raise ProbeError(f"not_a_video: cannot open ({_short(exc)})") from None
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
            raise ProbeError(f"decode_failed: ({_short(exc)})") from None
        if frames <= 0:
            raise ProbeError("zero_length: no frames")
    finally:
        container.close()
    return {"frames": frames, "fps": fps, "width": width, "height": height}


def probe_video(path: str) -> Dict[str, Any]:
    """{frames, fps, width, height, duration, codec, bytes} of the video at `path` (raises ProbeError)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ProbeError(f"unreadable: {exc.strerror or exc}") from None
    if size == 0:
        raise ProbeError("zero_length: empty file")
    from data_pipeline.decode import mp4_box_problem

    with open(path, "rb") as f:
        problem = mp4_box_problem(f, size)
    if problem:
        raise ProbeError(f"truncated: {problem}")
    try:
        import decord  # noqa: F401

        info = _probe_decord(path)
    except ImportError:
        info = _probe_av(path)
    if info["fps"] <= 0:
        raise ProbeError("bad_fps: the container reports no frame rate")
    info["duration"] = info["frames"] / info["fps"]
    info["codec"] = _codec_name(path)
    info["bytes"] = size
    return info


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__


__all__ = ["ProbeError", "probe_video"]
