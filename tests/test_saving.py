"""The BSR config travels with save_for_hf, full checkpoints (torch and safetensors) and deltas;
loading re-applies it or warns."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch

import bsr_kernels
from bsr_kernels.config_access import bsr_config_dict
from bsr_kernels.saving import BSRConfigWarning

KW = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2, num_classes=5)
NAME = "vit_tiny_patch16_224"


def plain(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(NAME, **KW).eval()


def tuned(seed=0, **bsr):
    model = plain(seed)
    bsr_kernels.reprogram(model, **{"keep_rate": 0.3, **bsr})
    with torch.no_grad():   # "fine-tuned": move the trained weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_save_for_hf_carries_the_config(tmp_path):
    pytest.importorskip("huggingface_hub")
    model, x = tuned(activation_dtype=torch.bfloat16), images()
    want = logits(model, x)
    timm.models.save_for_hf(model, tmp_path, safe_serialization="both")
    notes = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["notes"]
    assert any("bsr_kernels.reprogram config" in n and '"keep_rate": 0.3' in n for n in notes)

    # timm's own reload: a plain model, which does not drop tokens (the 0.36 logits)
    weights = tmp_path / "pytorch_model.bin"
    reloaded = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(weights), custom_load=False), **KW).eval()   # (older timm: not the npz loader)
    assert not torch.allclose(logits(reloaded, x), want, atol=1e-3)
    assert bsr_kernels.saved_bsr_config(weights)["keep_rate"] == 0.3
    bsr_kernels.load_checkpoint(reloaded, tmp_path)      # the directory, or either weights file
    torch.testing.assert_close(logits(reloaded, x), want)
    assert bsr_config_dict(reloaded)["activation_dtype"] == "bfloat16"

    for file in ("model.safetensors", "pytorch_model.bin"):
        again = bsr_kernels.load_checkpoint(plain(seed=5), tmp_path / file)
        torch.testing.assert_close(logits(again, x), want)

    # create_model("local-dir:...") keeps the config in pretrained_cfg; re-apply from there
    hub = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, **KW).eval()
    assert bsr_kernels.saved_bsr_config(hub)["drop_at"] == bsr_config_dict(model)["drop_at"]
    bsr_kernels.load_checkpoint(hub, None)
    torch.testing.assert_close(logits(hub, x), want)


def test_restore_removes_the_config_from_pretrained_cfg():
    model = plain()
    notes = model.pretrained_cfg.get("notes")
    bsr_kernels.reprogram(model)
    assert bsr_kernels.saved_bsr_config(model) is not None
    bsr_kernels.restore(model)
    assert bsr_kernels.saved_bsr_config(model) is None
    assert model.pretrained_cfg.get("notes") == notes
    assert "bsr_config" not in model.state_dict()._metadata[""]
    assert timm.create_model(NAME, **KW).pretrained_cfg.get("notes") == notes   # not shared


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_full_checkpoint_carries_the_config(tmp_path, suffix):
    model, x = tuned(), images()
    path = bsr_kernels.save_checkpoint(model, tmp_path / f"ckpt{suffix}")
    if suffix == ".pth":   # a plain torch.save of the state_dict carries it too
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "train.pth")
        assert bsr_kernels.saved_bsr_config(tmp_path / "train.pth")["keep_rate"] == 0.3
        other = bsr_kernels.load_checkpoint(plain(seed=2), tmp_path / "train.pth")
        torch.testing.assert_close(logits(other, x), logits(model, x))
    fresh = plain(seed=3)
    bsr_kernels.load_checkpoint(fresh, path)
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
    assert set(fresh.state_dict()) == set(plain().state_dict())     # keys unchanged


def test_state_dict_into_a_differently_reprogrammed_model_warns():
    model = tuned()
    sd = model.state_dict()
    other = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.7)
    with pytest.warns(BSRConfigWarning, match="keep_rate.*0.3.*load_checkpoint"):
        other.load_state_dict(sd)
    same = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSRConfigWarning)
        same.load_state_dict(sd)                          # same settings: silent
        bsr_kernels.reprogram(plain(seed=4)).load_state_dict(plain().state_dict())  # plain weights


def test_load_checkpoint_into_a_plain_model_without_reprogram_warns():
    model, x = tuned(), images()
    target = plain(seed=6)
    with pytest.warns(BSRConfigWarning, match="this model is plain"):
        bsr_kernels.load_checkpoint(target, model.state_dict(), reprogram=False)
    assert bsr_config_dict(target) is None
    bsr_kernels.load_checkpoint(target, model.state_dict())
    torch.testing.assert_close(logits(target, x), logits(model, x))


def test_save_delta_is_public(tmp_path):
    model, x = tuned(), images()
    path = bsr_kernels.save_delta(model, tmp_path / "task.safetensors")
    base = plain()
    bsr_kernels.load_delta(base, path)
    torch.testing.assert_close(logits(base, x), logits(model, x))
    assert "save_delta" in bsr_kernels.__all__
