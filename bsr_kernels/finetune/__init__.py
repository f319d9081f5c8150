"""``bsr-finetune``: fine-tune a timm ViT with BSR, full fine-tuning, a linear probe or BitFit.

With no arguments it adapts a small ViT, shipped pre-trained on digits 0-4, to digits 5-9
(scikit-learn's ``load_digits``, no network needed) with every method, and prints accuracy,
saved activation memory, training FLOPs and step time side by side. See
:func:`bsr_kernels.finetune.cli.main` and ``bsr-finetune --help``.
"""
from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Runs the ``bsr-finetune`` command line; see :mod:`bsr_kernels.finetune.cli`."""
    from .cli import main as _main
    return _main(argv)
