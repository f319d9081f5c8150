"""The copyable example in python/ runs as a user would run it."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_finetune_example_runs():
    """The example learns: 4 epochs take the test accuracy from about chance (20%, 5 classes,
    299 test images) to about 41% here, and the loss down; the floor of 33% is over 5 standard
    deviations of a chance guess above 20% and leaves 8 points of margin."""
    env = dict(os.environ, OMP_NUM_THREADS="1")   # a shared 2-core machine: no oversubscription
    r = subprocess.run([sys.executable, "python/finetune_example.py", "--epochs", "4"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    epochs = [re.fullmatch(r"epoch (\d+): loss ([\d.]+), test accuracy ([\d.]+)%", ln)
              for ln in lines[:4]]
    assert all(epochs), lines[:4]
    assert [int(m[1]) for m in epochs] == [1, 2, 3, 4]
    losses = [float(m[2]) for m in epochs]
    accs = [float(m[3]) for m in epochs]
    assert 33.0 < accs[-1] <= 100.0, accs
    assert accs[-1] > accs[0] and losses[-1] < losses[0], (accs, losses)
    assert "saved activations" in lines[4] and "tokens per block" in lines[4]


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```python", text.index(heading)) + len("```python")
    return text[start:text.index("```", start)]


def test_readme_training_loop_runs():
    """The README's own training loop, as printed there: random init instead of hub weights
    (no network here), a two-batch loader and a small test set of random images."""
    code = _readme_block("## Your own training loop")
    assert "pretrained=True" in code
    setup = ("import torch\n"
             "g = torch.Generator().manual_seed(0)\n"
             "loader = [(torch.randn(4, 3, 224, 224, generator=g), torch.randint(0, 10, (4,), "
             "generator=g)) for _ in range(2)]\n"
             "test_images = torch.randn(8, 3, 224, 224, generator=g)\n"
             "test_labels = torch.randint(0, 10, (8,), generator=g)\n")
    check = ("\nassert float(accuracy * 8).is_integer()  # a fraction of the 8 test images\n"
             "trained = {id(p) for p in rest + head}\n"
             "assert len(rest) > 0 and len(head) == 2\n"
             "assert all((p.grad is not None) == (id(p) in trained) for p in model.parameters())\n"
             "import timm.models.vision_transformer as vt\n"
             "assert all(type(b) is vt.Block for b in model.blocks)  # restored\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", setup + code.replace("pretrained=True",
                                                                   "pretrained=False") + check],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # print(bsr_kernels.profile(...)) shows its table (a ProfileResult)
    assert re.search(r"tokens per block +\[197, 197, 197, 197, 100, 100, 100, 52, 52, 52, 28, 28\]",
                     r.stdout), r.stdout
