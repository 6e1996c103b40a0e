"""ds_orthoadam: DeepSpeed pre-training of GPT2/Llama models with softmax-1 attention and the OrthoAdam optimiser.

Runtime dependencies are pinned to versions known to work together (see README.md, "Install").
torch is required as ``torch>=2.13`` on purpose: GPU users install their CUDA build first, and this
requirement is then already satisfied; the Makefile installs the CPU build for CI and demos.
"""
from setuptools import find_packages, setup

setup(
    name="ds_orthoadam",
    version="0.1.0",
    description="Pre-train GPT2/Llama models without attention sinks or outlier activations "
    "(softmax-1 + OrthoAdam) with DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # ds_configs/ stays at the top of the repository and ships inside the package as ds_orthoadam.ds_configs
    packages=find_packages(include=["ds_orthoadam", "ds_orthoadam.*"]) + ["ds_orthoadam.ds_configs"],
    package_dir={"ds_orthoadam.ds_configs": "ds_configs"},
    package_data={"ds_orthoadam": ["csrc/*.cpp"],  # the CPU rotation kernel, compiled on first use
                  "ds_orthoadam.ds_configs": ["*.json", "variants/*.json"]},
    install_requires=[
        "torch>=2.13",
        "deepspeed==0.19.8",
        "transformers==5.24.0",
        "accelerate==1.16.0",  # transformers requires it for its DeepSpeed ZeRO-3 integration (models.py)
        "datasets==5.2.0",
        "sentencepiece==0.2.3",
        "tensorboard==2.21.0",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
    ],
    extras_require={"dev": ["pytest>=8", "scipy>=1.11", "ruff==0.16.9"]},  # ruff: `make lint` (pyproject.toml)
    entry_points={"console_scripts": [
        "ds-orthoadam-demo-data=ds_orthoadam.data.demo_corpus:main",
        "ds-orthoadam-tokenizer=ds_orthoadam.data.tokenizer:main",
        "ds-orthoadam-pretokenize=ds_orthoadam.data.pretokenize:main",
        "ds-orthoadam-analyze=ds_orthoadam.analysis.cli:main",
        "ds-orthoadam-train=ds_orthoadam.train:main",
        "ds-orthoadam-export=ds_orthoadam.export:main",
    ]},
)
