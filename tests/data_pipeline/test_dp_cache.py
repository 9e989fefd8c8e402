"""osp-cache: tiny real-class VAE + umT5 -> latent shards the loader reads back bit-exactly; ranks; resume."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_pipeline import build_loader
from osp_megatron.cli.cache import main as cache_main
from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_clip, to_unit_range
from data_pipeline.latent_cache import CacheConfig, LatentCacher, parse_buckets
from dp_helpers import BUCKETS, NUM_CLIPS, read_json

BUCKET_ARG = ",".join(f"{b.frames}x{b.height}x{b.width}" for b in BUCKETS)
TEXT_LEN, TEXT_DIM = 24, 32
TINY = {"vae": "tiny", "text_encoder": "tiny"}  # the random stand-ins, asked for explicitly


@pytest.fixture(scope="module")
def latent_shards(raw_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    rc = cache_main(["--input", str(raw_shards), "--output", str(out), "--vae", "tiny", "--text-encoder", "tiny",
                     "--buckets", BUCKET_ARG, "--text-len", str(TEXT_LEN), "--text-dim", str(TEXT_DIM),
                     "--device", "cpu", "--workers", "2", "--no-progress"])
    assert rc == 0
    return out


def test_loader_reads_latents_back_bit_exactly(raw_shards, latent_shards):
    from osp_megatron.encoders import load_text_encoder, load_vae

    m = read_json(latent_shards / "manifest.json")
    assert m["kind"] == "latent" and m["num_samples"] == NUM_CLIPS and m["num_shards"] == 4
    vae = load_vae("tiny")
    assert m["latents_mean"] == vae.latents_mean and m["latents_std"] == vae.latents_std
    text_enc = load_text_encoder("tiny", text_len=TEXT_LEN, text_dim=TEXT_DIM)
    raw = {}
    for tar in sorted(raw_shards.glob("shard-*.tar")):
        for s in wds.tarfile_to_samples()(iter([{"url": str(tar)}])):
            raw[s["__key__"]] = s
    cfg = DataConfig(kind="latent", shards=str(latent_shards), micro_batch_size=1, num_workers=1,
                     text_len=TEXT_LEN, seed=3)
    seen = set()
    for batch in build_loader(cfg, epochs=1):
        key = batch["key"][0]
        seen.add(key)
        s = raw[key]
        # recompute independently: same centred window, same bucket, same tiny encoders
        video, bucket, info = decode_clip(s["mp4"], BUCKETS, 16.0, "center", random.Random(0), json.loads(s["json"]))
        latents = vae.encode(to_unit_range(video[None]))
        assert latents.shape == (1, 16, 5, BUCKETS[bucket].height // 8, BUCKETS[bucket].width // 8)
        assert batch["latents"].dtype == torch.float32
        assert torch.equal(batch["latents"], latents)
        text = text_enc.encode([s["txt"].decode()])
        assert batch["text"].shape == (1, TEXT_LEN, TEXT_DIM)
        assert torch.equal(batch["text"], text)
        assert batch["caption"][0] == s["txt"].decode()
        assert batch["meta"][0]["frame_indices"] == info["frame_indices"]
        assert batch["meta"][0]["latent_normalized"] is True
    assert len(seen) == NUM_CLIPS


def test_latent_batches_group_by_shape(latent_shards):
    cfg = DataConfig(kind="latent", shards=str(latent_shards), micro_batch_size=2, num_workers=0,
                     text_len=TEXT_LEN)
    for i, batch in enumerate(build_loader(cfg)):
        assert batch["latents"].shape[0] == 2 and batch["text"].shape == (2, TEXT_LEN, TEXT_DIM)
        if i == 6:
            break


def test_rerun_skips_finished_shards(raw_shards, latent_shards, tmp_path):
    import shutil

    out = tmp_path / "lat"
    shutil.copytree(latent_shards, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    # lose one shard's commit record: only that shard is redone, byte-identically
    victim = sorted(out.glob("shard-*.tar"))[1]
    old = victim.read_bytes()
    (out / ".osp-cache" / f"{victim.name}.json").unlink()
    # the fixture decoded in 2 worker processes; redo in-process: the bytes must not depend on that
    cfg = CacheConfig(**TINY, input=str(raw_shards), output=str(out), buckets=list(BUCKETS), text_len=TEXT_LEN,
                      text_dim=TEXT_DIM, device="cpu", workers=0)
    summary = LatentCacher(cfg).run(progress=False)
    assert summary == {"shards_done": 1, "shards_skipped": 3, "samples": 3, "rejected": 0}
    for p in out.glob("shard-*.tar"):
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == mtimes[p.name]
    assert victim.read_bytes() == old
    assert read_json(out / "manifest.json")["num_samples"] == NUM_CLIPS


def test_ranks_take_disjoint_shards_and_last_writes_manifest(raw_shards, tmp_path):
    out = tmp_path / "lat"
    cfg = CacheConfig(**TINY, input=str(raw_shards), output=str(out), buckets=list(BUCKETS), text_len=8, text_dim=16,
                      device="cpu", workers=0)
    r1 = LatentCacher(cfg, rank=1, world_size=2)
    assert [os.path.basename(u) for u in r1.mine] == ["shard-000001.tar", "shard-000003.tar"]
    r1.run(progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    assert not (out / "manifest.json").exists()  # rank 0 not done yet
    LatentCacher(cfg, rank=0, world_size=2).run(progress=False)
    m = read_json(out / "manifest.json")
    assert m["num_samples"] == NUM_CLIPS and [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]


@pytest.mark.slow
def test_torchrun_two_ranks(raw_shards, tmp_path):
    out = tmp_path / "lat"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "osp_megatron.cli.cache", "--input", str(raw_shards), "--output", str(out),
           "--buckets", BUCKET_ARG, "--text-len", "8", "--text-dim", "16", "--device", "cpu", "--workers", "0",
           "--vae", "tiny", "--text-encoder", "tiny",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout
    stats = [read_json(p) for p in sorted((out / ".osp-cache").glob("*.json"))]
    assert sorted((s["name"], s["rank"]) for s in stats) == [
        ("shard-000000.tar", 0), ("shard-000001.tar", 1), ("shard-000002.tar", 0), ("shard-000003.tar", 1)]
    assert read_json(out / "manifest.json")["num_samples"] == NUM_CLIPS


def test_bad_arguments_are_refused_before_work(raw_shards, tmp_path, capsys):
    assert cache_main(["--input", str(raw_shards), "--output", str(tmp_path / "o"), "--buckets", "16x64x64",
                       "--device", "cpu"]) == 2
    assert "frames must be 4k+1" in capsys.readouterr().err
    assert cache_main(["--input", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--device", "cpu"]) == 2
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        parse_buckets("81x480")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("shard-*"))


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cache_main(["--help"])
    assert e.value.code == 0
    assert "--vae" in capsys.readouterr().out


def test_bad_samples_become_named_rejects(raw_shards, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = list(wds.tarfile_to_samples()(iter([{"url": str(raw_shards / "shard-000000.tar")}])))
    with wds.TarWriter(str(src / "shard-000000.tar")) as w:
        w.write({"__key__": good[0]["__key__"], "mp4": good[0]["mp4"], "txt": good[0]["txt"], "json": good[0]["json"]})
        w.write({"__key__": "garbage", "mp4": os.urandom(2000), "txt": b"noise", "json": b"{}"})
        w.write({"__key__": "nocap", "mp4": good[1]["mp4"], "json": b"{}"})  # no .txt, no caption in json
    cfg = CacheConfig(**TINY, input=str(src), output=str(tmp_path / "out"), buckets=list(BUCKETS), text_len=8,
                      text_dim=16, device="cpu", workers=2)
    summary = LatentCacher(cfg).run(progress=False)
    assert summary["samples"] == 1 and summary["rejected"] == 2
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["category"]) for r in rejects] == [("garbage", "decode_error"), ("nocap", "missing_field")]


def test_foreign_member_names_become_safe_unique_keys(raw_shards, tmp_path):
    import io
    import tarfile

    from data_pipeline.keys import unique_key

    good = list(wds.tarfile_to_samples()(iter([{"url": str(raw_shards / "shard-000000.tar")}])))[0]
    src = tmp_path / "src"
    src.mkdir()
    names = ["../../traversal", "/abs/olute", "sub/dir/clip", "a b", "a_b", "dir/../up", "x\\y"]
    with tarfile.open(src / "shard-000000.tar", "w") as tar:
        for name in names:
            for ext in ("mp4", "txt", "json"):
                data = {"mp4": good["mp4"], "txt": good["txt"], "json": good["json"]}[ext]
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = CacheConfig(**TINY, input=str(src), output=str(tmp_path / "out"), buckets=list(BUCKETS), text_len=8,
                      text_dim=16, device="cpu", workers=0)
    summary = LatentCacher(cfg).run(progress=False)
    assert summary["samples"] == len(names) and summary["rejected"] == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = tar.getnames()
    keys = sorted({m.split(".", 1)[0] for m in members})
    assert len(keys) == len(names)
    assert all(k and set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for k in keys)
    assert not any(m.startswith(("/", "..")) or "/" in m for m in members)
    sources = {}
    for s in wds.tarfile_to_samples()(iter([{"url": str(tmp_path / "out" / "shard-000000.tar")}])):
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"]
        sources[s["__key__"]] = meta.get("source_key", s["__key__"])
    assert sorted(sources.values()) == sorted(names)
    used = set()
    assert [unique_key(n, used) for n in ["a\0b", "../../a_b", "/", ""]] == ["a_b", "a_b_1", "sample", "sample_1"]


def test_encoders_are_required_and_the_loader_checks_the_cached_widths(raw_shards, latent_shards, tmp_path, capsys):
    """osp-cache never falls back to the random tiny encoders; the manifest records the widths, and a model of
    another text width / latent channel count is refused naming the fix."""
    from data_pipeline import build_loader
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import LoaderConfigError

    assert cache_main(["--input", str(raw_shards), "--output", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--vae is required" in err and "--text-encoder is required" in err and "--vae tiny" in err
    assert not (tmp_path / "o").exists()
    m = read_json(latent_shards / "manifest.json")
    assert (m["text_dim"], m["latent_channels"]) == (TEXT_DIM, 16)
    cfg = DataConfig(kind="latent", shards=str(latent_shards), buckets=list(BUCKETS), text_len=TEXT_LEN,
                     num_workers=0)
    build_loader(cfg, text_dim=TEXT_DIM, latent_channels=16)
    with pytest.raises(LoaderConfigError, match=rf"text embeddings are {TEXT_DIM} wide .* model.text_dim=4096: "
                                                r"re-cache with the model's umT5"):
        build_loader(cfg, text_dim=4096, latent_channels=16)
    with pytest.raises(LoaderConfigError, match="latents have 16 channels .* model.in_channels=48"):
        build_loader(cfg, text_dim=TEXT_DIM, latent_channels=48)
