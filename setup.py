"""Build script of bsr_kernels: the Python package and its C++ CPU extension ``bsr_kernels.ops._C``.

The extension is compiled against the torch that is installed, so build without isolation:

    pip install --no-build-isolation -e .      # development (the suite runs from the repo root)
    pip install --no-build-isolation .         # regular install

``DEBUG=1`` builds the extension with ``-O0 -g`` instead of ``-O3``.
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0").strip() not in ("", "0")


def _extensions() -> list:
    # Relative paths: setuptools refuses absolute source paths in some modes.
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    opt = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
    return [
        CppExtension(
            name="bsr_kernels.ops._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            # OpenMP: at::parallel_for runs on torch's OpenMP pool only when compiled with it.
            extra_compile_args={"cxx": opt + ["-fopenmp", "-Wall"]},
            extra_link_args=["-fopenmp"] + (["-g"] if DEBUG else []),
        )
    ]


def _long_description() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="bsr_kernels",
    version="0.1.0",
    description="Block Selective Reprogramming (BSR) for timm Vision Transformers: "
                "train a few blocks, drop the least attended tokens.",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bsr_kernels", "bsr_kernels.*"]),
    package_data={"bsr_kernels.finetune": ["assets/*"]},
    include_package_data=True,
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch==2.14.1",
        "timm>=1.0.20,<2",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "numpy",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["bsr-finetune = bsr_kernels.finetune.cli:main"]},
    zip_safe=False,
)
