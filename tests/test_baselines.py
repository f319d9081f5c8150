"""Tests of the anchors: the eager drop composite and the eager BSR formulation of timm ViTs."""
from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels
from bsr_kernels.baselines import (EagerBSR, configure_eager_bsr, default_drop_at,
                                   default_train_blocks, eager_bsr_forward, eager_drop_composite)
from bsr_kernels.ops import reference

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=12, num_heads=4, num_classes=7)


def small_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """A random-init small ViT in float64 whose parameters are perturbed away from timm's init
    (ones/zeros norms, tiny head), so that attention is peaked and the logits are O(1)."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**SMALL, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("qkv.weight", "head.weight")) else 0.1
            p.add_(torch.randn_like(p) * scale)
    return model.double().eval()


def images(b: int = 3, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)


# --- eager BSR formulation = timm when nothing is dropped -------------------------------------

@pytest.mark.parametrize("kwargs", [
    {},
    {"reg_tokens": 4},
    {"init_values": 0.3},
    {"qk_norm": True},
    {"reg_tokens": 2, "init_values": 0.3, "qk_norm": True, "no_embed_class": True},
    {"global_pool": "avg", "fc_norm": True},
], ids=["plain", "registers", "layerscale", "qk_norm", "all", "avgpool"])
def test_no_drop_reproduces_timm(kwargs):
    model = small_vit(**kwargs)
    x = images()
    expected = model(x)
    assert expected.abs().max() > 0.1  # not a degenerate model
    out = eager_bsr_forward(model, x, keep_rate=1.0)
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
    n = 16 + model.num_prefix_tokens
    assert out.tokens_in == [n] * 12 and out.tokens_out == [n] * 12
    assert len(out.kept) == 3
    for kept in out.kept:
        assert torch.equal(kept, torch.arange(16).expand(3, 16))
    # No drop stages at all: same logits whatever the keep rate.
    out = eager_bsr_forward(model, x, drop_at=(), keep_rate=0.2)
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
    assert out.kept == []


class _GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate on (VisionTransformer has no flag for it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


@pytest.mark.parametrize("kwargs", [{"scale_attn_norm": True}, {"attn_layer": _GatedAttention},
                                    {"scale_attn_norm": True, "attn_layer": _GatedAttention,
                                     "qk_norm": True}],
                         ids=["scale_norm", "gated", "both"])
def test_eager_attention_honours_scale_norm_and_the_output_gate(kwargs):
    """check_vit accepts scale_norm and gated attention, and eager_attention applies their norm
    and gate: with nothing dropped the eager formulation reproduces timm, and the anchor's
    attention equals timm's Attention module (mutations that skipped the norm or the gate
    passed the tests, which built no such model)."""
    from bsr_kernels.baselines import eager_attention

    model = small_vit(seed=4, **kwargs)
    attn = model.blocks[0].attn
    assert (attn.gate is not None) == ("attn_layer" in kwargs)
    assert isinstance(attn.norm, torch.nn.LayerNorm) == ("scale_attn_norm" in kwargs)
    h = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out, probs = eager_attention(attn, h)
    torch.testing.assert_close(out, attn(h), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17, dtype=torch.float64))
    x = images()
    expected = model(x)
    out = eager_bsr_forward(model, x, keep_rate=1.0)
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)


def test_dropping_changes_logits():
    model = small_vit()
    x = images()
    full = model(x)
    out = eager_bsr_forward(model, x)
    assert out.logits.shape == full.shape
    assert not torch.allclose(out.logits, full, atol=1e-6)


# --- the selection inside the model agrees with the reference op ------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 3, "qk_norm": True}],
                         ids=["plain", "registers_qk_norm"])
@pytest.mark.parametrize("fuse_token", [True, False])
def test_kept_tokens_match_reference_scores(kwargs, fuse_token):
    model = small_vit(seed=2, **kwargs)
    p = model.num_prefix_tokens
    drop_at = default_drop_at(12)
    captured = {}

    def hook(i):
        def fn(mod, inp, out):
            captured[i] = out.detach()
        return fn

    handles = [model.blocks[i].attn.qkv.register_forward_hook(hook(i)) for i in drop_at]
    try:
        out = eager_bsr_forward(model, images(b=4), keep_rate=0.4, fuse_token=fuse_token)
    finally:
        for h in handles:
            h.remove()
    for stage, i in enumerate(drop_at):
        attn = model.blocks[i].attn
        qkv = captured[i]
        b, n, _ = qkv.shape
        q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scores, _ = reference.cls_scores(q, k, attn.scale, p)
        n_keep = -(-4 * (n - p) // 10)  # ceil(0.4 * M)
        kept, _ = reference.select_tokens(scores, n_keep)
        assert torch.equal(out.kept[stage], kept)
        assert out.tokens_in[i] == n
        assert out.tokens_out[i] == p + n_keep + int(fuse_token)


# --- token counts of ViT-B/16 at 224 ---------------------------------------------------------

def test_vit_b16_token_counts():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12,
                              num_heads=12, weight_init="skip").eval()
    with torch.no_grad():  # timm's init of 86M parameters is slow; any random values will do
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fused = eager_bsr_forward(model, x)
        plain = eager_bsr_forward(model, x, fuse_token=False)
    # Design: 197 -> 100 -> 52 -> 28 (1 CLS + ceil(M/2) kept + 1 fused token).
    assert fused.tokens_out == [197] * 3 + [100] * 3 + [52] * 3 + [28] * 3
    assert fused.tokens_in == [197] * 4 + [100] * 3 + [52] * 3 + [28] * 2
    assert [k.shape[1] for k in fused.kept] == [98, 50, 26]
    # Without the fused token: 197 -> 99 -> 50 -> 26.
    assert plain.tokens_out == [197] * 3 + [99] * 3 + [50] * 3 + [26] * 3
    assert [k.shape[1] for k in plain.kept] == [98, 49, 25]


# --- the eager composite equals the reference op ---------------------------------------------

@pytest.mark.parametrize("shape,num_prefix_tokens", [
    ((2, 3, 17, 8), 1), ((2, 3, 17, 8), 3), ((3, 2, 31, 5), 1), ((3, 2, 31, 5), 3),
    ((1, 4, 2, 3), 1), ((2, 1, 6, 3), 5)])
@pytest.mark.parametrize("keep_rate", [0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fuse_token", [True, False])
def test_composite_matches_reference(monkeypatch, shape, num_prefix_tokens, keep_rate,
                                     fuse_token):
    b, h, n, d = shape
    monkeypatch.setenv("BSR_BACKEND", "reference")
    g = torch.Generator().manual_seed(hash((shape, num_prefix_tokens)) % 2**31)
    c = 11
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    q = (2 * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).requires_grad_()
    k = (2 * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).requires_grad_()
    args = (keep_rate, fuse_token, num_prefix_tokens, 0.7)

    out_e, kept_e = eager_drop_composite(x, q, k, *args)
    out_r, kept_r = bsr_kernels.drop_tokens(x, q, k, *args)
    assert torch.equal(kept_e, kept_r)
    assert kept_e.dtype == torch.int64
    torch.testing.assert_close(out_e, out_r, rtol=1e-12, atol=1e-12)

    cot = torch.randn(out_e.shape, generator=g, dtype=torch.float64)
    if not out_e.requires_grad:
        return
    grads_e = torch.autograd.grad(out_e, (x, q, k), cot, allow_unused=True)
    grads_r = torch.autograd.grad(out_r, (x, q, k), cot, allow_unused=True)
    for name, ge, gr, t in zip("xqk", grads_e, grads_r, (x, q, k)):
        ge = torch.zeros_like(t) if ge is None else ge
        gr = torch.zeros_like(t) if gr is None else gr
        torch.testing.assert_close(ge, gr, rtol=1e-10, atol=1e-12, msg=f"grad {name}")
    m = n - num_prefix_tokens
    if fuse_token and kept_e.shape[1] < m:
        assert out_e.shape[1] == num_prefix_tokens + kept_e.shape[1] + 1
        assert grads_e[1].abs().sum() > 0  # the fusion weights carry gradient to q


def test_composite_default_scale_and_float32(monkeypatch):
    monkeypatch.setenv("BSR_BACKEND", "reference")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 197, 48, generator=g)
    q = torch.randn(4, 6, 197, 8, generator=g)
    k = torch.randn(4, 6, 197, 8, generator=g)
    out_e, kept_e = eager_drop_composite(x, q, k, 0.5)
    out_r, kept_r = bsr_kernels.drop_tokens(x, q, k, 0.5)
    assert out_e.shape == (4, 1 + 98 + 1, 48)
    assert torch.equal(kept_e, kept_r)
    torch.testing.assert_close(out_e, out_r, rtol=1e-5, atol=1e-6)


def test_composite_bad_inputs():
    x, q = torch.randn(2, 9, 4), torch.randn(2, 2, 9, 3)
    with pytest.raises(ValueError, match="keep_rate"):
        eager_drop_composite(x, q, q, 0.0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        eager_drop_composite(x, q, q, 0.5, num_prefix_tokens=9)
    with pytest.raises(ValueError, match="x"):
        eager_drop_composite(x[:, :5], q, q, 0.5)
    with pytest.raises(TypeError, match="q"):
        eager_drop_composite(x, q.long(), q, 0.5)


# --- training set-up ---------------------------------------------------------------------------

def test_defaults():
    assert default_train_blocks(12) == (3, 7, 11)
    assert default_drop_at(12) == (3, 6, 9)
    assert default_train_blocks(24) == (7, 15, 23)
    assert default_drop_at(24) == (6, 12, 18)
    # one definition with reprogram's (round(d/3*k) - 1, round(d/4*k)), also at other depths
    assert default_train_blocks(8) == (2, 4, 7) and default_drop_at(8) == (2, 4, 6)
    assert default_train_blocks(10) == (2, 6, 9) and default_drop_at(10) == (2, 5, 8)
    assert bsr_kernels.reprogram(small_vit(depth=10)).bsr_config.train_blocks == (2, 6, 9)
    for bad in (0, -1, 2.5, "12", True):
        with pytest.raises(ValueError, match="depth"):
            default_drop_at(bad)


def test_configure_and_gradients():
    model = small_vit()
    bsr = EagerBSR(model)
    assert bsr.train_blocks == (3, 7, 11) and bsr.drop_at == (3, 6, 9)
    trained = {f"blocks.{i}." for i in (3, 7, 11)}
    for name, p in model.named_parameters():
        want = name.startswith("head.") or any(name.startswith(t) for t in trained)
        assert p.requires_grad == want, name
    logits = bsr(images())
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert [k.shape for k in bsr.last.kept] == [(3, 8), (3, 5), (3, 3)]


def test_prefix_blocks_run_without_grad():
    # Everything trainable, but train_blocks says block 5 is the first: blocks 0..4 and the
    # embedding must not be recorded, later frozen-or-not blocks must be.
    model = small_vit()
    model.requires_grad_(True)
    out = eager_bsr_forward(model, images(), train_blocks=(5, 9))
    out.logits.sum().backward()
    for name, p in model.named_parameters():
        early = (name.startswith(("patch_embed.", "cls_token", "pos_embed"))
                 or any(name.startswith(f"blocks.{i}.") for i in range(5)))
        assert (p.grad is None) == early, name


def test_bad_arguments():
    model = small_vit()
    x = images()
    with pytest.raises(ValueError, match="train_blocks"):
        eager_bsr_forward(model, x, train_blocks=(3, 12))
    with pytest.raises(ValueError, match="train_blocks"):
        configure_eager_bsr(model, (3, 3))
    with pytest.raises(ValueError, match="drop_at"):  # ValueError, as in reprogram
        eager_bsr_forward(model, x, drop_at="3")
    with pytest.raises(ValueError, match="drop_at"):
        eager_bsr_forward(model, x, drop_at=(-1,))
    with pytest.raises(ValueError, match="keep_rate"):
        eager_bsr_forward(model, x, keep_rate=1.5)
    with pytest.raises(TypeError, match="model"):
        eager_bsr_forward(torch.nn.Linear(3, 3), x)
    no_cls = VisionTransformer(**{**SMALL, "class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match="class token"):
        EagerBSR(no_cls)
    assert all(p.requires_grad for p in no_cls.parameters())  # left unchanged


def test_trains_what_reprogram_trains_on_a_distilled_deit():
    """configure_eager_bsr froze a distilled DeiT's head_dist, which reprogram trains: the
    anchor trained (and so measured) another set of parameters than the library. Both now train
    the same parameters, on a plain ViT and on a distilled DeiT."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(3)
    for cls in (VisionTransformer, VisionTransformerDistilled):
        model = cls(**SMALL)
        EagerBSR(model)
        eager = {n for n, p in model.named_parameters() if p.requires_grad}
        bsr_kernels.reprogram(model)
        assert eager == {n for n, p in model.named_parameters() if p.requires_grad}, cls
        assert any(n.startswith("head.") for n in eager)
    assert any(n.startswith("head_dist.") for n in eager)


