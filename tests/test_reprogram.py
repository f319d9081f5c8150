"""reprogram / restore / the memory-lean backward, against the authors' eager formulation and
timm."""
from __future__ import annotations

import contextlib
import warnings
import copy

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

import bsr_kernels
import bsr_kernels.backward
from bsr_kernels.baselines import EagerBSR
from bsr_kernels.measure import saved_activations
from bsr_kernels.ops.common import num_kept
from bsr_kernels.reprogram import BSRBlock, default_drop_at, default_train_blocks

CONFIGS = {
    "plain": dict(),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True, qkv_bias=False),
    # CLIP image towers (vit_*_clip_*): a norm before the blocks, QuickGELU (openai weights)
    "clip": dict(pre_norm=True, act_layer="quick_gelu"),
    # RMSNorm in every norm and projections without a bias, as in some newer ViTs
    "rmsnorm_no_proj_bias": dict(norm_layer="rmsnorm", proj_bias=False),
}


def small_vit(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4, num_classes=7)
    args.update(kw)
    model = VisionTransformer(**args).to(dtype)
    with torch.no_grad():  # random-init LayerScale/norm params away from their constant inits
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(n=3, seed=1, size=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b, floor=1e-12):
    """Relative error; ``floor`` handles gradients that are mathematically zero (e.g. the k_norm
    bias, to which softmax is invariant) and come out as rounding noise in both computations."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def assert_grad_close(got, ref, scale, rtol, what):
    """``got`` equals ``ref`` to ``rtol`` relative error; where ``ref`` is numerically zero next
    to the model's gradient scale (a gradient that is mathematically zero, such as the k_norm
    bias, to which softmax is invariant), both must be rounding noise of that scale (1e-14)."""
    if ref.norm() < 1e-14 * scale:
        assert got.norm() < 1e-14 * scale, (what, float(got.norm()), float(scale))
    else:
        assert rel_err(got, ref) < rtol, (what, rel_err(got, ref))


def to_patches(kept_stages, fuse=True):
    """Maps per-stage kept positions (as the eager formulation returns them) to original patches."""
    out, mapping = [], None
    for kept in kept_stages:
        mapped = kept if mapping is None else torch.gather(mapping, 1, kept)
        out.append(mapped)
        if fuse:
            mapped = torch.cat([mapped, mapped.new_full((mapped.shape[0], 1), -1)], 1)
        mapping = mapped
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_matches_eager_formulation_float64(config, memory_mode):
    """Logits, gradients (1e-10 relative, to the float64 rounding of mathematically zero
    gradients) and kept patches against the authors' eager formulation."""
    base = small_vit(**CONFIGS[config])
    eager_model, bsr_model = copy.deepcopy(base), copy.deepcopy(base)
    x, y = images(), torch.tensor([0, 3, 6])

    eager = EagerBSR(eager_model)
    logits_e = eager(x)
    torch.nn.functional.cross_entropy(logits_e, y).backward()

    bsr_kernels.reprogram(bsr_model, memory_mode=memory_mode)
    logits_b = bsr_model(x)
    torch.nn.functional.cross_entropy(logits_b, y).backward()

    assert bsr_model.__class__ is VisionTransformer
    torch.testing.assert_close(logits_b, logits_e, rtol=1e-10, atol=1e-10)
    ge, gb = grads(eager_model), grads(bsr_model)
    assert set(ge) == set(gb) and len(gb) > 0
    scale = max(g.norm() for g in ge.values())
    for name in ge:
        assert_grad_close(gb[name], ge[name], scale, 1e-10, name)
    kept_b = bsr_kernels.kept_patches(bsr_model, x)
    kept_e = to_patches(eager.last.kept)
    assert len(kept_b) == len(kept_e) == 3
    for a, b in zip(kept_b, kept_e):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_gradients_equal_plain_autograd_float32(memory_mode):
    """The lean/fast backward against plain autograd through the same body (fp32, 1e-3)."""
    base = small_vit(dtype=torch.float32, init_values=0.5)
    plain, bsr = copy.deepcopy(base), copy.deepcopy(base)
    x = images(dtype=torch.float32)
    for m, mode in ((plain, "autograd"), (bsr, memory_mode)):  # autograd: the plain body
        bsr_kernels.reprogram(m, memory_mode=mode)
    plain(x).square().mean().backward()
    bsr(x).square().mean().backward()
    gp, gb = grads(plain), grads(bsr)
    assert set(gp) == set(gb) and len(gb) > 0
    for name in gp:
        assert rel_err(gb[name], gp[name]) < 1e-3, name


def _plain_autograd(model):
    """Runs every block that is not before the first trained block under plain autograd."""
    bsr_kernels.reprogram(model, **_kwargs(model, "autograd"))
    return model


def _kwargs(model, memory_mode):
    """The reprogram arguments of ``model``'s config with another memory mode."""
    cfg = model.bsr_config
    return dict(train_blocks=cfg.train_blocks, drop_at=cfg.drop_at, keep_rate=cfg.keep_rate,
                fuse_token=cfg.fuse_token, memory_mode=memory_mode, train_norm=cfg.train_norm)


FROZEN_CONFIGS = {**CONFIGS, "gelu_tanh": dict(act_layer="gelu_tanh"),
                  "no_affine_qk_norm": dict(qk_norm=True, init_values=0.3)}


@pytest.mark.parametrize("config", sorted(FROZEN_CONFIGS))
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "no_fuse"])
def test_lean_backward_equals_plain_autograd_float64(config, fuse):
    """The lean backward (frozen blocks 4-6 and 8-10 replayed from their input alone, trained
    blocks from input, qkv and fc1) against plain autograd through the same body, across block
    variants (registers, LayerScale, qk_norm with and without affine, GELU-tanh, CLIP's pre-norm
    and QuickGELU, RMSNorm without projection biases)."""
    base = small_vit(**FROZEN_CONFIGS[config])
    if config == "no_affine_qk_norm":
        for blk in base.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                norm.weight, norm.bias = None, None
    x, results = images(), {}
    for path in ("plain", "lean"):
        model = bsr_kernels.reprogram(copy.deepcopy(base), fuse_token=fuse)
        if path == "plain":
            _plain_autograd(model)
        model(x).square().sum().backward()
        results[path] = grads(model)
    assert len(results["plain"]) > 0
    scale = max(g.norm() for g in results["plain"].values())
    assert set(results["lean"]) == set(results["plain"])
    for name, g in results["plain"].items():
        assert_grad_close(results["lean"][name], g, scale, 1e-10, name)


def test_lean_backward_float32_and_compressed():
    base = small_vit(dtype=torch.float32, init_values=0.5)
    x = images(dtype=torch.float32)
    plain = _plain_autograd(bsr_kernels.reprogram(copy.deepcopy(base)))
    plain(x).square().mean().backward()
    for act_dtype, tol in ((None, 1e-3), (torch.bfloat16, 3e-2)):
        model = bsr_kernels.reprogram(copy.deepcopy(base), activation_dtype=act_dtype)
        model(x).square().mean().backward()
        gp, gb = grads(plain), grads(model)
        assert set(gp) == set(gb)
        for name in gp:
            assert rel_err(gb[name], gp[name]) < tol, (act_dtype, name)


