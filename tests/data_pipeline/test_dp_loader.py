"""The training loader: round trip, buckets, corrupt samples, rank/worker splitting, config errors, synthetic."""
import json
import os

import pytest
import torch
import webdataset as wds

from data_pipeline import build_loader
from data_pipeline.config import BucketSpec, DataConfig
from data_pipeline.loader import LoaderConfigError
from dp_helpers import BUCKETS, NUM_CLIPS, raw_config


def _epoch_keys(cfg, rank=0, world=1):
    loader = build_loader(cfg, rank, world, epochs=1)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader


def test_round_trip_shapes_range_captions(raw_shards, clips_dir):
    cfg = raw_config(raw_shards, micro_batch_size=2, num_workers=2)
    loader = build_loader(cfg)
    seen = 0
    for i, batch in enumerate(loader):
        v = batch["video"]
        assert v.dtype == torch.float32 and v.dim() == 5 and v.shape[:3] == (2, 3, 17)
        assert (v.shape[3], v.shape[4]) in {(b.height, b.width) for b in BUCKETS}
        assert v.min() >= -1 and v.max() <= 1 and v.std() > 0.05
        assert len(batch["caption"]) == len(batch["key"]) == 2
        for key, cap, meta in zip(batch["key"], batch["caption"], batch["meta"]):
            assert cap == (clips_dir / f"{key}.txt").read_text().strip()
            src_fps = meta["src_fps"]
            idx = meta["frame_indices"]
            # 17 frames at 16 fps: source spacing src_fps/16 (rounded)
            assert abs((idx[-1] - idx[0]) - 16 * src_fps / 16.0) <= 1
            w, h = meta["src_size"]
            b = BUCKETS[meta["bucket"]]
            assert (b.height, b.width) == tuple(v.shape[3:])
            assert abs((b.width / b.height) - (w / h)) < 0.6  # nearest aspect bucket
        seen += 1
        if i == 9:
            break
    assert seen == 10
    m = loader.metrics()
    assert m["batches"] >= 10 and m["skipped_total"] == 0 and m["consumed_batches"] == 10


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_covers_every_clip_once(raw_shards, all_keys, workers):
    keys, loader = _epoch_keys(raw_config(raw_shards, num_workers=workers))
    assert sorted(keys) == sorted(all_keys) and len(keys) == NUM_CLIPS


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (4, 0), (4, 2)])
def test_ranks_split_an_epoch_disjoint_and_complete(raw_shards, all_keys, world, workers):
    per_rank = []
    for rank in range(world):
        keys, _ = _epoch_keys(raw_config(raw_shards, num_workers=workers), rank, world)
        per_rank.append(keys)
        assert keys, f"rank {rank} got nothing"
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)) == NUM_CLIPS  # disjoint
    assert sorted(flat) == sorted(all_keys)  # complete


def test_shuffle_is_seeded(raw_shards):
    a, _ = _epoch_keys(raw_config(raw_shards, seed=1))
    b, _ = _epoch_keys(raw_config(raw_shards, seed=1))
    c, _ = _epoch_keys(raw_config(raw_shards, seed=2))
    assert a == b and a != c and sorted(a) == sorted(c)


def test_every_batch_comes_from_one_bucket(raw_shards):
    loader = build_loader(raw_config(raw_shards, micro_batch_size=3, num_workers=0))
    for i, batch in enumerate(loader):
        assert len({m["bucket"] for m in batch["meta"]}) == 1
        if i == 5:
            break


