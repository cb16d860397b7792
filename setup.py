"""adatok-vlm: one distribution, one import root.

The sibling folders ``tokenizer/``, ``generator/`` and ``training/`` install *under* ``adatok_vlm``
(``adatok_vlm.tokenizer`` ...) so that a VLM project with its own ``tokenizer`` package is never
shadowed by ours. ``package_dir`` does the mapping for both editable and regular installs.
``configs/`` ships as package data (``adatok_vlm.configs``) so an installed package finds its YAML and
JSON configs without a source checkout (``training.config.configs_dir``).
"""

from setuptools import setup

SUBPACKAGES = {
    "adatok_vlm": "adatok_vlm",
    "adatok_vlm.tokenizer": "tokenizer",
    "adatok_vlm.generator": "generator",
    "adatok_vlm.training": "training",
    "adatok_vlm.configs": "configs",
}
# The config files inside adatok_vlm.configs, one level of sub-folders (configs/dit/*.yaml) and two
# (configs/vae/NAME/config.json).
CONFIG_FILES = [f"{depth}*.{ext}" for depth in ("", "*/", "*/*/") for ext in ("yaml", "json", "sbatch", "example", "md")]

setup(
    name="adatok-vlm",
    version="0.1.0",
    description="AdaTok: adaptive, variable-length 1D image tokens for Hugging Face vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(SUBPACKAGES),
    package_dir=SUBPACKAGES,
    include_package_data=False,
    package_data={"adatok_vlm.configs": CONFIG_FILES},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0",
        "accelerate>=1.5",
        "deepspeed>=0.16",
        "peft>=0.15",
        "datasets>=3.0",
        "timm>=1.0.10",
        "safetensors>=0.4.3",
        "diffusers>=0.32",
        "numpy>=1.24",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.16",
        "scipy>=1.11",
    ],
    extras_require={
        "data": ["scikit-image>=0.22", "scikit-learn>=1.4"],
        "lpips": ["lpips>=0.1.4"],
        "lm": ["gguf>=0.10", "sentencepiece>=0.2"],
        "dev": [
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "build>=1.2",
            "wheel>=0.43",
            "scikit-image>=0.22",
            "scikit-learn>=1.4",
            "lpips>=0.1.4",
            "gguf>=0.10",
        ],
    },
    entry_points={"console_scripts": ["adatok=adatok_vlm.cli:main"]},
)
