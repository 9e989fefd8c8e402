"""Input listing for `osp-shards`: a folder of videos (caption in `<stem>.txt`) or a CSV/JSONL manifest.

Every input becomes `{"path", "name", "caption", "extra"}`: `name` is the path relative to the folder or
manifest (the key is derived from it), `caption` is None when missing, `extra` holds further manifest columns.
Manifest rows also carry `line` (1-based, where the row starts).

An input that is unusable on its own gets `reject` (`"<category>: <reason>"`) instead of stopping the run;
`build_shards` writes it to rejects.jsonl like a failed probe:

  hidden_name       a folder entry whose name (or a folder above it) starts with '.'
  caption_not_utf8  the caption (.txt file or manifest field) is not UTF-8 text
  caption_unreadable the .txt caption exists but cannot be read
  bad_row           a manifest row with no / an empty / a non-string path, a non-string caption, more
                    fields than the CSV header, a line that is not JSON or not a JSON object
  duplicate         the same file as an earlier input (by device and inode, else by resolved path)

A manifest without any usable row (no `path` column / field at all, or every row bad) is a file-level
error (`InputError`), as is a missing or unreadable folder or manifest.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class InputError(ValueError):
    """The input folder or manifest is unusable; the message says what to fix."""


def _utf8_problem(text: str) -> Optional[str]:
    """None if `text` is valid Unicode (encodable as UTF-8), else where it is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"lone surrogate {ord(bad):#x}"
        return f"{byte} at character {exc.start}"
    return None


def _read_caption(path: Path) -> Tuple[Optional[str], Optional[str]]:
    """(caption or None, reject or None) of the `<stem>.txt` beside a video."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"caption_unreadable: {path.name}: {exc.strerror or exc}"
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return None, (f"caption_not_utf8: {path.name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                      f"{exc.start}); re-save it as UTF-8")
    return text or None, None


def list_folder(folder: str) -> List[Dict[str, Any]]:
    """Videos under `folder` (recursive, sorted by relative path); caption from `<stem>.txt` beside each."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            record: Dict[str, Any] = {"path": str(p), "name": str(rel), "caption": None, "extra": {}}
            hidden = next((part for part in rel.parts if part.startswith(".")), None)
            if hidden is not None:
                record["reject"] = (f"hidden_name: {hidden!r} starts with '.' (hidden entries, e.g. macOS '._*' "
                                    "files, are not read from folders); rename it, or list it in a CSV/JSONL "
                                    "manifest")
            else:
                record["caption"], reject = _read_caption(p.with_suffix(".txt"))
                if reject:
                    record["reject"] = reject
            out.append(record)
    out.sort(key=lambda r: r["name"])
    return out


def _bad_row(manifest: str, line: int, reason: str) -> Dict[str, Any]:
    return {"path": manifest, "name": f"{manifest}:{line}", "caption": None, "extra": {}, "line": line,
            "reject": f"bad_row: {manifest}:{line}: {reason}"}


def _from_row(row: Dict[Any, Any], base: Path, manifest: str, line: int) -> Dict[str, Any]:
    if None in row:  # csv.DictReader puts fields beyond the header under None
        return _bad_row(manifest, line, f"{len(row) - 1 + len(row[None])} fields but the header has {len(row) - 1}"
                                        "; quote fields that contain commas")
    rel = row.get("path")
    if not isinstance(rel, str):
        what = "no 'path' field" if rel is None else f"'path' must be a string, got {type(rel).__name__} {rel!r}"
        return _bad_row(manifest, line, what)
    if not rel.strip():
        return _bad_row(manifest, line, "empty 'path'")
    if "\0" in rel:
        return _bad_row(manifest, line, "'path' contains a NUL character")
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        return _bad_row(manifest, line, f"'caption' must be a string, got {type(caption).__name__} {caption!r}")
    p = Path(rel)
    full = p if p.is_absolute() else base / p
    record = {"path": str(full), "name": rel, "caption": (caption or "").strip() or None, "line": line,
              "extra": {k: v for k, v in row.items() if k not in ("path", "caption") and v not in (None, "")}}
    problem = _utf8_problem(record["caption"] or "")
    if problem:
        record["caption"] = None
        record["reject"] = f"caption_not_utf8: {manifest}:{line}: the caption is not UTF-8 text ({problem})"
    return record


