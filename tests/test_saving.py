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
from bsr_kernels.reprogram import is_reprogrammed
from bsr_kernels import BSRConfigWarning  # exported for warnings filters

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


def test_a_weights_file_without_metadata_takes_the_config_json_beside_it(tmp_path):
    """A save_for_hf folder whose pytorch_model.bin holds no BSR metadata (a plain
    ``torch.save(dict(state_dict))``, as a plain model re-saving it writes): the config.json
    beside it still gives the settings, when the .bin file is named."""
    pytest.importorskip("huggingface_hub")
    model, x = tuned(), images()
    timm.models.save_for_hf(model, tmp_path, safe_serialization=False)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(dict(model.state_dict()), weights)            # no _metadata
    assert bsr_kernels.saved_bsr_config(weights)["keep_rate"] == 0.3
    again = bsr_kernels.load_checkpoint(plain(seed=5), weights)
    torch.testing.assert_close(logits(again, x), logits(model, x))


def test_the_outermost_models_config_is_the_one_a_state_dict_gives():
    """A reprogrammed model holding another reprogrammed ViT (a distillation teacher): the
    state_dict's metadata holds both configs; the model's own, at the shortest prefix, is the
    one read."""
    student, teacher = tuned(keep_rate=0.3), tuned(seed=1, keep_rate=0.75)
    student.teacher = teacher
    sd = student.state_dict()
    assert json.loads(sd._metadata["teacher"]["bsr_config"])["keep_rate"] == 0.75
    assert bsr_kernels.saved_bsr_config(sd)["keep_rate"] == 0.3


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


@pytest.mark.parametrize("notes", [None, ("the user's own note",)])
def test_reprogram_then_restore_leaves_pretrained_cfg_as_it_was(notes):
    model = plain()
    if notes is not None:
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "notes": notes}
    before = dict(model.pretrained_cfg)
    assert ("notes" in before) == (notes is not None)
    bsr_kernels.reprogram(model)
    bsr_kernels.reprogram(model, keep_rate=0.7)
    bsr_kernels.restore(model)
    assert model.pretrained_cfg == before   # no "notes": None where it had no notes
    assert model.default_cfg is model.pretrained_cfg


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


