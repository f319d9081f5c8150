"""The design anchors: saved activation memory and FLOPs of ViT-B/16 training, measured on CPU.

Rows (random-init ``vit_base_patch16_224``, float32, train mode, batch 8, cross-entropy loss):

* ``timm full``: plain timm fine-tuning, every parameter trained (timm's fused SDPA attention).
* ``BSR eager``: :class:`bsr_kernels.baselines.EagerBSR`, the authors' formulation (eager attention,
  blocks 3, 7, 11 + head trained, drops in 3, 6, 9 at keep rate 0.5 with the fused token).
* ``bsr_kernels lean`` / ``fast``: ``bsr_kernels.reprogram`` in both memory modes, when it imports.

Saved memory and FLOPs follow :mod:`bsr_kernels.measure` (the design's definitions). The design
states: full 112.7 MiB/image, 100.9 GFLOP/image, 16.85 GMAC forward; BSR eager 25.3 MiB/image,
29.6 GFLOP/image, 8.82 GMAC forward. ``--cpu-sdpa`` also counts the FLOPs of CPU SDPA kernels,
which stock FlopCounterMode skips (so the full-model anchor leaves out attention matmuls).

Usage: ``python benchmarks/bench_anchors.py [--batch 8] [--model vit_base_patch16_224] [--json P]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import format_table  # noqa: E402

from bsr_kernels.baselines import EagerBSR  # noqa: E402
from bsr_kernels.measure import count_flops, saved_activations  # noqa: E402

#: What DESIGN.md states for vit_base_patch16_224 at batch 8: (MiB/img, GFLOP/img, fwd GMAC/img).
ANCHORS = {"timm full": (112.7, 100.9, 16.85), "BSR eager": (25.3, 29.6, 8.82)}


def _variants(model_name: str):
    """name -> (module to run, model whose parameters are excluded)."""
    def full():
        m = timm.create_model(model_name, pretrained=False).train()
        return m, m

    def eager():
        m = timm.create_model(model_name, pretrained=False).train()
        return EagerBSR(m).train(), m

    def library(mode):
        def make():
            import bsr_kernels
            m = timm.create_model(model_name, pretrained=False).train()
            return bsr_kernels.reprogram(m, memory_mode=mode), m
        return make

    return {"timm full": full, "BSR eager": eager, "bsr_kernels lean": library("lean"),
            "bsr_kernels fast": library("fast")}


def measure(make, batch: int, cpu_sdpa: bool, seed: int = 0) -> dict:
    """Saved MiB/image, training GFLOP/image and forward GMAC/image of one variant."""
    torch.manual_seed(seed)
    module, model = make()
    images = torch.randn(batch, 3, *model.patch_embed.img_size)
    labels = torch.randint(0, model.num_classes, (batch,))

    def loss():
        return F.cross_entropy(module(images), labels)

    saved = saved_activations(loss, exclude=[model])
    mib = saved.mib_per_image(batch)
    del saved
    flops = count_flops(loss, count_cpu_sdpa=cpu_sdpa)
    return dict(saved_mib_per_image=mib, train_gflop_per_image=flops.total / batch / 1e9,
                forward_gmac_per_image=flops.forward_macs / batch / 1e9)


def run(model_name: str = "vit_base_patch16_224", batch: int = 8, cpu_sdpa: bool = False,
        include_library: bool = True) -> dict[str, dict]:
    """Measures every variant; a library variant that fails is reported with its error."""
    results = {}
    for name, make in _variants(model_name).items():
        if name.startswith("bsr_kernels") and not include_library:
            continue
        try:
            results[name] = measure(make, batch, cpu_sdpa)
        except Exception as e:  # the library rows are informative only
            if not name.startswith("bsr_kernels"):
                raise
            results[name] = dict(error=f"{type(e).__name__}: {e}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpu-sdpa", action="store_true",
                        help="count CPU SDPA kernels' FLOPs (not done for the design anchors)")
    parser.add_argument("--no-library", action="store_true", help="skip bsr_kernels.reprogram")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = run(args.model, args.batch, args.cpu_sdpa, not args.no_library)
    print(f"{args.model}, random init, float32, CPU, batch {args.batch}, train mode"
          + (", CPU SDPA FLOPs counted" if args.cpu_sdpa else ""))
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((name, r["error"][:60], "", "", ""))
            continue
        want = ANCHORS.get(name) if args.model == "vit_base_patch16_224" and args.batch == 8 \
            and not args.cpu_sdpa else None
        rows.append((name, f"{r['saved_mib_per_image']:.2f}", f"{r['train_gflop_per_image']:.2f}",
                     f"{r['forward_gmac_per_image']:.3f}",
                     "" if want is None else f"{want[0]} / {want[1]} / {want[2]}"))
    print(format_table(rows, ["variant", "saved MiB/img", "train GFLOP/img", "fwd GMAC/img",
                              "design anchor"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