def _csv_rows(f, manifest: str) -> Iterator[Tuple[int, Any]]:
    """(start line, row dict or an error string) for every CSV record."""
    reader = csv.DictReader(f)
    try:
        fields = reader.fieldnames
    except csv.Error as exc:
        raise InputError(f"--input {manifest}: the CSV header cannot be read ({exc})") from None
    if not fields or "path" not in fields:
        raise InputError(f"--input {manifest}: the CSV header needs a 'path' column (and 'caption')")
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, f"not a valid CSV record ({exc})"
            continue
        yield start, row


def _jsonl_rows(f) -> Iterator[Tuple[int, Any]]:
    for i, line in enumerate(f):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield i + 1, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(row, dict):
            yield i + 1, f"expected a JSON object with path, caption; got {type(row).__name__}"
            continue
        yield i + 1, row


def list_manifest(manifest: str) -> List[Dict[str, Any]]:
    """Rows of a `.csv` (header with `path`, `caption`, ...) or `.jsonl` manifest, in file order.

    Relative paths are resolved against the manifest's folder. Bytes that are not UTF-8 are kept in paths
    (as the file system's own bytes) and make a caption `caption_not_utf8`.
    """
    path = Path(manifest)
    base = path.parent
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"--input {manifest}: use a folder, a .csv or a .jsonl manifest")
    rows: List[Dict[str, Any]] = []
    try:
        with open(path, newline="" if suffix == ".csv" else None, encoding="utf-8-sig",
                  errors="surrogateescape") as f:
            for line, row in (_csv_rows(f, manifest) if suffix == ".csv" else _jsonl_rows(f)):
                rows.append(_bad_row(manifest, line, row) if isinstance(row, str) else
                            _from_row(row, base, manifest, line))
    except OSError as exc:
        raise InputError(f"--input {manifest}: cannot read ({exc.strerror})") from None
    if rows and all(r.get("reject", "").startswith("bad_row") for r in rows):
        if suffix != ".csv" and all("no 'path' field" in r["reject"] for r in rows):
            raise InputError(f"--input {manifest}: no row has a 'path' field; every row needs path (and caption)")
        raise InputError(f"--input {manifest}: none of its {len(rows)} rows is usable, e.g. "
                         + "; ".join(r["reject"][len("bad_row: "):] for r in rows[:3]))
    return rows


def _file_identity(path: str) -> Any:
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))


def mark_duplicates(records: List[Dict[str, Any]]) -> None:
    """Give every input that names the same file as an earlier usable input a `duplicate` reject."""
    first: Dict[Any, Dict[str, Any]] = {}
    for r in records:
        if r.get("reject"):
            continue
        ident = _file_identity(r["path"])
        if ident in first:
            earlier = first[ident]
            where = f"line {earlier['line']}" if "line" in earlier else repr(earlier["name"])
            at = f"line {r['line']}: " if "line" in r else ""
            r["reject"] = f"duplicate: {at}the same file as {where} ({earlier['path']}); it is used once"
        else:
            first[ident] = r


def list_inputs(source: str) -> List[Dict[str, Any]]:
    """Folder or manifest -> input records (raises InputError with a fix when unusable or empty)."""
    if not os.path.exists(source):
        raise InputError(f"--input {source}: does not exist; give a folder of videos or a .csv/.jsonl manifest")
    rows = list_folder(source) if os.path.isdir(source) else list_manifest(source)
    if not rows:
        raise InputError(f"--input {source}: no videos found (extensions {', '.join(VIDEO_EXTENSIONS)})")
    mark_duplicates(rows)
    if all(r.get("reject") for r in rows):
        raise InputError(f"--input {source}: none of its {len(rows)} videos can be used, e.g. "
                         + "; ".join(r["reject"] for r in rows[:3]))
    return rows


__all__ = ["InputError", "list_folder", "list_manifest", "list_inputs", "mark_duplicates", "VIDEO_EXTENSIONS"]
