"""osp-megatron: OSP-Next-style sparse video DiT training on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="osp-megatron",
    version="0.1.0",
    description="Training stack for OSP-Next sparse video diffusion transformers on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["osp_megatron", "osp_megatron.*", "data_pipeline", "data_pipeline.*"]),
    include_package_data=True,
    install_requires=[
        # CPU installs: this pin takes the local CPU wheel; GPU clusters bring their own CUDA torch
        # (install it first, then `pip install --no-deps -e .` or keep a matching constraint).
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "psutil",  # megatron's checkpoint writers need it (undeclared upstream)
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "data": ["decord==0.6.0", "webdataset==1.0.2", "imageio-ffmpeg", "av"],
        "track": ["mlflow==3.17.2"],
        "encoders": ["diffusers>=0.35", "transformers>=4.50", "sentencepiece"],
        "te": ["transformer-engine[pytorch]>=2.9"],
        "flash": ["flash-attn>=2.6"],
        "dev": [
            "pytest", "pytest-timeout", "en-dtypes==0.0.4",
            "triton==3.6.0",  # CPU CI runs the HiF8 Triton kernels in the interpreter (TRITON_INTERPRET=1)
            "decord==0.6.0", "webdataset==1.0.2", "imageio-ffmpeg", "av",
            "mlflow==3.17.2", "diffusers>=0.35", "transformers>=4.50", "sentencepiece",
        ],
    },
    entry_points={
        "console_scripts": [
            "osp-train=osp_megatron.cli.train:main",
            "osp-grpo=osp_megatron.cli.grpo:main",
            "osp-sample=osp_megatron.cli.sample:main",
            "osp-shards=osp_megatron.cli.shards:main",
            "osp-cache=osp_megatron.cli.cache:main",
            "osp-convert=osp_megatron.cli.convert:main",
        ]
    },
)