def test_checkpoint_and_delta_of_a_compiled_model_use_the_models_own_names(tmp_path):
    """torch.compile's wrapper (OptimizedModule) is looked through, as timm's unwrap_model does:
    saving one wrote "_orig_mod."-prefixed keys that no plain model could load, and loading into
    one was refused as "not a ViT". (Nothing here runs a compiled model: no compilation.)"""
    from safetensors import safe_open
    model, x = tuned(), images()
    ckpt = bsr_kernels.save_checkpoint(torch.compile(model), tmp_path / "ckpt.safetensors")
    with safe_open(str(ckpt), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    fresh = plain(seed=3)
    wrapper = torch.compile(fresh)
    assert bsr_kernels.load_checkpoint(wrapper, ckpt) is wrapper
    assert bsr_config_dict(fresh) == bsr_config_dict(model)
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
    delta = bsr_kernels.save_delta(torch.compile(model), tmp_path / "delta.safetensors")
    base = plain()
    wrapper = torch.compile(base)
    assert bsr_kernels.load_delta(wrapper, delta) is wrapper
    torch.testing.assert_close(logits(base, x), logits(model, x))
    with pytest.raises(ValueError, match="compiled.*reprogram the model itself, then compile"):
        bsr_kernels.reprogram(torch.compile(plain()))


@pytest.mark.parametrize("make", [plain, tuned], ids=["plain", "reprogrammed"])
def test_timm_checkpoint_with_ema_loads_its_state_dict_from_a_dict_and_a_file(tmp_path, make):
    """A timm train.py checkpoint holds the model's weights under ``state_dict`` and the EMA's
    under ``state_dict_ema``: loading it as a dict and as a file gives the same weights, the
    model's (a dict of plain weights went on to the EMA's). Only an EMA in it is loaded as the
    fallback."""
    model, ema, x = make(seed=0), make(seed=1), images()
    ckpt = {"epoch": 3, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}
    torch.save(ckpt, tmp_path / "train.pth")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for source in (ckpt, tmp_path / "train.pth"):
        fresh = bsr_kernels.load_checkpoint(plain(seed=2), source)
        got = fresh.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        torch.testing.assert_close(logits(fresh, x), logits(model, x))
        assert bsr_config_dict(fresh) == bsr_config_dict(model)
    only_ema = {"epoch": 3, "state_dict_ema": ema.state_dict()}
    fresh = bsr_kernels.load_checkpoint(plain(seed=2), only_ema)
    torch.testing.assert_close(logits(fresh, x), logits(ema, x))


def test_checkpoint_of_timm_train_py_loads_with_its_args(tmp_path):
    """timm's train.py saves through ``timm.utils.CheckpointSaver``, which stores its
    ``argparse.Namespace`` of arguments beside the weights: ``weights_only=True`` refused the
    file, so load_checkpoint and saved_bsr_config failed on what timm's own loader reads. The
    namespace is allowed now; any other object is still refused."""
    import argparse
    from timm.utils import CheckpointSaver
    model, x = tuned(seed=0), images()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    saver = CheckpointSaver(model, opt, args=argparse.Namespace(model="vit", lr=0.1),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = tmp_path / "last.pth.tar"
    assert isinstance(torch.load(path, weights_only=False)["args"], argparse.Namespace)
    assert bsr_kernels.saved_bsr_config(path) == bsr_config_dict(model)
    fresh = bsr_kernels.load_checkpoint(plain(seed=2), path)
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
    from fractions import Fraction
    torch.save({"state_dict": model.state_dict(), "args": Fraction(1, 3)},
               tmp_path / "other.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        bsr_kernels.load_checkpoint(plain(seed=2), tmp_path / "other.pth")


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


def test_state_dict_of_an_older_config_with_the_same_settings_loads_silently():
    """An older checkpoint's config (no depth, no num_prefix_tokens) equal to the model's
    settings: load_checkpoint was silent, but load_state_dict's hook compared the raw dict with
    today's form and warned that the logits would differ. A different setting still warns."""
    model = tuned()
    sd = model.state_dict()
    key = next(k for k, v in sd._metadata.items() if "bsr_config" in v)
    old = {k: v for k, v in bsr_config_dict(model).items()
           if k not in ("depth", "num_prefix_tokens")}
    sd._metadata[key] = {**sd._metadata[key], "bsr_config": json.dumps(old)}
    same = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSRConfigWarning)
        same.load_state_dict(sd)
        bsr_kernels.load_checkpoint(same, sd, reprogram=False)
    other = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.7)
    with pytest.warns(BSRConfigWarning, match="keep_rate.*0.3.*load_checkpoint"):
        other.load_state_dict(sd)


def test_backward_only_settings_load_without_a_warning():
    """Weights saved under another memory mode, activation dtype, train_blocks or train_norm
    (settings of the backward alone), or where nothing is dropped (keep_rate 1 or no drop_at,
    into a plain model too), give the same logits: they load silently, with load_state_dict and
    with load_checkpoint(reprogram=False) (the last three warned 'its logits will differ'); a
    forward setting still warns beside them."""
    model, x = tuned(), images()
    sd = model.state_dict()
    others = [dict(memory_mode="autograd"), dict(memory_mode="fast",
                                                 activation_dtype=torch.bfloat16),
              dict(train_blocks=(0, 2), train_norm=True)]
    for settings in others:
        other = bsr_kernels.reprogram(plain(seed=4), **{"keep_rate": 0.3, **settings})
        with warnings.catch_warnings():
            warnings.simplefilter("error", BSRConfigWarning)
            other.load_state_dict(sd)
            bsr_kernels.load_checkpoint(other, sd, reprogram=False)
        torch.testing.assert_close(logits(other, x), logits(model, x))
    whole = tuned(keep_rate=1.0)
    nothing = tuned(drop_at=())
    for into in (bsr_kernels.reprogram(plain(seed=4), keep_rate=1.0, drop_at=(0,),
                                       fuse_token=False), plain(seed=4)):
        for saved in (whole, nothing):     # neither drops: a plain model's logits
            with warnings.catch_warnings():
                warnings.simplefilter("error", BSRConfigWarning)
                into.load_state_dict(saved.state_dict())
                bsr_kernels.load_checkpoint(into, saved.state_dict(), reprogram=False)
            torch.testing.assert_close(logits(into, x), logits(saved, x))
    other = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.7, memory_mode="autograd")
    with pytest.warns(BSRConfigWarning, match="keep_rate"):
        other.load_state_dict(sd)
    with pytest.warns(BSRConfigWarning, match="logits will differ"):
        bsr_kernels.load_checkpoint(other, sd, reprogram=False)


