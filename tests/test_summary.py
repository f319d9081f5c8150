"""Helpers: trainable_summary, draw_kept and profile's readable result."""
from __future__ import annotations

import json
import os
import re

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels
from bsr_kernels.profile import ProfileResult


def vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2,
                             num_classes=5)


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_trainable_summary_counts_like_peft():
    model = vit()
    full = bsr_kernels.trainable_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert full.trainable == full.total == total and full.bsr is None
    bsr_kernels.reprogram(model)
    s = bsr_kernels.trainable_summary(model)
    want = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (s.trainable, s.total) == (want, total)
    assert s.trainable_percent == pytest.approx(100 * want / total)
    trained_groups = [g for g, (t, _) in s.groups.items() if t]
    assert trained_groups == [f"blocks.{i}" for i in (1, 3, 5)] + ["head"]
    assert s.groups["patch_embed"] == (0, model.patch_embed.proj.weight.numel()
                                       + model.patch_embed.proj.bias.numel())
    assert sum(n for _, n in s.groups.values()) == total
    text = str(s)
    assert re.match(rf"trainable params: {want:,} \|\| all params: {total:,} \|\| "
                    rf"trainable%: {100 * want / total:.4f}\n", text)
    assert "trained: blocks.1, blocks.3, blocks.5, head" in text
    assert "BSR: drops tokens in blocks (2, 3, 4) (keep_rate 0.5" in text
    # a part trained in part is listed with both counts
    fc2 = model.blocks[1].mlp.fc2
    fc2.requires_grad_(False)
    part = bsr_kernels.trainable_summary(model)
    n = s.groups["blocks.1"][1]
    t = n - fc2.weight.numel() - fc2.bias.numel()
    assert part.groups["blocks.1"] == (t, n) and 0 < t < n
    assert f"trained: blocks.1 ({t:,} of {n:,}), blocks.3, blocks.5, head\n" in str(part)


@pytest.mark.parametrize("name,stages", [("convnext_atto", "stages"),
                                         ("swin_tiny_patch4_window7_224", "layers")])
def test_trainable_summary_groups_a_staged_model_by_stage(name, stages):
    """Blocks inside numbered stages were split one by one in the first stage only
    (stages.0.blocks.0, stages.0.blocks.1, then stages.1, stages.2...): the first stage's
    ``blocks.<i>`` was taken for a ViT's. Every stage is one group now."""
    model = timm.create_model(name, pretrained=False, num_classes=10)
    s = bsr_kernels.trainable_summary(model)
    staged = [g for g in s.groups if g.startswith(stages + ".")]
    assert staged == [f"{stages}.{i}" for i in range(4)], list(s.groups)
    assert sum(n for _, n in s.groups.values()) == sum(p.numel() for p in model.parameters())
    # a ViT under a numbered prefix of its own (nn.Sequential(norm, vit)) keeps its blocks
    seq = nn.Sequential(nn.Identity(), bsr_kernels.reprogram(vit()))
    groups = list(bsr_kernels.trainable_summary(seq).groups)
    assert "1.blocks.0" in groups and "1.head" in groups, groups


def test_trainable_summary_places_the_vit_by_its_outermost_blocks():
    """A ViT block holding numbered ``blocks`` of its own (an adapter made of sub-blocks) is
    still one block of a ViT under a prefix (nn.Sequential(norm, vit)): only the outermost
    ``blocks.<i>`` of a name places the ViT, so the model does not look staged."""
    model = vit()
    model.blocks[0].mlp.blocks = nn.ModuleList([nn.Linear(2, 2)])
    s = bsr_kernels.trainable_summary(nn.Sequential(nn.Identity(), model))
    n0 = sum(p.numel() for p in model.blocks[0].parameters())
    assert s.groups["1.blocks.0"] == (n0, n0) and "1.blocks.5" in s.groups, list(s.groups)


