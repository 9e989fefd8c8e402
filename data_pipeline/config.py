"""Data section of the training config (also usable on its own by `data_pipeline`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List

DECODERS = ("auto", "decord", "torchcodec", "pyav")
# 8K UHD: larger streams are skipped as too_large instead of allocating frames of that size
DEFAULT_MAX_FRAME_PIXELS = 7680 * 4320


def doc(default: Any = None, help: str = "", factory=None, choices=None):
    """A dataclass field with a one-line description (the config reference lists it)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class BucketSpec:
    """One (frames, height, width) pixel bucket; frames must be 4k+1."""

    frames: int = doc(81, "frames per clip (4k+1 for the Wan VAE)")
    height: int = doc(480, "pixel height (multiple of 16)")
    width: int = doc(832, "pixel width (multiple of 16)")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bucket_problems(b: BucketSpec) -> List[tuple]:
    """[(field, value, problem)] for one bucket: frames 4k+1 >= 1, height/width positive multiples of 16."""
    out = []
    if not is_int(b.frames) or b.frames < 1 or (b.frames - 1) % 4 != 0:
        out.append(("frames", b.frames, "must be 4k+1 (e.g. 81, 49, 17) for the Wan VAE (temporal stride 4)"))
    for name in ("height", "width"):
        v = getattr(b, name)
        if not is_int(v) or v < 16 or v % 16 != 0:
            out.append((name, v, "must be a positive multiple of 16 (VAE stride 8 x patch 2)"))
    return out


@dataclass
class DataConfig:
    """Where samples come from and how they are decoded and batched.

    `shards`: a brace pattern or a directory of `shard-*.tar` files (raw `.mp4` or latent shards).
    `kind`: `raw` (decode videos), `latent` (cached latents + text embeddings), or `synthetic`
    (random latents, for smoke tests and benchmarks; no files needed).
    `decoder`: `auto` (decord, else torchcodec, else PyAV: the first that imports) or one of them by name.
    `max_frame_pixels`: clips whose stream is larger (width x height) are skipped as `too_large`.
    """

    kind: str = doc("raw", "raw (decode videos), latent (cached latents + text embeddings), synthetic (random "
                    "latents, no files)", choices=("raw", "latent", "synthetic"))
    shards: str = doc("", "a directory of shard-*.tar files or a brace pattern (raw or latent shards)")
    fps: float = doc(16.0, "frame rate clips are resampled to")
    sample_window: str = doc("random", "which window of a longer clip is taken", choices=("random", "center"))
    decoder: str = doc("auto", "video decoder: auto (decord, else torchcodec, else PyAV) or one by name",
                       choices=DECODERS)
    buckets: List[BucketSpec] = doc(help="(frames, height, width) buckets; each clip goes to the closest one",
                                    factory=lambda: [BucketSpec()])
    micro_batch_size: int = doc(1, "samples per micro-batch per data-parallel rank")
    num_workers: int = doc(2, "DataLoader worker processes per rank (0: decode in the training process)")
    shuffle_buffer: int = doc(64, "sample shuffle buffer (0 or 1: no sample shuffle)")
    shard_shuffle: bool = doc(True, "shuffle the shard order every epoch")
    seed: int = doc(1234, "seed of the data order")
    text_len: int = doc(512, "text tokens per caption (Wan: 512)")
    caption_dropout: float = doc(0.0, "probability that a sample trains on the empty caption (for CFG; OSP-Next: "
                                 "0.1), drawn from (seed, sample key, step): the same under resume")
    synthetic_latent_shape: List[int] = doc(help="synthetic kind: latent [C, T, H, W]",
                                            factory=lambda: [16, 5, 16, 16])
    synthetic_num_samples: int = doc(64, "synthetic kind: samples per epoch")
    max_consecutive_errors: int = doc(100, "stop when this many samples in a row fail to load (0: never)")
    max_frame_pixels: int = doc(DEFAULT_MAX_FRAME_PIXELS, "clips whose stream is larger (width x height) are "
                                "skipped as too_large")

    def validate(self, errors: List[str], prefix: str = "data") -> None:
        def at_least(name: str, minimum: int, hint: str = "") -> None:
            v = getattr(self, name)
            if not is_int(v) or v < minimum:
                errors.append(f"{prefix}.{name}={v!r}: must be an integer >= {minimum}{hint}")

        if self.kind not in ("raw", "latent", "synthetic"):
            errors.append(f"{prefix}.kind={self.kind!r}: use one of raw, latent, synthetic")
        if self.kind != "synthetic" and not self.shards:
            errors.append(f"{prefix}.shards is empty: give a shard directory or pattern (or data.kind=synthetic)")
        if self.sample_window not in ("random", "center"):
            errors.append(f"{prefix}.sample_window={self.sample_window!r}: use random or center")
        if self.decoder not in DECODERS:
            errors.append(f"{prefix}.decoder={self.decoder!r}: use one of {', '.join(DECODERS)}")
        elif self.kind == "raw":
            from data_pipeline.decode import decoder_unavailable

            problem = decoder_unavailable(self.decoder)
            if problem:
                errors.append(f"{prefix}.decoder={self.decoder}: {problem}")
        if not is_finite_number(self.fps) or self.fps <= 0:
            errors.append(f"{prefix}.fps={self.fps!r}: must be a finite number > 0 (e.g. 16)")
        if not is_finite_number(self.caption_dropout) or not 0.0 <= self.caption_dropout <= 1.0:
            errors.append(f"{prefix}.caption_dropout={self.caption_dropout!r}: must be a probability in [0, 1]")
        if not self.buckets:
            errors.append(f"{prefix}.buckets is empty: give at least one {{frames, height, width}}")
        at_least("max_frame_pixels", 1, " (width x height of the largest stream to decode)")
        seen = set()
        for i, b in enumerate(self.buckets):
            problems = bucket_problems(b)
            for name, v, problem in problems:
                errors.append(f"{prefix}.buckets[{i}].{name}={v!r}: {problem}")
            if problems:
                continue
            if is_int(self.max_frame_pixels) and b.height * b.width > self.max_frame_pixels:
                errors.append(f"{prefix}.buckets[{i}] {b.height}x{b.width}: {b.height * b.width} pixels per frame > "
                              f"{prefix}.max_frame_pixels={self.max_frame_pixels}; use a smaller bucket or raise "
                              "max_frame_pixels")
            if (b.frames, b.height, b.width) in seen:
                errors.append(f"{prefix}.buckets[{i}] {b.frames}x{b.height}x{b.width}: listed twice; remove the copy")
            seen.add((b.frames, b.height, b.width))
        at_least("micro_batch_size", 1)
        at_least("num_workers", 0)
        at_least("shuffle_buffer", 0, " (0 or 1 = no sample shuffle)")
        at_least("text_len", 1, " (Wan uses 512)")
        at_least("max_consecutive_errors", 0)
        if not is_int(self.seed):
            errors.append(f"{prefix}.seed={self.seed!r}: must be an integer")
        if not isinstance(self.shard_shuffle, bool):
            errors.append(f"{prefix}.shard_shuffle={self.shard_shuffle!r}: must be true or false")
        if self.kind == "synthetic":
            shape = list(self.synthetic_latent_shape)
            if len(shape) != 4 or not all(is_int(x) and x >= 1 for x in shape):
                errors.append(f"{prefix}.synthetic_latent_shape={shape}: give 4 positive sizes [C, T, H, W], "
                              "e.g. [16, 5, 16, 16]")
            at_least("synthetic_num_samples", 1)
