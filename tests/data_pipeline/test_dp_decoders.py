"""Decoder backends (decord / torchcodec / PyAV / auto) give identical frames; shard metadata is never trusted
for allocation sizes (lying json -> bad_metadata, oversized streams -> too_large), in decode_clip and the loader."""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline import build_loader
from data_pipeline.config import BucketSpec
from data_pipeline.decode import (BACKENDS, DecoderUnavailable, SkipSample, checked_geometry, decode_clip,
                                  decoder_unavailable, read_frames, resolve_decoder, stream_header)
from data_pipeline.probe import probe_video
from data_pipeline.synthetic import ffmpeg_exe, ramp_clip
from dp_helpers import BUCKETS, raw_config

AVAILABLE = [b for b in BACKENDS if decoder_unavailable(b) is None]
needs_two = pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs two importable decoders")


def _ffmpeg(out, *args):
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", "testsrc2=size=96x64:rate=16:duration=2", *args, "-threads", "1", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory, clips_dir):
    """Sharp-edged test pattern in several pixel formats / colour tags / containers, plus two synthetic clips."""
    d = tmp_path_factory.mktemp("odd")
    h264 = ["-c:v", "libx264", "-preset", "ultrafast"]
    clips = [
        _ffmpeg(d / "bt709.mp4", *h264, "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709",
                "-color_trc", "bt709"),
        _ffmpeg(d / "fullrange.mp4", *h264, "-pix_fmt", "yuvj420p"),
        _ffmpeg(d / "yuv444.mp4", *h264, "-pix_fmt", "yuv444p"),
        _ffmpeg(d / "vp9.webm", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-pix_fmt", "yuv420p"),
        ramp_clip(str(d / "ramp.mp4"), width=64, height=48, fps=24, frames=48),
        clips_dir / "clip-000002.mp4",
        clips_dir / "clip-000005.mp4",
    ]
    return {str(p).rsplit("/", 1)[-1]: open(p, "rb").read() for p in clips}


@needs_two
def test_backends_decode_identical_frames(odd_clips):
    """Same indices -> the same uint8 frames: natively, and after the shared crop + resize into buckets
    (downscale, upscale, crop to another aspect ratio). Measured max difference on these clips: 0."""
    buckets = [BucketSpec(9, 32, 48), BucketSpec(9, 80, 80), BucketSpec(9, 96, 64)]
    for name, data in odd_clips.items():
        hdr = stream_header(data)
        n = hdr.frames or 32
        native = {b: np.concatenate(list(read_frames(data, [0, 1, 1, 7, n - 1], b))) for b in AVAILABLE}
        for b in AVAILABLE:
            assert native[b].shape == (5, hdr.height, hdr.width, 3)
            assert np.array_equal(native[b], native[AVAILABLE[0]]), (name, b)
        for bucket in buckets:
            out = {b: decode_clip(data, [bucket], 16.0, "random", random.Random(5), decoder=b) for b in AVAILABLE}
            ref_video, ref_index, ref_info = out[AVAILABLE[0]]
            assert ref_video.shape == (3, 9, bucket.height, bucket.width)
            for b, (video, index, info) in out.items():
                assert (index, info["frame_indices"]) == (ref_index, ref_info["frame_indices"])
                assert torch.equal(video, ref_video), (name, bucket, b, (video.int() - ref_video.int()).abs().max())


@needs_two
def test_probe_agrees_across_backends(odd_clips, tmp_path):
    for name, data in odd_clips.items():
        p = tmp_path / name
        p.write_bytes(data)
        infos = [probe_video(str(p), b) for b in AVAILABLE]
        keys = ("frames", "fps", "width", "height", "codec")
        assert all({k: i[k] for k in keys} == {k: infos[0][k] for k in keys} for i in infos), (name, infos)


def test_auto_picks_the_first_importable_and_named_ones_must_import(monkeypatch):
    assert resolve_decoder("auto") == AVAILABLE[0]
    assert decoder_unavailable("auto") is None
    for b in BACKENDS:
        if b not in AVAILABLE:
            with pytest.raises(DecoderUnavailable, match=f"decoder={b}: {b} does not import"):
                resolve_decoder(b)
            errors = []
            raw_config("shards/", decoder=b).validate(errors)
            assert any(e.startswith(f"data.decoder={b}: {b} does not import") and "data.decoder=auto" in e
                       for e in errors), errors
    # decord missing (an aarch64 install): auto falls back to the next one that imports
    from data_pipeline import decode

    monkeypatch.setitem(sys.modules, "decord", None)
    decode._import_problem.cache_clear()
    try:
        assert resolve_decoder("auto") == next(b for b in BACKENDS[1:] if decode._import_problem(b) is None)
        with pytest.raises(DecoderUnavailable, match="pip install decord==0.6.0"):
            resolve_decoder("decord")
    finally:
        decode._import_problem.cache_clear()


def test_webm_without_frame_count_or_metadata_decodes(odd_clips):
    data = odd_clips["vp9.webm"]
    assert stream_header(data).frames == 0  # Matroska records no frame count: counted from packets
    video, _, info = decode_clip(data, [BucketSpec(17, 64, 96)], 16.0, "center", random.Random(0))
    assert info["src_frames"] == 32 and video.shape == (3, 17, 64, 96)


def test_lying_metadata_is_bad_metadata_not_an_allocation(clips_dir):
    data = (clips_dir / "clip-000002.mp4").read_bytes()
    hdr = stream_header(data)
    truth = {"frames": hdr.frames, "fps": hdr.fps, "width": hdr.width, "height": hdr.height}
    video, _, _ = decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), dict(truth))
    lies = {
        "width": [100000, 4000, 0, -96, "wide", None, 1.5],
        "height": [3, 10**9],
        "fps": [1000.0, 1e-9, 0, float("nan"), float("inf"), "24"],
        "frames": [100000, 0, -1, 2.5, True],
    }
    for key, values in lies.items():
        for v in values:
            meta = {**truth, key: v}
            with pytest.raises(SkipSample) as e:
                decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), meta)
            assert e.value.category == "bad_metadata", (key, v, e.value)
            assert f"json {key}=" in str(e.value)
    # a smaller frame count than the stream's is honoured (the probe's count is the safer one)
    _, _, info = decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), {**truth, "frames": 25})
    assert info["src_frames"] == 25 and max(info["frame_indices"]) < 25
    # without json the stream's header is used; the same frames come out
    again, _, _ = decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), None)
    assert torch.equal(again, video)


