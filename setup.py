"""fastted: fused layer-wise knowledge distillation for transformer language models.

The Triton kernels live in the top-level folder ``kernels/`` of the source
tree and install as ``fastted.kernels`` (never as a top-level ``kernels``
module: that name belongs to another package on PyPI).
"""
from setuptools import setup

setup(
    name="fastted",
    version="0.1.0",
    description="Fused Triton kernels and recipes for layer-wise knowledge distillation of transformer LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastted", "fastted.ops", "fastted.methods", "fastted.kernels"],
    package_dir={"fastted": "fastted", "fastted.kernels": "kernels"},
    install_requires=[
        # Any torch >= 2.4 satisfies this: an installed (CUDA or CPU) build is kept.
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.40",
        "datasets>=2.18",
        "deepspeed>=0.14",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "matplotlib",       # the run report's PNG
        "gguf>=0.10",       # GGUF checkpoints (the SmolLM2 example) through transformers
        "accelerate>=0.26",
    ],
    extras_require={
        # liger-kernel: a baseline of `pytest benchmarks/` (its chunked losses run on a CPU too)
        # trl: the tests of fastted.integrations with TRL's SFTTrainer
        "dev": ["pytest>=8", "pytest-benchmark>=4", "liger-kernel>=0.8", "trl>=1.0"],
        "trl": ["trl>=1.0"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["fastted = fastted.cli:main"]},
)
