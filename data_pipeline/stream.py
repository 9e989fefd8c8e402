"""The per-worker sample stream: a deterministic WebDataset pipeline with a resumable position.

One *role* = one loader worker slot of one DP rank. Its stream is a pure function of
(seed, epoch, rank, world_size, role, num_roles, shards):

  epoch shard order (seeded) -> node + worker split -> tar reading (wds.tarfile_samples, counting handler)
  -> seeded shuffle buffer -> decode (raw) or load (latent) -> bucket batcher (one bucket per batch)

Every batch carries `__state__`: the role, epoch, how many shuffled samples of that epoch were consumed
("position"), where the samples waiting in partly filled buckets came from, and the counters. Restoring a
role replays the epoch's tar stream up to the position without decoding (cheap) and re-reads the waiting
samples by key, so a resumed run yields exactly the batches the uninterrupted run would have yielded.
Epochs loop forever unless `epochs` is given; a finite stream ends with a batch-less `__final__` item that
carries the last counters (partly filled buckets are dropped and counted as `dropped_partial_batch`).
"""
from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections import Counter, OrderedDict
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.decode import SkipSample, decode_clip
from data_pipeline.shardlist import split_for

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
COUNTERS = ("samples_read", "samples_used", "batches", "epochs_completed", "skipped_read_error",
            "skipped_decode_error", "skipped_too_short", "skipped_missing_field", "skipped_load_error",
            "skipped_bad_metadata", "skipped_too_large", "skipped_caption_not_utf8", "dropped_partial_batch")


def fresh_role_state(role: int) -> Dict[str, Any]:
    return {"role": role, "epoch": 0, "position": 0, "pending": [], "counters": {k: 0 for k in COUNTERS}}


def _shuffled(src: Iterator[Dict[str, Any]], bufsize: int, rng: random.Random) -> Iterator[Dict[str, Any]]:
    """Seeded buffer shuffle (same idea as wds.shuffle, but with an explicit RNG we own)."""
    if bufsize <= 1:
        yield from src
        return
    buf: List[Dict[str, Any]] = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


