"""Console entry points (thin: parse, call the library, exit code): osp-train, osp-grpo, osp-sample, osp-convert,
osp-shards (videos -> shards), osp-cache (shards -> latent shards)."""

from osp_megatron.launch import quiet_library_warnings

quiet_library_warnings()  # before any entry point imports megatron-core