def test_lean_backward_replays_under_the_forward_autocast_state(monkeypatch):
    """Backward replays the body with the forward's autocast (the engine does not carry it), so
    the replayed drop sees the forward's bf16 q and k; gradients agree with plain autograd to
    bf16 precision."""
    # the reference backend takes the bf16 q and k as they are (the C++ one casts them to x's
    # float32)
    monkeypatch.setenv("BSR_BACKEND", "reference")
    base = small_vit(dtype=torch.float32)
    x = images(dtype=torch.float32)
    seen, real_drop = [], BSRBlock.drop

    def drop(self, x_, q, k, kept=None):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), q.dtype))
        return real_drop(self, x_, q, k, kept)
    monkeypatch.setattr(BSRBlock, "drop", drop)
    results = {}
    for path in ("plain", "lean"):
        model = bsr_kernels.reprogram(copy.deepcopy(base))
        if path == "plain":
            _plain_autograd(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        seen.clear()
        loss.backward()
        if path == "lean":  # one replayed drop per dropping block (3, 6, 9)
            assert len(seen) == 3 and all(s == (True, True, torch.bfloat16) for s in seen), seen
        results[path] = grads(model)
    for name, g in results["plain"].items():
        assert rel_err(results["lean"][name], g) < 2e-2, name


@pytest.mark.skipif("cpp" not in bsr_kernels.available_backends("cpu"),
                    reason="the C++ extension is not built")
@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_memory_modes_under_cpu_bf16_autocast_with_the_cpp_backend(memory_mode):
    """CPU bf16 autocast with the C++ kernels (the CPU default): lean/fast run and give
    autograd mode's logits and gradients. The drop runs outside autocast, in forward and in the
    replay (the replay's bf16 scores failed the C++ backward, so bsr-finetune refused --amp
    bf16 on CPU)."""
    base = small_vit(dtype=torch.float32, init_values=0.5)
    x = images(dtype=torch.float32)
    results = {}
    for mode in ("autograd", memory_mode):
        model = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode)
        with bsr_kernels.use_backend("cpp"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().square().mean().backward()
        results[mode] = out, grads(model)
    (out_ref, g_ref), (out, g) = results["autograd"], results[memory_mode]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # the same bf16 ops in forward
    assert set(g) == set(g_ref) and g
    # backward differs only in the float32 rounding of the replayed drop (the reference
    # formulation against the C++ forward), which a bf16 rounding of a recomputed activation
    # can turn into 2^-8 on an element; a wrong term would be > 1e-2
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-4, name

def gradcheck_vit(fuse, memory_mode, seed=0):
    """A reprogrammed ViT small enough for gradcheck: two 8x8 one-channel images, 4 patches of
    4x4, two register tokens (3 prefix tokens), 2 blocks, LayerScale; block 0 trained (its qkv
    and fc1 outputs saved in lean mode), block 1 frozen (replayed from its input alone in lean
    mode), both dropping half the tokens. Weights are drawn at scale 0.5 (norms and LayerScale
    around their initial values), so that CLS attention is far from uniform and the selection
    has a margin (checked by the test)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                              num_heads=2, num_classes=3, reg_tokens=2, init_values=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p)) if "norm" in name or "gamma" in name \
                else p.copy_(0.5 * torch.randn_like(p))
    return bsr_kernels.reprogram(model.double(), train_blocks=[0], drop_at=[0, 1],
                                 fuse_token=fuse, memory_mode=memory_mode)


def selection_margin(model, x, monkeypatch):
    """The smallest gap, over the drops and the images, between the lowest kept score and the
    highest dropped one in ``model(x)``."""
    margins, real = [], BSRBlock.drop

    def drop(self, x_, q, k, kept=None):
        cfg = self.bsr_config
        scores = bsr_kernels.cls_attention(q, k, self.attn.scale, cfg.num_prefix_tokens)
        n = num_kept(cfg.keep_rate, scores.shape[1])
        top = scores.sort(dim=1, descending=True).values
        margins.append(float((top[:, n - 1] - top[:, n]).min()))
        return real(self, x_, q, k, kept)
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(BSRBlock, "drop", drop)
        model(x)
    assert len(margins) == 2
    return min(margins)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "no_fuse"])
def test_lean_and_fast_backward_pass_gradcheck(memory_mode, fuse, monkeypatch):
    """torch.autograd.gradcheck (float64) of the custom backward of the lean/fast modes
    (_LeanBlock), through a whole reprogrammed ViT with register tokens, with respect to the
    images and three parameters of the trained block (qkv bias, LayerScale gamma: fc2's output
    is then needed, fc2 bias), taken through torch.func.functional_call."""
    model = gradcheck_vit(fuse, memory_mode)
    x = images(n=2, size=8)[:, :1]
    # gradcheck moves each input by eps = 1e-6: no selection flips at a margin of 1e-3
    assert selection_margin(model, x, monkeypatch) > 1e-3
    names = ["blocks.0.attn.qkv.bias", "blocks.0.ls2.gamma", "blocks.0.mlp.fc2.bias"]
    params = dict(model.named_parameters())
    inputs = [x.clone().requires_grad_()]
    inputs += [params[n].detach().clone().requires_grad_() for n in names]
    calls, apply = [], bsr_kernels.backward._LeanBlock.apply

    def lean_apply(*args):
        calls.append(args[0].bsr_index)
        return apply(*args)
    monkeypatch.setattr(bsr_kernels.backward._LeanBlock, "apply", lean_apply)

    def logits(images_, *tensors):
        return torch.func.functional_call(model, dict(zip(names, tensors)), (images_,))
    logits(*inputs)
    assert calls == [0, 1]  # both blocks ran through the custom backward
    # float64 central differences are good to ~1e-9 here; gradcheck's default rtol (1e-3)
    # would pass a gradient 0.1 % wrong
    assert torch.autograd.gradcheck(logits, inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_backward_replays_with_the_parameters_given_to_forward(memory_mode):
    """A forward under torch.func.functional_call with other values for a frozen and a trained
    parameter: the lean/fast backward replays with those values (not the module's own, back in
    place by backward time) and gives the passed trained tensor its gradient, as plain
    autograd does."""
    base = small_vit()
    x = images()
    results = {}
    for mode in ("autograd", memory_mode):
        model = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode)
        own = dict(model.named_parameters())
        given = {"blocks.5.mlp.fc1.weight": 1.5 * own["blocks.5.mlp.fc1.weight"].detach(),
                 "blocks.7.attn.qkv.bias": (own["blocks.7.attn.qkv.bias"].detach() + 0.1
                                            ).requires_grad_()}
        out = torch.func.functional_call(model, given, (x,))
        out.square().sum().backward()
        assert dict(model.named_parameters()) == own  # the module's own tensors, back in place
        results[mode] = (out, given["blocks.7.attn.qkv.bias"].grad, grads(model))
    (out_ref, g_ref, rest_ref), (out, g, rest) = results["autograd"], results[memory_mode]
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    assert g is not None and g.norm() > 0
    assert rel_err(g, g_ref) < 1e-10
    assert set(rest) == set(rest_ref) and "blocks.7.attn.qkv.bias" not in rest
    scale = max(v.norm() for v in rest_ref.values())
    for name, v in rest_ref.items():
        assert_grad_close(rest[name], v, scale, 1e-10, name)


def test_keep_rate_one_all_trained_reproduces_timm():
    base = small_vit()
    ref, bsr = copy.deepcopy(base), copy.deepcopy(base)
    x = images()
    bsr_kernels.reprogram(bsr, train_blocks=range(12), drop_at=[3, 6, 9], keep_rate=1.0)
    assert bsr_kernels.kept_patches(bsr, x) == []   # a keep_rate of 1 makes no drop stage
    out_ref, out_bsr = ref(x), bsr(x)
    torch.testing.assert_close(out_bsr, out_ref, rtol=1e-12, atol=1e-12)
    out_ref.square().sum().backward()
    out_bsr.square().sum().backward()
    g_ref, g_bsr = grads(ref), grads(bsr)
    trained = {n for n, p in bsr.named_parameters() if p.requires_grad}
    assert trained == {n for n in g_ref if n.startswith(("blocks.", "head."))}
    for name in trained:
        torch.testing.assert_close(g_bsr[name], g_ref[name], rtol=1e-10, atol=1e-12)


def test_defaults_and_token_counts():
    assert default_train_blocks(12) == (3, 7, 11) and default_drop_at(12) == (3, 6, 9)
    for depth in range(1, 25):   # clamped to the blocks: the last block always trains
        for blocks in (default_train_blocks(depth), default_drop_at(depth)):
            assert blocks and list(blocks) == sorted(set(blocks)), (depth, blocks)
            assert 0 <= blocks[0] and blocks[-1] < depth, (depth, blocks)
        assert default_train_blocks(depth)[-1] == depth - 1
    one = bsr_kernels.reprogram(small_vit(depth=1))       # the defaults of a 1-block ViT run
    one(images()).sum().backward()
    assert one.blocks[0].mlp.fc1.weight.grad is not None
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                              num_classes=3)
    bsr_kernels.reprogram(model)
    prof = bsr_kernels.profile(model, torch.randn(1, 3, 224, 224))
    # ViT-B/16 token schedule of DESIGN.md: 197 -> 100 -> 52 -> 28 (incl. CLS and fused token)
    assert prof["tokens_per_block"] == [197] * 4 + [100] * 3 + [52] * 3 + [28] * 2
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.3", "blocks.7", "blocks.11", "head"}


@pytest.mark.parametrize("train_blocks", [None, (1,), (0, 10)])
def test_blocks_before_first_trained_run_without_autograd(train_blocks):
    """Exactly the given blocks (default 3, 7, 11) and the head train (block 1 is no prefix of
    blocks 10 and 11), and the blocks before the first trained one run without autograd."""
    model = bsr_kernels.reprogram(small_vit(dtype=torch.float32), train_blocks=train_blocks)
    want = (3, 7, 11) if train_blocks is None else train_blocks
    trained = {n.split(".")[1] for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("blocks.")}
    assert trained == {str(i) for i in want}
    assert all(p.requires_grad for p in model.head.parameters())
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(images(dtype=torch.float32))
    assert [seen[i] for i in range(12)] == [i >= want[0] for i in range(12)]


def test_lean_saves_less_and_never_attention_probabilities():
    x = images(n=2, dtype=torch.float32)
    sizes = {}
    for mode in ("autograd", "fast", "lean"):
        model = small_vit(dtype=torch.float32)
        bsr_kernels.reprogram(model, memory_mode=mode)
        for blk in model.blocks:   # SDPA, timm's default, whatever TIMM_FUSED_ATTN says
            blk.attn.fused_attn = True
        sizes[mode] = saved_activations(lambda: model(x).sum(), exclude=[model]).bytes
        shapes = []   # a forward of its own: saved_activations' hooks would hide these

        def pack(t):
            shapes.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        n_tokens = 65
        assert len(shapes) > 10, (mode, len(shapes))   # the hook saw what backward keeps
        assert not any(len(s) >= 2 and s[-1] == s[-2] == n_tokens for s in shapes), mode
    assert sizes["lean"] < sizes["fast"] < sizes["autograd"]


@pytest.mark.parametrize("mode", ["lean", "fast"])
def test_each_block_saves_what_its_mode_says_and_never_recomputes_fc2(mode, monkeypatch):
    """What each block's backward keeps, tensor by tensor (the module doc of
    bsr_kernels.backward): lean, the input of a frozen block and also the qkv and fc1 outputs
    of a trained one; fast, the input and the qkv, proj and fc1 outputs of every block; both,
    the int32 kept indices of a drop. And backward replays fc2 without its matmul unless a
    trained LayerScale needs its output. Mutations that made lean save qkv and fc1 of frozen
    blocks too (2.2x its memory) or recompute fc2 passed the 'lean < fast < autograd' test."""
    model = bsr_kernels.reprogram(small_vit(dtype=torch.float32), memory_mode=mode)
    b, n, c = 2, 65, 48
    for i, blk in enumerate(model.blocks):
        if blk.bsr_no_grad:
            continue
        x = torch.randn(b, n, c, requires_grad=True)
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = blk(x)
        m = out.shape[1]
        names = ("qkv", "proj", "fc1") if mode == "fast" else \
            ("qkv", "fc1") if i in (3, 7, 11) else ()     # the default trained blocks
        width = {"qkv": (n, 3 * c), "proj": (n, c), "fc1": (m, 4 * c)}
        want = [((b, n, c), torch.float32)] + [((b, *width[k]), torch.float32) for k in names]
        if i in (3, 6, 9):                            # the default drops
            want.append(((b, m - 2), torch.int32))   # the fused token is no kept index
        assert saved == want, (i, saved)
        n = m

    calls, fc2s = [], set()
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda self, t: (calls.append(id(self) in fc2s), forward(self, t))[1])
    for init_values, trained_ls in ((None, 0), (0.3, 3)):   # trained blocks 3, 7, 11
        model = bsr_kernels.reprogram(small_vit(dtype=torch.float32, init_values=init_values),
                                      memory_mode=mode)
        fc2s.clear()
        fc2s.update(id(blk.mlp.fc2) for blk in model.blocks)
        loss = model(images(dtype=torch.float32)).square().sum()
        calls.clear()
        loss.backward()
        assert sum(calls) == trained_ls, (init_values, calls)


def test_kept_patches_leaves_the_training_path_as_it_was():
    """kept_patches records the selection of its own forward only: afterwards a block trains
    through the lean backward again (not plain autograd, recording into a stale list)."""
    from bsr_kernels.backward import _LeanBlock
    model = bsr_kernels.reprogram(small_vit(depth=6), memory_mode="lean")
    tokens = torch.randn(2, 65, 48, dtype=torch.float64, requires_grad=True)
    lean = _LeanBlock.__name__ + "Backward"
    assert model.blocks[4](tokens).grad_fn.name() == lean
    assert len(bsr_kernels.kept_patches(model, images())) == 3
    assert model.blocks[4](tokens).grad_fn.name() == lean


def test_eval_and_no_grad_match_training_logits():
    """Without dropout, the logits are the same bitwise in training and eval mode, with and
    without autograd; with dropout turned on, eval mode turns it off and gives the logits of the
    same weights without dropout."""
    model = bsr_kernels.reprogram(small_vit())
    x = images()
    with torch.no_grad():
        a = model(x)
    b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        c = model(x)
    d = model(x)
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    torch.testing.assert_close(d, a, rtol=0, atol=0)
    dropping = copy.deepcopy(model).train()
    for blk in dropping.blocks[4:]:  # dropout turned on after reprogram (it refuses it before)
        blk.attn.proj_drop.p = blk.mlp.drop1.p = blk.attn.attn_drop.p = 0.3
    torch.manual_seed(0)
    assert not torch.equal(dropping(x), a)  # training mode: dropout is active
    dropping.eval()
    with torch.no_grad():
        e = dropping(x)
    torch.testing.assert_close(e, a, rtol=0, atol=0)
    torch.testing.assert_close(dropping(x), a, rtol=0, atol=0)


def test_state_dict_round_trips():
    base = small_vit()
    bsr = bsr_kernels.reprogram(copy.deepcopy(base), train_blocks=[1, 5])
    assert list(bsr.state_dict()) == list(base.state_dict())
    fresh = small_vit(seed=5)
    fresh.load_state_dict(bsr.state_dict())  # reprogrammed weights -> plain timm model
    x = images()
    torch.testing.assert_close(fresh(x), base(x))
    other = bsr_kernels.reprogram(small_vit(seed=7))
    other.load_state_dict(base.state_dict())  # plain timm weights -> reprogrammed model
    torch.testing.assert_close(other(x), bsr(x))


def test_restore_gives_back_plain_timm():
    base = small_vit()
    base.blocks[2].attn.qkv.weight.requires_grad_(False)
    model = copy.deepcopy(base)
    bsr_kernels.reprogram(model)
    assert isinstance(model.blocks[0], BSRBlock)
    assert bsr_kernels.restore(model) is model
    for blk in model.blocks:
        assert type(blk) is Block and type(blk.attn) is timm.layers.Attention
        assert not any(a.startswith(("bsr_", "_bsr")) for a in vars(blk))
    assert ([p.requires_grad for p in model.parameters()]
            == [p.requires_grad for p in base.parameters()])
    x = images()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not reprogrammed"):
        bsr_kernels.restore(model)
    with pytest.raises(ValueError, match="not reprogrammed"):
        bsr_kernels.kept_patches(model, x)


def test_reprogram_twice_replaces_configuration():
    """A second reprogram replaces the first's settings, and restore then gives back the plain
    model as it was before the first: timm's classes and the original requires_grad flags (a
    mutation that reprogrammed over the first without undoing it left BSRBlocks and 14 of 80
    parameters trainable after restore, and passed)."""
    model = small_vit()
    model.pos_embed.requires_grad_(False)              # flags of the user's own
    before = _snapshot(model)
    bsr_kernels.reprogram(model, keep_rate=0.5)
    bsr_kernels.reprogram(model, keep_rate=0.25, drop_at=[2], train_blocks=[0])
    prof = bsr_kernels.profile(model, images(n=1))
    assert prof["tokens_per_block"] == [65] * 3 + [18] * 9  # 1 + ceil(0.25 * 64) + 1 fused
    assert [n for n, p in model.named_parameters() if p.requires_grad and "blocks" in n] \
        and all(n.startswith(("blocks.0.", "head.")) for n, p in model.named_parameters()
                if p.requires_grad)
    bsr_kernels.restore(model)
    assert _same(model, before)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_train_norm_trains_the_final_norm_the_model_has(pool):
    """train_norm trains model.norm, or model.fc_norm where timm puts the final norm after an
    average pool (norm is then an Identity); nothing else besides the blocks and the head (a
    mutation that left fc_norm out passed)."""
    model = small_vit(depth=6, global_pool=pool, fc_norm=pool == "avg")
    final = model.fc_norm if pool == "avg" else model.norm
    assert any(True for _ in final.parameters())
    bsr_kernels.reprogram(model, fuse_token=False, train_norm=True)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks", "head", "fc_norm" if pool == "avg" else "norm"}
    assert all(p.requires_grad for p in final.parameters())
    bsr_kernels.reprogram(model, fuse_token=False)
    assert not any(p.requires_grad for p in final.parameters())


def test_dynamic_image_size():
    model = small_vit(dynamic_img_size=True)
    bsr_kernels.reprogram(model)
    out = model(images(n=2, size=48))
    assert out.shape == (2, 7)
    assert bsr_kernels.profile(model, images(n=1, size=48))["tokens_per_block"][0] == 145


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()],
            [type(b) for b in model.blocks], [type(b.attn) for b in model.blocks])


def _same(model, snap):
    sd, rg, bt, at = snap
    now = _snapshot(model)
    return (all(torch.equal(sd[k], now[0][k]) for k in sd) and rg == now[1] and bt == now[2]
            and at == now[3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_rate=0), "keep_rate"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate=float("nan")), "keep_rate"),
    (dict(train_blocks=[12]), "train_blocks"),
    (dict(train_blocks=[-1]), "train_blocks"),
    (dict(train_blocks=[1, 1]), "train_blocks"),
    (dict(train_blocks="3"), "train_blocks"),
    (dict(train_blocks=b"\x03"), "train_blocks"),
    (dict(train_blocks=[True]), "train_blocks"),
    (dict(drop_at=[3, 99]), "drop_at"),
    (dict(drop_at=[2.5]), "drop_at"),
    (dict(memory_mode="tiny"), "memory_mode"),
    (dict(fuse_token="yes"), "fuse_token"),
    (dict(train_norm=1), "train_norm"),
])
def test_bad_arguments_raise_and_leave_model_unchanged(kwargs, match):
    model = small_vit()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        bsr_kernels.reprogram(model, **kwargs)
    assert _same(model, snap)
    assert not hasattr(model, "bsr_config")


def test_block_indices_in_any_order_give_the_same_configuration():
    """train_blocks and drop_at name sets of blocks: in another order, or as a range, they give
    the same configuration (compared when a checkpoint loads), its indices sorted."""
    configs = [bsr_kernels.reprogram(small_vit(depth=4), train_blocks=t, drop_at=d).bsr_config
               for t, d in (([3, 1], (2, 0)), (range(1, 4, 2), [0, 2]))]
    assert configs[0] == configs[1]
    assert configs[0].train_blocks == (1, 3) and configs[0].drop_at == (0, 2)


def test_bad_arguments_on_reprogrammed_model_keep_its_configuration():
    model = bsr_kernels.reprogram(small_vit(), keep_rate=0.5)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="drop_at"):
        bsr_kernels.reprogram(model, drop_at=[40])
    assert _same(model, snap) and model.bsr_config.keep_rate == 0.5


class _OwnBlock(Block):
    """A Block subclass: its forward may differ from timm's."""


