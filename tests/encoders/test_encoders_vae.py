"""Wan VAE wrapper: the real AutoencoderKLWan class, tiny and seeded; 3 -> 16 channels, 4x8x8 stride."""
import pytest
import torch

from osp_megatron.encoders import load_vae
from osp_megatron.encoders.vae import tiny_vae_model


@pytest.fixture(scope="module")
def vae():
    return load_vae("tiny", "cpu", torch.float32)


def test_tiny_is_the_real_class_and_deterministic(vae):
    from diffusers import AutoencoderKLWan

    assert isinstance(vae.model, AutoencoderKLWan)
    other = load_vae("tiny")
    for (n, a), (_, b) in zip(vae.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), n
    state = torch.random.get_rng_state()
    tiny_vae_model()
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("t,h,w", [(1, 16, 16), (9, 32, 48), (17, 64, 32)])
def test_encode_shapes_and_normalisation(vae, t, h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, t, h, w, generator=g) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 16, (t - 1) // 4 + 1, h // 8, w // 8) == (2, *vae.latent_shape(t, h, w))
    raw = vae.model.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    y = vae.decode(z)
    assert y.shape == (2, 3, t, h, w) and y.abs().max() <= 1
    torch.testing.assert_close(y, vae.model.decode(raw).sample.clamp(-1, 1))


def test_bad_shapes_and_paths(vae, tmp_path):
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[b, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(FileNotFoundError, match="encoders.vae"):
        load_vae(str(tmp_path / "missing"))


def test_load_from_a_local_diffusers_folder(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):  # pipeline root or the vae folder itself
        loaded = load_vae(str(path))
        x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        assert torch.equal(loaded.encode(x), vae.encode(x))


def test_bfloat16_encoder_is_close_to_float32(vae):
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z16 = load_vae("tiny", "cpu", torch.bfloat16).encode(x)
    assert z16.dtype == torch.float32  # normalised latents are handed out in fp32
    torch.testing.assert_close(z16, vae.encode(x), rtol=0.05, atol=0.05)


def test_patch_vae_code_is_exact_on_cell_constant_linear_clips():
    """The demo's `patch` VAE: Wan latent layout, deterministic, and its decode reproduces clips made of 4x4-pixel
    cells whose colour changes linearly in luma within each group of 4 frames."""
    from osp_megatron.encoders import PatchVAE

    vae = load_vae("patch")
    assert isinstance(vae, PatchVAE) and vae.latent_shape(17, 64, 48) == [16, 5, 8, 6]
    g = torch.Generator().manual_seed(0)
    cells = torch.rand(2, 3, 5, 16, 12, generator=g) * 1.2 - 0.6  # [b, rgb, latent frame, H/4, W/4]
    slope = torch.rand(2, 1, 5, 16, 12, generator=g) * 0.1 - 0.05
    slope[:, :, 0] = 0
    offsets = torch.tensor([-1.5, -0.5, 0.5, 1.5]).view(1, 1, 1, 4, 1, 1)
    rest = (cells[:, :, 1:, None] + slope[:, :, 1:, None] * offsets).flatten(2, 3)
    video = torch.cat([cells[:, :, :1], rest], dim=2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    z = vae.encode(video)
    assert z.shape == (2, 16, 5, 8, 6) and torch.equal(z, vae.encode(video))
    assert torch.allclose(vae.decode(z), video, atol=1e-5)
    # the RGB channels carry the cell colours: a blue frame encodes to blue in every (dy, dx) copy
    blue = torch.tensor([-0.75, -0.5, 0.76]).view(1, 3, 1, 1, 1).expand(1, 3, 5, 16, 16)
    zb = vae.encode(blue) * torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(zb[0, :12, 0, 0, 0], blue[0, :, 0, 0, 0].repeat_interleave(4), atol=1e-6)
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 6, 64, 64))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 8, 2, 8, 8))
