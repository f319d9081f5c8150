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
from .config import BSRConfig
from .ops import available_backends, cls_attention, drop_tokens, use_backend
from . import export as _export  # noqa: F401  (registers the ONNX decomposition of the drop op)
from .export import export_onnx
from .profile import ProfileResult, profile
from .reprogram import kept_patches, reprogram, restore
from .summary import TrainableSummary, draw_kept, trainable_summary
from .saving import load_checkpoint, save_checkpoint, saved_bsr_config

__version__ = "0.1.0"

__all__ = ["cls_attention", "drop_tokens", "available_backends", "use_backend", "BSRConfig",
           "TokenDropAttention",
           "reprogram", "restore", "profile", "ProfileResult", "kept_patches", "load_delta",
           "save_delta", "trainable_summary", "TrainableSummary", "draw_kept", "export_onnx",
           "save_checkpoint", "load_checkpoint", "saved_bsr_config", "to_moe", "MultiTaskViT",
           "__version__"]


def load_delta(model, path):
    """Applies a delta checkpoint (trained parameters only) to ``model``; see
    :func:`bsr_kernels.delta.load_delta`."""
    from .delta import load_delta as _load_delta
    return _load_delta(model, path)


def save_delta(model, path, names=None, extra=None):
    """Writes a delta checkpoint: the trained parameters and the BSR config; see
    :func:`bsr_kernels.delta.save_delta`."""
    from .delta import save_delta as _save_delta
    return _save_delta(model, path, names=names, extra=extra)
