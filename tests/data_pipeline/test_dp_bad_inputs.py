"""osp-shards on bad input: every unusable input gets a rejects.jsonl entry, nothing is dropped or doubled
silently, one bad manifest row never stops the run, and --output touches only this tool's own files."""
import json
import os
import shutil

import pytest

from osp_megatron.cli.shards import main as shards_main
from data_pipeline.inputs import InputError, list_inputs
from dp_helpers import read_json


def _run(src, out, *extra):
    return shards_main(["--input", str(src), "--output", str(out), "--workers", "1", "--no-progress", *extra])


def _rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def _clip(clips_dir, i, dst, caption="a clip"):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(clips_dir / f"clip-{i:06d}.mp4", dst)
    if caption is not None:
        (dst.parent / (dst.name[: -len(".mp4")] + ".txt")).write_text(caption)
    return dst


def test_hidden_names_are_rejected_by_name_not_dropped(clips_dir, tmp_path):
    src = tmp_path / "in"
    _clip(clips_dir, 0, src / "visible.mp4")
    for i, rel in enumerate([".hidden.mp4", "..mp4", "sub/..;rm -rf ~;.mp4", ".cache/inside.mp4"]):
        _clip(clips_dir, i + 1, src / rel)
    out = tmp_path / "out"
    assert _run(src, out) == 0
    rejects = _rejects(out)
    assert sorted(os.path.relpath(r["path"], src) for r in rejects) == sorted(
        [".hidden.mp4", "..mp4", "sub/..;rm -rf ~;.mp4", ".cache/inside.mp4"])
    assert {r["category"] for r in rejects} == {"hidden_name"}
    assert all("starts with '.'" in r["reason"] and "manifest" in r["reason"] for r in rejects)
    m = read_json(out / "manifest.json")
    assert m["num_samples"] == 1
    assert m["filter_stats"] == {"inputs": 5, "accepted": 1, "rejected": 4, "by_reason": {"hidden_name": 4}}
    # listed explicitly in a manifest, a hidden name is a normal input
    jsonl = src / "m.jsonl"
    jsonl.write_text(json.dumps({"path": ".hidden.mp4", "caption": "hidden but listed"}) + "\n")
    assert _run(jsonl, tmp_path / "out2") == 0
    assert read_json(tmp_path / "out2" / "manifest.json")["num_samples"] == 1


def test_duplicate_rows_are_accepted_once(clips_dir, tmp_path):
    data = tmp_path / "data"
    a = _clip(clips_dir, 0, data / "a.mp4", caption=None)
    _clip(clips_dir, 1, data / "b.mp4", caption=None)
    os.symlink(a, data / "link-to-a.mp4")
    spellings = ["a.mp4", str(a), "./a.mp4", "sub/../a.mp4", "link-to-a.mp4", "b.mp4"]
    (data / "sub").mkdir()
    jsonl = data / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "caption": f"c{i}"}) + "\n" for i, p in enumerate(spellings)))
    csv = data / "m.csv"
    csv.write_text("path,caption\n" + "".join(f"{p},c{i}\n" for i, p in enumerate(spellings)))
    for manifest in (jsonl, csv):
        out = tmp_path / f"out-{manifest.suffix[1:]}"
        assert _run(manifest, out) == 0
        rejects = _rejects(out)
        first_line = 1 if manifest.suffix == ".jsonl" else 2
        assert [(r["category"], r["line"]) for r in rejects] == [("duplicate", first_line + i) for i in range(1, 5)]
        assert all(f"the same file as line {first_line}" in r["reason"] for r in rejects)
        m = read_json(out / "manifest.json")
        assert m["num_samples"] == 2 and m["filter_stats"]["by_reason"] == {"duplicate": 4}
    # a folder with a symlink to one of its videos: the link is the duplicate
    src = tmp_path / "folder"
    _clip(clips_dir, 0, src / "a.mp4")
    os.symlink(src / "a.mp4", src / "b.mp4")
    (src / "b.txt").write_text("the same clip again")
    assert _run(src, tmp_path / "out-folder") == 0
    assert [(os.path.basename(r["path"]), r["category"]) for r in _rejects(tmp_path / "out-folder")] == [
        ("b.mp4", "duplicate")]


def test_one_bad_manifest_row_is_rejected_alone(clips_dir, tmp_path):
    data = tmp_path / "data"
    _clip(clips_dir, 0, data / "a.mp4", caption=None)
    _clip(clips_dir, 1, data / "b.mp4", caption=None)
    lines = [
        json.dumps({"path": "a.mp4", "caption": "first"}),
        json.dumps({"path": "", "caption": "empty path"}),
        json.dumps(["a.mp4", "a list, not an object"]),
        json.dumps({"path": 123, "caption": "numeric path"}),
        "{not json",
        json.dumps({"caption": "no path"}),
        json.dumps({"path": "b.mp4", "caption": 5}),
        "",  # blank lines are skipped, not rows
        json.dumps({"path": "b.mp4", "caption": "last"}),
    ]
    jsonl = data / "m.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert _run(jsonl, out) == 0
    rejects = _rejects(out)
    assert [(r["line"], r["category"]) for r in rejects] == [(n, "bad_row") for n in (2, 3, 4, 5, 6, 7)]
    reasons = [r["reason"] for r in rejects]
    assert all(f"m.jsonl:{n}:" in why for n, why in zip((2, 3, 4, 5, 6, 7), reasons))
    assert "empty 'path'" in reasons[0] and "got list" in reasons[1] and "got int 123" in reasons[2]
    assert "not valid JSON" in reasons[3] and "no 'path' field" in reasons[4]
    assert "'caption' must be a string" in reasons[5]
    assert read_json(out / "manifest.json")["num_samples"] == 2

    csv = data / "m.csv"
    csv.write_text('path,caption\na.mp4,first\n,empty path\nb.mp4,"too, many",fields\n"b.mp4","a caption\n'
                   'over two lines"\na\0.mp4,a NUL in the path\n')
    out = tmp_path / "out-csv"
    assert _run(csv, out) == 0
    assert [(r["line"], r["category"]) for r in _rejects(out)] == [(3, "bad_row"), (4, "bad_row"), (7, "bad_row")]
    assert "3 fields but the header has 2" in _rejects(out)[1]["reason"]
    assert read_json(out / "manifest.json")["num_samples"] == 2

    # file-level problems still refuse the run, naming the file
    nopath = data / "nopath.jsonl"
    nopath.write_text(json.dumps({"file": "a.mp4", "caption": "x"}) + "\n")
    with pytest.raises(InputError, match="no row has a 'path' field"):
        list_inputs(str(nopath))
    allbad = data / "allbad.jsonl"
    allbad.write_text("[1]\n{oops\n")
    with pytest.raises(InputError, match="none of its 2 rows is usable"):
        list_inputs(str(allbad))
    assert _run(nopath, tmp_path / "o3") == 2


