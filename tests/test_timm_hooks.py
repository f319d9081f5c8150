"""timm features on a reprogrammed model: forward_intermediates, set_grad_checkpointing, CPU
half precision, and the instance-level overrides surviving copies."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels


def vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args)


def images(n=2, seed=1, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=2, no_embed_class=True)])
def test_forward_intermediates_nchw_puts_kept_tokens_on_the_grid(kw):
    model = bsr_kernels.reprogram(vit(**kw), keep_rate=0.4).eval()
    x = images()
    with torch.no_grad():
        final, dense = model.forward_intermediates(x)
        _, nlc = model.forward_intermediates(x, output_fmt="NLC")
        kept = bsr_kernels.kept_patches(model, x)
        want_final = model.forward_features(x)
    assert len(dense) == len(model.blocks)
    assert all(t.shape == (2, 32, 8, 8) for t in dense)
    torch.testing.assert_close(final, want_final)    # forward_features ends with the norm
    # NLC: the non-prefix tokens each block really holds (fewer after each drop)
    counts = [t.shape[1] for t in nlc]
    assert counts[0] == 64 and counts[-1] < counts[0]
    drop_blocks = [i for i, b in enumerate(model.blocks) if b.bsr_drops]
    stage = -1
    for i, (d, t) in enumerate(zip(dense, nlc)):
        flat = d.flatten(2).transpose(1, 2)              # (B, 64, C) in grid order
        if i in drop_blocks:
            stage += 1
        if stage < 0:
            torch.testing.assert_close(flat, t)
            continue
        idx = kept[stage]                                 # original patch of each kept token
        for b in range(2):
            patches = idx[b][idx[b] >= 0]
            torch.testing.assert_close(flat[b, patches], t[b, :idx.shape[1]][idx[b] >= 0])
            dropped = torch.ones(64, dtype=torch.bool)
            dropped[patches] = False
            assert torch.count_nonzero(flat[b, dropped]) == 0


def test_forward_intermediates_options_follow_timm():
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    x = images()
    with torch.no_grad():
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        both = model.forward_intermediates(x, indices=[0, 4], return_prefix_tokens=True)
        as_dict = model.forward_intermediates(x, indices=[4], output_dict=True,
                                              return_prefix_tokens=True)
    assert len(only) == 2 and all(t.shape == (2, 32, 8, 8) for t in only)
    final, pairs = both
    assert final.shape[0] == 2 and len(pairs) == 2
    assert pairs[1][0].shape == (2, 32, 8, 8) and pairs[1][1].shape == (2, 1, 32)
    assert set(as_dict) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    torch.testing.assert_close(as_dict["image_intermediates"][0], pairs[1][0])


def test_forward_intermediates_nchw_with_patch_dropout_in_training_is_refused():
    """With patch dropout drawn (patch_drop_rate > 0, training mode) the NCHW maps failed with
    torch's 'Expected index [2, 64, 32] to be no larger than self [2, 65, 32]': the patches that
    entered the blocks are no longer the grid. ValueError naming output_fmt and the fixes; NLC
    and eval mode work."""
    model = bsr_kernels.reprogram(vit(patch_drop_rate=0.5), keep_rate=0.5).train()
    with pytest.raises(ValueError, match=r"output_fmt='NCHW'.*patch_drop_rate 0.5.*model\.eval"):
        model.forward_intermediates(images())
    final, tokens = model.forward_intermediates(images(), output_fmt="NLC")
    assert tokens[0].shape[1] < 64           # the blocks saw fewer patches than the grid's
    _, maps = model.eval().forward_intermediates(images())
    assert all(m.shape == (2, 32, 8, 8) for m in maps)


def test_forward_intermediates_trains():
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5)
    _, dense = model.forward_intermediates(images())
    dense[-1].square().mean().backward()
    assert model.blocks[-1].attn.qkv.weight.grad is not None


def test_forward_intermediates_is_timms_again_after_restore():
    model = vit()
    plain = model.forward_intermediates(images())[1]
    bsr_kernels.restore(bsr_kernels.reprogram(model))
    assert "forward_intermediates" not in vars(model)
    for a, b in zip(plain, model.forward_intermediates(images())[1]):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_is_refused_at_the_call():
    model = bsr_kernels.reprogram(vit())
    with pytest.raises(RuntimeError, match="set_grad_checkpointing.*memory_mode='lean'.*restore"):
        model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="set_grad_checkpointing"):
        model.set_grad_checkpointing()
    assert not model.grad_checkpointing
    model.set_grad_checkpointing(False)                # turning it off is fine
    model(images()).sum().backward()
    bsr_kernels.restore(model)
    model.set_grad_checkpointing(True)                  # timm's own method again
    assert model.grad_checkpointing


def test_overrides_follow_deepcopy_and_pickle():
    model = bsr_kernels.reprogram(vit())
    for other in (copy.deepcopy(model), _pickled(model)):
        assert other.forward_intermediates.model is other
        with pytest.raises(RuntimeError, match="set_grad_checkpointing"):
            other.set_grad_checkpointing(True)
        assert set(other.state_dict()) == set(model.state_dict())


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_runs_and_trains(dtype, monkeypatch):
    """No BSR_BACKEND needed: the drop runs in float32 and casts back, which is what the
    reference backend computes for half inputs (kept rows exact, scores in float32)."""
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5)
    x = images(dtype=dtype)
    half = copy.deepcopy(model).to(dtype)
    out = half(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert half.head.weight.grad is not None and half.blocks[-1].mlp.fc1.weight.grad is not None
    half.eval()
    with torch.no_grad():
        got, kept = half(x), bsr_kernels.kept_patches(half, x)
        monkeypatch.setenv("BSR_BACKEND", "reference")
        want, kept_ref = half(x), bsr_kernels.kept_patches(half, x)
        full = model.eval()(x.float())
    for a, b in zip(kept, kept_ref):
        assert torch.equal(a, b)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), full, rtol=10 * tol, atol=10 * tol)


def test_forward_intermediates_nchw_is_timms_when_a_drop_keeps_every_token():
    """keep_rate 0.99 keeps ceil(0.99 * 64) = 64 of 64 patches at every drop: no token is
    dropped and no fused token appended, so the NCHW maps are timm's own (a mutation that gave
    each such drop a fused-token slot in the patch mapping passed the tests)."""
    plain = vit(seed=3).eval()
    model = bsr_kernels.reprogram(copy.deepcopy(plain), keep_rate=0.99).eval()
    assert model.bsr_config.fuse_token
    x = images(seed=4)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        want_final, want_maps = plain.forward_intermediates(x)
    torch.testing.assert_close(final, want_final)
    assert len(maps) == len(want_maps) == len(plain.blocks)
    for got, want in zip(maps, want_maps):
        torch.testing.assert_close(got, want)


def test_forward_intermediates_output_dict_has_timms_keys():
    """output_dict=True holds the prefix tokens only when return_prefix_tokens asks for them,
    as timm's does (a mutation that always added them passed the tests)."""
    plain = vit(seed=5).eval()
    model = bsr_kernels.reprogram(copy.deepcopy(plain), keep_rate=0.5).eval()
    x = images()
    for kw in (dict(), dict(return_prefix_tokens=True), dict(intermediates_only=True)):
        with torch.no_grad():
            got = model.forward_intermediates(x, indices=[1, 5], output_dict=True, **kw)
            want = plain.forward_intermediates(x, indices=[1, 5], output_dict=True, **kw)
        assert set(got) == set(want), kw
        assert [t.shape for t in got["image_intermediates"]] == \
            [t.shape for t in want["image_intermediates"]]


