"""Video data pipeline: videos -> WebDataset shards (osp-shards), decoding into buckets (decord, torchcodec
or PyAV), the resumable training loader (`build_loader`), latent caching (osp-cache) and synthetic clips.

`build_loader` is imported lazily so `data_pipeline.config` stays cheap to import.
"""
from data_pipeline.config import BucketSpec, DataConfig

__all__ = ["BucketSpec", "DataConfig", "build_loader"]


def __getattr__(name):
    if name == "build_loader":
        from data_pipeline.loader import build_loader

        return build_loader
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
