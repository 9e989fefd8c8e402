"""Loader batches -> model-ready micro-batches.

A loader batch is raw (`{"video" [b,3,F,H,W] in [-1,1], "caption": list[str]}`), latent (`{"latents"
[b,16,T,H,W], "text" [b,L,D]}`) or synthetic (latent layout). Raw batches go through the VAE and the text
encoder here. Flow matching then draws sigma and noise from a CPU generator seeded with
(seed, dp_rank, step, micro) so that every TP/CP/PP rank of one data-parallel rank builds the identical
micro-batch `{"x_t", "timestep", "text", "target"}` (on `device`; x_t/text in the model dtype, target fp32).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch

from osp_megatron.diffusion.flow_matching import FlowMatching, step_seed


class EndlessLoader:
    """Iterates a re-iterable loader forever (a new pass after each exhausted one), counting passes."""

    def __init__(self, loader):
        self.loader = loader
        self.passes = 0
        self._it: Optional[Iterator] = None

    def next(self) -> Dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.passes += 1
        raise RuntimeError(
            "the data loader yielded no batch in a whole pass: check data.shards (is the dataset empty?) "
            "and data.buckets (do any samples fit?)"
        )


class BatchPreparer:
    """Encodes (if raw) and noises loader batches into model micro-batches."""

    def __init__(self, flow: FlowMatching, seed: int, dp_rank: int, device, dtype, vae=None, text_encoder=None):
        self.flow = flow
        self.seed = seed
        self.dp_rank = dp_rank
        self.device = device
        self.dtype = dtype
        self.vae = vae
        self.text_encoder = text_encoder

    @torch.no_grad()
    def latents_and_text(self, batch: Dict[str, Any]):
        """-> (latents [b,16,T,H,W] float32 on device, text [b,L,D] on device)."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
        elif "video" in batch:
            if self.vae is None:
                raise RuntimeError("raw video batches need a VAE: set encoders.vae (a path or `tiny`)")
            latents = self.vae.encode(batch["video"].to(self.device)).to(torch.float32)
        else:
            raise KeyError(f"loader batch has neither 'latents' nor 'video' (keys: {sorted(batch)})")
        if "text" in batch:
            text = batch["text"].to(self.device)
        elif "caption" in batch:
            if self.text_encoder is None:
                raise RuntimeError("caption batches need a text encoder: set encoders.text_encoder (a path or `tiny`)")
            text = self.text_encoder.encode(list(batch["caption"])).to(self.device)
        else:
            raise KeyError(f"loader batch has neither 'text' nor 'caption' (keys: {sorted(batch)})")
        return latents, text

    @torch.no_grad()
    def prepare(self, batch: Dict[str, Any], step: int, micro: int) -> Dict[str, torch.Tensor]:
        latents, text = self.latents_and_text(batch)
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.dp_rank, step, micro))
        x_t, timestep, target, sigma = self.flow.draw(latents, gen)
        return {
            "x_t": x_t.to(self.dtype),
            "timestep": timestep,
            "text": text.to(self.dtype),
            "target": target,  # float32: the loss is computed in fp32
            "sigma": sigma,
        }
