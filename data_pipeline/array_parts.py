"""Split the inputs of a SLURM array job into parts and merge the parts' outputs (used by slurm/*.sbatch).

Part `i` of `K` is the contiguous slice `items[i*n//K : (i+1)*n//K]` of the sorted input list, so every
input belongs to exactly one part. Each array task writes `OUT/parts/part-IIIII/` (built in a temporary
folder and renamed when done), which makes a rerun skip finished parts and redo unfinished ones.
When every part is done, `merge` links all part shards into `OUT/shard-NNNNNN.tar` (relative symlinks,
numbered in part order) and writes `OUT/manifest.json` (summed counts) and `OUT/rejects.jsonl`.

    python -m data_pipeline.array_parts split --kind videos|shards --input SRC --part I --num-parts K --out FILE
    python -m data_pipeline.array_parts merge --out OUT --num-parts K [--source INPUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data_pipeline.inputs import list_inputs
from data_pipeline.sharding import reject_entry
from data_pipeline.shardlist import resolve_shards

SUMMED_KEYS = ("num_samples", "num_shards", "total_duration_s", "total_bytes", "num_rejected", "rejected")


class PartsError(ValueError):
    """Unusable part arguments or outputs; the message says what to fix."""


def part_dir(out: str, part: int) -> Path:
    return Path(out) / "parts" / f"part-{part:05d}"


def part_slice(n: int, part: int, num_parts: int) -> slice:
    """Contiguous, disjoint, covering slices of `range(n)` for parts 0..num_parts-1."""
    if num_parts < 1:
        raise PartsError(f"--num-parts {num_parts}: must be >= 1")
    if not 0 <= part < num_parts:
        raise PartsError(f"--part {part}: must be in [0, {num_parts}) (the array index; use --array=0-{num_parts - 1})")
    return slice(part * n // num_parts, (part + 1) * n // num_parts)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


INPUT_REJECTS = "input-rejects.jsonl"  # under OUT/parts: inputs refused while listing (hidden, bad row, duplicate)


def list_items(kind: str, source: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(usable input records, rejects.jsonl entries of the inputs refused while listing).

    videos: records `path`, `caption`, extra columns, listed once over the whole input (so duplicates across parts
    are found); shards: shard files (`path`)."""
    if kind == "videos":
        rows, rejects = [], []
        for r in list_inputs(source):
            if r.get("reject"):
                rejects.append(reject_entry(r, r["reject"]))
                continue
            row = {"path": os.path.abspath(r["path"])}
            if r.get("caption") is not None:
                row["caption"] = r["caption"]
            row.update(r.get("extra") or {})
            rows.append(row)
        return rows, rejects
    if kind == "shards":
        return [{"path": os.path.abspath(u)} for u in resolve_shards(source)], []
    raise PartsError(f"--kind {kind!r}: use videos or shards")


def split(kind: str, source: str, part: int, num_parts: int, out_file: str) -> List[Dict[str, Any]]:
    """Write part `part`'s records to `out_file` (.jsonl for videos, one path per line for shards), and the inputs
    refused while listing to `INPUT_REJECTS` beside it (the same file from every part; merge adds it)."""
    items, refused = list_items(kind, source)
    if num_parts > len(items):
        raise PartsError(f"--num-parts {num_parts} exceeds the {len(items)} inputs of {source} (usable ones); "
                         f"use at most --array=0-{len(items) - 1}")
    mine = items[part_slice(len(items), part, num_parts)]
    if kind == "videos":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mine)
    else:
        text = "".join(r["path"] + "\n" for r in mine)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(out_file), text)
    _atomic_write(Path(out_file).parent / INPUT_REJECTS,
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in refused))
    return mine