def test_refuses_a_pool_that_would_average_the_fused_token():
    """reprogram refuses global_pool='avg' with the fused token (the fused token, a weighted sum
    of the dropped tokens, would be averaged in); the eager anchor ran it. It now refuses it
    with the same message, and runs it without the fused token or without a drop."""
    model = small_vit(global_pool="avg")
    with pytest.raises(ValueError, match="global_pool='avg' would pool the fused token"):
        EagerBSR(model)
    with pytest.raises(ValueError, match="global_pool='avg' would pool the fused token"):
        eager_bsr_forward(model, images())
    assert all(p.requires_grad for p in model.parameters())   # refused before configuring
    assert eager_bsr_forward(model, images(), fuse_token=False).logits.shape == (3, 7)
    assert EagerBSR(model, keep_rate=1.0)(images()).shape == (3, 7)


@pytest.mark.parametrize("method", ["full", "linear", "bitfit", "bsr", "eager_bsr"])
def test_method_setup_refuses_settings_it_would_ignore_or_cannot_take(method):
    """methods.setup took keep_rate=7.0 or memory_mode='bogus' for the plain methods and
    compressed storage for the eager formulation, none of which they use, without a word; the
    block settings' refusal named --method bsr only, though eager_bsr takes them. Values are
    checked for every method now, before the model changes."""
    from bsr_kernels import methods

    model = small_vit()
    before = [p.requires_grad for p in model.parameters()]
    for kwargs, match in [(dict(keep_rate=7.0), "keep_rate"), (dict(keep_rate="0.5"), "keep_rate"),
                          (dict(memory_mode="bogus"), "memory_mode"),
                          (dict(activation_dtype=torch.float8_e4m3fn), "activation_dtype")]:
        with pytest.raises(ValueError, match=match):
            methods.setup(model, method, **kwargs)
    if method not in methods.BSR_METHODS:
        with pytest.raises(ValueError, match="apply to --method bsr or eager_bsr only"):
            methods.setup(model, method, train_blocks=[1])
    if method == "eager_bsr":
        for kwargs in (dict(memory_mode="fast"), dict(activation_dtype=torch.bfloat16)):
            with pytest.raises(ValueError, match="apply to --method bsr only"):
                methods.setup(model, method, **kwargs)
    assert [p.requires_grad for p in model.parameters()] == before
    assert not hasattr(model, "bsr_config")
    assert methods.setup(model, method).name == method


