"""`build_loader(data_config, rank, world_size)`: the training loader, resumable to the exact sample.

Batches (every batch from one bucket):
  raw       {"video": float32 [b, 3, T, H, W] in [-1, 1], "caption": list[str], "key": list[str], "meta": list[dict]}
  latent    {"latents": [b, 16, T', H', W'], "text": [b, text_len, D] (zeros past each prompt),
             "text_lens": int64 [b], "caption", "key", "meta"}
  synthetic {"latents": randn [b, *synthetic_latent_shape], "text": [b, text_len, text_dim], "caption", "key"}

`rank` / `world_size` are the data-parallel rank and size (ranks of one TP/CP group must pass the same DP
rank). Workers of a `torch.utils.data.DataLoader` (any `data.num_workers`, 0 included) play fixed roles;
the DataLoader hands out their batches round-robin, so the loader's output order is a pure function of the
config, and `state_dict()` (per-role positions + the number of batches consumed) restores it exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import warnings
from typing import Any, Dict, Iterator, List, Optional

import torch

from data_pipeline.buckets import bucket_frames_message
from data_pipeline.config import DataConfig
from data_pipeline.decode import to_unit_range
from data_pipeline.shardlist import read_manifest, resolve_shards
from data_pipeline.stream import COUNTERS, ShardDataset, fresh_role_state
from data_pipeline.synthetic_loader import SyntheticLoader

STATE_VERSION = 1


class LoaderConfigError(ValueError):
    """The data config cannot work with these shards; the message names the field and the fix."""


def _check(cfg: DataConfig) -> None:
    errors = []
    cfg.validate(errors)
    if errors:
        raise LoaderConfigError("invalid data config:\n  - " + "\n  - ".join(errors))


class ShardLoader:
    """Iterable of batches over raw or latent shards (see module docstring)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, epochs: Optional[int] = None,
                 text_dim: Optional[int] = None, latent_channels: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise LoaderConfigError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        self.cfg, self.rank, self.world_size, self.epochs = cfg, rank, world_size, epochs
        self.urls = resolve_shards(cfg.shards)
        manifest = read_manifest(cfg.shards)
        self.expected_counts = {s["name"]: int(s["num_samples"]) for s in (manifest or {}).get("shards", [])
                                if "name" in s and "num_samples" in s}
        if manifest is not None:
            kind = manifest.get("kind", "raw")
            if kind != cfg.kind:
                raise LoaderConfigError(
                    f"data.kind={cfg.kind!r} but {cfg.shards} holds {kind} shards; set data.kind={kind}")
            if cfg.kind == "latent":
                _check_widths(manifest, cfg.shards, text_dim, latent_channels)
            if cfg.kind == "raw" and manifest.get("num_samples", 0) > 0 and "max_span_s" in manifest:
                msg = bucket_frames_message(cfg.buckets, cfg.fps, float(manifest["max_span_s"]), cfg.shards)
                if msg:
                    raise LoaderConfigError(msg)
        self.num_roles = max(1, cfg.num_workers)
        readers = world_size * self.num_roles
        if len(self.urls) < readers and rank == 0:
            warnings.warn(
                f"data.shards: {len(self.urls)} shard(s) for {readers} reader processes (DP {world_size} x "
                f"data.num_workers {cfg.num_workers}): every process reads every shard and keeps 1/{readers} of "
                "the samples; for large data write more, smaller shards (osp-shards --shard-size)", stacklevel=2)
        self._role_states: Dict[int, Dict[str, Any]] = {}
        self._consumed = 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        dataset = ShardDataset(self.cfg, self.urls, self.rank, self.world_size, dict(self._role_states),
                               self._consumed % self.num_roles, self.epochs, self.expected_counts)
        workers = self.cfg.num_workers
        kwargs = {"in_order": True} if "in_order" in inspect.signature(torch.utils.data.DataLoader).parameters else {}
        # in_order (the default): batches come back strictly round-robin over workers; exact resume relies on it
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers,
            prefetch_factor=2 if workers > 0 else None, persistent_workers=False, **kwargs,
        )
        for batch in loader:
            state = batch.pop("__state__")
            self._role_states[int(state["role"])] = state
            if batch.get("__final__"):  # end of a finite stream: counters only
                continue
            self._consumed += 1
            if "video" in batch:
                batch["video"] = to_unit_range(batch["video"])
            yield batch

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for u in self.urls:
            h.update(u.encode() + b"\0")
        return h.hexdigest()[:16]

    def _identity(self) -> Dict[str, Any]:
        c = self.cfg
        return {"kind": c.kind, "rank": self.rank, "world_size": self.world_size, "num_workers": c.num_workers,
                "seed": c.seed, "micro_batch_size": c.micro_batch_size, "shuffle_buffer": c.shuffle_buffer,
                "shard_shuffle": c.shard_shuffle, "shards": self._fingerprint(),
                "buckets": [dataclasses.astuple(b) for b in c.buckets], "fps": c.fps,
                "sample_window": c.sample_window}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue with the next unseen batch (JSON-serialisable)."""
        return {"version": STATE_VERSION, "consumed_batches": self._consumed, "identity": self._identity(),
                "roles": {str(k): v for k, v in sorted(self._role_states.items())}}

    TOPOLOGY_FIELDS = ("rank", "world_size", "num_workers")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly where `state` was taken.

        The data definition (shards, seed, buckets, fps, batch size, shuffle) must match, else a clear error.
        If only the topology changed (DP size, rank, data.num_workers), the exact order cannot carry over:
        the loader warns and restarts the saved epoch under the new split (see `load_resharded_state`).
        """
        if state.get("version") != STATE_VERSION:
            raise LoaderConfigError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        saved, now = state["identity"], self._identity()
        diffs = [k for k in now if _norm(saved.get(k)) != _norm(now[k])]
        hard = [k for k in diffs if k not in self.TOPOLOGY_FIELDS]
        if hard:
            parts = ", ".join(f"{k}: saved {saved.get(k)!r} now {now[k]!r}" for k in hard)
            raise LoaderConfigError(
                f"cannot resume the data loader: the data definition changed ({parts}). Use the saved data.* "
                "values, or start the data stream fresh (do not load the loader state)")
        if diffs:
            self.load_resharded_state([state])
            return
        self._consumed = int(state["consumed_batches"])
        self._role_states = {int(k): v for k, v in state["roles"].items()}

    def load_resharded_state(self, states: List[Dict[str, Any]]) -> None:
        """Resume from the states of a run with another DP size / worker count (one state per old DP rank).

        Positions inside an epoch do not map between splits, so the stream restarts at the beginning of the
        earliest epoch that some old rank had not finished: nothing is skipped; samples of that epoch that were
        already seen are seen once more. Skip counters carry over (summed).
        """
        epochs = [int(r["epoch"]) for st in states if st for r in st.get("roles", {}).values()]
        start = min(epochs) if epochs else 0
        warnings.warn(
            f"data loader rank {self.rank}: resuming with a different topology (DP size / data.num_workers); "
            f"exact resume is not possible, restarting epoch {start} under the new split", stacklevel=2)
        self._consumed = 0
        self._role_states = {}
        for role in range(self.num_roles):
            st = fresh_role_state(role)
            st["epoch"] = start
            self._role_states[role] = st

    def metrics(self) -> Dict[str, int]:
        """Counters summed over all workers (samples read/used, batches, skipped by reason, epochs)."""
        out = {k: 0 for k in COUNTERS}
        for st in self._role_states.values():
            for k, v in st["counters"].items():
                out[k] = out.get(k, 0) + int(v)
        out["skipped_total"] = sum(v for k, v in out.items() if k.startswith("skipped_"))
        # not a skip: samples of partly filled buckets when a finite (epochs=N) stream ends
        out["consumed_batches"] = self._consumed
        return out


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _check_widths(manifest: Dict[str, Any], shards: str, text_dim: Optional[int],
                  latent_channels: Optional[int]) -> None:
    """Latent shards must have been cached with the model's VAE channels and text width."""
    problems = []
    have_text, have_z = manifest.get("text_dim"), manifest.get("latent_channels")
    enc, vae = manifest.get("text_encoder", "?"), manifest.get("vae", "?")
    if text_dim is not None and have_text is not None and int(have_text) != int(text_dim):
        problems.append(f"text embeddings are {have_text} wide (osp-cache --text-encoder {enc}) but the model takes "
                        f"model.text_dim={text_dim}: re-cache with the model's umT5 (osp-cache --text-encoder / "
                        f"--pipeline), or set model.text_dim={have_text} to train on this cache")
    if latent_channels is not None and have_z is not None and int(have_z) != int(latent_channels):
        problems.append(f"latents have {have_z} channels (osp-cache --vae {vae}) but the model takes "
                        f"model.in_channels={latent_channels}: re-cache with the model's VAE, or set "
                        f"model.in_channels/out_channels={have_z}")
    if problems:
        raise LoaderConfigError(f"data.shards={shards}: " + "; ".join(problems))


def build_loader(data_config: DataConfig, rank: int = 0, world_size: int = 1, text_dim: Optional[int] = None,
                 epochs: Optional[int] = None, latent_channels: Optional[int] = None):
    """The loader for `data_config.kind` (raw | latent | synthetic); see the module docstring.

    `text_dim` is the text-embedding width of synthetic batches (default 4096) and, with `latent_channels`, what
    latent shards must have been cached with (checked against their manifest when given); `epochs=None` loops
    forever.
    """
    _check(data_config)
    if data_config.kind == "synthetic":
        return SyntheticLoader(data_config, rank, world_size, text_dim=text_dim or 4096, epochs=epochs)
    return ShardLoader(data_config, rank, world_size, epochs=epochs, text_dim=text_dim,
                       latent_channels=latent_channels)


__all__ = ["build_loader", "ShardLoader", "LoaderConfigError"]