def test_trainable_summary_names_blocks_through_wrappers():
    """Compiled, the summary said "trained: _orig_mod (1,335,557 of 5,488,517)"; for a
    MultiTaskViT, "trained: vit": the blocks were not named. The wrapped model's parts are."""
    import copy
    model = bsr_kernels.reprogram(vit())
    plain = bsr_kernels.trainable_summary(model)
    assert plain.bsr is not None and "BSR: drops tokens" in str(plain)
    wrapped = nn.Module()
    wrapped.module = model       # as DDP names its parameters
    # nested wrappers too: DDP of a compiled model (nanoGPT's order) was summarised under
    # "_orig_mod." names, and no wrapper showed the BSR settings (the wrapper has none)
    for other in (torch.compile(model), wrapped, nn.DataParallel(model),
                  nn.DataParallel(torch.compile(model)), torch.compile(nn.DataParallel(model))):
        s = bsr_kernels.trainable_summary(other)
        assert s.groups == plain.groups and (s.trainable, s.total) == (plain.trainable,
                                                                       plain.total)
        assert s.bsr == plain.bsr and str(s) == str(plain), type(other)
    mt = bsr_kernels.MultiTaskViT(copy.deepcopy(model), num_classes=[5, 2])
    s = bsr_kernels.trainable_summary(mt)
    trained = [g for g, (t, _) in s.groups.items() if t]
    assert trained == [f"vit.blocks.{i}" for i in (1, 3, 5)] + ["heads.0", "heads.1"]
    assert s.groups["vit.patch_embed"] == plain.groups["patch_embed"]
    assert sum(n for _, n in s.groups.values()) == s.total


def test_profile_counts_the_tokens_of_a_wrapped_model():
    """profile() of a DataParallel-wrapped model reported tokens_per_block [] (it looked for
    ``blocks`` on the wrapper); the wrapped model's blocks are counted, the rest is the same."""
    model = bsr_kernels.reprogram(vit())
    x, y = images(2), torch.tensor([1, 3])
    plain = bsr_kernels.profile(model, x, y)
    assert plain.tokens_per_block == [65, 65, 65, 34, 19, 11]   # 64 patches; drops at 2, 3, 4
    got = bsr_kernels.profile(nn.DataParallel(model), x, y)
    assert got.tokens_per_block == plain.tokens_per_block
    assert got.train_gflops_per_image == plain.train_gflops_per_image


def test_trainable_summary_counts_shared_parameters_once():
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(lin, lin)
    assert bsr_kernels.trainable_summary(model).total == 20
    with pytest.raises(TypeError, match="nn.Module"):
        bsr_kernels.trainable_summary("model")


def test_trainable_summary_of_a_model_without_parameters():
    """A model with no parameters (a parameter-free pipeline stage) is summarised as 0 of 0,
    at 0 % trained, rather than failing on a division by zero."""
    s = bsr_kernels.trainable_summary(nn.Sequential(nn.ReLU(), nn.Flatten()))
    assert (s.trainable, s.total, s.groups) == (0, 0, {})
    assert s.trainable_percent == 0.0
    assert str(s) == "trainable params: 0 || all params: 0 || trainable%: 0.0000"


def test_draw_kept_shades_the_dropped_patches():
    model = bsr_kernels.reprogram(vit(), keep_rate=0.4).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)
    assert len(kept) == 3                                   # drops in blocks 2, 3, 4
    pics = bsr_kernels.draw_kept(x, kept, model.patch_embed.patch_size)
    assert pics.shape == (len(kept), 2, 32, 32, 3)
    img = x.permute(0, 2, 3, 1)
    for b in range(2):
        counts = []
        for s, idx in enumerate(kept):
            keep = torch.zeros(64, dtype=torch.bool)
            keep[idx[b][idx[b] >= 0]] = True
            # every stage and image: distinct patches, some kept and some shaded
            assert int(keep.sum()) == int((idx[b] >= 0).sum()), (s, b)
            assert 0 < int(keep.sum()) < 64, (s, b)
            counts.append(int(keep.sum()))
            mask = keep.view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
            assert torch.equal(pics[s, b][mask], img[b][mask])
            shade = img[b][~mask] * 0.15 + 0.85 * torch.tensor([0.2, 0.2, 0.35])
            torch.testing.assert_close(pics[s, b][~mask], shade)
        assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0], counts