def test_non_utf8_captions_are_named_as_such(clips_dir, tmp_path):
    src = tmp_path / "in"
    _clip(clips_dir, 0, src / "good.mp4")
    _clip(clips_dir, 1, src / "latin1.mp4", caption=None)
    (src / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    _clip(clips_dir, 2, src / "nocap.mp4", caption=None)
    _clip(clips_dir, 3, src / "capdir.mp4", caption=None)
    (src / "capdir.txt").mkdir()  # a caption that exists but cannot be read
    out = tmp_path / "out"
    assert _run(src, out) == 0
    by_name = {os.path.basename(r["path"]): r for r in _rejects(out)}
    assert by_name["capdir.mp4"]["category"] == "caption_unreadable"
    assert by_name["latin1.mp4"]["category"] == "caption_not_utf8"
    assert "byte 0xe9 at offset 3" in by_name["latin1.mp4"]["reason"]
    assert by_name["nocap.mp4"]["category"] == "missing_caption"

    # manifests: a non-UTF-8 caption byte rejects its row; a non-UTF-8 file name is a valid path
    data = tmp_path / "data"
    _clip(clips_dir, 3, data / "ok.mp4", caption=None)
    odd = os.path.join(os.fsencode(data), b"caf\xe9.mp4")
    shutil.copy(clips_dir / "clip-000004.mp4", odd)
    csv = data / "m.csv"
    csv.write_bytes(b"path,caption\nok.mp4,caf\xe9\ncaf\xe9.mp4,a file name in latin-1\n")
    jsonl = data / "m.jsonl"
    jsonl.write_bytes(b'{"path": "ok.mp4", "caption": "caf\xe9"}\n{"path": "caf\xe9.mp4", "caption": "fine"}\n'
                      b'{"path": "ok.mp4", "caption": "\\ud800 lone surrogate"}\n')
    for manifest, lines in ((csv, [2]), (jsonl, [1, 3])):
        out = tmp_path / f"out-{manifest.suffix[1:]}"
        assert _run(manifest, out) == 0
        rejects = _rejects(out)
        assert [(r["line"], r["category"]) for r in rejects] == [(n, "caption_not_utf8") for n in lines]
        assert read_json(out / "manifest.json")["num_samples"] == 1


def test_output_folder_only_its_own_files_are_touched(clips_dir, tmp_path):
    src = tmp_path / "in"
    _clip(clips_dir, 0, src / "a.mp4")
    _clip(clips_dir, 1, src / "b.mp4")
    # a non-empty folder that is not an osp-shards output: refused, untouched
    out = tmp_path / "scratch"
    out.mkdir()
    (out / "important.tmp").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert _run(src, out) == 2
    assert sorted(p.name for p in out.iterdir()) == ["important.tmp", "notes.txt"]
    assert shards_main(["--synthetic", "2", "--output", str(out), "--workers", "1", "--no-progress"]) == 2
    assert not (out / "synthetic-clips").exists()  # refused before any synthetic clip is made
    # with consent it writes there and keeps the user's files
    assert _run(src, out, "--overwrite") == 0
    assert (out / "important.tmp").read_text() == "mine" and (out / "notes.txt").read_text() == "mine too"
    assert read_json(out / "manifest.json")["num_samples"] == 2
    # a rerun resumes (no consent needed) and removes only its own temp names
    (out / "shard-000007.tar.tmp").write_bytes(b"half a shard from a crash")
    (out / "manifest.json.tmp").write_text("{")
    assert _run(src, out) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == ["important.tmp"]
    # another input list: refused, with the way out named; --overwrite starts over and drops stale shards
    (out / "shard-000009.tar").write_bytes(b"a stale shard of an older run")
    one = tmp_path / "one"
    _clip(clips_dir, 2, one / "c.mp4")
    assert _run(one, out) == 2
    assert _run(one, out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar"]
    assert read_json(out / "manifest.json")["num_samples"] == 1
    assert (out / "important.tmp").exists() and (out / "notes.txt").exists()
    # shards without their state cannot be resumed: refused unless --overwrite
    shutil.rmtree(out / ".osp-shards")
    assert _run(one, out) == 2
    # --output that is a file
    assert _run(src, tmp_path / "in" / "a.txt") == 2


def test_refusal_messages_say_what_to_do(clips_dir, tmp_path, capsys):
    src = tmp_path / "in"
    _clip(clips_dir, 0, src / "a.mp4")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.tmp").write_text("")
    assert _run(src, out) == 2
    err = capsys.readouterr().err
    assert "not an earlier osp-shards output" in err and "x.tmp" in err and "--overwrite" in err
    assert "leaves every other file alone" in err
