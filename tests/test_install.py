"""The package's requirements: a torch range, the application's packages in an extra, and an
``import bsr_kernels`` that needs only torch, timm, safetensors and numpy."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_ONLY = ("matplotlib", "sklearn", "tqdm", "onnx", "onnxscript", "onnxruntime", "scipy")


def _setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "extras_require")}


def test_requirements_are_a_range_and_the_app_is_an_extra():
    kw = _setup_kwargs()
    reqs = kw["install_requires"]
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs)
    assert names == ["numpy", "safetensors", "timm", "torch"]
    assert "torch>=2.11" in reqs and not any("==" in r for r in reqs)
    assert "timm>=1.0.28,<2" in reqs          # the oldest timm the suite passed with
    assert set(kw["extras_require"]["app"]) == {"tqdm", "matplotlib", "scikit-learn"}
    assert {"onnx", "onnxscript", "onnxruntime", "pytest"} <= set(kw["extras_require"]["test"])
    assert '"torch>=2.11"' in (REPO / "pyproject.toml").read_text()
    install = (REPO / "scripts" / "install.sh").read_text()
    assert "torch==2.14.1" in install and '-e ".[test,app]"' in install
    oldest = (REPO / "scripts" / "test_oldest_torch.sh").read_text()  # the lower bound, tested
    assert "torch==2.11.0" in oldest and '-e ".[test,app]"' in oldest


def test_import_and_reprogram_without_the_app_packages():
    """A fresh interpreter in which matplotlib, scikit-learn, tqdm (and onnx*) cannot be imported
    still imports bsr_kernels, reprograms a model, trains a step and uses the helpers."""
    code = f"""
import sys
BLOCKED = {APP_ONLY!r}
class Hide:   # every import finder, made blind to the blocked packages: as if not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path if hasattr(f, "find_spec")]
for name in BLOCKED:
    try:
        __import__(name)
        raise SystemExit(f"{{name}} is still importable")
    except ModuleNotFoundError:
        pass
import torch
from timm.models.vision_transformer import VisionTransformer
import bsr_kernels
torch.manual_seed(0)
m = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3)
bsr_kernels.reprogram(m)
x = torch.randn(2, 3, 16, 16)
m(x).square().mean().backward()
assert m.head.weight.grad is not None
print(bsr_kernels.trainable_summary(m))
print(bsr_kernels.profile(m, x).tokens_per_block)
with torch.no_grad():
    ep = torch.export.export(m.eval(), (x,))
loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
print("app modules loaded:", loaded)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "app modules loaded: []" in r.stdout
    assert "trainable params" in r.stdout and "[17, 17, 10, 7]" in r.stdout
