"""bsr_kernels: Block Selective Reprogramming for timm Vision Transformers.

Fine-tune a pre-trained ViT by training a few blocks and dropping the patch tokens the CLS token
attends to least::

    import timm, bsr_kernels
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=10)
    bsr_kernels.reprogram(model)          # blocks 3, 7, 11 + head trained; drops in 3, 6, 9
"""
from __future__ import annotations

from .attention import TokenDropAttention
from .moe import MultiTaskViT, to_moe
from .ops import available_backends, cls_attention, drop_tokens
from .profile import profile
from .reprogram import kept_patches, reprogram, restore

__version__ = "0.1.0"

__all__ = ["cls_attention", "drop_tokens", "available_backends", "TokenDropAttention",
           "reprogram", "restore", "profile", "kept_patches", "load_delta", "to_moe",
           "MultiTaskViT", "__version__"]


def load_delta(model, path):
    """Applies a delta checkpoint (trained parameters only) to ``model``; see
    :func:`bsr_kernels.delta.load_delta`."""
    from .delta import load_delta as _load_delta
    return _load_delta(model, path)