def test_method_setup_applies_every_setting_it_is_given():
    """methods.setup passes each BSR setting on (reprogram's config is what BSRConfig.create
    makes of them; the eager formulation keeps train_blocks, drop_at and keep_rate), and the
    linear probe trains every head a model has (a distilled DeiT's head_dist too). Mutations
    that dropped activation_dtype or drop_at for bsr, keep_rate for eager_bsr, or head_dist for
    linear passed the tests that compared trained-parameter names."""
    from timm.models.deit import VisionTransformerDistilled

    from bsr_kernels import methods
    from bsr_kernels.config import BSRConfig

    settings = dict(train_blocks=(2, 4), drop_at=(1, 3), keep_rate=0.25)
    m = methods.setup(small_vit(), "bsr", memory_mode="fast", activation_dtype=torch.bfloat16,
                      **settings)
    assert m.model.bsr_config == BSRConfig.create(
        len(m.model.blocks), 1, memory_mode="fast", activation_dtype=torch.bfloat16, **settings)
    eager = methods.setup(small_vit(), "eager_bsr", **settings).module
    assert (tuple(eager.train_blocks), tuple(eager.drop_at), eager.keep_rate) == \
        ((2, 4), (1, 3), 0.25)
    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                      num_heads=2, num_classes=5)
    for method in ("linear", "bitfit"):
        trained = set(methods.trainable_parameters(methods.setup(deit, method).model))
        assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} <= trained
