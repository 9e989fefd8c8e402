"""osp-shards: probing, filtering, size-bounded shards, manifest, rejects, sanitised keys, resume."""
import json
import os
import shutil

import pytest
import webdataset as wds

from osp_megatron.cli.shards import main as shards_main
from data_pipeline.filters import FilterConfigError, load_filter_config
from data_pipeline.inputs import InputError, list_inputs
from data_pipeline.keys import sanitize_key, unique_key
from data_pipeline.sharding import ShardOutputError, build_shards
from dp_helpers import NUM_CLIPS, read_json


def _tar_samples(path):
    return list(wds.tarfile_to_samples()(iter([{"url": str(path)}])))


def _corrupt_set(clips_dir, dst):
    """12 good clips + 1 truncated, 1 garbage, 1 empty, 1 missing caption (4 of 16 = 25% bad)."""
    shutil.copytree(clips_dir, dst)
    good = (clips_dir / "clip-000002.mp4").read_bytes()
    (dst / "broken-truncated.mp4").write_bytes(good[: len(good) // 3])
    (dst / "broken-truncated.txt").write_text("a truncated clip")
    (dst / "broken-garbage.mp4").write_bytes(os.urandom(4000))
    (dst / "broken-garbage.txt").write_text("random bytes")
    (dst / "broken-empty.mp4").write_bytes(b"")
    (dst / "broken-empty.txt").write_text("empty")
    shutil.copy(clips_dir / "clip-000003.mp4", dst / "nocaption.mp4")
    return dst


def test_round_trip_manifest_and_members(raw_shards, clips_dir):
    m = read_json(raw_shards / "manifest.json")
    assert m["num_samples"] == NUM_CLIPS and m["num_shards"] == 4
    assert sum(s["num_samples"] for s in m["shards"]) == NUM_CLIPS
    assert m["filter_stats"] == {"inputs": NUM_CLIPS, "accepted": NUM_CLIPS, "rejected": 0, "by_reason": {}}
    assert (raw_shards / "rejects.jsonl").read_text() == ""
    total = 0.0
    for shard in m["shards"]:
        samples = _tar_samples(raw_shards / shard["name"])
        assert len(samples) == shard["num_samples"]
        for s in samples:
            assert set(s) >= {"__key__", "mp4", "json", "txt"}
            meta = json.loads(s["json"])
            src = clips_dir / (s["__key__"] + ".mp4")
            assert s["mp4"] == src.read_bytes()
            assert s["txt"].decode() == src.with_suffix(".txt").read_text().strip()
            assert meta["codec"] == "h264" and meta["frames"] > 0 and meta["duration"] == meta["frames"] / meta["fps"]
            total += meta["duration"]
    assert m["total_duration_s"] == pytest.approx(total)
    assert not list(raw_shards.glob("*.tmp"))


def test_corrupt_inputs_are_skipped_counted_and_named(clips_dir, tmp_path):
    src = _corrupt_set(clips_dir, tmp_path / "in")
    out = tmp_path / "out"
    assert shards_main(["--input", str(src), "--output", str(out), "--workers", "2", "--no-progress"]) == 0
    m = read_json(out / "manifest.json")
    assert m["num_samples"] == NUM_CLIPS
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_path = {os.path.basename(r["path"]): r for r in rejects}
    assert set(by_path) == {"broken-truncated.mp4", "broken-garbage.mp4", "broken-empty.mp4", "nocaption.mp4"}
    assert by_path["nocaption.mp4"]["category"] == "missing_caption"
    assert by_path["broken-empty.mp4"]["category"] == "zero_length"
    assert by_path["broken-garbage.mp4"]["category"] in ("not_a_video", "decode_failed")
    assert by_path["broken-truncated.mp4"]["category"] == "truncated"
    assert all(r["reason"] for r in rejects)
    assert m["filter_stats"]["rejected"] == 4 and sum(m["filter_stats"]["by_reason"].values()) == 4


def test_filter_yaml_rejects_by_duration_size_and_aspect(clips_dir, tmp_path):
    cfg = tmp_path / "filter.yaml"
    cfg.write_text("min_duration: 1.6\nmin_width: 64\nmax_aspect: 1.6\n")
    out = tmp_path / "out"
    manifest = build_shards(list_inputs(str(clips_dir)), str(out), load_filter_config(str(cfg)), progress=False)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    from data_pipeline.probe import probe_video

    expected = set()
    for p in sorted(clips_dir.glob("clip-*.mp4")):
        info = probe_video(str(p))
        if info["duration"] < 1.6 or info["width"] / info["height"] > 1.6:
            expected.add(str(p))
    assert {r["path"] for r in rejects} == expected and expected
    assert manifest["num_samples"] == NUM_CLIPS - len(expected)
    assert {r["category"] for r in rejects} <= {"too_short", "aspect_out_of_range"}


def test_bad_filter_config_names_the_field(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_text("min_duraton: 2\n")
    with pytest.raises(FilterConfigError, match="min_duraton"):
        load_filter_config(str(bad))
    bad.write_text("min_duration: 5\nmax_duration: 2\n")
    with pytest.raises(FilterConfigError, match="min_duration=5 > filter.max_duration=2"):
        load_filter_config(str(bad))


def test_manifest_inputs_csv_jsonl_with_unsafe_names(clips_dir, tmp_path):
    data = tmp_path / "data"
    (data / "sub dir").mkdir(parents=True)
    names = ["../x/evil clip.v1.mp4", "sub dir/a.b.mp4", "sub dir/a b.mp4", "c.mp4"]
    shutil.copy(clips_dir / "clip-000000.mp4", data / "sub dir" / "a.b.mp4")
    shutil.copy(clips_dir / "clip-000001.mp4", data / "sub dir" / "a b.mp4")
    shutil.copy(clips_dir / "clip-000002.mp4", data / "c.mp4")
    (tmp_path / "x").mkdir()
    shutil.copy(clips_dir / "clip-000003.mp4", tmp_path / "x" / "evil clip.v1.mp4")
    rows = [{"path": n, "caption": f"caption {i}", "source_id": i} for i, n in enumerate(names)]
    jsonl = data / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = data / "m.csv"
    csv.write_text("path,caption,source_id\n" + "".join(f"{r['path']},{r['caption']},{r['source_id']}\n" for r in rows))
    results = {}
    for manifest in (jsonl, csv):
        out = tmp_path / f"out-{manifest.suffix[1:]}"
        assert shards_main(["--input", str(manifest), "--output", str(out), "--workers", "1", "--no-progress"]) == 0
        samples = _tar_samples(out / "shard-000000.tar")
        keys = [s["__key__"] for s in samples]
        assert len(keys) == 4 and len(set(keys)) == 4
        assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for k in keys)
        metas = [json.loads(s["json"]) for s in samples]
        assert sorted(str(m["source_id"]) for m in metas) == ["0", "1", "2", "3"]
        results[manifest.suffix] = keys
    assert results[".jsonl"] == results[".csv"]
    assert sanitize_key("../x/evil clip.v1.mp4") == "x_evil_clip_v1"
    used = set()
    assert [unique_key(n, used) for n in ["a.b.mp4", "a b.mp4", "a/b.mkv"]] == ["a_b", "a_b_1", "a_b_2"]


def test_manifest_rows_with_missing_files_are_rejected(clips_dir, tmp_path):
    m = tmp_path / "m.jsonl"
    rows = [{"path": str(clips_dir / "clip-000000.mp4"), "caption": "ok"},
            {"path": "does/not/exist.mp4", "caption": "gone"},
            {"path": str(clips_dir / "clip-000001.mp4")}]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert shards_main(["--input", str(m), "--output", str(out), "--workers", "1", "--no-progress"]) == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(os.path.basename(r["path"]), r["category"]) for r in rejects] == [
        ("exist.mp4", "unreadable"), ("clip-000001.mp4", "missing_caption")]
    assert read_json(out / "manifest.json")["num_samples"] == 1


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no videos found"):
        list_inputs(str(tmp_path / "empty"))
    bad = tmp_path / "m.csv"
    bad.write_text("file,caption\nx.mp4,hi\n")
    with pytest.raises(InputError, match="'path' column"):
        list_inputs(str(bad))
    assert shards_main(["--output", str(tmp_path / "o")]) == 2


def test_rerun_resumes_keeps_finished_shards(clips_dir, raw_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(raw_shards, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    # simulate a crash while writing the last shard: its commit record is gone, a half file is left
    last = sorted(out.glob("shard-*.tar"))[-1]
    commits = sorted((out / ".osp-shards").glob("commit-*.json"))
    commits[-1].unlink()
    last.unlink()
    (out / (last.name + ".tmp")).write_bytes(b"half a shard")
    inputs = list_inputs(str(clips_dir))
    sizes = sorted(os.path.getsize(r["path"]) for r in inputs)
    manifest = build_shards(inputs, str(out), workers=1, shard_size=3 * sizes[-1], progress=False)
    assert manifest["num_samples"] == NUM_CLIPS
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    assert set(after) == set(before)
    for name in before:
        assert after[name][1] == before[name][1]  # identical bytes
        if name != last.name:
            assert after[name][0] == before[name][0]  # finished shards untouched
    assert not list(out.glob("*.tmp"))
    # a different input list into the same folder is refused
    with pytest.raises(ShardOutputError, match="different input"):
        build_shards(inputs[:-1], str(out), workers=1, shard_size=3 * sizes[-1], progress=False)


def test_synthetic_flag_and_workers_do_not_change_shards(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert shards_main(["--synthetic", "4", "--output", str(a), "--workers", "1", "--no-progress"]) == 0
    assert shards_main(["--synthetic", "4", "--output", str(b), "--workers", "2", "--no-progress"]) == 0
    assert read_json(a / "manifest.json")["num_samples"] == 4
    assert (a / "shard-000000.tar").read_bytes() == (b / "shard-000000.tar").read_bytes()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        shards_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--input" in out and "--shard-size" in out and "--synthetic" in out
