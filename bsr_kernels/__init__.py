"""bsr_kernels: Block Selective Reprogramming for timm Vision Transformers."""
from __future__ import annotations

from .ops import available_backends, cls_attention, drop_tokens

__version__ = "0.1.0"

__all__ = ["cls_attention", "drop_tokens", "available_backends", "__version__"]
