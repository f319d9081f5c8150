"""Delta checkpoints: only trained parameters, applied back onto the base model."""
import json

import pytest
import timm
import torch

import bsr_kernels
import bsr_kernels.delta
from bsr_kernels.delta import base_fingerprint, read_delta, save_delta


def _vit(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=64).eval()


def _finetune_like(model, seed=1):
    """Changes every trained parameter, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_bsr_delta_holds_trained_blocks_only_and_round_trips(tmp_path):
    tuned = _finetune_like(bsr_kernels.reprogram(_vit(), keep_rate=0.5))
    path = save_delta(tuned, tmp_path / "task.safetensors", extra={"task": "demo"})
    tensors, config = read_delta(path)

    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert set(tensors) == trained
    assert {n.split(".")[1] for n in trained if n.startswith("blocks.")} == {"3", "7", "11"}
    assert all(n.startswith(("blocks.3.", "blocks.7.", "blocks.11.", "head.")) for n in trained)
    # About 3/12 of the model (plus the head), far from all of it.
    ratio = config["numel"] / config["model_numel"]
    assert 0.2 < ratio < 0.3, ratio
    assert config["bsr"]["train_blocks"] == [3, 7, 11] and config["bsr"]["drop_at"] == [3, 6, 9]
    assert config["extra"] == {"task": "demo"}
    assert json.loads(path.with_suffix(".json").read_text())["parameters"] == config["parameters"]

    # A fresh base model (plain timm) becomes the fine-tuned BSR model.
    base = _vit()
    bsr_kernels.load_delta(base, path)
    assert hasattr(base, "bsr_config")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, got = tuned(x), base(x)
        plain = _vit()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, plain, atol=1e-3)
    for (n, a), (_, b) in zip(tuned.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), n


def test_delta_of_other_head_size_resets_the_classifier(tmp_path):
    base = _vit(num_classes=1000)            # a hub-style model with a 1000-class head
    model = _vit(num_classes=5)
    model.load_state_dict({k: v for k, v in base.state_dict().items()
                           if not k.startswith("head.")}, strict=False)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head.") or n.endswith(".bias"))   # BitFit
    _finetune_like(model)
    path = save_delta(model, tmp_path / "bitfit.safetensors")
    bsr_kernels.load_delta(base, path)
    assert base.head.out_features == 5
    assert not hasattr(base, "bsr_config")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)


def test_delta_refuses_another_base_and_bad_files(tmp_path):
    tuned = _finetune_like(bsr_kernels.reprogram(_vit()))
    path = save_delta(tuned, tmp_path / "d.safetensors")
    other = _vit(seed=123)                   # other pre-trained weights
    with pytest.raises(ValueError, match="frozen weights differ"):
        bsr_kernels.load_delta(other, path)
    assert not hasattr(other, "bsr_config")            # a refused delta changes nothing
    bsr_kernels.delta.load_delta(other, path, check_base=False)   # explicit opt-out works
    assert hasattr(other, "bsr_config")

    from timm.models.vision_transformer import VisionTransformer
    small = VisionTransformer(img_size=64, patch_size=16, num_classes=10, embed_dim=192,
                              depth=6, num_heads=3)
    with pytest.raises(ValueError, match="does not fit this model"):
        bsr_kernels.load_delta(small, path)
    assert not hasattr(small, "bsr_config")

    with pytest.raises(ValueError, match="no such delta"):
        bsr_kernels.load_delta(_vit(), tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read"):
        bsr_kernels.load_delta(_vit(), junk)
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a bsr_kernels delta"):
        bsr_kernels.load_delta(_vit(), plain)


def test_save_delta_checks_its_arguments(tmp_path):
    model = _vit()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trained parameters"):
        save_delta(model, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="names"):
        save_delta(model, tmp_path / "x.safetensors", names=["not.a.param"])


def test_base_fingerprint_sees_any_change():
    a, b = _vit(), _vit()
    assert base_fingerprint(a) == base_fingerprint(b)
    with torch.no_grad():
        b.blocks[5].mlp.fc1.weight[0, 0] += 1e-6
    assert base_fingerprint(a) != base_fingerprint(b)
    assert base_fingerprint(a, exclude=["blocks.5.mlp.fc1.weight"]) == \
        base_fingerprint(b, exclude=["blocks.5.mlp.fc1.weight"])
