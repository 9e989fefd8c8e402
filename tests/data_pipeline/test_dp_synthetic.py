"""Synthetic clips: real H.264, deterministic, captions that describe them."""
import hashlib

from data_pipeline.probe import probe_video
from data_pipeline.synthetic import clip_spec, make_synthetic_dataset


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_clips_are_h264_with_matching_captions(clips_dir):
    from dp_helpers import NUM_CLIPS

    mp4s = sorted(clips_dir.glob("clip-*.mp4"))
    assert len(mp4s) == NUM_CLIPS
    for i, p in enumerate(mp4s):
        spec = clip_spec(7, i)
        info = probe_video(str(p))
        assert info["codec"] == "h264"
        assert (info["width"], info["height"]) == (spec.width, spec.height)
        assert info["fps"] == spec.fps
        assert info["frames"] == round(spec.fps * spec.duration)
        caption = p.with_suffix(".txt").read_text().strip()
        assert caption == spec.caption
        assert f"{spec.colour} {spec.shape} moving {spec.direction}" in caption
        assert caption.endswith(f"{spec.background} background")


def test_same_seed_same_bytes_other_seed_differs(clips_dir, tmp_path):
    again = make_synthetic_dataset(str(tmp_path / "a"), 2, seed=7)
    assert [_sha(p) for p in again] == [_sha(clips_dir / f"clip-{i:06d}.mp4") for i in range(2)]
    other = make_synthetic_dataset(str(tmp_path / "b"), 2, seed=8)
    assert [_sha(p) for p in other] != [_sha(p) for p in again]


def test_shape_moves_in_the_stated_direction(clips_dir):
    import decord
    import numpy as np

    for i in range(4):
        spec = clip_spec(7, i)
        vr = decord.VideoReader(str(clips_dir / f"clip-{i:06d}.mp4"))
        first, last = vr[0].asnumpy().astype(float), vr[len(vr) - 1].asnumpy().astype(float)
        del vr
        bg = np.median(first.reshape(-1, 3), axis=0)

        def centre(frame):
            mask = np.abs(frame - bg).sum(-1) > 60
            ys, xs = np.nonzero(mask)
            return xs.mean(), ys.mean()

        (x0, y0), (x1, y1) = centre(first), centre(last)
        dx, dy = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[spec.direction]
        moved = (x1 - x0) * dx + (y1 - y0) * dy
        assert moved > 0.3 * (spec.width if dx else spec.height), (spec, x0, y0, x1, y1)
