"""raw shards -> latent shards (`osp-cache`): Wan VAE latents + umT5 embeddings, one output shard per input.

Output members per sample: `<key>.latents.pth` (normalised latents [16, T', H', W']), `<key>.text.pth`
(text embedding [n_tokens, D], the loader zero-pads it to `text_len`), `<key>.json` (source metadata plus
latent shape, `latents_mean`/`latents_std`, encoder specs, frame indices), `<key>.txt` (caption).

Ranks (`RANK`/`WORLD_SIZE`, as set by torchrun) take disjoint input shards `shards[rank::world]`. A shard
is written to `*.tmp` and renamed; its stats file in `.osp-cache/` marks it done, so reruns skip it. The
rank that finishes last (all stats present) writes `manifest.json` and `rejects.jsonl`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data_pipeline.config import (DECODERS, DEFAULT_MAX_FRAME_PIXELS, BucketSpec, bucket_problems, is_finite_number,
                                   is_int)
from data_pipeline.decode import SkipSample, decode_clip, decoder_unavailable, to_unit_range
from data_pipeline.keys import unique_key
from data_pipeline.sharding import atomic_write_text
from data_pipeline.shardlist import resolve_shards
from data_pipeline.stream import VIDEO_EXTS, sample_caption, sample_meta

STATE_DIR = ".osp-cache"


@dataclass
class CacheConfig:
    """What `osp-cache` encodes and how."""

    input: str
    output: str
    vae: str = ""  # a Wan VAE folder / pipeline folder, or "tiny" (the random demo stand-in); required
    text_encoder: str = ""  # a umT5 folder / pipeline folder, or "tiny"; required
    tokenizer: Optional[str] = None
    buckets: List[BucketSpec] = field(default_factory=lambda: [BucketSpec()])
    fps: float = 16.0
    sample_window: str = "center"
    seed: int = 0
    text_len: int = 512
    text_dim: Optional[int] = None  # tiny text encoder width
    device: str = "auto"
    dtype: str = "float32"  # encoder compute dtype
    save_dtype: str = "float32"  # stored latents / embeddings
    workers: int = 2  # decode processes feeding the encoders
    decoder: str = "auto"  # auto | decord | torchcodec | pyav
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS

    def validate(self, errors: List[str], prefix: str = "osp-cache") -> None:
        for name in ("dtype", "save_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                errors.append(f"{prefix} --{name.replace('_', '-')}={getattr(self, name)!r}: use float32, bfloat16 "
                              "or float16")
        if self.sample_window not in ("center", "random"):
            errors.append(f"{prefix} --sample-window={self.sample_window!r}: use center or random")
        if not is_finite_number(self.fps) or self.fps <= 0:
            errors.append(f"{prefix} --fps={self.fps}: must be a finite number > 0")
        if self.text_len < 1:
            errors.append(f"{prefix} --text-len={self.text_len}: must be >= 1")
        if not self.buckets:
            errors.append(f"{prefix} --buckets: give at least one FRAMESxHEIGHTxWIDTH")
        pixels_ok = is_int(self.max_frame_pixels) and self.max_frame_pixels >= 1
        if not pixels_ok:
            errors.append(f"{prefix} --max-frame-pixels={self.max_frame_pixels}: must be an integer >= 1")
        for b in self.buckets:
            problems = bucket_problems(b)
            for name, _, problem in problems:
                errors.append(f"{prefix} --buckets {b.frames}x{b.height}x{b.width}: {name} {problem}")
            if not problems and pixels_ok and b.height * b.width > self.max_frame_pixels:
                errors.append(f"{prefix} --buckets {b.frames}x{b.height}x{b.width}: more pixels per frame than "
                              f"--max-frame-pixels={self.max_frame_pixels}")
        if self.decoder not in DECODERS:
            errors.append(f"{prefix} --decoder={self.decoder!r}: use one of {', '.join(DECODERS)}")
        elif decoder_unavailable(self.decoder):
            errors.append(f"{prefix} --decoder={self.decoder}: {decoder_unavailable(self.decoder)}")
        if self.workers < 0:
            errors.append(f"{prefix} --workers={self.workers}: must be >= 0 (0 = decode in the main process)")
        for name, flag in (("vae", "--vae"), ("text_encoder", "--text-encoder")):
            if not getattr(self, name):
                errors.append(f"{prefix} {flag} is required: give the encoder the model trains with (a Wan2.1 "
                              f"diffusers pipeline folder, or --pipeline for both), or {flag} tiny for the random "
                              "demo stand-in")
        if self.text_dim is not None and self.text_encoder != "tiny":
            errors.append(f"{prefix} --text-dim is only for --text-encoder tiny (a real encoder has its own width)")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous().clone(), buf)  # clone: never save a view's whole storage
    return buf.getvalue()


class LatentCacher:
    """Encodes the input shards owned by one rank."""

    def __init__(self, cfg: CacheConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        errors: List[str] = []
        cfg.validate(errors)
        if errors:
            raise ValueError("invalid osp-cache arguments:\n  - " + "\n  - ".join(errors))
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.urls = resolve_shards(cfg.input)
        self.mine = self.urls[rank::world_size]
        self.out = Path(cfg.output)
        self.state = self.out / STATE_DIR
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.vae = self.text = None

    def _load_encoders(self) -> None:
        from osp_megatron.encoders import load_text_encoder, load_vae

        dt = _dtype(self.cfg.dtype)
        self.vae = load_vae(self.cfg.vae, self.device, dt)
        self.text = load_text_encoder(self.cfg.text_encoder, self.device, dt, self.cfg.text_len,
                                      text_dim=self.cfg.text_dim, tokenizer=self.cfg.tokenizer)

    def _done(self, name: str) -> bool:
        return (self.out / name).exists() and (self.state / f"{name}.json").exists()

    def run(self, progress: bool = True) -> Dict[str, Any]:
        """Encode this rank's shards; returns {"shards_done", "shards_skipped", "samples", "rejected"}."""
        self.state.mkdir(parents=True, exist_ok=True)
        todo = [u for u in self.mine if not self._done(os.path.basename(u))]
        summary = {"shards_done": 0, "shards_skipped": len(self.mine) - len(todo), "samples": 0, "rejected": 0}
        if todo:
            self._load_encoders()
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"osp-cache rank {self.rank}", unit="shard", file=sys.stderr)
        for url in todo:
            stats = self.encode_shard(url)
            summary["shards_done"] += 1
            summary["samples"] += stats["num_samples"]
            summary["rejected"] += len(stats["rejects"])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.maybe_write_manifest()
        return summary

    def encode_sample(self, item: Dict[str, Any]) -> Dict[str, Any]:
        """A decoded item (from `decode_for_cache`) -> the latent sample's tar members."""
        video, caption, meta, info = item["video"], item["caption"], dict(item["meta"]), item["info"]
        latents = self.vae.encode(to_unit_range(video[None]))[0]
        text, lengths = self.text.encode([caption], return_lengths=True)
        n = int(lengths[0])
        sd = _dtype(self.cfg.save_dtype)
        b = self.cfg.buckets[info["bucket"]]
        meta.update({
            "key": item["key"], "caption": caption, "latent_shape": list(latents.shape),
            "latent_dtype": self.cfg.save_dtype, "latent_normalized": True, "latents_mean": self.vae.latents_mean,
            "latents_std": self.vae.latents_std, "vae": self.cfg.vae, "text_encoder": self.cfg.text_encoder,
            "text_tokens": n, "text_dim": int(text.shape[-1]), "text_len": self.cfg.text_len, "frames": b.frames,
            "height": b.height, "width": b.width, "sample_fps": self.cfg.fps, "frame_indices": info["frame_indices"],
            "src_frames": info["src_frames"], "src_fps": info["src_fps"], "src_size": info["src_size"],
        })
        return {"__key__": item["key"], "latents.pth": _tensor_bytes(latents.to(sd)),
                "text.pth": _tensor_bytes(text[0, :n].to(sd)), "json": meta, "txt": caption}

    def encode_shard(self, url: str) -> Dict[str, Any]:
        """Decode (in `workers` DataLoader processes) and encode (here, on the device) one shard."""
        import webdataset as wds

        name = os.path.basename(url)
        rejects: List[Dict[str, Any]] = []
        workers = self.cfg.workers
        items = torch.utils.data.DataLoader(
            _ShardDecoder(url, self.cfg), batch_size=None, num_workers=workers,
            prefetch_factor=2 if workers > 0 else None)
        tmp = self.out / f"{name}.tmp"
        count = 0
        used: set = set()
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0)
            for item in items:
                if not item["ok"]:
                    rejects.append({"path": url, "key": item["key"], "reason": item["reason"],
                                    "category": item["category"]})
                    continue
                # member names come from a foreign tar: keep them safe (no '/', '..', NUL) and unique
                key = unique_key(item["key"], used)
                if key != item["key"]:
                    item = {**item, "key": key, "meta": {**item["meta"], "source_key": item["key"]}}
                try:
                    writer.write(self.encode_sample(item))
                    count += 1
                except Exception as exc:  # noqa: BLE001 - skip, count, name it in rejects
                    rejects.append({"path": url, "key": item["key"], "reason": str(exc)[:300],
                                    "category": "encode_error"})
            writer.close()
        os.replace(tmp, self.out / name)
        stats = {"name": name, "source": url, "num_samples": count, "bytes": (self.out / name).stat().st_size,
                 "rejects": rejects, "rank": self.rank, "latent_channels": self.vae.z_dim, "text_dim": self.text.dim}
        atomic_write_text(self.state / f"{name}.json", json.dumps(stats))
        return stats

    def maybe_write_manifest(self) -> Optional[Dict[str, Any]]:
        """Write manifest.json + rejects.jsonl once every input shard has been encoded (by any rank)."""
        names = [os.path.basename(u) for u in self.urls]
        if not all(self._done(n) for n in names):
            return None
        stats = [json.loads((self.state / f"{n}.json").read_text()) for n in names]
        rejects = [r for s in stats for r in s["rejects"]]
        if self.vae is None:
            from osp_megatron.encoders.vae import load_vae

            self.vae = load_vae(self.cfg.vae, "cpu") if self.cfg.vae == "tiny" else None
        manifest = {
            "format": "osp-cache/latent-v1",
            "kind": "latent",
            "source": self.cfg.input,
            "num_samples": sum(s["num_samples"] for s in stats),
            "num_shards": len(stats),
            "shards": [{"name": s["name"], "num_samples": s["num_samples"], "bytes": s["bytes"]} for s in stats],
            "latent_normalized": True,
            "latents_mean": self.vae.latents_mean if self.vae else None,
            "latents_std": self.vae.latents_std if self.vae else None,
            "vae": self.cfg.vae,
            "text_encoder": self.cfg.text_encoder,
            "text_len": self.cfg.text_len,
            # the widths the model must take (None: shards from before these fields)
            "latent_channels": next((s["latent_channels"] for s in stats if "latent_channels" in s), None),
            "text_dim": next((s["text_dim"] for s in stats if "text_dim" in s), None),
            "save_dtype": self.cfg.save_dtype,
            "buckets": [dataclasses.asdict(b) for b in self.cfg.buckets],
            "fps": self.cfg.fps,
            "sample_window": self.cfg.sample_window,
            "rejected": len(rejects),
            "world_size": self.world_size,
        }
        if manifest["latents_mean"] is None:  # a real VAE that this rank did not load: read its config
            cfg_path = next((p for p in (Path(self.cfg.vae) / "config.json", Path(self.cfg.vae) / "vae" / "config.json")
                             if p.is_file()), None)
            if cfg_path is not None:
                vcfg = json.loads(cfg_path.read_text())
                manifest["latents_mean"], manifest["latents_std"] = vcfg.get("latents_mean"), vcfg.get("latents_std")
        tag = f".rank{self.rank}"
        buf = "".join(json.dumps(r) + "\n" for r in rejects)
        _atomic(self.out / "rejects.jsonl", buf, tag)
        _atomic(self.out / "manifest.json", json.dumps(manifest, indent=2) + "\n", tag)
        return manifest


