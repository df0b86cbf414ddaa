"""Packaging: the neutral spec installs alone; each backend is an extra."""

import re
from pathlib import Path

from setuptools import setup

INIT = (Path(__file__).parent / "mistral" / "__init__.py").read_text()

setup(
    name="mistral-reference",
    version=re.search(r'__version__ = "(.+)"', INIT).group(1),
    description="Reference Mistral/Mixtral inference on PyTorch and MLX, and a cross-backend diff",
    python_requires=">=3.10",
    packages=["mistral", "mistral.cli", "backends", "backends.torch", "backends.mlx"],
    package_data={"mistral": ["default_model/*", "configs/*.json"]},
    install_requires=["numpy", "sentencepiece", "simple-parsing", "tiktoken", "tqdm"],
    extras_require={
        # Install torch yourself first when you need a specific build (see README).
        "torch": ["torch>=2.5"],
        "mlx": ["mlx>=0.26"],
        "hub": ["huggingface_hub"],  # models by repo id (mistral.load("org/name"))
        "plot": ["matplotlib"],  # mistral diff --plot, mistral bench --plot
        "hf": ["transformers"],  # the hf reference of diff and bench (with torch)
        "mlx-lm": ["mlx-lm"],  # the mlx-lm reference of diff and bench (with mlx)
        "test": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "transformers",
            "mlx-lm",
            "mistral-common",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["mistral = mistral.cli:main"]},
)