def _merge_counts(dst: Dict[str, Any], src: Dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _merge_counts(dst.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            dst[k] = dst.get(k, 0) + v


def merge(out: str, num_parts: int, source: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Link every part's shards into OUT and write the merged manifest; None if a part is unfinished."""
    out_path = Path(out)
    manifests = []
    for i in range(num_parts):
        m = part_dir(out, i) / "manifest.json"
        if not m.is_file():
            return None
        manifests.append(json.loads(m.read_text()))
    links: List[str] = []
    renamed: List[Dict[str, str]] = []  # per part: original shard name -> linked name in OUT
    for i in range(num_parts):
        names: Dict[str, str] = {}
        for shard in sorted(part_dir(out, i).glob("shard-*.tar")):
            name = f"shard-{len(links):06d}.tar"
            link = out_path / name
            tmp = out_path / f".{name}.tmp{os.getpid()}"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(os.path.relpath(shard, out_path), tmp)
            os.replace(tmp, link)
            links.append(name)
            names[shard.name] = name
        renamed.append(names)
    for stale in out_path.glob("shard-*.tar"):  # a previous merge with more shards
        if stale.name not in links and stale.is_symlink():
            stale.unlink()
    merged: Dict[str, Any] = {}
    shard_records: List[Any] = []
    for i, m in enumerate(manifests):
        for rec in m.get("shards") or []:
            if isinstance(rec, dict) and rec.get("name") in renamed[i]:
                rec = dict(rec, name=renamed[i][rec["name"]], part=i)
            elif isinstance(rec, str) and os.path.basename(rec) in renamed[i]:
                rec = renamed[i][os.path.basename(rec)]
            shard_records.append(rec)
        for k, v in m.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k == "shards":
                continue
            if k in SUMMED_KEYS and numeric:
                merged[k] = merged.get(k, 0) + v
            elif k.startswith(("min_", "max_")) and numeric and k in merged:
                merged[k] = (min if k.startswith("min_") else max)(merged[k], v)
            elif k.endswith("_stats") and isinstance(v, dict):
                _merge_counts(merged.setdefault(k, {}), v)
            elif k not in merged:
                merged[k] = v
    listing = out_path / "parts" / INPUT_REJECTS
    refused = [json.loads(line) for line in listing.read_text().splitlines()] if listing.is_file() else []
    stats = merged.get("filter_stats")
    if refused and isinstance(stats, dict):  # inputs refused while listing belong to no part: count them once here
        stats["inputs"] = stats.get("inputs", 0) + len(refused)
        stats["rejected"] = stats.get("rejected", 0) + len(refused)
        by_reason = stats.setdefault("by_reason", {})
        for r in refused:
            by_reason[r["category"]] = by_reason.get(r["category"], 0) + 1
        stats["by_reason"] = dict(sorted(by_reason.items()))
    merged["num_shards"] = len(links)
    merged["shards"] = shard_records
    merged["parts"] = num_parts
    if source is not None:
        merged["source"] = source
    _atomic_write(out_path / "manifest.json", json.dumps(merged, indent=2, sort_keys=True) + "\n")
    rejects = (listing.read_text() if listing.is_file() else "") + "".join(
        (part_dir(out, i) / "rejects.jsonl").read_text()
        for i in range(num_parts) if (part_dir(out, i) / "rejects.jsonl").is_file())
    _atomic_write(out_path / "rejects.jsonl", rejects)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.array_parts", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write one part's input list")
    s.add_argument("--kind", choices=["videos", "shards"], required=True)
    s.add_argument("--input", required=True, help="videos: folder or .csv/.jsonl manifest; shards: folder or pattern")
    s.add_argument("--part", type=int, required=True)
    s.add_argument("--num-parts", type=int, required=True)
    s.add_argument("--out", required=True, help="file to write the part's inputs to")
    m = sub.add_parser("merge", help="link finished parts into OUT (no-op until every part is done)")
    m.add_argument("--out", required=True)
    m.add_argument("--num-parts", type=int, required=True)
    m.add_argument("--source", help="the job's original input, recorded in the merged manifest")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            mine = split(args.kind, args.input, args.part, args.num_parts, args.out)
            print(f"array_parts: part {args.part}/{args.num_parts}: {len(mine)} inputs -> {args.out}")
        else:
            merged = merge(args.out, args.num_parts, args.source)
            if merged is None:
                print(f"array_parts: not every part of {args.out} is finished yet; nothing merged")
            else:
                print(f"array_parts: merged {args.num_parts} parts -> {merged['num_shards']} shards, "
                      f"{merged.get('num_samples', '?')} samples in {args.out}")
    except PartsError as exc:
        print(f"array_parts: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # InputError / ShardListError name the input and the fix
        print(f"array_parts: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