def test_streams_over_the_pixel_limit_are_too_large(clips_dir):
    data = (clips_dir / "clip-000002.mp4").read_bytes()  # 112x64
    hdr = stream_header(data)
    with pytest.raises(SkipSample) as e:
        decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), max_frame_pixels=112 * 64 - 1)
    assert e.value.category == "too_large" and "data.max_frame_pixels=7167" in str(e.value)
    decode_clip(data, BUCKETS, 16.0, "center", random.Random(0), max_frame_pixels=112 * 64)
    assert checked_geometry(hdr, None, 112 * 64) == (hdr.frames, hdr.fps)
    with pytest.raises(SkipSample, match="no frame rate"):
        checked_geometry(type(hdr)(hdr.frames, math.nan, hdr.width, hdr.height), None)


@pytest.fixture(scope="module")
def crafted_shards(raw_shards, tmp_path_factory):
    """4 good samples and crafted ones with lying or broken json / captions, in one real tar."""
    out = tmp_path_factory.mktemp("crafted")
    good = list(wds.tarfile_to_samples()(iter([{"url": str(raw_shards / "shard-000000.tar")}])))
    good += list(wds.tarfile_to_samples()(iter([{"url": str(raw_shards / "shard-000001.tar")}])))[:1]
    meta = json.loads(good[0]["json"])
    bad_meta = [("lie-width", {**meta, "width": 100000, "height": 3}), ("lie-fps", {**meta, "fps": 1000.0}),
                ("lie-frames", {**meta, "frames": 100000}), ("lie-height-str", {**meta, "height": "64"})]
    samples = [{"__key__": s["__key__"], "mp4": s["mp4"], "json": s["json"], "txt": s["txt"]} for s in good]
    for key, m in bad_meta:
        samples.append({"__key__": key, "mp4": good[0]["mp4"], "json": json.dumps(m).encode(), "txt": b"x"})
    samples.append({"__key__": "latin1-caption", "mp4": good[1]["mp4"], "json": good[1]["json"],
                    "txt": "caf\u00e9".encode("latin-1")})
    samples.append({"__key__": "json-not-object", "mp4": good[2]["mp4"], "json": b"[1, 2]", "txt": b"fine"})
    with wds.TarWriter(str(out / "shard-000000.tar")) as w:
        for s in samples:
            w.write(s)
    return out, [s["__key__"] for s in good]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_skips_and_counts_crafted_samples(crafted_shards, workers):
    shards, good_keys = crafted_shards
    cfg = raw_config(shards, num_workers=workers, shuffle_buffer=0)
    loader = build_loader(cfg, epochs=1)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(good_keys + ["json-not-object"])  # a json that is not an object: header used
    m = loader.metrics()
    assert m["skipped_bad_metadata"] == 4 and m["skipped_caption_not_utf8"] == 1
    assert m["skipped_total"] == 5 and m["samples_read"] == len(good_keys) + 6


def test_loader_warning_names_the_sample_and_the_key(crafted_shards):
    shards, _ = crafted_shards
    with pytest.warns(UserWarning, match=r"skipped lie-width: bad_metadata: json width=100000 but the stream is"):
        for _ in build_loader(raw_config(shards, num_workers=0, shuffle_buffer=0), epochs=1):
            pass


def test_pyav_reads_frames_in_order_with_repeats(odd_clips):
    data = odd_clips["ramp.mp4"]  # frame i has luma 16 + 4 i
    frames = np.concatenate(list(read_frames(data, [0, 0, 3, 3, 3, 10, 47], "pyav")))
    grey = frames.astype(float).mean(axis=(1, 2, 3))
    assert np.abs(grey - 4 * np.array([0, 0, 3, 3, 3, 10, 47]) * 255 / 219).max() < 2.0
    with pytest.raises(SkipSample, match="stream ended before frame 48"):
        list(read_frames(data, [46, 48], "pyav"))
    with pytest.raises(ValueError, match="non-decreasing"):
        read_frames(data, [3, 1], "pyav")