def sample_meta(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The sample's `.json` member as a dict ({} when absent, not JSON or not an object)."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(raw: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """The `.txt` member (else the json's `caption`); SkipSample caption_not_utf8 / missing_field."""
    key = raw.get("__key__", "?")
    if "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SkipSample("caption_not_utf8", f"{key}: .txt is not UTF-8 text (byte "
                                                 f"0x{raw['txt'][exc.start]:02x} at offset {exc.start})") from None
        if text:
            return text
    cap = meta.get("caption")
    if isinstance(cap, str) and cap.strip():
        return cap.strip()
    raise SkipSample("missing_field", f"{key}: no caption (.txt)")


def _load_tensor(raw: Dict[str, Any], name: str) -> torch.Tensor:
    if f"{name}.pth" in raw:
        return torch.load(io.BytesIO(raw[f"{name}.pth"]), weights_only=True, map_location="cpu")
    if f"{name}.npy" in raw:
        import numpy as np

        return torch.from_numpy(np.load(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False))
    raise SkipSample("missing_field", f"no {name}.pth / {name}.npy member")


class RoleStream:
    """Batches of one (rank, role); see the module docstring."""

    def __init__(self, cfg: DataConfig, urls: List[str], rank: int, world_size: int, role: int,
                 num_roles: int, state: Optional[Dict[str, Any]] = None, epochs: Optional[int] = None,
                 expected_counts: Optional[Dict[str, int]] = None):
        self.cfg, self.urls = cfg, urls
        self.expected_counts = expected_counts or {}
        self.rank, self.world_size = rank, world_size
        self.role, self.num_roles = role, num_roles
        self.state = state or fresh_role_state(role)
        self.epochs = epochs
        self.counters: Counter = Counter({k: 0 for k in COUNTERS})
        self._replaying = False

    # ---------------------------------------------------------------- raw stream
    def _on_read_error(self, exn: BaseException) -> bool:
        if not self._replaying:
            self.counters["skipped_read_error"] += 1
            warnings.warn(f"data loader rank {self.rank} worker {self.role}: skipped unreadable shard data "
                          f"({type(exn).__name__}: {str(exn)[:200]})", stacklevel=2)
        return True

    def raw_samples(self, epoch: int) -> Iterator[Dict[str, Any]]:
        """Shuffled raw samples (bytes) of this role in `epoch`."""
        import webdataset as wds

        cfg = self.cfg
        split = split_for(self.urls, cfg.seed, epoch, cfg.shard_shuffle, self.rank, self.world_size,
                          self.role, self.num_roles)
        # a shard that is shorter than its manifest says was cut (tar reading stops silently at a truncated
        # header): count the missing samples once (by the process that owns them, or process 0 when every
        # process reads every shard and keeps a residue class of positions)
        owner = split.sample_modulo == 1 or split.sample_residue == 0

        def tars():
            for url in split.shards:
                n = 0
                for sample in wds.tarfile_to_samples(handler=self._on_read_error)(iter([{"url": url}])):
                    n += 1
                    yield sample
                expected = self.expected_counts.get(os.path.basename(url))
                if expected is not None and n < expected and owner and not self._replaying:
                    self.counters["skipped_read_error"] += expected - n
                    warnings.warn(f"data loader rank {self.rank} worker {self.role}: {url} holds {n} of its "
                                  f"{expected} samples (truncated shard?)", stacklevel=2)

        def kept():
            for i, sample in enumerate(tars()):
                if split.keeps(i):
                    yield sample

        rng = random.Random(f"osp-shuffle/{cfg.seed}/{epoch}/{self.rank}/{self.role}")
        return _shuffled(kept(), cfg.shuffle_buffer, rng)

    def fetch(self, url: str, key: str) -> Dict[str, Any]:
        """Re-read one sample by key (restoring a partly filled bucket)."""
        import webdataset as wds

        for sample in wds.tarfile_to_samples(handler=wds.ignore_and_continue)(iter([{"url": url}])):
            if sample.get("__key__") == key:
                return sample
        raise SkipSample("read_error", f"sample {key} not found in {url} while restoring loader state")

    # ---------------------------------------------------------------- one sample
    def prepare(self, raw: Dict[str, Any], epoch: int) -> Dict[str, Any]:
        key = raw.get("__key__", "?")
        meta = sample_meta(raw)
        caption = sample_caption(raw, meta)
        origin = {"url": raw.get("__url__"), "key": key, "epoch": epoch}
        if self.cfg.kind == "latent":
            try:
                latents = _load_tensor(raw, "latents")
                text = _load_tensor(raw, "text")
            except SkipSample:
                raise
            except Exception as exc:  # noqa: BLE001
                raise SkipSample("load_error", f"{key}: {type(exc).__name__}: {str(exc)[:200]}") from None
            if latents.dim() != 4 or text.dim() != 2:
                raise SkipSample("load_error", f"{key}: latents {tuple(latents.shape)} / text {tuple(text.shape)}: "
                                               "expected [C,T,H,W] and [L,D]")
            bucket_key = ["latent", *latents.shape, str(latents.dtype)]
            return {"key": key, "bucket_key": bucket_key, "latents": latents, "text": text, "caption": caption,
                    "meta": {**meta, "url": origin["url"]}, "origin": origin}
        data = next((raw[e] for e in VIDEO_EXTS if e in raw), None)
        if data is None:
            raise SkipSample("missing_field", f"{key}: no video member ({'/'.join(VIDEO_EXTS)})")
        rng = random.Random(f"osp-window/{self.cfg.seed}/{epoch}/{key}")
        video, bucket, info = decode_clip(data, self.cfg.buckets, self.cfg.fps, self.cfg.sample_window, rng, meta,
                                          self.cfg.decoder, self.cfg.max_frame_pixels)
        info["url"] = origin["url"]
        return {"key": key, "bucket_key": ["raw", bucket], "video": video, "caption": caption, "meta": info,
                "origin": origin}

    # ---------------------------------------------------------------- batching
    def collate(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch: Dict[str, Any] = {"caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
                                 "meta": [it["meta"] for it in items]}
        if self.cfg.kind == "latent":
            batch["latents"] = torch.stack([it["latents"] for it in items])
            length = self.cfg.text_len
            texts = []
            for it in items:
                t = it["text"][:length]
                if t.shape[0] < length:
                    t = torch.cat([t, t.new_zeros(length - t.shape[0], t.shape[1])])
                texts.append(t)
            batch["text"] = torch.stack(texts)
            batch["text_lens"] = torch.tensor([min(it["text"].shape[0], length) for it in items])
        else:
            batch["video"] = torch.stack([it["video"] for it in items])  # uint8; the loader makes it [-1, 1]
        return batch

    def _skip(self, exc: Exception, key: str) -> None:
        category = exc.category if isinstance(exc, SkipSample) else "decode_error"
        self.counters[f"skipped_{category}"] += 1
        self._consecutive += 1
        warnings.warn(f"data loader rank {self.rank} worker {self.role}: skipped {key}: {exc}", stacklevel=2)
        if self._consecutive > self.cfg.max_consecutive_errors:
            raise RuntimeError(
                f"data loader rank {self.rank} worker {self.role}: {self._consecutive} samples in a row failed "
                f"(last: {key}: {exc}); check data.shards or raise data.max_consecutive_errors"
            )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        st = self.state
        self.counters = Counter({k: 0 for k in COUNTERS})
        self.counters.update(st.get("counters", {}))
        self._consecutive = 0
        mbs = self.cfg.micro_batch_size
        pending: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
        for bucket_key, origins in st.get("pending", []):
            items = []
            for o in origins:
                try:
                    items.append(self.prepare(self.fetch(o["url"], o["key"]), o["epoch"]))
                except Exception as exc:  # noqa: BLE001 - the bytes changed under us: count, go on
                    self._skip(exc, o["key"])
            if items:
                pending[tuple(items[0]["bucket_key"])] = items
        epoch, skip = int(st.get("epoch", 0)), int(st.get("position", 0))
        while self.epochs is None or epoch < self.epochs:
            pos = 0
            self._replaying = skip > 0
            for raw in self.raw_samples(epoch):
                pos += 1
                if pos < skip:
                    continue
                if pos == skip:
                    self._replaying = False
                    continue
                self.counters["samples_read"] += 1
                try:
                    item = self.prepare(raw, epoch)
                except Exception as exc:  # noqa: BLE001 - warn and continue, counted
                    self._skip(exc, raw.get("__key__", "?"))
                    continue
                self._consecutive = 0
                key = tuple(item["bucket_key"])
                waiting = pending.setdefault(key, [])
                waiting.append(item)
                if len(waiting) < mbs:
                    continue
                del pending[key]
                self.counters["batches"] += 1
                self.counters["samples_used"] += len(waiting)
                batch = self.collate(waiting)
                batch["__state__"] = {
                    "role": self.role, "epoch": epoch, "position": pos,
                    "pending": [[list(k), [it["origin"] for it in v]] for k, v in pending.items()],
                    "counters": dict(self.counters),
                }
                yield batch
            self._replaying = False
            if pos == 0:
                raise RuntimeError(
                    f"data loader rank {self.rank} worker {self.role}: epoch {epoch} has no samples "
                    f"({len(self.urls)} shards for {self.world_size} ranks x {self.num_roles} workers); "
                    "check data.shards or use fewer data.num_workers"
                )
            skip = 0
            epoch += 1
            self.counters["epochs_completed"] += 1
        # finite run: report the final counters (skips after the last batch) without a batch
        dropped = sum(len(v) for v in pending.values())
        self.counters["dropped_partial_batch"] += dropped
        yield {"__final__": True, "__state__": {"role": self.role, "epoch": epoch, "position": 0, "pending": [],
                                                "counters": dict(self.counters)}}


class ShardDataset(IterableDataset):
    """IterableDataset over RoleStreams: worker `w` plays role `(w + role_offset) % num_workers`."""

    def __init__(self, cfg: DataConfig, urls: List[str], rank: int, world_size: int,
                 role_states: Dict[int, Dict[str, Any]], role_offset: int, epochs: Optional[int],
                 expected_counts: Optional[Dict[str, int]] = None):
        super().__init__()
        self.expected_counts = expected_counts or {}
        self.cfg, self.urls, self.rank, self.world_size = cfg, urls, rank, world_size
        self.role_states, self.role_offset, self.epochs = role_states, role_offset, epochs

    def __iter__(self):
        info = get_worker_info()
        wid, num = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (wid + self.role_offset) % num
        stream = RoleStream(self.cfg, self.urls, self.rank, self.world_size, role, num,
                            self.role_states.get(role), self.epochs, self.expected_counts)
        return iter(stream)


__all__ = ["RoleStream", "ShardDataset", "COUNTERS", "fresh_role_state", "sample_meta", "sample_caption"]