def test_state_dict_with_a_malformed_saved_config_still_loads_with_a_warning():
    """model.load_state_dict (not load_checkpoint) raised a bare JSONDecodeError from the
    comparison hook when the metadata's config was not JSON; the comparison only ever warned."""
    model = tuned()
    sd = model.state_dict()
    key = next(k for k, v in sd._metadata.items() if "bsr_config" in v)
    sd._metadata[key] = {**sd._metadata[key], "bsr_config": "{not json"}
    other = bsr_kernels.reprogram(plain(seed=4), keep_rate=0.3)
    with pytest.warns(BSRConfigWarning, match="not valid JSON.*not compared"):
        other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))


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


def _snapshot(model):
    return bsr_config_dict(model), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    cfg, sd = snapshot
    assert bsr_config_dict(model) == cfg
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd)


@pytest.mark.parametrize("target", ["plain", "reprogrammed"])
def test_load_checkpoint_that_does_not_fit_leaves_the_model_unchanged(tmp_path, target):
    """Another head size, another depth or a missing key: a ValueError naming the source and
    what does not fit, raised before the model's settings or weights change (load_state_dict
    alone would have reprogrammed the model and copied the matching weights first)."""
    saved = tuned()                                           # keep_rate 0.3, 5 classes
    path = bsr_kernels.save_checkpoint(saved, tmp_path / "c.safetensors")
    model = plain(seed=7) if target == "plain" else \
        bsr_kernels.reprogram(plain(seed=7), keep_rate=0.75)
    other_head = timm.create_model(NAME, **{**KW, "num_classes": 3})
    other_head = bsr_kernels.reprogram(other_head, keep_rate=0.75) \
        if target == "reprogrammed" else other_head
    snap = _snapshot(other_head)
    with pytest.raises(ValueError, match=r"c\.safetensors.*head\.weight: shape \(5, 32\)"):
        bsr_kernels.load_checkpoint(other_head, path)
    _assert_unchanged(other_head, snap)

    deeper = timm.create_model(NAME, **{**KW, "depth": 6})
    snap = _snapshot(deeper)
    with pytest.raises(ValueError, match="depth 4, this model has 6 blocks"):
        bsr_kernels.load_checkpoint(deeper, path)
    _assert_unchanged(deeper, snap)

    partial = saved.state_dict()   # its metadata carries the settings
    del partial["head.bias"]
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="1 missing key.*head.bias"):
        bsr_kernels.load_checkpoint(model, partial)
    _assert_unchanged(model, snap)
    extra = saved.state_dict()
    extra["head.scale"] = torch.ones(1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="1 unexpected key.*head.scale"):
        bsr_kernels.load_checkpoint(model, extra)
    _assert_unchanged(model, snap)
    bsr_kernels.load_checkpoint(model, partial, strict=False)  # allowed: the rest loads
    assert bsr_config_dict(model) == bsr_config_dict(saved)
    assert torch.equal(model.blocks[1].attn.qkv.weight, saved.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize("target", ["plain", "reprogrammed"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_load_checkpoint_failing_inside_load_state_dict_puts_the_settings_back(target, error):
    """The saved settings are applied before the weights are copied; when the copy itself
    fails (a user's load hook, Ctrl-C), the model gets its own settings back: a plain model is
    restored, a reprogrammed one takes its earlier config again."""
    sd = tuned().state_dict()                                  # keep_rate 0.3
    model = plain(seed=4) if target == "plain" else \
        bsr_kernels.reprogram(plain(seed=4), keep_rate=0.75, memory_mode="fast")
    snap, flags = _snapshot(model), [p.requires_grad for p in model.parameters()]

    def hook(*args):
        raise error("interrupted while loading")
    handle = model.register_load_state_dict_pre_hook(hook)
    with pytest.raises(error, match="interrupted while loading"):
        bsr_kernels.load_checkpoint(model, sd)
    handle.remove()
    _assert_unchanged(model, snap)
    assert is_reprogrammed(model) == (target == "reprogrammed")
    assert [p.requires_grad for p in model.parameters()] == flags
    bsr_kernels.load_checkpoint(model, sd)                    # and it loads afterwards
    assert bsr_config_dict(model)["keep_rate"] == 0.3


def test_load_checkpoint_of_an_unreadable_file_names_the_path(tmp_path):
    """A corrupt file: a ValueError naming the path (not safetensors' or pickle's own error,
    whose advice to pass weights_only=False is not one to follow for an unknown file)."""
    model = plain()
    snap = _snapshot(model)
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 7)
        with pytest.raises(ValueError, match=f"path .*{name}: cannot read it"):
            bsr_kernels.load_checkpoint(model, tmp_path / name)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_checkpoint_failing_midway_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    """A crash while saving (here the writer raises after writing part of the file) leaves the
    previous checkpoint whole and loadable, and no temporary file behind."""
    import safetensors.torch
    model, x = tuned(), images()
    path = bsr_kernels.save_checkpoint(model, tmp_path / f"c{suffix}")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        target = args[1] if len(args) > 1 else kwargs.get("filename", kwargs.get("f"))
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bsr_kernels.save_checkpoint(tuned(seed=9), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    fresh = bsr_kernels.load_checkpoint(plain(seed=3), path)
    torch.testing.assert_close(logits(fresh, x), logits(model, x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_checkpoint_of_a_delta_says_to_use_load_delta(tmp_path, suffix):
    """A delta holds only the trained parameters, its config under its own metadata key: it is
    refused naming the path and load_delta, also with strict=False (which loaded its tensors
    into a plain model without the BSR settings), and by saved_bsr_config (which said None)."""
    path = bsr_kernels.save_delta(tuned(), tmp_path / f"task{suffix}")   # safetensors inside
    model = plain()   # the delta's base
    snap = _snapshot(model)
    for strict in (True, False):
        with pytest.raises(ValueError, match=rf"task\{suffix}: a bsr_kernels delta.*load_delta"):
            bsr_kernels.load_checkpoint(model, path, strict=strict)
        _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="delta checkpoint.*load_delta"):
        bsr_kernels.saved_bsr_config(path)
    bsr_kernels.load_delta(model, path)            # the way that works
    assert bsr_config_dict(model)["keep_rate"] == 0.3


def test_load_checkpoint_refuses_entries_it_cannot_load_before_changing_the_model():
    """Entries that are not tensors, complex values for a real parameter and tensors without
    data: a ValueError naming each key, raised before anything changes (load_state_dict alone
    reprogrammed the model and copied the other entries before its RuntimeError, and dropped
    the imaginary part of a complex tensor silently)."""
    sd = tuned().state_dict()   # reprogrammed: a plain model would be reprogrammed first
    bad = {"blocks.3.mlp.fc2.bias": sd["blocks.3.mlp.fc2.bias"].tolist(),
           "pos_embed": sd["pos_embed"].to(torch.complex64),
           "head.bias": torch.empty(5, device="meta")}
    for key, value in bad.items():
        broken = sd.copy()   # keeps the metadata with the settings
        broken[key] = value
        model = plain(seed=2)
        snap = _snapshot(model)
        for strict in (True, False):
            with pytest.raises(ValueError, match=rf"\) does not fit this model \({key}: "):
                bsr_kernels.load_checkpoint(model, broken, strict=strict)
            _assert_unchanged(model, snap)
    ok = sd.copy()
    ok["pos_embed"] = sd["pos_embed"].double()     # real dtypes are converted, as by torch
    model = bsr_kernels.load_checkpoint(plain(seed=2), ok)
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_to_strict_json_converts_numpy_arrays_and_scalars(tmp_path):
    """numpy arrays (e.g. per-class accuracies in a delta's extra) become lists, NaN in them
    null, like tensors; ndarray.item() raised for more than one element."""
    np = pytest.importorskip("numpy")
    from bsr_kernels.checkpoint import to_strict_json
    obj = {"per_class": np.array([0.5, np.nan]), "grid": np.arange(4).reshape(2, 2),
           "acc": np.float32(0.25), "inf": np.float64("inf"), "zero_d": np.array(3)}
    assert to_strict_json(obj) == {"per_class": [0.5, None], "grid": [[0, 1], [2, 3]],
                                   "acc": 0.25, "inf": None, "zero_d": 3}
    path = bsr_kernels.save_delta(tuned(), tmp_path / "d.safetensors", extra=obj)
    assert json.loads(path.with_suffix(".json").read_text())["extra"]["per_class"] == [0.5, None]


def _old_form(cfg):
    """A config as saved before BSRConfig: reprogram's arguments, no depth or prefix tokens."""
    return {k: v for k, v in cfg.items() if k not in ("depth", "num_prefix_tokens")}


def test_load_checkpoint_of_a_malformed_config_names_the_path(tmp_path):
    """Config metadata that is not JSON, not an object, with unknown keys or wrong values, for
    another number of prefix tokens, a broken save_for_hf config.json, a file holding a bare
    tensor: a ValueError naming the path and the problem, the model unchanged (these raised
    TypeError, JSONDecodeError or AttributeError, or loaded). A config of the older form
    without depth still loads."""
    from safetensors.torch import save_file
    saved = tuned()
    cfg = bsr_config_dict(saved)
    tensors = {k: v.contiguous() for k, v in saved.state_dict().items()}
    metadata = {
        "notjson": ("{not json", "not valid JSON"),
        "list": (json.dumps([1, 2]), "a JSON list, not an object"),
        "unknown": (json.dumps({**cfg, "bogus": 1}), r"malformed \(missing \[\], unknown "
                    r"\['bogus'\]"),
        "old_unknown": (json.dumps({**_old_form(cfg), "num_prefix_tokens": 1}),
                        r"unknown \['num_prefix_tokens'\]"),
        "badvalue": (json.dumps({**cfg, "keep_rate": "high"}), "keep_rate"),
        "badtype": (json.dumps({**cfg, "activation_dtype": [1]}), "activation_dtype"),
        "prefix": (json.dumps({**cfg, "num_prefix_tokens": 2}), "2 prefix tokens.*has 1"),
    }
    model = bsr_kernels.reprogram(plain(seed=2), keep_rate=0.8)
    snap = _snapshot(model)
    for name, (text, match) in metadata.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"bsr_config": text})
        with pytest.raises(ValueError, match=rf"path .*{name}\.safetensors: .*{match}"):
            bsr_kernels.load_checkpoint(model, path)
        _assert_unchanged(model, snap)

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tensors, str(hf / "model.safetensors"))   # the config only in config.json
    for text, match in (("{oops", "cannot read it as a save_for_hf config.json"),
                        ('{"pretrained_cfg": [1]}', "pretrained_cfg is a JSON list"),
                        (json.dumps({"pretrained_cfg": {"notes": [
                            "bsr_kernels.reprogram config: {x"]}}), "notes.*not valid JSON")):
        (hf / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"path .*config\.json: .*{match}"):
            bsr_kernels.load_checkpoint(model, hf)
        _assert_unchanged(model, snap)

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"tensor\.pth: holds a Tensor, not a state_dict"):
        bsr_kernels.load_checkpoint(model, tmp_path / "tensor.pth")
    _assert_unchanged(model, snap)

    old = tmp_path / "old.safetensors"   # the form written before BSRConfig still loads
    save_file(tensors, str(old), metadata={"bsr_config": json.dumps(_old_form(cfg))})
    assert bsr_kernels.load_checkpoint(model, old) is model
    assert bsr_config_dict(model) == cfg
    torch.testing.assert_close(logits(model, images()), logits(saved, images()))


