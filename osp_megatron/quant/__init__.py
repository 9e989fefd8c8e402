"""HiF8 quantization-aware training.

- `hif8`: exact codec (`hif8_round`, `hif8_encode`, `hif8_decode`), equal to en-dtypes' `hifloat8`.
- `hif8_kernels`: per-tensor amax-scaled quantize-dequantize (Triton on GPU, torch elsewhere, bit-identical).
- `recipes`: `HiF8CurrentScaling`, `HiF8DelayedScaling`, `autocast`, `active_recipe`, `recipe_from_config`,
  TransformerEngine bridge (`te_fp8_recipe`, `te_custom_recipe`).
- `modules`: `HiF8ColumnParallelLinear`, `HiF8RowParallelLinear` (megatron drop-ins), `hif8_linear`, `hif8_qkv`,
  `HiF8QKV` (the Q/K/V quantizer submodule).

Submodules are imported explicitly (`from osp_megatron.quant.recipes import autocast`); this package import
stays light (no megatron import).
"""