def test_check_pool_refuses_a_pool_only_where_a_fused_token_is_appended():
    """check_pool (what reprogram and reset_classifier refuse) refuses a pool other than 'token'
    and '' (no pooling) only with a fused token: fuse_token, keep_rate < 1 and a drop block.
    Mutations that refused '' or keep_rate 1 passed the tests."""
    from bsr_kernels.timm_hooks import check_pool

    for pool in ("token", ""):
        check_pool(pool, True, 0.5, (3,))
    for pool in ("avg", "max"):
        with pytest.raises(ValueError, match=f"global_pool='{pool}' would pool the fused token"):
            check_pool(pool, True, 0.5, (3,))
        check_pool(pool, False, 0.5, (3,))      # no fused token
        check_pool(pool, True, 1.0, (3,))       # nothing dropped
        check_pool(pool, True, 0.5, ())         # no drop block


def test_reset_classifier_takes_the_pool_and_refuses_one_that_pools_the_fused_token():
    """A reprogrammed model's reset_classifier refuses global_pool='avg' with a fused token
    before changing anything, and otherwise resets the head and the pool as timm's does (a
    mutation that dropped the pool, leaving 'token', passed the tests)."""
    model = bsr_kernels.reprogram(vit(), keep_rate=0.5).eval()
    head = model.head.weight.clone()
    with pytest.raises(ValueError, match="global_pool='avg' would pool the fused token"):
        model.reset_classifier(3, global_pool="avg")
    assert model.global_pool == "token" and torch.equal(model.head.weight, head)
    model.reset_classifier(3, global_pool="")
    assert model.global_pool == "" and model.head.out_features == 3
    x = images()
    with torch.no_grad():
        out, feats = model(x), model.forward_features(x)
    assert out.dim() == 3      # no pooling: every token the last block holds gets logits
    torch.testing.assert_close(out, model.head(feats))
    # keep_rate 1 appends no fused token: 'avg' is taken, and averages the patch tokens
    model = bsr_kernels.reprogram(vit(), keep_rate=1.0).eval()
    model.reset_classifier(3, global_pool="avg")
    assert model.global_pool == "avg"
    with torch.no_grad():
        out, feats = model(x), model.forward_features(x)
    torch.testing.assert_close(out, model.head(feats[:, 1:].mean(1)))
