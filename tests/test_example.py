"""The copyable example in python/ runs as a user would run it."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_finetune_example_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")   # a shared 2-core machine: no oversubscription
    r = subprocess.run([sys.executable, "python/finetune_example.py", "--epochs", "2"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["epoch 1", "epoch 2"]
    acc = float(lines[1].rsplit(" ", 1)[1].rstrip("%"))
    assert 20.0 < acc <= 100.0           # 5 classes: better than chance after 2 epochs
    assert "saved activations" in lines[2] and "tokens per block" in lines[2]
