"""Rebuilds the shipped source model: a 12-block ViT pre-trained on digits 0-4.

Run::

    python -m bsr_kernels.finetune.pretrain_source            # writes bsr_kernels/finetune/assets/

It trains from a fixed seed on scikit-learn's digits 0-4 (two thirds of them; the rest measures
the source accuracy), and writes ``bsr_digits_vit.safetensors`` (weights) and
``bsr_digits_vit.json`` (architecture, input size, normalisation, recipe, source accuracy and the
SHA-256 of the weights). The run is deterministic: the same torch build and thread count give
the same bytes; another machine gives the same recipe and, up to float rounding, the same model.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import _positive_float, _positive_int, _seed
from .data import DIGITS_SOURCE_CLASSES, digits_split
from .models import ASSETS, DIGITS_MODEL, create_digits_vit

__all__ = ["DEFAULT_ARCH", "pretrain", "main"]

#: The shipped architecture: 12 blocks so that BSR's defaults (3, 7, 11 / 3, 6, 9) apply.
DEFAULT_ARCH = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 12, "num_heads": 4,
                "mlp_ratio": 4.0}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def pretrain(arch: dict, epochs: int = 120, batch_size: int = 64, lr: float = 1e-3,
             weight_decay: float = 0.05, warmup_epochs: int = 5, max_shift: int = -1,
             seed: int = 0, log=print) -> tuple[torch.nn.Module, dict]:
    """Trains a digits ViT from scratch on the source task (digits 0-4).

    Args:
        arch: architecture keywords of :func:`~bsr_kernels.finetune.models.create_digits_vit`.
        epochs, batch_size, lr, weight_decay, warmup_epochs: the AdamW + cosine recipe.
        max_shift: random-shift augmentation in pixels; -1 means ``img_size // 8`` (one
            original 8 x 8 pixel).
        seed: the seed of initialisation and shuffling.
        log: progress lines.

    Returns:
        (model, record): the trained model (eval mode) and a dict with the recipe and the
        source-task test accuracy.
    """
    from .train import make_optimizer, make_scheduler

    torch.manual_seed(seed)
    img = arch["img_size"]
    shift = img // 8 if max_shift < 0 else max_shift
    train, test = digits_split(DIGITS_SOURCE_CLASSES, img, MEAN, STD, test_fraction=1 / 3,
                               max_shift=shift)
    model = create_digits_vit(len(DIGITS_SOURCE_CLASSES), arch=arch)
    opt = make_optimizer(model, lr, head_lr_scale=1.0, weight_decay=weight_decay)
    steps = len(train) // batch_size
    sched = make_scheduler(opt, epochs * steps, warmup_epochs * steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=g)
        for i in range(steps):
            batch = [train[j] for j in order[i * batch_size:(i + 1) * batch_size].tolist()]
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([b[1] for b in batch])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(test.images).argmax(-1) == test.labels).float().mean().item()
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, source accuracy "
                f"{100 * acc:.2f}% ({time.time() - t0:.0f} s)")
    model.eval()
    record = {"epochs": epochs, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "max_shift": shift,
              "seed": seed, "train_images": len(train), "test_images": len(test),
              "source_test_accuracy": acc, "train_seconds": round(time.time() - t0, 1)}
    return model, record


def main(argv=None) -> int:
    """``python -m bsr_kernels.finetune.pretrain_source [--out DIR] [--epochs N] ...``."""
    p = argparse.ArgumentParser(prog="python -m bsr_kernels.finetune.pretrain_source",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=120)
    p.add_argument("--img-size", type=_positive_int, default=DEFAULT_ARCH["img_size"])
    p.add_argument("--patch-size", type=_positive_int, default=DEFAULT_ARCH["patch_size"])
    p.add_argument("--embed-dim", type=_positive_int, default=DEFAULT_ARCH["embed_dim"])
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads; fixed so that the bytes reproduce (default: 1)")
    args = p.parse_args(argv)
    if args.img_size < 8:
        p.error(f"argument --img-size: the digits data needs at least 8 px, got {args.img_size}")
    if 2 * args.patch_size > args.img_size:
        p.error(f"argument --patch-size: {args.patch_size} px is more than half the --img-size "
                f"{args.img_size} px; the model needs at least 2 patches per side")
    if args.img_size % args.patch_size:
        p.error(f"argument --img-size: {args.img_size} px is not a whole number of --patch-size "
                f"{args.patch_size} px patches per side")
    heads = DEFAULT_ARCH["num_heads"]
    if args.embed_dim % heads:
        p.error(f"argument --embed-dim: {args.embed_dim} is not a multiple of the {heads} "
                "attention heads")
    torch.set_num_threads(args.threads)
    arch = dict(DEFAULT_ARCH, img_size=args.img_size, patch_size=args.patch_size,
                embed_dim=args.embed_dim)
    model, record = pretrain(arch, epochs=args.epochs, lr=args.lr, seed=args.seed)

    from safetensors.torch import save_file

    from ..checkpoint import atomic_write, write_json
    weights = args.out / f"{DIGITS_MODEL}.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={
        "format": "pt", "model": DIGITS_MODEL}))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    config = {
        "name": DIGITS_MODEL,
        "arch": arch,
        "source_classes": list(DIGITS_SOURCE_CLASSES),
        "mean": list(MEAN), "std": list(STD),
        "recipe": record,
        "rebuild": "python -m bsr_kernels.finetune.pretrain_source",
        "sha256": sha,
        "built_with": {"torch": torch.__version__, "python": platform.python_version(),
                       "threads": args.threads},
    }
    write_json(args.out / f"{DIGITS_MODEL}.json", config)
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.2f} MiB, sha256 {sha[:12]}...) "
          f"and {DIGITS_MODEL}.json; source accuracy {100 * record['source_test_accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
