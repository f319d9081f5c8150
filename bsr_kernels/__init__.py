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
from .saving import BSRConfigWarning, load_checkpoint, save_checkpoint, saved_bsr_config
from .delta import load_delta, save_delta

__version__ = "0.1.0"

__all__ = ["cls_attention", "drop_tokens", "available_backends", "use_backend", "BSRConfig",
           "TokenDropAttention",
           "reprogram", "restore", "profile", "ProfileResult", "kept_patches", "load_delta",
           "save_delta", "trainable_summary", "TrainableSummary", "draw_kept", "export_onnx",
           "save_checkpoint", "load_checkpoint", "saved_bsr_config", "BSRConfigWarning", "to_moe",
           "MultiTaskViT", "__version__"]

