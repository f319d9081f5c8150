"""Delta checkpoints: only trained parameters, applied back onto the base model."""
import json
import warnings

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
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    assert list(tuned_sd) == list(base_sd) and tuned_sd
    for n, a in tuned_sd.items():
        assert a.dtype == base_sd[n].dtype and torch.equal(a, base_sd[n]), n


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
    bsr_kernels.load_delta(other, path, check_base=False)   # the opt-out the error names
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


# --- issue 13: a delta brings the exact saved state, or refuses; damaged files are refused ---

def _tiny():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=12, num_heads=4,
                             num_classes=5).eval()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            (model.bsr_config if hasattr(model, "bsr_config") else None), type(model.blocks[3]))


def _assert_unchanged(model, snap):
    sd, rg, cfg, cls = _snapshot(model)
    assert sd.keys() == snap[0].keys()
    for k in sd:
        assert torch.equal(sd[k], snap[0][k]), k
    assert rg == snap[1] and cfg == snap[2] and cls is snap[3]


def _edit_header(path, edit):
    """Rewrites a safetensors header: ``edit(header_dict)`` changes it in place."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _edit_config(path, edit):
    def go(header):
        cfg = json.loads(header["__metadata__"]["bsr_kernels"])
        if edit(cfg) == "as a list":
            cfg = list(cfg.values())
        header["__metadata__"]["bsr_kernels"] = json.dumps(cfg)
    _edit_header(path, go)


@pytest.fixture
def tuned_delta(tmp_path):
    tuned = _finetune_like(bsr_kernels.reprogram(_tiny()))       # keep 0.5, drop at 3, 6, 9
    return tuned, save_delta(tuned, tmp_path / "d.safetensors")


def test_load_delta_replaces_other_bsr_settings_with_the_deltas(tuned_delta):
    tuned, path = tuned_delta
    t = bsr_kernels.reprogram(_tiny(), keep_rate=0.9, drop_at=[1])
    with pytest.warns(UserWarning, match="other BSR settings") as w:
        bsr_kernels.load_delta(t, path)
    assert "keep_rate 0.9 -> 0.5" in str(w[0].message)
    assert "drop_at [1] -> [3, 6, 9]" in str(w[0].message)
    assert t.bsr_config == tuned.bsr_config
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), tuned(x), rtol=0, atol=0)
    assert {n for n, p in t.named_parameters() if p.requires_grad} == \
        {n for n, p in tuned.named_parameters() if p.requires_grad}


def test_load_delta_warns_of_replaced_settings_only_when_reprogram_takes_them(tuned_delta):
    _, path = tuned_delta
    t = bsr_kernels.reprogram(_tiny(), keep_rate=0.9, drop_at=[1])
    t.grad_checkpointing = True           # set behind timm's back: reprogram refuses the model
    snap = _snapshot(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no "reprogrammed with the delta's" for a refusal
        with pytest.raises(ValueError, match="grad checkpointing is on"):
            bsr_kernels.load_delta(t, path)
    _assert_unchanged(t, snap)


def test_load_delta_of_a_plain_model_restores_a_reprogrammed_one(tmp_path):
    plain = _tiny()
    for n, p in plain.named_parameters():
        p.requires_grad_(n.startswith("head.") or n.endswith(".bias"))   # BitFit
    _finetune_like(plain)
    path = save_delta(plain, tmp_path / "bitfit.safetensors")
    t = bsr_kernels.reprogram(_tiny())
    with pytest.warns(UserWarning, match="not reprogrammed"):
        bsr_kernels.load_delta(t, path)
    assert not hasattr(t, "bsr_config")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), plain(x), rtol=0, atol=0)


def test_load_delta_refuses_a_header_dtype_change(tuned_delta):
    _, path = tuned_delta
    _edit_header(path, lambda h: h["head.weight"].update(dtype="I32"))
    t = _tiny()
    snap = _snapshot(t)
    with pytest.raises(ValueError, match=r"damaged or edited.*head\.weight is int32, saved as "
                                         r"float32"):
        bsr_kernels.load_delta(t, path)
    _assert_unchanged(t, snap)


def test_load_delta_refuses_an_int_tensor_for_a_float_parameter_even_in_version_1(tuned_delta):
    _, path = tuned_delta

    _edit_config(path, _to_v1)
    _edit_header(path, lambda h: h["head.weight"].update(dtype="I32"))
    t = _tiny()
    snap = _snapshot(t)
    with pytest.raises(ValueError, match=r"does not fit.*head\.weight: delta dtype torch\.int32"):
        bsr_kernels.load_delta(t, path)
    _assert_unchanged(t, snap)


def _to_v1(cfg):
    """A delta's config as version 1 wrote it: no dtypes, no checksum, and BSR settings
    without the ones added later (memory_mode, train_norm, activation_dtype)."""
    cfg["version"] = 1
    del cfg["dtypes"], cfg["checksum"]
    for key in ("memory_mode", "train_norm", "activation_dtype"):
        del cfg["bsr"][key]


def test_a_version_1_delta_loads_with_the_settings_of_its_time(tuned_delta):
    """Settings a version-1 file lacks take the values that version had: lean memory, no
    trained norm, activations kept in their own dtype."""
    tuned, path = tuned_delta
    _edit_config(path, _to_v1)
    t = bsr_kernels.load_delta(_tiny(), path)
    assert t.bsr_config == tuned.bsr_config
    assert (t.bsr_config.memory_mode, t.bsr_config.train_norm,
            t.bsr_config.activation_dtype) == ("lean", False, None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), tuned(x), rtol=0, atol=0)


def test_a_delta_whose_tensors_differ_from_its_list_is_refused(tuned_delta):
    """Version 1 has no checksum: the list of parameters against the tensors held is what
    tells a file that lost (or gained) a tensor."""
    _, path = tuned_delta

    def listed_but_absent(cfg):
        _to_v1(cfg)
        cfg["parameters"].append("blocks.0.norm1.weight")
    _edit_config(path, listed_but_absent)
    t = _tiny()
    snap = _snapshot(t)
    with pytest.raises(ValueError, match=r"tensors \['blocks\.0\.norm1\.weight'\] differ from "
                                         "the parameters its config lists"):
        bsr_kernels.load_delta(t, path)
    _assert_unchanged(t, snap)


def test_read_delta_sees_a_reshaped_tensor_through_its_checksum(tuned_delta):
    """The same bytes under another shape (an edited header) fail the checksum, which covers
    the shapes."""
    _, path = tuned_delta
    _edit_header(path, lambda h: h["head.weight"].update(shape=h["head.weight"]["shape"][::-1]))
    with pytest.raises(ValueError, match="do not match the checksum"):
        read_delta(path)


def test_load_delta_refuses_changed_tensor_bytes(tuned_delta):
    _, path = tuned_delta
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        bsr_kernels.load_delta(_tiny(), path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(base_fingerprint=""), "base_fingerprint must be a SHA-256"),
    (lambda c: c.pop("base_fingerprint"), "base_fingerprint is missing"),
    (lambda c: c["bsr"].pop("train_blocks"), r"bsr\.train_blocks is missing"),
    (lambda c: c.update(bsr=[3, 7, 11]), "bsr must be null or an object"),
    (lambda c: c["bsr"].update(keep_rate=7), r"bsr\.keep_rate must be a number in \(0, 1\]"),
    (lambda c: c.update(parameters="head.weight"), "parameters must be a non-empty list"),
    (lambda c: c.update(global_pool=["avg"]), "global_pool must be a pool name"),
    (lambda c: "as a list", "config is a JSON list"),
])
def test_load_delta_refuses_damaged_metadata_with_a_clear_error(tuned_delta, edit, match):
    _, path = tuned_delta
    _edit_config(path, edit)
    t = _tiny()
    snap = _snapshot(t)
    with pytest.raises(ValueError, match=match) as e:
        bsr_kernels.load_delta(t, path)
    assert str(path) in str(e.value)
    _assert_unchanged(t, snap)


def test_save_delta_refuses_a_json_name(tmp_path):
    tuned = _finetune_like(bsr_kernels.reprogram(_tiny()))
    with pytest.raises(ValueError, match=r"w\.json.*overwrite the delta.*w\.safetensors"):
        save_delta(tuned, tmp_path / "w.json")
    assert list(tmp_path.iterdir()) == []


def test_save_delta_refuses_non_finite_parameters(tmp_path):
    tuned = bsr_kernels.reprogram(_tiny())
    with torch.no_grad():
        tuned.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_delta(tuned, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_delta_files_get_ordinary_permissions(tuned_delta):
    import os
    import stat
    _, path = tuned_delta
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, path.with_suffix(".json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert sorted(q.name for q in path.parent.iterdir()) == ["d.json", "d.safetensors"]
    json.loads(path.with_suffix(".json").read_text())      # strict JSON


# --- review: save_delta writes nothing read_delta refuses; distilled heads; cast bases ---

def test_save_delta_refuses_bad_names_and_extra_and_keeps_the_old_file(tuned_delta):
    tuned, path = tuned_delta
    before = path.read_bytes()
    for kwargs, match in (
            (dict(names=["head.weight", "head.weight", "head.bias"]), r"names repeats"),
            (dict(names="head.weight"), r"names must be a list.*the string 'head\.weight'"),
            (dict(extra=["task", "demo"]), r"extra must be a dict.*got list"),
            (dict(extra={"classes": {1, 2}}), r"extra must hold JSON values.*set")):
        with pytest.raises(ValueError, match=match):
            save_delta(tuned, path, **kwargs)
        assert path.read_bytes() == before, kwargs
    read_delta(path)
    assert sorted(q.name for q in path.parent.iterdir()) == ["d.json", "d.safetensors"]


def test_save_delta_checks_its_config_as_read_delta_does(tmp_path, monkeypatch):
    tuned = _finetune_like(bsr_kernels.reprogram(_tiny()))
    bad = dict(tuned.bsr_config.to_dict(), keep_rate=1.5)     # a config read_delta refuses
    monkeypatch.setattr(bsr_kernels.delta, "_bsr_config", lambda model: bad)
    with pytest.raises(ValueError, match=r"read_delta refuses: bsr\.keep_rate must be a number"):
        save_delta(tuned, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def _distilled(num_classes, seed=0):
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(seed)
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=12,
                                      num_heads=4, num_classes=num_classes).eval()


def test_delta_resets_both_heads_of_a_distilled_deit(tmp_path):
    tuned = _finetune_like(bsr_kernels.reprogram(_distilled(5)))
    path = save_delta(tuned, tmp_path / "deit.safetensors")
    base = _distilled(1000)                 # the hub model: 1000 classes in head and head_dist
    base.load_state_dict({k: v for k, v in _distilled(5).state_dict().items()
                          if not k.startswith("head")}, strict=False)
    bsr_kernels.load_delta(base, path)
    assert base.head.out_features == base.head_dist.out_features == 5
    assert all(p.requires_grad for p in base.head_dist.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(x), tuned(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [_vit, _distilled], ids=["vit", "distilled_deit"])
def test_load_delta_gives_a_headless_backbone_the_deltas_head(tmp_path, make):
    """A base created as timm backbones are, ``num_classes=0`` (head an nn.Identity), was
    refused ('not in the model: head.bias, head.weight') though reset_classifier gives it the
    delta's head, as it does to a head of another size. A head of another width is refused,
    naming the shapes, with the model unchanged."""
    tuned = _finetune_like(bsr_kernels.reprogram(make(num_classes=5)))
    path = save_delta(tuned, tmp_path / "task.safetensors")
    base = make(num_classes=0)              # the same pre-trained weights, no head
    base.load_state_dict({k: v for k, v in make(num_classes=5).state_dict().items()
                          if not k.startswith("head")})
    assert isinstance(base.head, torch.nn.Identity)
    bsr_kernels.load_delta(base, path)
    assert base.head.out_features == 5
    assert all(p.requires_grad for p in base.head.parameters())
    x = torch.randn(2, 3, *tuned.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(base(x), tuned(x), rtol=0, atol=0)

    other = bsr_kernels.reprogram(make(num_classes=5))
    other.head.weight = torch.nn.Parameter(other.head.weight[:, :-1].detach())  # another width
    wrong = save_delta(other, tmp_path / "wrong.safetensors")
    headless = make(num_classes=0)
    snap = _snapshot(headless)
    with pytest.raises(ValueError, match=r"head.weight: delta \(5, \d+\) vs model \(5, \d+\)"):
        bsr_kernels.load_delta(headless, wrong, check_base=False)
    _assert_unchanged(headless, snap)
    assert isinstance(headless.head, torch.nn.Identity)


def test_load_delta_names_a_cast_base(tuned_delta):
    _, path = tuned_delta
    assert read_delta(path)[1]["base_dtypes"] == ["float32"]
    cast = _tiny().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights are bfloat16, the delta was saved from "
                                         r"float32 ones.*check_base=False"):
        bsr_kernels.load_delta(cast, path)
    # A file written before base_dtypes was recorded still loads, and still names the cast
    # (from the trained parameters' dtypes).
    _edit_config(path, lambda c: c.pop("base_dtypes"))
    with pytest.raises(ValueError, match=r"weights are bfloat16, the delta was saved from "
                                         r"float32"):
        bsr_kernels.load_delta(cast, path)
    with pytest.raises(ValueError, match=r"other pre-trained weights\?"):
        bsr_kernels.load_delta(_other_tiny(), path)
    bsr_kernels.load_delta(_tiny(), path)


def _other_tiny():
    model = _tiny()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1.0      # a frozen weight
    return model


def test_load_delta_refuses_another_global_pool(tmp_path):
    """No parameter tells global_pool "avg" (without fc_norm) from "token", so a delta of an
    avg-pooled model loaded silently into a token-pooled base and gave other logits. The delta
    records the pool; another one is refused, naming it, with the model unchanged; the same pool
    loads, and a delta written before the pool was recorded still loads."""
    from timm.models.vision_transformer import VisionTransformer

    def make(pool):
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                 num_classes=5, global_pool=pool, fc_norm=False).eval()

    tuned = _finetune_like(bsr_kernels.reprogram(make("avg"), fuse_token=False))
    path = save_delta(tuned, tmp_path / "avg.safetensors")
    assert read_delta(path)[1]["global_pool"] == "avg"
    token = make("token")
    snap = _snapshot(token)
    with pytest.raises(ValueError, match="global_pool='avg', this one has 'token'"):
        bsr_kernels.load_delta(token, path)
    _assert_unchanged(token, snap)
    x = torch.randn(2, 3, 32, 32)
    same = bsr_kernels.load_delta(make("avg"), path)
    with torch.no_grad():
        torch.testing.assert_close(same(x), tuned(x), rtol=0, atol=0)
    _edit_config(path, lambda c: c.pop("global_pool"))   # as written before 2026-11-28
    assert "global_pool" not in read_delta(path)[1]
    bsr_kernels.load_delta(make("token"), path)
