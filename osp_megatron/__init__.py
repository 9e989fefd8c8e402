"""osp-megatron: OSP-Next-style sparse video diffusion transformers (Skiparse-2D, SSP, HiF8, Mix-GRPO) on
megatron-core."""

__version__ = "0.2.0"
