"""Loader batches -> model-ready micro-batches.

A loader batch is raw (`{"video" [b,3,F,H,W] in [-1,1], "caption": list[str]}`), latent (`{"latents"
[b,16,T,H,W], "text" [b,L,D]}`) or synthetic (latent layout). Raw batches go through the VAE and the text
encoder here. Flow matching then draws sigma and noise from a CPU generator seeded with
(seed, dp_rank, step, micro) so that every TP/CP/PP rank of one data-parallel rank builds the identical
micro-batch `{"x_t", "timestep", "text", "target"}` (on `device`; x_t/text in the model dtype, target fp32).

Caption dropout (`data.caption_dropout` = p): a sample trains on the empty caption with probability p (OSP-Next's
`text_drop_ratio`, for classifier-free guidance). Raw batches get "" as caption; latent and synthetic batches get
the text encoder's embedding of "". Each decision is a pure function of (seed, sample key, step), so a resumed
run drops exactly the samples the uninterrupted run drops.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
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

    def close(self) -> None:
        """End the pass in progress now: a loader's worker processes are shut down here, while the queues they
        read are alive, not whenever the garbage collector reaches them (a collection that finalizes the queues
        first, or none before interpreter exit, leaves a worker that ignores stop signals to be joined forever)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def caption_dropped(seed: int, key: str, step: int, p: float) -> bool:
    """Whether sample `key` trains on the empty caption at optimizer step `step` (probability `p`)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), zlib.crc32(key.encode("utf-8"))])
    return float(np.random.default_rng(state).random()) < p


class BatchPreparer:
    """Encodes (if raw), drops captions (`caption_dropout`) and noises loader batches into model micro-batches."""

    def __init__(self, flow: FlowMatching, seed: int, dp_rank: int, device, dtype, vae=None, text_encoder=None,
                 caption_dropout: float = 0.0):
        self.flow = flow
        self.seed = seed
        self.dp_rank = dp_rank
        self.device = device
        self.dtype = dtype
        self.vae = vae
        self.text_encoder = text_encoder
        self.caption_dropout = float(caption_dropout)
        self._null_text: Optional[torch.Tensor] = None

    def dropped(self, batch: Dict[str, Any], step: int, micro: int) -> List[bool]:
        """Per sample of `batch`: train on the empty caption? (keys from the loader; else position in the step)."""
        n = len(batch["caption"]) if "caption" in batch else int((batch.get("latents", batch.get("text"))).shape[0])
        keys = list(batch.get("key") or [f"#{micro}/{i}" for i in range(n)])
        return [caption_dropped(self.seed, str(k), step, self.caption_dropout) for k in keys]

    def null_text(self) -> torch.Tensor:
        """The embedding of "" [1, L, D] (computed once)."""
        if self._null_text is None:
            if self.text_encoder is None:
                raise RuntimeError("data.caption_dropout > 0 needs a text encoder for the empty caption: set "
                                   "encoders.text_encoder (the one the latents were cached with)")
            self._null_text = self.text_encoder.encode([""]).to(self.device)
        return self._null_text

    @torch.no_grad()
    def latents_and_text(self, batch: Dict[str, Any], drop: Optional[List[bool]] = None):
        """-> (latents [b,16,T,H,W] float32 on device, text [b,L,D] on device); `drop[i]`: sample i gets the
        empty caption."""
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
            if drop and any(drop):
                null = self.null_text()
                if null.shape[1:] != text.shape[1:]:
                    raise RuntimeError(f"caption dropout: the empty caption's embedding {tuple(null.shape[1:])} does "
                                       f"not match the batch's text {tuple(text.shape[1:])}: set encoders.text_encoder "
                                       "and data.text_len to those the latents were cached with")
                keep = torch.tensor([not d for d in drop], device=self.device).view(-1, 1, 1)
                text = torch.where(keep, text, null.to(text.dtype))
        elif "caption" in batch:
            if self.text_encoder is None:
                raise RuntimeError("caption batches need a text encoder: set encoders.text_encoder (a path or `tiny`)")
            captions = [("" if drop and drop[i] else c) for i, c in enumerate(batch["caption"])]
            text = self.text_encoder.encode(captions).to(self.device)
        else:
            raise KeyError(f"loader batch has neither 'text' nor 'caption' (keys: {sorted(batch)})")
        return latents, text

    @torch.no_grad()
    def prepare(self, batch: Dict[str, Any], step: int, micro: int) -> Dict[str, torch.Tensor]:
        drop = self.dropped(batch, step, micro) if self.caption_dropout > 0 else None
        latents, text = self.latents_and_text(batch, drop)
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.dp_rank, step, micro))
        x_t, timestep, target, sigma = self.flow.draw(latents, gen)
        return {
            "x_t": x_t.to(self.dtype),
            "timestep": timestep,
            "text": text.to(self.dtype),
            "target": target,  # float32: the loss is computed in fp32
            "sigma": sigma,
        }
