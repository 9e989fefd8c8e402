"""data_pipeline.array_parts: array-job parts cover every input exactly once; merge links finished parts only."""
from __future__ import annotations

import json
import os

import pytest

from data_pipeline import array_parts as ap


@pytest.mark.parametrize("n", [1, 2, 7, 10, 101])
def test_parts_are_disjoint_and_cover_everything(n):
    for k in range(1, n + 1):
        seen = []
        for i in range(k):
            seen += list(range(n))[ap.part_slice(n, i, k)]
        assert seen == list(range(n))


def test_bad_part_numbers_name_the_fix():
    with pytest.raises(ap.PartsError, match="--array=0-2"):
        ap.part_slice(10, 3, 3)
    with pytest.raises(ap.PartsError, match="must be >= 1"):
        ap.part_slice(10, 0, 0)


def _manifest(tmp_path, n):
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i in range(n):
        (videos / f"v{i}.mp4").write_bytes(b"x")
        rows.append({"path": f"videos/v{i}.mp4", "caption": f"clip {i}", "score": i})
    man = tmp_path / "list.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man


def test_split_a_manifest_keeps_captions_and_extra_columns(tmp_path):
    man = _manifest(tmp_path, 5)
    got = []
    for i in range(2):
        out = tmp_path / f"p{i}.jsonl"
        ap.split("videos", str(man), i, 2, str(out))
        got += [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in got] == [f"clip {i}" for i in range(5)]
    assert [r["score"] for r in got] == list(range(5))
    assert all(os.path.isabs(r["path"]) and os.path.isfile(r["path"]) for r in got)
    with pytest.raises(ap.PartsError, match="exceeds the 5 inputs"):
        ap.split("videos", str(man), 0, 6, str(tmp_path / "x.jsonl"))


def test_merge_waits_for_every_part_then_links_and_sums(tmp_path):
    out = tmp_path / "out"
    for i, (n, shards) in enumerate([(3, 2), (2, 1)]):
        d = ap.part_dir(str(out), i)
        d.mkdir(parents=True)
        for j in range(shards):
            (d / f"shard-{j:06d}.tar").write_bytes(f"part{i}shard{j}".encode())
        (d / "rejects.jsonl").write_text(json.dumps({"path": f"bad{i}", "reason": "r"}) + "\n")
        if i == 0:
            manifest = {"kind": "raw", "num_samples": n, "num_shards": shards, "total_duration_s": 1.5,
                        "max_frames": 10, "shards": [{"name": f"shard-{j:06d}.tar", "num_samples": 1} for j in range(shards)],
                        "filter_stats": {"inputs": 4, "accepted": 3, "rejected": 1, "by_reason": {"r": 1}}}
            (d / "manifest.json").write_text(json.dumps(manifest))
    assert ap.merge(str(out), 2) is None  # part 1 unfinished
    assert not list(out.glob("shard-*.tar"))
    (ap.part_dir(str(out), 1) / "manifest.json").write_text(json.dumps(
        {"kind": "raw", "num_samples": 2, "num_shards": 1, "total_duration_s": 2.0, "max_frames": 30,
         "shards": [{"name": "shard-000000.tar", "num_samples": 2}],
         "filter_stats": {"inputs": 3, "accepted": 2, "rejected": 1, "by_reason": {"r": 1}}}))
    merged = ap.merge(str(out), 2, source="/data/videos")
    assert [p.name for p in sorted(out.glob("shard-*.tar"))] == ["shard-000000.tar", "shard-000001.tar",
                                                                 "shard-000002.tar"]
    assert (out / "shard-000002.tar").read_bytes() == b"part1shard0"
    assert merged["num_samples"] == 5 and merged["num_shards"] == 3 and merged["max_frames"] == 30
    assert merged["total_duration_s"] == 3.5 and merged["source"] == "/data/videos"
    assert merged["filter_stats"] == {"inputs": 7, "accepted": 5, "rejected": 2, "by_reason": {"r": 2}}
    assert [s["name"] for s in merged["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "manifest.json").read_text()) == merged


def test_inputs_refused_while_listing_reach_the_merged_rejects_once(tmp_path):
    """Hidden names, bad rows and duplicates are refused over the whole input (not per part) and reported once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        (videos / f"v{i}.mp4").write_bytes(b"x")
    rows = [{"path": f"videos/v{i}.mp4", "caption": f"clip {i}"} for i in range(3)]
    rows += [{"path": "videos/v0.mp4", "caption": "again"}, {"caption": "no path"}]
    man = tmp_path / "list.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    parts = []
    for i in range(2):
        ap.split("videos", str(man), i, 2, str(out / "parts" / f".p{i}.inputs.jsonl"))
        parts += [json.loads(line) for line in (out / "parts" / f".p{i}.inputs.jsonl").read_text().splitlines()]
    assert sorted(r["caption"] for r in parts) == ["clip 0", "clip 1", "clip 2"]  # rejected rows in no part
    refused = [json.loads(line) for line in (out / "parts" / ap.INPUT_REJECTS).read_text().splitlines()]
    assert sorted(r["category"] for r in refused) == ["bad_row", "duplicate"]
    for i in range(2):
        d = ap.part_dir(str(out), i)
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"num_samples": 1, "num_shards": 0, "shards": [],
                                                     "filter_stats": {"inputs": 1, "accepted": 1, "rejected": 0,
                                                                      "by_reason": {}}}))
    merged = ap.merge(str(out), 2)
    assert merged["filter_stats"] == {"inputs": 4, "accepted": 2, "rejected": 2,
                                      "by_reason": {"bad_row": 1, "duplicate": 1}}
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["category"] for x in lines) == ["bad_row", "duplicate"]