class _OwnMlp(Mlp):
    """An Mlp subclass: its forward may differ from timm's."""


class _OwnDropout(torch.nn.Dropout):
    """A Dropout subclass (p > 0 draws as nn.Dropout does)."""


def _vit4(**kw):
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=4, **kw)


def _changed(model, path=None, module=None, checkpointing=False):
    """``model`` with ``module`` set at ``path``, or grad checkpointing on."""
    if path is not None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)
    model.set_grad_checkpointing(checkpointing)
    return model


@pytest.mark.parametrize("make, match", [
    (lambda: _vit4(class_token=False, global_pool="avg"), "class token"),
    (lambda: _changed(_vit4(), checkpointing=True), "grad checkpointing is on"),
    (lambda: _vit4(global_pool="map"), "attention pooling"),
    (lambda: _vit4(block_fn=_OwnBlock), "block 0 is a _OwnBlock"),
    (lambda: _changed(_vit4(), "blocks.0.attn.gate", torch.nn.Linear(48, 48)),
     "block 0 attention is gated"),
    (lambda: _vit4(mlp_layer=_OwnMlp), "block 0 MLP is a _OwnMlp"),
    (lambda: _vit4(scale_mlp_norm=True), "hidden norm"),
    (lambda: _changed(_vit4(), "blocks.1.ls2", torch.nn.Linear(48, 48)),
     r"block 1\.ls2 is neither"),
    (lambda: _changed(_vit4(), "blocks.2.mlp.drop1", _OwnDropout(0.1)),
     r"block 2 has dropout.*drop1"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 3)), "not a ViT"),
    (lambda: timm.create_model("resnet18", pretrained=False), "not a ViT"),
    (lambda: _vit4(drop_path_rate=0.1), "drop"),
])
def test_unsupported_models_get_clear_errors(make, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        bsr_kernels.reprogram(model)


def test_timm_deit_and_vit_factories():
    for name in ("deit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_reg4_gap_256"):
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=64)
        if model.cls_token is None:
            with pytest.raises(ValueError, match="class token"):
                bsr_kernels.reprogram(model)
            continue
        bsr_kernels.reprogram(model)
        out = model(torch.randn(2, 3, 64, 64))
        out.sum().backward()
        assert out.shape == (2, 3)
        assert model.blocks[3].mlp.fc1.weight.grad is not None
        assert model.blocks[4].mlp.fc1.weight.grad is None


