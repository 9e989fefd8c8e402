"""Console entry points of the data pipeline: `osp-shards` (videos -> shards), `osp-cache` (shards -> latents)."""
