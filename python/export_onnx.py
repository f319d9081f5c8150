"""Deploy a BSR model: export to ONNX, run it in onnxruntime, compare with eager PyTorch.

The model is the small ViT that ships with bsr_kernels (pre-trained on digits 0-4, 12 blocks,
16x16 px, patch 4), reprogrammed as for fine-tuning: token dropping is part of the model, so the
ONNX graph drops tokens too (the drop op is decomposed into standard ONNX ops; onnxruntime needs
no bsr_kernels). The batch size stays dynamic; the image size is fixed.

Needs ``pip install onnx onnxscript onnxruntime``. Run: ``python python/export_onnx.py [--out F]``.
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import bsr_kernels
from bsr_kernels.finetune.models import ASSETS, create_digits_vit, load_weights


def main(out: Path) -> float:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_digits_vit(num_classes=5)
    load_weights(model, ASSETS / "bsr_digits_vit.safetensors")
    bsr_kernels.reprogram(model, keep_rate=0.5)     # drops tokens in blocks 3, 6 and 9
    model.eval()
    size = model.patch_embed.img_size

    example = torch.randn(2, 3, *size)
    bsr_kernels.export_onnx(model, example, out)    # = torch.onnx.export(..., dynamo=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")

    images = torch.randn(7, 3, *size)               # another batch size: the batch is dynamic
    with torch.no_grad():
        eager = model(images).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    diff = float(np.abs(onnx_logits - eager).max())
    same = bool((onnx_logits.argmax(-1) == eager.argmax(-1)).all())
    print(f"onnxruntime vs eager PyTorch on {images.shape[0]} images: "
          f"max |logit diff| {diff:.3g}, same predictions: {same}")
    return diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the .onnx file to write (default: a temporary file)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "bsr_digits_vit.onnx")
