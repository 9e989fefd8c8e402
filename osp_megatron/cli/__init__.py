"""Console entry points (thin: parse, call the library, exit code): osp-train, osp-grpo, osp-sample, osp-convert,
osp-shards (videos -> shards), osp-cache (shards -> latent shards)."""
