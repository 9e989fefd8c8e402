"""Helpers shared by the data-pipeline tests (fixtures live in conftest.py)."""
import json
import shutil
from pathlib import Path

from data_pipeline.config import BucketSpec, DataConfig

NUM_CLIPS = 12
# every synthetic clip is 64..128 wide/high and >= 1.25 s: 17 frames at 16 fps always fit
BUCKETS = [BucketSpec(17, 64, 64), BucketSpec(17, 64, 96), BucketSpec(17, 96, 64)]


def raw_config(shards, **kw) -> DataConfig:
    base = dict(kind="raw", shards=str(shards), buckets=list(BUCKETS), fps=16.0, micro_batch_size=1,
                num_workers=0, shuffle_buffer=4, seed=11)
    base.update(kw)
    return DataConfig(**base)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_json(p: Path):
    return json.loads(Path(p).read_text())
