"""Sample previews: frame strips written as PNG (read back with Pillow) and mp4s read back frame by frame."""
import numpy as np
import torch
from PIL import Image

from osp_megatron.training.samples import frame_strip, read_mp4, write_frame_strip, write_mp4


def _video(frames=9, h=16, w=24):
    """[3, F, H, W]: frame i is a flat grey ramp level, with a red pixel marking the frame index column."""
    v = torch.zeros(3, frames, h, w)
    for i in range(frames):
        v[:, i] = -1 + 2 * i / (frames - 1)
        v[0, i, 0, i] = 1.0
        v[1:, i, 0, i] = -1.0
    return v


def test_frame_strip_png_has_the_evenly_spaced_frames(tmp_path):
    video = _video()
    path = write_frame_strip(tmp_path / "s.png", video, num_frames=3, scale=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (32, 3 * 48 + 2 * 2, 3)
    assert np.array_equal(img, frame_strip(video, 3, 2))
    for k, frame in enumerate((0, 4, 8)):  # first, middle, last
        tile = img[:, k * 50: k * 50 + 48]
        level = round((-1 + 2 * frame / 8 + 1) * 127.5)
        assert tile[10, 10].tolist() == [level] * 3
        assert tile[0, 2 * frame].tolist() == [255, 0, 0]  # the marker of that frame, upscaled 2x
    assert (img[:, 48:50] == 255).all()  # white gap
    assert not list(tmp_path.glob("*.tmp.png"))
    # more frames asked than there are: every frame once
    assert frame_strip(video[:, :2], 5).shape == (16, 2 * 24 + 2, 3)


def test_mp4_read_back(tmp_path):
    video = _video(frames=5, h=32, w=32)
    video[:, :, 8:, :] = torch.tensor([0.5, -0.5, 0.0]).view(3, 1, 1, 1)
    back = read_mp4(write_mp4(tmp_path / "v.mp4", video, fps=8))
    assert back.shape == (3, 5, 32, 32)
    assert torch.allclose(back[:, :, 16, 16], torch.tensor([0.5, -0.5, 0.0]).view(3, 1).expand(3, 5), atol=0.06)
