"""`data.kind=synthetic`: random latents and text embeddings, for smoke tests and benchmarks (no files).

Sample `i` of rank `r` is drawn from a generator seeded with (seed, r, i), so the stream is reproducible
and resumable from a single position counter. Text embeddings are zero past a per-sample prompt length,
like real umT5 outputs.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch

from data_pipeline.config import DataConfig


class SyntheticLoader:
    """Batches {"latents": [b, *shape], "text": [b, text_len, text_dim], "text_lens", "caption", "key"}."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, text_dim: int = 4096,
                 epochs: Optional[int] = None):
        if text_dim < 1:
            raise ValueError(f"text_dim={text_dim}: must be >= 1 (the model's text embedding width)")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.text_dim, self.epochs = text_dim, epochs
        self.position = 0
        self.batches = 0

    def _sample(self, index: int) -> Dict[str, Any]:
        cfg = self.cfg
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + self.rank) * 1_000_003 + index)
        latents = torch.randn(list(cfg.synthetic_latent_shape), generator=g)
        length = int(torch.randint(1, cfg.text_len + 1, (1,), generator=g))
        text = torch.zeros(cfg.text_len, self.text_dim)
        text[:length] = torch.randn(length, self.text_dim, generator=g)
        n = cfg.synthetic_num_samples
        return {"latents": latents, "text": text, "length": length,
                "key": f"synthetic-r{self.rank}-e{index // n}-{index % n:06d}"}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        mbs, n = self.cfg.micro_batch_size, self.cfg.synthetic_num_samples
        while self.epochs is None or self.position + mbs <= self.epochs * n:
            items = [self._sample(self.position + j) for j in range(mbs)]
            self.position += mbs
            self.batches += 1
            yield {
                "latents": torch.stack([it["latents"] for it in items]),
                "text": torch.stack([it["text"] for it in items]),
                "text_lens": torch.tensor([it["length"] for it in items]),
                "caption": [f"synthetic sample {it['key']}" for it in items],
                "key": [it["key"] for it in items],
            }

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "synthetic", "position": self.position, "batches": self.batches, "rank": self.rank,
                "seed": self.cfg.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "synthetic":
            raise ValueError("loader state is not from a synthetic loader; data.kind must match the saved run")
        self.position = int(state["position"])
        self.batches = int(state.get("batches", 0))

    def metrics(self) -> Dict[str, int]:
        return {"samples_used": self.position, "batches": self.batches, "consumed_batches": self.batches,
                "skipped_total": 0}


__all__ = ["SyntheticLoader"]
