"""fastted: fused layer-wise knowledge distillation for transformer language models.

The Triton kernels live in the top-level folder ``kernels/`` of the source
tree and install as ``fastted.kernels`` only. ``kernels/`` has no
``__init__.py``, so that it never shadows the PyPI distribution ``kernels``
(which transformers imports) when the repository root is on ``sys.path``;
the wheel's ``build_py`` copies its modules into ``fastted/kernels/``, and in
a source checkout ``fastted/kernels/__init__.py`` reaches into the folder.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_kernels(build_py):
    """build_py, plus the modules of the top-level ``kernels/`` folder copied into ``fastted/kernels/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them where they are
            return
        target = Path(self.build_lib, "fastted", "kernels")
        self.mkpath(str(target))
        for source in sorted(Path("kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


setup(
    name="fastted",
    version="0.1.0",
    description="Fused Triton kernels and recipes for layer-wise knowledge distillation of transformer LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastted", "fastted.ops", "fastted.methods", "fastted.kernels", "fastted.train"],
    cmdclass={"build_py": build_py_with_kernels},
    # The library (fused losses, recipes, integrations) needs only these; the engine (`fastted.train`, the
    # `fastted` command) needs the `train` extra. safetensors: the files TaskFilters save and load.
    install_requires=[
        # Any torch >= 2.4 satisfies this: an installed (CUDA or CPU) build is kept.
        "torch>=2.4",
        "triton>=3.6",  # 3.6 (the GPU machine's) and 3.9 (CI's) are tested; .ci/run checks 3.6 under the interpreter
        "numpy",
        "safetensors",
    ],
    extras_require={
        # fastted.integrations (transformers.Trainer, TRL) and the recipes over Hugging Face models
        "hf": ["transformers>=4.40"],
        # the engine: fastted.train and the `fastted` command
        "train": [
            "transformers>=4.40",
            "datasets>=2.18",
            "deepspeed>=0.14",
            "pyyaml",
            "tqdm",
            "matplotlib",  # the run report's PNG
            "gguf>=0.10",  # GGUF checkpoints (the SmolLM2 example) through transformers
            "accelerate>=0.26",
        ],
        # liger-kernel: a baseline of `pytest benchmarks/` (its chunked losses run on a CPU too)
        # trl: the tests of fastted.integrations with TRL's SFTTrainer
        # build: the sdist and wheel of scripts/wheel_check.sh
        # ruff, import-linter, pre-commit: the lint, format and import-layer checks of .ci/run
        # mkdocs*: the documentation site (mkdocs build --strict in the tests)
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "liger-kernel>=0.8",
            "trl>=1.0",
            "build>=1",
            "ruff>=0.15",
            "import-linter>=2.0",
            "pre-commit>=4",
            "mkdocs>=1.6",
            "mkdocs-material>=9.5",
            "mkdocstrings-python>=1.10",
        ],
        "trl": ["trl>=1.0"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["fastted = fastted.train.cli:command"]},
)
