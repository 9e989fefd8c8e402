"""Frozen encoders: Wan VAE (diffusers AutoencoderKLWan) and umT5 (transformers UMT5EncoderModel).

`load_vae(spec, device, dtype)` and `load_text_encoder(spec, device, dtype, text_len, text_dim=None)` take a
local path or `"tiny"` (the real classes, random-initialised small and deterministic, for tests and the demo).
"""
from osp_megatron.encoders.text import TextEncoder, load_text_encoder
from osp_megatron.encoders.vae import PatchVAE, WanVAE, load_vae

__all__ = ["load_vae", "load_text_encoder", "WanVAE", "PatchVAE", "TextEncoder"]
