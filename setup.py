"""Build script of bsr_kernels: the Python package and its C++ CPU extension ``bsr_kernels.ops._C``.

The extension is compiled against the torch that is installed, so build without isolation:

    pip install --no-build-isolation -e ".[test,app]"  # development (tests and bsr-finetune)
    pip install --no-build-isolation .                 # the library: torch, timm, safetensors, numpy
    pip install --no-build-isolation ".[app]"          # and the bsr-finetune application

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
    # The kernel library needs only these; the extension builds against whichever torch is
    # installed (CI tests the version pinned in scripts/install.sh).
    install_requires=[
        "torch>=2.11",
        "timm>=1.0.28,<2",   # Attention.gate, which reprogram checks, came in 1.0.28
        "safetensors",
        "numpy",
    ],
    extras_require={
        # bsr-finetune (the application): digits data, the PNG report, progress bars.
        "app": ["tqdm", "matplotlib", "scikit-learn"],
        # the test suite, including the ONNX export tests (onnxruntime runs the exported files).
        "test": ["pytest", "hypothesis", "onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["bsr-finetune = bsr_kernels.finetune.cli:main"]},
    zip_safe=False,
)