def test_draw_kept_of_hand_made_kept_on_oblong_patches():
    """Kept indices are row-major over the patch grid, whatever the patch's shape: 8x16 px
    images in 4x8 px patches make a 2x2 grid, patch 0 (the top-left, which is a patch like any
    other and not the fused token's -1) and patch 3 (the last one) included. With strength 1,
    dropped pixels are the colour itself and kept ones the image."""
    x = torch.rand(2, 3, 8, 16, generator=torch.Generator().manual_seed(2))
    kept = [torch.tensor([[0, 3, -1], [1, 2, -1]])]
    red = torch.tensor([1.0, 0.0, 0.0])
    pics = bsr_kernels.draw_kept(x, kept, (4, 8), color=red, strength=1.0)
    img = x.permute(0, 2, 3, 1)
    want = red.expand(2, 8, 16, 3).clone()
    want[0, :4, :8], want[0, 4:, 8:] = img[0, :4, :8], img[0, 4:, 8:]   # patches 0 and 3
    want[1, :4, 8:], want[1, 4:, :8] = img[1, :4, 8:], img[1, 4:, :8]   # patches 1 and 2
    assert pics.shape == (1, 2, 8, 16, 3)
    assert torch.equal(pics[0], want)
    for bad in (4, -2):    # one past the last patch; a negative index other than -1
        with pytest.raises(ValueError, match=rf"kept\[0\] holds (patch )?index {bad}"):
            bsr_kernels.draw_kept(x, [torch.tensor([[0, bad], [1, 2]])], (4, 8))


def test_draw_kept_writes_a_png_and_checks_arguments(tmp_path):
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)
    with pytest.raises(ValueError, match="patches"):
        bsr_kernels.draw_kept(x, kept, 5)
    with pytest.raises(ValueError, match=r"kept\[0\]"):
        bsr_kernels.draw_kept(x[:1], kept, 4)
    with pytest.raises(ValueError, match="images"):
        bsr_kernels.draw_kept(x[:, :1], kept, 4)
    for bad in (0, -4, (4, 0), 4.0):
        with pytest.raises(ValueError, match="patch_size"):
            bsr_kernels.draw_kept(x, kept, bad)
    with pytest.raises(ValueError, match="32x30 px are not a whole number of 4x4 patches"):
        bsr_kernels.draw_kept(x[..., :30], kept, 4)     # the height fits, the width does not
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
            bsr_kernels.draw_kept(x, kept, 4, strength=bad)
    pytest.importorskip("matplotlib")
    path = tmp_path / "kept.png"
    bsr_kernels.draw_kept(x, kept, 4, path=path, titles=["block 2", "block 3", "block 4"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_kept_clamps_images_outside_zero_one():
    """Images given after the model's normalisation (values below 0 and above 1) are drawn
    clamped to [0, 1], as the docstring says, not blended out of range."""
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)
    raw = x * 3 - 1
    assert (raw < 0).any() and (raw > 1).any()
    pics = bsr_kernels.draw_kept(raw, kept, 4)
    assert torch.equal(pics, bsr_kernels.draw_kept(raw.clamp(0, 1), kept, 4))
    assert 0 <= float(pics.min()) and float(pics.max()) <= 1


def test_draw_kept_without_drop_stages_returns_no_pictures(tmp_path):
    model = bsr_kernels.reprogram(vit(), keep_rate=1.0).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)
    assert kept == []
    pics = bsr_kernels.draw_kept(x, kept, 4)
    assert pics.shape == (0, 2, 32, 32, 3) and pics.dtype == torch.float32
    pytest.importorskip("matplotlib")
    bsr_kernels.draw_kept(x, kept, 4, path=tmp_path / "k.png")     # the inputs only
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_kept_refuses_kept_beyond_the_grid_and_bad_colors():
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)               # 8x8 grid of 4 px patches
    assert max(int(k.max()) for k in kept) >= 16
    with pytest.raises(ValueError, match=r"kept\[0\] holds patch index \d+, beyond the 4x4 "
                                         r"grid.*patch_size 8"):
        bsr_kernels.draw_kept(x, kept, 8)
    with pytest.raises(ValueError, match="beyond the 4x4 grid"):        # kept of other images
        bsr_kernels.draw_kept(torch.rand(2, 3, 16, 16), kept, 4)
    bad = [k.clone() for k in kept]   # -2 was drawn as a fused token (-1), without a word
    bad[1][0, 0] = -2
    with pytest.raises(ValueError, match=r"kept\[1\] holds index -2: .*-1 marks the fused"):
        bsr_kernels.draw_kept(x, bad, 4)
    for bad in ((1.0, 0.0), (0.2, 0.2, 0.35, 1.0), (0.0, 0.0, 2.0), "red", 0.5):
        with pytest.raises(ValueError, match="color must be 3 values"):
            bsr_kernels.draw_kept(x, kept, 4, color=bad)
    pics = bsr_kernels.draw_kept(x, kept, 4, color=torch.tensor([1.0, 0.0, 0.0]), strength=1.0)
    dropped = ~bsr_kernels.summary.kept_masks(kept, (8, 8))[0, 0]    # image 0 after stage 1
    dropped = dropped.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(pics[0, 0][dropped].unique(dim=0), torch.tensor([[1.0, 0.0, 0.0]]))


