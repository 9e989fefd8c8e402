"""Session fixtures: real H.264 clips made once by ffmpeg, and raw shards made once by osp-shards."""
import os
from pathlib import Path

import pytest

from dp_helpers import NUM_CLIPS


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory) -> Path:
    from data_pipeline.synthetic import make_synthetic_dataset

    d = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(str(d), NUM_CLIPS, seed=7)
    return d


@pytest.fixture(scope="session")
def raw_shards(clips_dir, tmp_path_factory) -> Path:
    """4 shards of 3 clips each (shard size ~ 3 clips)."""
    from data_pipeline.inputs import list_inputs
    from data_pipeline.sharding import build_shards

    out = tmp_path_factory.mktemp("shards")
    inputs = list_inputs(str(clips_dir))
    sizes = sorted(os.path.getsize(r["path"]) for r in inputs)
    manifest = build_shards(inputs, str(out), workers=1, shard_size=3 * sizes[-1], progress=False)
    assert manifest["num_samples"] == NUM_CLIPS
    return out


@pytest.fixture(scope="session")
def all_keys(raw_shards):
    import webdataset as wds

    keys = []
    for tar in sorted(raw_shards.glob("shard-*.tar")):
        for s in wds.tarfile_to_samples()(iter([{"url": str(tar)}])):
            keys.append(s["__key__"])
    return keys


