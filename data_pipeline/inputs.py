"""Input listing for `osp-shards`: a folder of videos (caption in `<stem>.txt`) or a CSV/JSONL manifest.

Every input becomes `{"path", "name", "caption", "extra"}`: `name` is the path relative to the folder or
manifest (the key is derived from it), `caption` is None when missing, `extra` holds further manifest columns.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, List

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class InputError(ValueError):
    """The input folder or manifest is unusable; the message says what to fix."""


def _read_caption(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def list_folder(folder: str) -> List[Dict[str, Any]]:
    """Videos under `folder` (recursive, sorted by relative path); caption from `<stem>.txt` beside each."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(VIDEO_EXTENSIONS) or name.startswith("."):
                continue
            p = Path(dirpath) / name
            out.append({
                "path": str(p),
                "name": str(p.relative_to(root)),
                "caption": _read_caption(p.with_suffix(".txt")),
                "extra": {},
            })
    out.sort(key=lambda r: r["name"])
    return out


def _from_row(row: Dict[str, Any], base: Path, where: str) -> Dict[str, Any]:
    if "path" not in row or row["path"] in (None, ""):
        raise InputError(f"{where}: no 'path' field; every row needs path (and caption)")
    rel = str(row["path"])
    p = Path(rel)
    full = p if p.is_absolute() else base / p
    caption = row.get("caption")
    caption = str(caption).strip() if caption not in (None, "") else None
    extra = {k: v for k, v in row.items() if k not in ("path", "caption") and v not in (None, "")}
    return {"path": str(full), "name": rel, "caption": caption or None, "extra": extra}


def list_manifest(manifest: str) -> List[Dict[str, Any]]:
    """Rows of a `.csv` (header with `path`, `caption`, ...) or `.jsonl` manifest, in file order.

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(manifest)
    base = path.parent
    rows: List[Dict[str, Any]] = []
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise InputError(f"--input {manifest}: the CSV header needs a 'path' column (and 'caption')")
                for i, row in enumerate(reader):
                    rows.append(_from_row(row, base, f"{manifest}:{i + 2}"))
        elif suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"--input {manifest}:{i + 1}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise InputError(f"--input {manifest}:{i + 1}: expected a JSON object with path, caption")
                    rows.append(_from_row(row, base, f"{manifest}:{i + 1}"))
        else:
            raise InputError(f"--input {manifest}: use a folder, a .csv or a .jsonl manifest")
    except OSError as exc:
        raise InputError(f"--input {manifest}: cannot read ({exc.strerror})") from None
    return rows


def list_inputs(source: str) -> List[Dict[str, Any]]:
    """Folder or manifest -> input records (raises InputError with a fix when unusable or empty)."""
    if not os.path.exists(source):
        raise InputError(f"--input {source}: does not exist; give a folder of videos or a .csv/.jsonl manifest")
    rows = list_folder(source) if os.path.isdir(source) else list_manifest(source)
    if not rows:
        raise InputError(f"--input {source}: no videos found (extensions {', '.join(VIDEO_EXTENSIONS)})")
    return rows


__all__ = ["InputError", "list_folder", "list_manifest", "list_inputs", "VIDEO_EXTENSIONS"]
