"""Data section of the training config (also usable on its own by `data_pipeline`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class BucketSpec:
    """One (frames, height, width) pixel bucket; frames must be 4k+1."""

    frames: int = 81
    height: int = 480
    width: int = 832


@dataclass
class DataConfig:
    """Where samples come from and how they are decoded and batched.

    `shards`: a brace pattern or a directory of `shard-*.tar` files (raw `.mp4` or latent shards).
    `kind`: `raw` (decode videos), `latent` (cached latents + text embeddings), or `synthetic`
    (random latents, for smoke tests and benchmarks; no files needed).
    """

    kind: str = "raw"
    shards: str = ""
    fps: float = 16.0
    sample_window: str = "random"  # random | center
    decoder: str = "decord"  # decord | pyav (both read from bytes in loader workers)
    buckets: List[BucketSpec] = field(default_factory=lambda: [BucketSpec()])
    micro_batch_size: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 64
    shard_shuffle: bool = True
    seed: int = 1234
    text_len: int = 512
    # synthetic kind only: latent grid (after VAE) and number of samples per epoch
    synthetic_latent_shape: List[int] = field(default_factory=lambda: [16, 5, 16, 16])
    synthetic_num_samples: int = 64
    max_consecutive_errors: int = 100

    def validate(self, errors: List[str], prefix: str = "data") -> None:
        if self.kind not in ("raw", "latent", "synthetic"):
            errors.append(f"{prefix}.kind={self.kind!r}: use one of raw, latent, synthetic")
        if self.kind != "synthetic" and not self.shards:
            errors.append(f"{prefix}.shards is empty: give a shard directory or pattern (or data.kind=synthetic)")
        if self.sample_window not in ("random", "center"):
            errors.append(f"{prefix}.sample_window={self.sample_window!r}: use random or center")
        if self.decoder not in ("decord", "pyav"):
            errors.append(f"{prefix}.decoder={self.decoder!r}: use decord or pyav")
        if self.fps <= 0:
            errors.append(f"{prefix}.fps={self.fps}: must be > 0")
        if not self.buckets:
            errors.append(f"{prefix}.buckets is empty: give at least one {{frames, height, width}}")
        for i, b in enumerate(self.buckets):
            if b.frames < 1 or (b.frames - 1) % 4 != 0:
                errors.append(f"{prefix}.buckets[{i}].frames={b.frames}: must be 4k+1 (e.g. 81, 49, 17) for the Wan VAE")
            if b.height % 16 != 0 or b.width % 16 != 0:
                errors.append(
                    f"{prefix}.buckets[{i}] {b.height}x{b.width}: height and width must be multiples of 16 "
                    "(VAE stride 8 x patch 2)"
                )
        if self.micro_batch_size < 1:
            errors.append(f"{prefix}.micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.num_workers < 0:
            errors.append(f"{prefix}.num_workers={self.num_workers}: must be >= 0")
        seen = set()
        for i, b in enumerate(self.buckets):
            if (b.frames, b.height, b.width) in seen:
                errors.append(f"{prefix}.buckets[{i}] {b.frames}x{b.height}x{b.width}: listed twice; remove the copy")
            seen.add((b.frames, b.height, b.width))
        if self.shuffle_buffer < 0:
            errors.append(f"{prefix}.shuffle_buffer={self.shuffle_buffer}: must be >= 0 (0 or 1 = no sample shuffle)")
        if self.text_len < 1:
            errors.append(f"{prefix}.text_len={self.text_len}: must be >= 1 (Wan uses 512)")
        if self.max_consecutive_errors < 0:
            errors.append(f"{prefix}.max_consecutive_errors={self.max_consecutive_errors}: must be >= 0")
        if self.kind == "synthetic":
            shape = list(self.synthetic_latent_shape)
            if len(shape) != 4 or any(int(x) < 1 for x in shape):
                errors.append(f"{prefix}.synthetic_latent_shape={shape}: give 4 positive sizes [C, T, H, W], "
                              "e.g. [16, 5, 16, 16]")
            if self.synthetic_num_samples < 1:
                errors.append(f"{prefix}.synthetic_num_samples={self.synthetic_num_samples}: must be >= 1")
