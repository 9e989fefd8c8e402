"""DataConfig / CacheConfig / filter validation: bad numbers are refused up front with the field named."""
import math

import pytest

from data_pipeline.config import BucketSpec, DataConfig
from data_pipeline.filters import FilterConfigError, load_filter_config
from data_pipeline.latent_cache import CacheConfig


def _errors(**kw):
    base = dict(kind="raw", shards="shards/", buckets=[BucketSpec(17, 64, 64)])
    base.update(kw)
    errors = []
    DataConfig(**base).validate(errors)
    return errors


@pytest.mark.parametrize("kw,needle", [
    (dict(buckets=[BucketSpec(17, -64, 64)]), "data.buckets[0].height=-64: must be a positive multiple of 16"),
    (dict(buckets=[BucketSpec(17, 64, 0)]), "data.buckets[0].width=0: must be a positive multiple of 16"),
    (dict(buckets=[BucketSpec(17, 64, 64), BucketSpec(17, 72, 64)]), "data.buckets[1].height=72: must be a positive"),
    (dict(buckets=[BucketSpec(-3, 64, 64)]), "data.buckets[0].frames=-3: must be 4k+1"),
    (dict(buckets=[BucketSpec(0, 64, 64)]), "data.buckets[0].frames=0: must be 4k+1"),
    (dict(buckets=[BucketSpec(17.0, 64, 64)]), "data.buckets[0].frames=17.0: must be 4k+1"),
    (dict(buckets=[BucketSpec(17, "64", 64)]), "data.buckets[0].height='64': must be a positive multiple of 16"),
    (dict(buckets=[BucketSpec(17, 8192, 8192)], max_frame_pixels=1 << 24),
     "data.buckets[0] 8192x8192: 67108864 pixels per frame > data.max_frame_pixels=16777216"),
    (dict(fps=math.nan), "data.fps=nan: must be a finite number > 0"),
    (dict(fps=math.inf), "data.fps=inf: must be a finite number > 0"),
    (dict(fps=-16.0), "data.fps=-16.0: must be a finite number > 0"),
    (dict(fps="16"), "data.fps='16': must be a finite number > 0"),
    (dict(max_frame_pixels=0), "data.max_frame_pixels=0: must be an integer >= 1"),
    (dict(micro_batch_size=0), "data.micro_batch_size=0: must be an integer >= 1"),
    (dict(num_workers=-1), "data.num_workers=-1: must be an integer >= 0"),
    (dict(num_workers=1.5), "data.num_workers=1.5: must be an integer >= 0"),
    (dict(shuffle_buffer=-2), "data.shuffle_buffer=-2: must be an integer >= 0"),
    (dict(text_len=0), "data.text_len=0: must be an integer >= 1"),
    (dict(max_consecutive_errors=-1), "data.max_consecutive_errors=-1: must be an integer >= 0"),
    (dict(seed="abc"), "data.seed='abc': must be an integer"),
    (dict(shard_shuffle="yes"), "data.shard_shuffle='yes': must be true or false"),
    (dict(decoder="ffmpeg"), "data.decoder='ffmpeg': use one of auto, decord, torchcodec, pyav"),
    (dict(kind="synthetic", synthetic_latent_shape=[16, 0, 4, 4]), "data.synthetic_latent_shape=[16, 0, 4, 4]"),
    (dict(kind="synthetic", synthetic_num_samples=0), "data.synthetic_num_samples=0: must be an integer >= 1"),
])
def test_bad_numbers_name_the_field(kw, needle):
    errors = _errors(**kw)
    assert any(needle in e for e in errors), errors


def test_good_config_has_no_errors():
    assert _errors() == []
    assert _errors(kind="synthetic", shards="") == []


def test_the_training_config_refuses_them_too():
    from osp_megatron.config import ConfigError, load_config

    cfg = load_config(overrides=["data.kind=raw", "data.shards=x", "data.fps=.nan",
                                 "data.buckets=[{frames: 17, height: -64, width: 64}]"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=1)
    assert "data.buckets[0].height=-64: must be a positive multiple of 16" in str(e.value)
    assert "data.fps=nan" in str(e.value)


def test_cache_config_checks_the_same_numbers():
    errors = []
    CacheConfig(input="i", output="o", buckets=[BucketSpec(17, -64, 64)], fps=math.nan, decoder="x",
                max_frame_pixels=0).validate(errors)
    text = "\n".join(errors)
    assert "--buckets 17x-64x64: height must be a positive multiple of 16" in text
    assert "--fps=nan" in text and "--decoder='x'" in text and "--max-frame-pixels=0" in text


@pytest.mark.parametrize("text,needle", [
    ("min_duration: .nan\n", "filter.min_duration=nan: must be a number >= 0"),
    ("max_fps: -1\n", "filter.max_fps=-1"),
    ("min_width: true\n", "filter.min_width=True"),
    ("require_caption: 'no'\n", "filter.require_caption='no': must be true or false"),
])
def test_filter_numbers_name_the_field(tmp_path, text, needle):
    p = tmp_path / "f.yaml"
    p.write_text(text)
    with pytest.raises(FilterConfigError) as e:
        load_filter_config(str(p))
    assert needle in str(e.value)