def decode_for_cache(raw: Dict[str, Any], cfg: CacheConfig) -> Dict[str, Any]:
    """One raw sample -> {"ok", "key", "video" uint8 [3,T,H,W], "caption", "meta", "info"} or a failure record."""
    key = raw.get("__key__", "?")
    try:
        meta = sample_meta(raw)
        caption = sample_caption(raw, meta)
        data = next((raw[e] for e in VIDEO_EXTS if e in raw), None)
        if data is None:
            raise SkipSample("missing_field", "no video member")
        rng = random.Random(f"osp-cache/{cfg.seed}/{key}")
        video, _, info = decode_clip(data, cfg.buckets, cfg.fps, cfg.sample_window, rng, meta, cfg.decoder,
                                     cfg.max_frame_pixels)
        return {"ok": True, "key": key, "video": video, "caption": caption, "meta": meta, "info": info}
    except Exception as exc:  # noqa: BLE001 - becomes a reject
        category = exc.category if isinstance(exc, SkipSample) else "decode_error"
        return {"ok": False, "key": key, "reason": str(exc)[:300], "category": category}


class _ShardDecoder(torch.utils.data.IterableDataset):
    """Decoded items of one shard in tar order: worker w of n decodes samples i with i % n == w, and the
    DataLoader's round-robin hands them back in order. Tar read errors are reported once, by worker 0."""

    def __init__(self, url: str, cfg: CacheConfig):
        super().__init__()
        self.url, self.cfg = url, cfg

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        errors: List[str] = []

        def on_error(exn: BaseException) -> bool:
            errors.append(f"read_error: {type(exn).__name__}: {str(exn)[:200]}")
            return True

        for i, raw in enumerate(wds.tarfile_to_samples(handler=on_error)(iter([{"url": self.url}]))):
            if i % n == wid:
                yield decode_for_cache(raw, self.cfg)
        if wid == 0:
            for e in errors:
                yield {"ok": False, "key": None, "reason": e, "category": "read_error"}


def _atomic(path: Path, text: str, tag: str) -> None:
    """Atomic write with a per-rank temp name (several ranks may write the same final content)."""
    tmp = path.with_name(path.name + tag + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_buckets(text: str) -> List[BucketSpec]:
    """`17x64x64,33x96x128` (FRAMESxHEIGHTxWIDTH, comma separated) -> buckets."""
    out = []
    for part in [p for p in text.split(",") if p.strip()]:
        try:
            f, h, w = (int(x) for x in part.lower().strip().split("x"))
        except ValueError:
            raise ValueError(f"--buckets {part!r}: use FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
        out.append(BucketSpec(frames=f, height=h, width=w))
    return out


__all__ = ["CacheConfig", "LatentCacher", "parse_buckets"]