def _moe(top_k, seed=0, renormalize=False):
    torch.manual_seed(seed)
    model = bsr_kernels.to_moe(timm.create_model(NAME, **KW), blocks=[1, 3], num_experts=4,
                               top_k=top_k, renormalize=renormalize)
    with torch.no_grad():   # experts that differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bsr_kernels.reprogram(model, train_blocks=[1, 3]).eval()


@pytest.mark.parametrize("source", [".pth", ".safetensors", "state_dict"])
def test_load_checkpoint_refuses_a_moe_that_routes_otherwise(tmp_path, source):
    """A top_k=2 checkpoint loaded silently into a top_k=3 MoE (other logits): load_state_dict
    warned but load_checkpoint hid the warning, and a .safetensors file did not record the
    routing at all. Now a ValueError names each block and setting, before anything changes;
    the same routing still loads, to the same logits."""
    saved = _moe(top_k=2)
    if source == "state_dict":
        src = saved.state_dict()
    else:
        src = tmp_path / f"moe{source}"
        bsr_kernels.save_checkpoint(saved, src)
    for other in (_moe(top_k=3, seed=1), _moe(top_k=2, seed=1, renormalize=True)):
        snapshot = _snapshot(other)
        with pytest.raises(ValueError, match="blocks.1.mlp: (top_k 2|renormalize False) in the "
                                             "checkpoint.*blocks.3.mlp.*the model is unchanged"):
            bsr_kernels.load_checkpoint(other, src)
        _assert_unchanged(other, snapshot)
    same = _moe(top_k=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bsr_kernels.load_checkpoint(same, src)
    x = images()
    torch.testing.assert_close(logits(same, x), logits(saved, x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_model_with_tied_weights_saves_and_loads(tmp_path, suffix):
    """safetensors refuses tensors that share memory: save_checkpoint of a model with a module
    used twice (ALBERT-style tying) failed with safetensors' RuntimeError; .pth saved it."""
    def build(seed):
        model = plain(seed)
        model.blocks[1].norm1 = model.blocks[0].norm1
        model.blocks[2].mlp = model.blocks[0].mlp
        return bsr_kernels.reprogram(model)
    saved = build(0)
    with torch.no_grad():
        saved.blocks[0].mlp.fc1.weight.add_(0.1 * torch.randn_like(saved.blocks[0].mlp.fc1.weight))
    bsr_kernels.save_checkpoint(saved, tmp_path / f"tied{suffix}")
    other = build(1)
    bsr_kernels.load_checkpoint(other, tmp_path / f"tied{suffix}")
    assert other.blocks[2].mlp is other.blocks[0].mlp   # still tied
    x = images()
    torch.testing.assert_close(logits(other, x), logits(saved, x), rtol=0, atol=0)