def test_compressed_activations_halve_memory_with_close_gradients():
    base = small_vit(dtype=torch.float32)
    exact, packed = copy.deepcopy(base), copy.deepcopy(base)
    bsr_kernels.reprogram(exact)
    bsr_kernels.reprogram(packed, activation_dtype=torch.bfloat16)
    x = images(n=4, dtype=torch.float32)
    m_exact = bsr_kernels.profile(exact, x)["saved_activation_mib_per_image"]
    m_packed = bsr_kernels.profile(packed, x)["saved_activation_mib_per_image"]
    assert m_packed < 0.6 * m_exact
    torch.testing.assert_close(packed(x), exact(x), rtol=0, atol=0)  # forward is untouched
    exact(x).square().mean().backward()
    packed(x).square().mean().backward()
    ge, gp = grads(exact), grads(packed)
    assert set(ge) == set(gp)
    for name in ge:
        assert rel_err(gp[name], ge[name], floor=1e-6) < 5e-2, name
    with pytest.raises(ValueError, match="activation_dtype"):
        bsr_kernels.reprogram(small_vit(), activation_dtype="bf16")
    plain = small_vit()   # autograd mode saves what autograd saves: it would compress nothing
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="activation_dtype=torch.bfloat16.*memory_mode='autograd'"):
        bsr_kernels.reprogram(plain, memory_mode="autograd", activation_dtype=torch.bfloat16)
    assert not hasattr(plain, "bsr_config") and plain.state_dict().keys() == before.keys()


