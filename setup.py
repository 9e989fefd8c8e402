"""osp-megatron: OSP-Next-style sparse video DiT training on megatron-core."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "osp_megatron" / "__init__.py").read_text()).group(1)

# decord has x86_64 wheels only; PyAV (always) and torchcodec (if installed) are the fallbacks
DATA = ['decord==0.6.0; platform_machine == "x86_64"', "webdataset==1.0.2", "imageio-ffmpeg", "av"]
TRACK = ["mlflow>=3.1", "tensorboard", "wandb"]  # tracking.backend = mlflow | tensorboard | wandb
ENCODERS = ["diffusers>=0.35", "transformers>=4.50", "sentencepiece", "accelerate>=1.0"]  # accelerate: diffusers export
RL = ["peft>=0.13", *ENCODERS]  # loading the exported GRPO adapters in diffusers / PEFT; the VideoAlign scorer

setup(
    name="osp-megatron",
    version=VERSION,
    description="Training stack for OSP-Next sparse video diffusion transformers on megatron-core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["osp_megatron", "osp_megatron.*", "data_pipeline", "data_pipeline.*"])
    + ["osp_megatron.presets", "osp_megatron.slurm_templates"],
    # the YAML presets and SLURM templates live at the top of the repository and ship inside the package
    package_dir={"osp_megatron.presets": "configs", "osp_megatron.slurm_templates": "slurm"},
    package_data={"osp_megatron.presets": ["*.yaml"], "osp_megatron.slurm_templates": ["*.sh", "*.sbatch", "*.md"]},
    include_package_data=True,
    install_requires=[
        # ranges, so a cluster's own CUDA build of torch satisfies them; CPU machines pin the local CPU wheel with
        # `pip install -c constraints-cpu.txt ...` (see README)
        "torch>=2.5",
        "megatron-core>=0.16,<0.20",
        "psutil",  # megatron's checkpoint writers need it (undeclared upstream)
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "data": DATA,
        "track": TRACK,
        "encoders": ENCODERS,
        "rl": RL,
        "te": ["transformer-engine[pytorch]>=2.9"],
        "flash": ["flash-attn>=2.6"],
        "all": DATA + TRACK + RL,
        "dev": [
            "pytest", "pytest-timeout", "en-dtypes==0.0.4",
            "triton==3.6.0",  # CPU CI runs the HiF8 Triton kernels in the interpreter (TRITON_INTERPRET=1)
            *DATA, *TRACK, *RL,
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