def test_draw_kept_png_leaves_pyplot_alone_and_writes_atomically(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bsr_kernels import checkpoint
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    x = images()
    kept = bsr_kernels.kept_patches(model, x)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")                   # stands for a notebook's interactive backend
    try:
        figs = plt.get_fignums()
        renames = []

        def replace(src, dst):
            renames.append((os.path.basename(src), os.path.basename(dst)))
            os.replace(src, dst)
        monkeypatch.setattr(checkpoint, "_replace", replace)
        path = tmp_path / "kept.png"
        path.write_bytes(b"old")
        bsr_kernels.draw_kept(x, kept, 4, path=path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert renames == [(checkpoint.tmp_name(path).name, "kept.png")]
        with pytest.raises(ValueError, match="unknownext"):
            bsr_kernels.draw_kept(x, kept, 4, path=tmp_path / "kept.unknownext")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figs
        assert sorted(q.name for q in tmp_path.iterdir()) == ["kept.png"]
    finally:
        matplotlib.use(backend)


def test_profile_result_fields_set_by_key_and_the_table_of_a_model_without_blocks():
    """Setting a field's key sets the field (not an extra entry), and the table of a model
    without ``blocks`` (no tokens counted) has no tokens row."""
    prof = ProfileResult(saved_activation_mib_per_image=1.5, train_gflops_per_image=2.0,
                         forward_gmacs_per_image=0.5, batch_size=2)
    lines = str(prof).splitlines()
    assert len(lines) == 4 and not any("tokens" in line for line in lines), lines
    prof["batch_size"], prof["tokens_per_block"] = 8, [5, 5, 3]
    assert prof.batch_size == 8 and prof.tokens_per_block == [5, 5, 3] and prof.extra == {}
    assert len(prof) == 5
    assert str(prof).startswith("one training step, per image (batch of 8):")
    assert re.search(r"tokens per block +\[5, 5, 3\]", str(prof))


def test_profile_result_reads_as_a_table_and_as_the_old_dict():
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5)
    prof = bsr_kernels.profile(model, images(4))
    assert isinstance(prof, ProfileResult)
    # 64 patches + CLS; drops in blocks 2, 3, 4 keep half (+ the fused token)
    assert prof["tokens_per_block"] == prof.tokens_per_block == [65, 65, 65, 34, 19, 11]
    assert set(prof) == {"saved_activation_mib_per_image", "train_gflops_per_image",
                         "forward_gmacs_per_image", "tokens_per_block", "batch_size"}
    assert prof.batch_size == prof["batch_size"] == 4 and prof.get("missing") is None
    prof["trained_params"] = 7           # existing callers add keys (benchmarks)
    prof.update({"param_bytes": 28})
    assert prof["trained_params"] == 7 and prof.extra == {"trained_params": 7, "param_bytes": 28}
    assert json.loads(json.dumps(prof.to_dict()))["param_bytes"] == 28
    assert prof == dict(prof)
    text = str(prof)
    assert text.startswith("one training step, per image (batch of 4):")
    assert re.search(rf"saved activations +{prof.saved_activation_mib_per_image:.4g} MiB", text)
    assert re.search(rf"training FLOPs +{prof.train_gflops_per_image:.4g} GFLOP", text)
    assert re.search(r"tokens per block +\[65, 65, 65, 34, 19, 11\]", text)
    assert "trained_params" in text
    with pytest.raises(KeyError):
        del prof["batch_size"]