@pytest.fixture(scope="module")
def corrupt_shards(raw_shards, tmp_path_factory):
    """The 12 good clips plus 2 truncated, 1 garbage and 1 caption-less sample written straight into tars
    (osp-shards would have rejected them): 4 of 16 = 25% bad."""
    out = tmp_path_factory.mktemp("corrupt")
    good = []
    for tar in sorted(raw_shards.glob("shard-*.tar")):
        good += list(wds.tarfile_to_samples()(iter([{"url": str(tar)}])))
    bad = [
        {"__key__": "bad-trunc-a", "mp4": good[0]["mp4"][: len(good[0]["mp4"]) // 2], "txt": b"x", "json": b"{}"},
        {"__key__": "bad-trunc-b", "mp4": good[1]["mp4"][: len(good[1]["mp4"]) * 3 // 5], "txt": b"x", "json": good[1]["json"]},
        {"__key__": "bad-garbage", "mp4": os.urandom(3000), "txt": b"x", "json": b"{}"},
        {"__key__": "bad-nocaption", "mp4": good[2]["mp4"], "json": b"{}"},
    ]
    samples = good[:6] + bad[:2] + good[6:] + bad[2:]
    for s in range(2):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as w:
            for sample in samples[s * 8:(s + 1) * 8]:
                w.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(corrupt_shards, workers):
    cfg = raw_config(corrupt_shards, num_workers=workers, micro_batch_size=1)
    if workers == 0:
        with pytest.warns(UserWarning, match="skipped bad-"):  # worker processes warn on their own stderr
            keys, loader = _epoch_keys(cfg)
    else:
        keys, loader = _epoch_keys(cfg)
    assert sorted(keys) == sorted(k for k in keys if not k.startswith("bad-")) and len(keys) == NUM_CLIPS
    m = loader.metrics()  # summed over workers, including skips after the last batch
    assert m["skipped_decode_error"] == 3 and m["skipped_missing_field"] == 1
    assert m["skipped_total"] == 4 and m["samples_read"] == NUM_CLIPS + 4 and m["samples_used"] == NUM_CLIPS


def test_too_many_consecutive_failures_stop_with_a_message(corrupt_shards):
    cfg = raw_config(corrupt_shards, max_consecutive_errors=0, shuffle_buffer=0, shard_shuffle=False)
    with pytest.raises(RuntimeError, match="max_consecutive_errors"):
        for _ in build_loader(cfg):
            pass


def test_bad_configs_are_rejected_with_the_field_named(raw_shards, tmp_path):
    with pytest.raises(LoaderConfigError, match=r"data.buckets\[0\].frames=16"):
        build_loader(raw_config(raw_shards, buckets=[BucketSpec(16, 64, 64)]))
    with pytest.raises(LoaderConfigError, match="data.kind='pixels'"):
        build_loader(raw_config(raw_shards, kind="pixels"))
    # more frames than any clip allows: refused before any decoding, with a fix
    with pytest.raises(LoaderConfigError, match=r"data.buckets: every bucket needs at least 81 frames.*frames <= "):
        build_loader(raw_config(raw_shards, buckets=[BucketSpec(81, 64, 64)]))
    with pytest.raises(LoaderConfigError, match="set data.kind=raw"):
        build_loader(raw_config(raw_shards, kind="latent"))
    from data_pipeline.shardlist import ShardListError

    with pytest.raises(ShardListError, match="no shard-"):
        build_loader(raw_config(tmp_path))
    with pytest.raises(LoaderConfigError, match="data.shards is empty"):
        build_loader(DataConfig(kind="raw", shards=""))
    with pytest.raises(LoaderConfigError, match=r"data.buckets\[1\] 17x64x64: listed twice"):
        build_loader(raw_config(raw_shards, buckets=[BucketSpec(17, 64, 64), BucketSpec(17, 64, 64)]))
    with pytest.raises(LoaderConfigError, match=r"data.synthetic_latent_shape=\[16, 5\]"):
        build_loader(DataConfig(kind="synthetic", synthetic_latent_shape=[16, 5]))
    with pytest.raises(LoaderConfigError, match="rank=2, world_size=2"):
        build_loader(raw_config(raw_shards), rank=2, world_size=2)


def test_resume_state_must_match_the_data_definition(raw_shards):
    loader = build_loader(raw_config(raw_shards, num_workers=0))
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    other = build_loader(raw_config(raw_shards, num_workers=0, seed=99))
    with pytest.raises(LoaderConfigError, match="seed: saved 11 now 99"):
        other.load_state_dict(state)


def test_topology_change_restarts_the_saved_epoch_without_skipping(raw_shards, all_keys):
    """DP size 1 -> 2 mid-epoch 1: both new ranks start epoch 1 of the new split; together they cover it."""
    loader = build_loader(raw_config(raw_shards, num_workers=0))
    for i, _ in enumerate(loader):
        if i == NUM_CLIPS + 2:  # 3 batches into epoch 1
            break
    state = json.loads(json.dumps(loader.state_dict()))
    seen = []
    for rank in range(2):
        new = build_loader(raw_config(raw_shards, num_workers=0), rank, 2, epochs=2)
        with pytest.warns(UserWarning, match="restarting epoch 1"):
            new.load_state_dict(state)
        seen += [k for b in new for k in b["key"]]
    assert sorted(seen) == sorted(all_keys)


def test_synthetic_kind_shapes_determinism_and_resume():
    cfg = DataConfig(kind="synthetic", micro_batch_size=2, text_len=16, synthetic_latent_shape=[16, 3, 4, 6])
    loader = build_loader(cfg, rank=1, world_size=2, text_dim=32)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    b = first[0]
    assert b["latents"].shape == (2, 16, 3, 4, 6) and b["text"].shape == (2, 16, 32)
    for row, n in zip(b["text"], b["text_lens"]):
        assert row[n:].abs().sum() == 0 and row[:n].abs().sum() > 0
    state = loader.state_dict()
    nxt = next(it)
    again = build_loader(cfg, rank=1, world_size=2, text_dim=32)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["latents"], nxt["latents"])
    other_rank = next(iter(build_loader(cfg, rank=0, world_size=2, text_dim=32)))
    assert not torch.equal(other_rank["latents"], first[0]["latents"])


def test_truncated_shard_is_counted_and_the_rest_still_read(raw_shards, tmp_path):
    import shutil

    for tar in list(raw_shards.glob("shard-*.tar")) + [raw_shards / "manifest.json"]:
        shutil.copy(tar, tmp_path / tar.name)
    victim = tmp_path / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    keys, loader = _epoch_keys(raw_config(tmp_path, num_workers=0))
    m = loader.metrics()
    got = len(set(keys))
    assert got == len(keys) and 9 <= got < NUM_CLIPS  # 3 other shards fully, the cut one partly
    # every lost sample is counted once: missing from the tar (read error) or cut inside (decode / missing field)
    assert m["skipped_read_error"] >= 1
    assert m["skipped_total"] == NUM_CLIPS - got
