"""videos -> size-bounded WebDataset shards (`osp-shards`), resumable.

Layout written under OUT:
  shard-NNNNNN.tar   members `<key>.mp4` (bytes), `<key>.json` (probe + manifest fields), `<key>.txt` (caption)
  manifest.json      num_samples, shards [{name, num_samples, bytes, duration_s}], totals, filter stats
  rejects.jsonl      one {"path", "reason", "category"} per skipped input (manifest rows also "line")
  .osp-shards/       run fingerprint and one commit record per finished shard (what makes a rerun resume)

OUT must be new, empty, or an earlier osp-shards output (it has `.osp-shards/`); anything else is refused
unless `overwrite=True`, which starts over: it removes this tool's own outputs there (shard-NNNNNN.tar,
manifest.json, rejects.jsonl, .osp-shards/) and leaves every other file alone. Only the temp names this
tool writes (`shard-NNNNNN.tar.tmp`, `manifest.json.tmp`, `rejects.jsonl.tmp`) are ever cleaned up.

Probing runs in worker processes (ordered results), writing happens in the main process in input order,
so the shards do not depend on the number of workers. A shard is written to `*.tar.tmp` and renamed when
complete; its commit record is written after the rename, so a rerun keeps every committed shard and
rewrites anything after it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from data_pipeline.filters import FilterConfig
from data_pipeline.keys import unique_key
from data_pipeline.probe import ProbeError, probe_video

STATE_DIR = ".osp-shards"
DEFAULT_SHARD_SIZE = 1 << 30
SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
OWN_TEMP = re.compile(r"^(shard-\d{6}\.tar|manifest\.json|rejects\.jsonl)\.tmp$")


class ShardOutputError(ValueError):
    """OUT holds a different run; the message says how to proceed."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_output(out_dir: str, overwrite: bool = False) -> Path:
    """Claim OUT for osp-shards (see the module docstring) and remove this tool's stale temp files.

    Raises ShardOutputError when OUT is a file, or non-empty and not an earlier osp-shards output while
    `overwrite` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ShardOutputError(f"--output {out_dir}: is a file; give a folder for the shards")
    state = out / STATE_DIR
    if out.is_dir() and not state.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found and not overwrite:
            if (out / "manifest.json").is_file() and any(SHARD_NAME.match(n) for n in found):
                what = "holds shards but not their .osp-shards/ state, so they cannot be resumed"
            else:
                what = "is not empty and is not an earlier osp-shards output (it has no .osp-shards/ folder)"
            shown = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
            raise ShardOutputError(
                f"--output {out_dir}: {what}; found: {shown}. Give a new or empty folder, or pass --overwrite "
                "to write there anyway (it replaces shard-NNNNNN.tar, manifest.json and rejects.jsonl and leaves "
                "every other file alone)")
    if overwrite and out.is_dir():
        for p in out.iterdir():
            if SHARD_NAME.match(p.name) or p.name in ("manifest.json", "rejects.jsonl") or OWN_TEMP.match(p.name):
                p.unlink()
        shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    for stale in [p for p in out.iterdir() if OWN_TEMP.match(p.name)] + list(state.glob("*.tmp")):
        stale.unlink()
    return out


def _probe_job(args: Tuple[int, Dict[str, Any], Dict[str, Any], str]
               ) -> Tuple[int, Optional[Dict[str, Any]], Optional[str]]:
    """Worker: (index, probe or None, reject reason or None)."""
    index, record, filt, decoder = args
    if record.get("reject"):  # unusable on its own (listing: hidden name, bad row, duplicate, bad caption)
        return index, None, record["reject"]
    flt = FilterConfig(**filt)
    if flt.require_caption and not record.get("caption"):
        where = "fill its caption field" if "line" in record else "put it in <stem>.txt beside the video"
        return index, None, f"missing_caption: no caption ({where}, or set require_caption: false)"
    try:
        info = probe_video(record["path"], decoder)
    except ProbeError as exc:
        return index, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - never crash the run on one file
        return index, None, f"probe_failed: {type(exc).__name__}: {exc}"
    reason = flt.reject_reason(info)
    return index, (None if reason else info), reason


class _ShardSink:
    """One shard being written to `<name>.tmp`; `commit()` renames it and returns its summary."""

    def __init__(self, out: Path, index: int):
        import webdataset as wds

        self.name = f"shard-{index:06d}.tar"
        self.final = out / self.name
        self.tmp = out / (self.name + ".tmp")
        self.stream = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.stream, mtime=0.0)
        self.num_samples = 0
        self.bytes = 0
        self.duration = 0.0
        self.keys: List[str] = []

    def write(self, key: str, video: bytes, meta: Dict[str, Any], caption: str) -> None:
        self.writer.write({"__key__": key, "mp4": video, "json": meta, "txt": caption})
        self.num_samples += 1
        self.bytes += len(video)
        self.duration += float(meta["duration"])
        self.keys.append(key)

    def commit(self) -> Dict[str, Any]:
        self.writer.close()  # closes the stream too
        os.replace(self.tmp, self.final)
        return {"name": self.name, "num_samples": self.num_samples, "bytes": self.final.stat().st_size,
                "video_bytes": self.bytes, "duration_s": round(self.duration, 6)}


def _fingerprint(inputs: List[Dict[str, Any]], flt: FilterConfig, shard_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"filter": dataclasses.asdict(flt), "shard_size": shard_size}, sort_keys=True).encode())
    for r in inputs:
        fields = [r["path"], r["name"], r["caption"], r["extra"]] + ([r["reject"]] if r.get("reject") else [])
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _load_commits(state: Path) -> List[Dict[str, Any]]:
    commits = []
    while True:
        p = state / f"commit-{len(commits):06d}.json"
        if not p.exists():
            return commits
        try:
            commits.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            return commits  # a torn record: redo from here


def _ordered_probes(jobs: List[Tuple[int, Dict[str, Any], Dict[str, Any]]], workers: int) -> Iterable:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _probe_job(job)
        return
    from multiprocessing import get_context

    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_probe_job, jobs, chunksize=4)


def build_shards(inputs: List[Dict[str, Any]], out_dir: str, flt: Optional[FilterConfig] = None,
                 workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                 source: str = "", decoder: str = "auto", overwrite: bool = False) -> Dict[str, Any]:
    """Probe (with `decoder`), filter and pack `inputs` into shards under `out_dir`; returns the manifest dict.

    `overwrite`: start over in a folder that is not empty or holds another run (see `prepare_output`).
    """
    flt = flt or FilterConfig()
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be a positive number of bytes")
    out = prepare_output(out_dir, overwrite)
    state = out / STATE_DIR
    fingerprint = _fingerprint(inputs, flt, shard_size)
    run_file = state / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise ShardOutputError(
                f"--output {out_dir}: holds shards from a different input list, filter config or --shard-size; "
                "use a new --output folder, or pass --overwrite to start over in this one"
            )
    else:
        atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint, "num_inputs": len(inputs)}))

    commits = _load_commits(state)
    start = commits[-1]["input_end"] if commits else 0
    used_keys = {k for c in commits for k in c["keys"]}
    filt = dataclasses.asdict(flt)
    jobs = [(i, inputs[i], filt, decoder) for i in range(start, len(inputs))]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), initial=start, desc="osp-shards", unit="clip", file=sys.stderr)

    sink: Optional[_ShardSink] = None
    rejects: List[Dict[str, Any]] = []
    samples: List[Dict[str, Any]] = []

    def commit(input_end: int) -> None:
        nonlocal sink, rejects, samples
        shard = sink.commit() if sink is not None else None
        record = {"input_end": input_end, "shard": shard, "keys": sink.keys if sink else [],
                  "samples": samples, "rejects": rejects}
        atomic_write_text(state / f"commit-{len(commits):06d}.json", json.dumps(record))
        commits.append(record)
        sink, rejects, samples = None, [], []

    num_shards = sum(1 for c in commits if c["shard"])
    try:
        for index, info, reason in _ordered_probes(jobs, workers):
            record = inputs[index]
            if bar is not None:
                bar.update(1)
            if info is None:
                rejects.append(reject_entry(record, reason))
                continue
            try:
                with open(record["path"], "rb") as f:
                    video = f.read()
            except OSError as exc:
                rejects.append(reject_entry(record, f"unreadable: {exc.strerror}"))
                continue
            if sink is not None and sink.num_samples > 0 and sink.bytes + len(video) > shard_size:
                commit(index)
            if sink is None:
                sink = _ShardSink(out, num_shards)
                num_shards += 1
            key = unique_key(record["name"], used_keys)
            meta = dict(record["extra"])
            meta.update(info)
            meta.update({"key": key, "source": record["name"], "caption": record["caption"] or ""})
            sink.write(key, video, meta, record["caption"] or "")
            samples.append({"key": key, "duration": info["duration"], "frames": info["frames"],
                            "fps": info["fps"], "width": info["width"], "height": info["height"]})
        if sink is not None or rejects or not commits or commits[-1]["input_end"] < len(inputs):
            commit(len(inputs))
    finally:
        if bar is not None:
            bar.close()
        if sink is not None and sink.tmp.exists():  # interrupted mid-shard: never leave it half-named
            try:
                sink.writer.close()
            except Exception:  # noqa: BLE001
                pass
            sink.tmp.unlink(missing_ok=True)

    return _write_outputs(out, commits, flt, source or "", len(inputs))


def reject_entry(record: Dict[str, Any], reason: str) -> Dict[str, Any]:
    """A rejects.jsonl entry: path, reason, category (the reason's first word), line for manifest rows."""
    entry = {"path": record["path"], "reason": reason, "category": reason.split(":", 1)[0]}
    if "line" in record:
        entry["line"] = record["line"]
    return entry


def _write_outputs(out: Path, commits: List[Dict[str, Any]], flt: FilterConfig, source: str,
                   num_inputs: int) -> Dict[str, Any]:
    shards = [c["shard"] for c in commits if c["shard"]]
    samples = [s for c in commits for s in c["samples"]]
    rejects = [r for c in commits for r in c["rejects"]]
    by_reason: Dict[str, int] = {}
    for r in rejects:
        by_reason[r["category"]] = by_reason.get(r["category"], 0) + 1
    durations = [s["duration"] for s in samples]
    manifest = {
        "format": "osp-shards/raw-v1",
        "kind": "raw",
        "source": source,
        "num_samples": len(samples),
        "num_shards": len(shards),
        "shards": shards,
        "total_duration_s": round(sum(durations), 6),
        "min_duration_s": min(durations) if durations else 0.0,
        "max_duration_s": max(durations) if durations else 0.0,
        "max_frames": max((s["frames"] for s in samples), default=0),
        "max_span_s": max(((s["frames"] - 1) / s["fps"] for s in samples), default=0.0),
        "filter": dataclasses.asdict(flt),
        "filter_stats": {"inputs": num_inputs, "accepted": len(samples), "rejected": len(rejects),
                         "by_reason": dict(sorted(by_reason.items()))},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    buf = io.StringIO()
    for r in rejects:
        buf.write(json.dumps(r) + "\n")
    atomic_write_text(out / "rejects.jsonl", buf.getvalue())
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["build_shards", "prepare_output", "ShardOutputError", "atomic_write_text", "DEFAULT_SHARD_SIZE"]