@pytest.mark.parametrize("change, match", [
    (dict(drop_at=None), r"malformed BSR config: missing \['drop_at'\]"),
    (dict(memory_modes="lean"), r"malformed BSR config: missing \[\], unknown \['memory_modes'\]"),
    (dict(activation_dtype="bf16"), "activation_dtype must be one of"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(depth=True), "depth must be a positive int"),
    (dict(depth="12"), "depth must be a positive int"),
], ids=["missing", "unknown", "dtype_name", "depth_0", "depth_bool", "depth_str"])
def test_config_from_dict_refuses_a_malformed_dict_naming_what_is_wrong(change, match):
    """A saved config dict (a checkpoint's) with a key missing (None here) or unknown, a dtype
    name it cannot read, or a depth that is no positive int: a ValueError that says so, not
    defaults filled in silently or an error of another kind."""
    from bsr_kernels.config import BSRConfig
    d = bsr_kernels.reprogram(small_vit(depth=4), drop_at=[1]).bsr_config.to_dict()
    d = {k: v for k, v in {**d, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        BSRConfig.from_dict(d)


def test_reprogram_of_a_multitask_wrapper_gives_its_vit_every_argument():
    """reprogram and restore of a MultiTaskViT act on its ViT, with every argument (each away
    from its default) as reprogram of that ViT alone takes it."""
    kw = dict(train_blocks=[1], drop_at=[2], keep_rate=0.25, fuse_token=False,
              memory_mode="fast", train_norm=True, activation_dtype=torch.bfloat16)
    model = bsr_kernels.MultiTaskViT(small_vit(depth=4), [3, 2])
    want = bsr_kernels.reprogram(copy.deepcopy(model.vit), **kw).bsr_config
    assert bsr_kernels.reprogram(model, **kw) is model
    assert model.vit.bsr_config == want
    assert bsr_kernels.restore(model) is model and not hasattr(model.vit, "bsr_config")


def test_an_older_config_without_depth_takes_the_models_blocks_and_prefix_tokens():
    """A config dict of an older checkpoint holds reprogram's arguments only (no depth, no
    num_prefix_tokens): read for a model with register tokens, directly or through a
    MultiTaskViT wrapper, it is the config those arguments give that model (the one a loaded
    state_dict is compared with), and it reprograms the model to it."""
    from bsr_kernels.config_access import config_from_dict, reprogram_from_dict
    kw = dict(train_blocks=[1], drop_at=[2], keep_rate=0.25, memory_mode="fast")
    for wrap in (False, True):
        vit = small_vit(depth=4, reg_tokens=4, no_embed_class=True)
        model = bsr_kernels.MultiTaskViT(vit, [3, 2]) if wrap else vit
        want = bsr_kernels.reprogram(copy.deepcopy(vit), **kw).bsr_config
        assert want.num_prefix_tokens == 5 and want.depth == 4
        assert config_from_dict(dict(kw), model) == want, wrap
        assert reprogram_from_dict(model, dict(kw)).bsr_config == want, wrap


# --- what a user may add to a reprogrammed model ---------------------------------------------

class _LoRALinear(torch.nn.Linear):
    """A LoRA-style projection: an nn.Linear subclass with parameters of its own."""

    def __init__(self, base, rank=2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(base.out_features)
        self.lora_a = torch.nn.Parameter(
            0.1 * torch.randn(rank, self.in_features, generator=g, dtype=base.weight.dtype))
        self.lora_b = torch.nn.Parameter(
            0.1 * torch.randn(self.out_features, rank, generator=g, dtype=base.weight.dtype))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


def test_lean_and_fast_replay_only_plain_linears():
    """A projection that is not a plain nn.Linear (a LoRA subclass with parameters of its own)
    is run again in the lean and fast backward, not replayed from its saved output as
    x @ W.T + b: the same gradients as plain autograd, the adapters' included (the replay gave
    them none, and x a wrong one). (A hooked projection makes its block run plain autograd:
    test_hooks_inside_a_block_keep_plain_autograd_in_every_mode.)"""
    x, y = images(), torch.tensor([0, 1, 6])
    results = {}
    for mode in ("autograd", "lean", "fast"):
        model = bsr_kernels.reprogram(small_vit(depth=6, init_values=0.3), memory_mode=mode)
        for blk in model.blocks:
            blk.attn.qkv, blk.mlp.fc1 = _LoRALinear(blk.attn.qkv), _LoRALinear(blk.mlp.fc1)
            blk.attn.proj, blk.mlp.fc2 = _LoRALinear(blk.attn.proj), _LoRALinear(blk.mlp.fc2)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        results[mode] = grads(model)
    want = results["autograd"]
    assert any(name.endswith("lora_a") for name in want)
    for mode in ("lean", "fast"):
        assert set(results[mode]) == set(want), mode
        for name, g in want.items():
            assert rel_err(results[mode][name], g) < 1e-10, (mode, name)


def test_restore_leaves_parameters_added_after_reprogram_trainable():
    """A parameter added after reprogram (a LoRA adapter in a frozen block) has no flag from
    before to give back: restore leaves it trainable, and gives every parameter that existed
    before reprogram (the adapter's base weights keep their names) the flag it had then."""
    model = small_vit(depth=4)
    model.blocks[2].attn.qkv.bias.requires_grad_(False)          # a flag of the user's own
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    bsr_kernels.reprogram(model)                                   # trains 0, 2, 3
    blk = model.blocks[1]
    blk.attn.qkv = _LoRALinear(blk.attn.qkv)
    bsr_kernels.restore(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {**before, "blocks.1.attn.qkv.lora_a": True, "blocks.1.attn.qkv.lora_b": True}


@pytest.mark.parametrize("part", ["norm1", "attn.qkv", "mlp.fc1", "ls2"])
def test_hooks_inside_a_block_keep_plain_autograd_in_every_mode(part):
    """In lean and fast mode a hook on a part of a block (here of trained block 7, and of
    frozen block 8 after it) ran in a forward without autograd, then again in backward's replay:
    an auxiliary loss on what it collected trained nothing (silently no gradient), and noise it
    drew differed in the replay (gradients ~150 % off, for a loss equal to autograd mode's). Such
    a block runs plain autograd now: its hooks run once a step, and every mode gives autograd
    mode's loss and gradients. A hook on the block itself keeps the lean path."""
    from bsr_kernels.backward import _LeanBlock
    x, y = images(), torch.tensor([0, 1, 6])
    results = {}
    for mode in ("autograd", "lean", "fast"):
        model = bsr_kernels.reprogram(small_vit(init_values=0.3), memory_mode=mode)
        calls, feats = [], []
        for i in (7, 8):
            model.blocks[i].get_submodule(part).register_forward_hook(
                lambda m, a, out, i=i: (calls.append(i), feats.append(out))[0])
        model.blocks[9].get_submodule(part).register_forward_hook(   # random, changes output
            lambda m, a, out: out + 0.1 * torch.randn_like(out))
        torch.manual_seed(5)
        with (pytest.warns(UserWarning, match=f"memory_mode='{mode}' saves no memory")
              if mode != "autograd" else contextlib.nullcontext()):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + sum(f.square().mean() for f in feats)
        loss.backward()
        assert calls == [7, 8], (mode, calls)                  # once a step, after backward too
        results[mode] = (loss.detach(), grads(model))
    want_loss, want = results["autograd"]
    for mode in ("lean", "fast"):
        loss, got = results[mode]
        assert torch.equal(loss, want_loss) and set(got) == set(want), mode
        for name, g in want.items():
            assert rel_err(got[name], g) < 1e-10, (mode, name)

    model = bsr_kernels.reprogram(small_vit(depth=6), memory_mode="lean")
    model.blocks[4].register_forward_hook(lambda m, a, out: None)
    tokens = torch.randn(2, 65, 48, dtype=torch.float64, requires_grad=True)
    assert model.blocks[4](tokens).grad_fn.name() == _LeanBlock.__name__ + "Backward"


@pytest.mark.parametrize("register", ["register_forward_pre_hook", "register_full_backward_hook",
                                      "register_full_backward_pre_hook"])
@pytest.mark.parametrize("where", ["attn", "mlp"])
def test_hooks_on_attn_or_mlp_are_refused_not_skipped(where, register):
    """A reprogrammed block calls its attention's and MLP's pieces itself, so hooks on those
    modules (forward or backward ones) would not run: forward raises, naming the module and
    where hooks do run. Hooks on the block and on the projections run as in timm."""
    model = bsr_kernels.reprogram(small_vit(depth=6))
    calls = []
    model.blocks[2].register_forward_hook(lambda m, a, out: calls.append("block"))
    model.blocks[2].attn.qkv.register_forward_hook(lambda m, a, out: calls.append("qkv"))
    model(images())
    assert calls == ["qkv", "block"]
    handle = getattr(getattr(model.blocks[4], where), register)(lambda *a: None)
    with pytest.raises(RuntimeError, match=rf"block 4\.{where} has forward or backward hooks.*"
                                           r"register them on the block"):
        model(images())
    handle.remove()
    model(images())


def test_hooks_on_a_moe_mlp_run():
    """A MoE MLP (to_moe) is called whole by its block, so hooks on it run, once a forward,
    on the tokens left after the block's drop: they are not refused as a timm MLP's are."""
    model = bsr_kernels.to_moe(small_vit(depth=4), num_experts=4, top_k=2, blocks=[1])
    bsr_kernels.reprogram(model, drop_at=[1])
    seen = []
    model.blocks[1].mlp.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    model(images())
    assert seen == [(3, 1 + 32 + 1, 48)]   # CLS, half the 64 patches, the fused token


@pytest.mark.parametrize("kw", [dict(attn_mask=torch.ones(65, 65, dtype=torch.bool)),
                                dict(is_causal=True)], ids=["attn_mask", "is_causal"])
def test_block_refuses_a_mask_it_would_not_honour(kw):
    """A reprogrammed block changes the sequence, so it takes no attn_mask and no is_causal:
    either raises, naming restore, rather than being ignored."""
    model = bsr_kernels.reprogram(small_vit(depth=4))
    with pytest.raises(ValueError, match="takes no attn_mask/is_causal.*restore"):
        model.blocks[1](torch.randn(2, 65, 48, dtype=torch.float64), **kw)


@pytest.mark.parametrize("memory_mode", ["autograd", "lean", "fast"])
def test_gradients_reach_inputs_and_parameters_trained_later(memory_mode):
    """Blocks before the first trained one run without autograd only while nothing asks for a
    gradient there: an input that requires grad (saliency, adversarial examples) and a
    parameter made trainable after reprogram (pos_embed, a block-0 weight) get their gradients,
    those of plain autograd: equal, in float64, to those of an autograd-mode model that trains
    block 0 too (so nothing runs without autograd), and the input gradient passes a float64
    gradcheck (fast mode, at tolerances a 0.5 % error in the drop's score path fails)."""
    def run(model):
        model.pos_embed.requires_grad_(True)
        model.blocks[0].attn.qkv.weight.requires_grad_(True)
        x = images(n=2).requires_grad_()
        model(x).square().sum().backward()
        return [x.grad, model.pos_embed.grad, model.blocks[0].attn.qkv.weight.grad]

    model = bsr_kernels.reprogram(small_vit(patch_size=8), memory_mode=memory_mode)
    assert [b.bsr_no_grad for b in model.blocks[:4]] == [True] * 3 + [False]   # trains 3, 7, 11
    got = run(model)
    want = run(bsr_kernels.reprogram(small_vit(patch_size=8), memory_mode="autograd",
                                     train_blocks=(0, 3, 7, 11)))
    for g, w in zip(got, want):
        assert g is not None and w.abs().sum() > 0
        assert rel_err(g, w) < 1e-10, rel_err(g, w)
    # a parameter made trainable asks for it alone too (nothing before it requires grad)
    alone = bsr_kernels.reprogram(small_vit(patch_size=8), memory_mode=memory_mode)
    weight = alone.blocks[0].attn.qkv.weight.requires_grad_(True)
    alone(images(n=2)).square().sum().backward()
    assert weight.grad is not None and rel_err(weight.grad, want[2]) < 1e-10
    frozen = bsr_kernels.reprogram(small_vit(patch_size=8), memory_mode=memory_mode)
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda t: frozen(t).square().sum(),
                                    (images(n=1).requires_grad_(),), fast_mode=True,
                                    atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_double_backward_through_lean_and_fast_raises(memory_mode):
    """create_graph=True through a lean or fast block would give detached, wrong second-order
    gradients (the replay builds no graph): it raises, naming memory_mode='autograd'."""
    model = bsr_kernels.reprogram(small_vit(depth=6), memory_mode=memory_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(images()).square().sum()
    with pytest.raises(RuntimeError, match="double backward.*memory_mode='autograd'"):
        torch.autograd.grad(loss, params, create_graph=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("fuse_token", [True, False])
def test_second_derivative_in_autograd_mode_matches_finite_differences(backend, fuse_token):
    """A gradient penalty (``create_graph=True``) through a reprogrammed model in autograd mode,
    with SDPA's math kernel (its fused CPU kernel has no double backward): the penalty's gradient
    along a random direction of the trained parameters equals the central difference of the
    penalty, which is computed with first-order gradients only (the backend's own kernels). The
    drop's backward once had no derivative in any mode, although the README said autograd mode
    supported second derivatives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend not in bsr_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built here")
    model = bsr_kernels.reprogram(small_vit(depth=6), memory_mode="autograd",
                                  fuse_token=fuse_token)
    assert model.bsr_config.drop_at   # the penalty's graph runs through the drop op
    params = [p for p in model.parameters() if p.requires_grad]
    x = images(n=2)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def penalty(create_graph):
        loss = model(x).logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        return sum(gr.square().sum() for gr in grads)

    with bsr_kernels.use_backend(backend), sdpa_kernel(SDPBackend.MATH):
        # the first-order gradients of a create_graph backward are the plain backward's (the
        # drop's partial derivatives: through its inputs themselves, q and k also reached x's)
        loss = model(x).logsumexp(-1).sum()
        for a, b in zip(torch.autograd.grad(loss, params, retain_graph=True),
                        torch.autograd.grad(loss, params, create_graph=True)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        analytic = torch.autograd.grad(penalty(True), params)
        along = sum((a * d).sum() for a, d in zip(analytic, direction)).item()
        eps, values = 1e-6, []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
            values.append(penalty(False).item())
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(along - numeric) <= 1e-6 * abs(numeric), (along, numeric)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_replay_reads_layerscale_of_functional_call(memory_mode):
    """Whether fc2's output is needed (for LayerScale's gamma gradient) is read with the
    forward's parameters bound: a gamma passed through torch.func.functional_call for a block
    whose own gamma is frozen gets autograd mode's gradient (it got zero)."""
    got = {}
    for mode in ("autograd", memory_mode):
        model = bsr_kernels.reprogram(small_vit(depth=6, init_values=0.3), memory_mode=mode)
        own = model.blocks[2].ls2.gamma
        assert not own.requires_grad
        gamma = (own.detach() * 1.1).requires_grad_()
        out = torch.func.functional_call(model, {"blocks.2.ls2.gamma": gamma}, (images(),))
        out.square().sum().backward()
        got[mode] = gamma.grad
    assert got["autograd"].abs().sum() > 0
    assert rel_err(got[memory_mode], got["autograd"]) < 1e-10


def test_restore_gives_back_the_attention_class_the_model_was_built_with():
    """A model built with attn_layer=TokenDropAttention (the README's own-block route) keeps it
    after reprogram + restore; timm's Attention comes back as Attention."""
    from bsr_kernels.attention import TokenDropAttention
    from timm.layers import Attention

    for attn_layer in (TokenDropAttention, Attention):
        model = small_vit(depth=6, attn_layer=attn_layer)
        bsr_kernels.restore(bsr_kernels.reprogram(model))
        assert all(type(b.attn) is attn_layer for b in model.blocks)


@pytest.mark.parametrize("fused", [True, False])
def test_token_drop_attention_is_timms_attention_in_training_with_dropout(fused):
    """As a drop-in (attn_layer=), TokenDropAttention computes what timm's Attention does in
    training too, with attention and projection dropout drawn (same seed, same masks) and their
    gradients; in eval both leave dropout out. A mutation that skipped proj_drop passed."""
    from bsr_kernels.attention import TokenDropAttention
    kw = dict(depth=2, attn_drop_rate=0.3, proj_drop_rate=0.4)
    ours, timms = small_vit(attn_layer=TokenDropAttention, **kw), small_vit(**kw)
    timms.load_state_dict(ours.state_dict())
    for b in (*ours.blocks, *timms.blocks):
        b.attn.fused_attn = fused
    x = images()
    out = {}
    for name, m in (("ours", ours), ("timm", timms)):
        torch.manual_seed(4)
        out[name] = m(x)
        out[name].square().sum().backward()
    torch.testing.assert_close(out["ours"], out["timm"], rtol=1e-12, atol=1e-12)
    gt = dict(timms.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, gt[n].grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.manual_seed(5)
    assert (ours(x) - out["ours"]).abs().max() > 1e-3         # dropout is really drawn
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), timms.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_token_drop_attention_is_timms_attention_with_masks_gate_and_scale_norm(fused):
    """As a drop-in, TokenDropAttention computes timm Attention's output for an additive and a
    boolean attn_mask and for is_causal=True, with the output gate and the scale norm on,
    through SDPA and through timm's explicit path; forward_qk's output is forward's."""
    from bsr_kernels.attention import TokenDropAttention
    from timm.layers import Attention
    torch.manual_seed(0)
    timms = Attention(16, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
                      norm_layer=torch.nn.LayerNorm).double()
    with torch.no_grad():   # norms away from their identity-like initial values
        for p in timms.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = copy.deepcopy(timms)
    ours.__class__ = TokenDropAttention
    timms.fused_attn = ours.fused_attn = fused
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(6, 6, generator=g) > 0.4
    keep.fill_diagonal_(True)
    cases = [dict(), dict(attn_mask=torch.randn(2, 1, 6, 6, generator=g, dtype=x.dtype)),
             dict(attn_mask=keep), dict(is_causal=True)]
    outs = []
    for kw in cases:
        want = timms(x, **kw)
        torch.testing.assert_close(ours(x, **kw), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.forward_qk(x, **kw)[0], want, rtol=1e-12, atol=1e-12)
        outs.append(want)
    assert all((o - outs[0]).abs().max() > 1e-3 for o in outs[1:])   # each mask matters


@pytest.mark.parametrize("mode", ["autograd", "fast", "lean"])
def test_fused_attn_false_takes_timms_explicit_attention(mode):
    """TokenDropAttention ran SDPA whatever the model's ``fused_attn`` (timm's
    ``TIMM_FUSED_ATTN=0``): a reprogrammed model with fused_attn=False gave no attn_drop output
    (timm's AttentionExtract and attn_drop hooks saw nothing) and no second derivative on CPU.
    Now it takes timm's explicit path there: the same logits and gradients as SDPA, attn_drop
    sees each block's probabilities at its token count, and autograd mode differentiates twice
    without SDPA's math kernel (the same result as that kernel gives)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    models = {}
    for fused in (True, False):
        m = bsr_kernels.reprogram(small_vit(depth=6), memory_mode=mode)   # drops at 2, 3, 4
        for b in m.blocks:
            b.attn.fused_attn = fused
        models[fused] = m
    x = images()
    seen = []
    for i, b in enumerate(models[False].blocks):
        b.attn.attn_drop.register_forward_hook(
            lambda mod, inp, out, i=i: seen.append((i, tuple(out.shape))))
    out = {f: m(x) for f, m in models.items()}
    torch.testing.assert_close(out[False], out[True], rtol=1e-12, atol=1e-12)
    # CLS + 64 patches; then CLS + 32 kept + fused; CLS + ceil(33 / 2) + fused; CLS + 9 + fused
    n = [65, 65, 65, 34, 19, 11]
    assert seen == [(i, (3, 4, t, t)) for i, t in enumerate(n)], seen
    for f, m in models.items():
        m.zero_grad()
        out[f].square().sum().backward()
    g = {f: grads(m) for f, m in models.items()}
    assert g[True].keys() == g[False].keys()
    for name in g[True]:
        torch.testing.assert_close(g[False][name], g[True][name], rtol=1e-10, atol=1e-12)
    if mode != "autograd":
        return
    second = {}
    for fused, m in models.items():
        head = m.head.weight
        with sdpa_kernel(SDPBackend.MATH) if fused else contextlib.nullcontext():
            first, = torch.autograd.grad(m(x).square().sum(), head, create_graph=True)
            second[fused], = torch.autograd.grad(first.square().sum(),
                                                 m.blocks[5].mlp.fc1.weight)
    torch.testing.assert_close(second[False], second[True], rtol=1e-10, atol=1e-12)


def test_block_skips_only_dropouts_that_return_their_input(monkeypatch):
    """A reprogrammed block calls its dropout modules (attn.proj_drop, mlp.drop1, mlp.drop2)
    only where the call can do something: p > 0 in training, hooks to run (the module's own or
    global forward or backward ones), or a Dropout subclass. An ``nn.Dropout`` of p=0 returns
    its input eagerly, but torch 2.11's torch.compile traced each call to a copy (aten.clone),
    36 a ViT-B step. The logits are those of every call made. Lean mode: its forward and
    replay run the body that every mode runs."""
    calls = []
    forward = torch.nn.Dropout.forward

    def counting(self, t):
        calls.append(self)
        return forward(self, t)
    monkeypatch.setattr(torch.nn.Dropout, "forward", counting)
    model = bsr_kernels.reprogram(small_vit(depth=4, img_size=16))
    parts = {(i, n): m for i, b in enumerate(model.blocks)
             for n, m in (("proj_drop", b.attn.proj_drop), ("drop1", b.mlp.drop1),
                          ("drop2", b.mlp.drop2))}
    assert all(type(m) is torch.nn.Dropout and m.p == 0 for m in parts.values())
    x = images(n=2, size=16)

    def called():
        calls.clear()
        out = model(x)
        out.square().sum().backward()
        return out, {k for k, m in parts.items() if any(c is m for c in calls)}

    ref, seen = called()
    assert seen == set()
    assert any(c is model.pos_drop for c in calls)   # timm's own forward still calls its own
    hooked = []
    handle = parts[3, "drop2"].register_forward_hook(lambda *a: hooked.append(a[2].shape))
    with warnings.catch_warnings():   # lean: a block with hooked parts runs plain autograd
        warnings.simplefilter("ignore")
        out, seen = called()
    handle.remove()
    assert seen == {(3, "drop2")} and hooked
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    module = torch.nn.modules.module
    for register in (module.register_module_forward_hook, module.register_module_forward_pre_hook,
                     module.register_module_full_backward_hook,
                     module.register_module_full_backward_pre_hook):
        handle = register(lambda *a: None)
        try:
            out, seen = called()
        finally:
            handle.remove()
        assert seen == set(parts), register.__name__
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    parts[2, "drop1"].p = 0.5   # drawn (lean replays the forward's masks)
    out, seen = called()
    assert seen == {(2, "drop1")} and (out - ref).abs().max() > 1e-3
    own = model.blocks[1].mlp.drop2 = _OwnDropout(0.0)   # a subclass may do more than drop
    calls.clear()
    model(x)
    assert any(c is own for c in calls)
    model.eval()   # drop1's p = 0.5 left on: in eval mode its call returns its input too
    with torch.no_grad():
        calls.clear()
        model(x)
    assert not any(c is m for c in calls for m in parts.values())

