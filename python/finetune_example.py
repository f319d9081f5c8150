"""Fine-tune a timm ViT with Block Selective Reprogramming, in a dozen lines.

Copy this and change the model name and the data. Here, offline: the small ViT that ships with
bsr_kernels (pre-trained on digits 0-4) learns digits 5-9. With a network, use for instance
``timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=...)``.

Run: ``python python/finetune_example.py [--epochs N]``.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import bsr_kernels
from bsr_kernels.finetune.data import DIGITS_TARGET_CLASSES, digits_split
from bsr_kernels.finetune.models import ASSETS, create_digits_vit, digits_vit_config, load_weights


def main(epochs: int = 15) -> float:
    torch.manual_seed(0)
    # 1. A pre-trained timm VisionTransformer with a new 5-class head.
    model = create_digits_vit(num_classes=5)
    load_weights(model, ASSETS / "bsr_digits_vit.safetensors")   # the head is left fresh

    # 2. BSR: train blocks 3, 7, 11 and the head; drop half the tokens in blocks 3, 6, 9.
    bsr_kernels.reprogram(model, keep_rate=0.5)

    # 3. An ordinary training loop; the head learns at 10x the rate, as the authors do.
    size = digits_vit_config()["arch"]["img_size"]
    train, test = digits_split(DIGITS_TARGET_CLASSES, img_size=size, max_shift=size // 8)
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")]
    opt = torch.optim.AdamW([{"params": rest, "lr": 3e-4}, {"params": head, "lr": 3e-3}],
                            weight_decay=0.05)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-4, 3e-3],
                                                total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():   # token dropping is part of the model: it runs here too
            accuracy = (model(test.images).argmax(-1) == test.labels).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {100 * accuracy:.1f}%")

    # 4. What one training step costs, per image.
    stats = bsr_kernels.profile(model, test.images[:8], test.labels[:8])
    print(f"saved activations {stats['saved_activation_mib_per_image']:.3f} MiB/image, "
          f"training {stats['train_gflops_per_image']:.4f} GFLOPs/image, "
          f"tokens per block {stats['tokens_per_block']}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    main(parser.parse_args().epochs)
