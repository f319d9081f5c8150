"""Mixture-of-Experts multitask BSR: routing vs the dense reference, to_moe, MultiTaskViT,
reprogram on MoE models (lean and fast against plain autograd), bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels
from bsr_kernels.measure import saved_activations
from bsr_kernels.moe import MoEMlp, moe_blocks, moe_forward, moe_reference, route

F64 = torch.float64


def small_vit(seed=0, dtype=F64, depth=6, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=depth, num_heads=4,
                num_classes=7)
    args.update(kw)
    model = VisionTransformer(**args).to(dtype)
    with torch.no_grad():  # random-init norm params away from their constant inits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(n=3, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype)


def expert_weights(e, c, hd, seed=0, bias=True, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_()  # noqa
    return t(e, hd, c), t(e, hd) if bias else None, t(e, c, hd), t(e, c) if bias else None


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b, floor=1e-12):
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


# --- the routed op against the dense reference ---------------------------------------------

@pytest.fixture(params=["loop", "bmm"])
def grouping(request, monkeypatch):
    """Both expert groupings: one matmul per expert slice, and the padded batched matmul."""
    import bsr_kernels.moe as moe_module
    monkeypatch.setattr(moe_module, "GROUPING", request.param)
    return request.param


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_routed_moe_gradcheck_and_matches_dense_reference(renormalize, bias, grouping):
    t, c, hd, e, k = 11, 5, 7, 6, 3
    g = torch.Generator().manual_seed(3)
    h = torch.randn(t, c, generator=g, dtype=F64, requires_grad=True)
    gate = torch.randn(e, c, generator=g, dtype=F64, requires_grad=True)
    w1, b1, w2, b2 = expert_weights(e, c, hd, bias=bias)
    inputs = [h, gate, w1, w2] + ([b1, b2] if bias else [])

    def routed(h, gate, w1, w2, b1=None, b2=None):
        return moe_forward(h, h @ gate.t(), w1, b1, w2, b2, k, renormalize)[0]

    def dense(h, gate, w1, w2, b1=None, b2=None):
        return moe_reference(h, h @ gate.t(), w1, b1, w2, b2, k, renormalize)[0]

    assert torch.autograd.gradcheck(routed, inputs)
    out_r, out_d = routed(*inputs), dense(*inputs)
    torch.testing.assert_close(out_r, out_d, rtol=1e-12, atol=1e-12)
    cot = torch.randn(out_r.shape, generator=g, dtype=F64)
    g_r = torch.autograd.grad(out_r, inputs, cot)
    g_d = torch.autograd.grad(out_d, inputs, cot)
    for a, b in zip(g_r, g_d):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grouping_", ["loop", "bmm", "auto"])
def test_experts_with_another_output_width_match_the_reference(grouping_, monkeypatch):
    """Experts whose output width differs from their input width (w2 (E, C_out, H)): forward
    and gradients of each grouping equal the dense reference and the per-expert loop. The
    padded grouping's backward built its output gradient with the input width and crashed;
    "auto" routes a balanced load (every expert 8 of the 32 pairs), so it pads too."""
    import bsr_kernels.moe as moe_module
    t, c, c_out, hd, e, k = 16, 5, 9, 7, 4, 2
    g = torch.Generator().manual_seed(5)
    h = torch.randn(t, c, generator=g, dtype=F64, requires_grad=True)
    gate = torch.randn(e, c, generator=g, dtype=F64, requires_grad=True)
    w1, b1, _, _ = expert_weights(e, c, hd, seed=6)
    w2 = (torch.randn(e, c_out, hd, generator=g, dtype=F64) * 0.5).requires_grad_()
    b2 = (torch.randn(e, c_out, generator=g, dtype=F64) * 0.5).requires_grad_()
    inputs = [h, gate, w1, b1, w2, b2]
    # balanced: each expert twice in every 4 tokens; differentiable weights from the logits
    idx = (torch.arange(t * k).reshape(t, k) % e).long()
    assert moe_module._use_bmm(torch.bincount(idx.reshape(-1), minlength=e).tolist(), t * k)
    logits = lambda h, gate: (h @ gate.t()).tanh() * 0.3   # noqa: E731  (spread probs)

    def routed(h, gate, w1, b1, w2, b2):
        return moe_forward(h, logits(h, gate), w1, b1, w2, b2, k, idx=idx)[0]

    def dense(h, gate, w1, b1, w2, b2):   # the same routing, every expert on every token
        probs = logits(h, gate).softmax(-1)
        gates = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))
        y = torch.einsum("teh,ech->tec", F.gelu(torch.einsum("tc,ehc->teh", h, w1) + b1),
                         w2) + b2
        return (gates[..., None] * y).sum(1)

    cot = torch.randn(t, c_out, generator=g, dtype=F64)
    results = {}
    for name in ("loop", grouping_):
        monkeypatch.setattr(moe_module, "GROUPING", name)
        out = routed(*inputs)
        assert out.shape == (t, c_out)
        results[name] = (out, torch.autograd.grad(out, inputs, cot))
    out_d = dense(*inputs)
    g_d = torch.autograd.grad(out_d, inputs, cot)
    for name, (out, g_r) in results.items():
        torch.testing.assert_close(out, out_d, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_r, g_d):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[grouping_][1], results["loop"][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(moe_module, "GROUPING", grouping_)
    assert torch.autograd.gradcheck(routed, inputs)


def _bad_moe_forward_args():
    """Good moe_forward arguments, and (overrides, the argument the error must name, whether
    route refuses it alike)."""
    t, c, hd, e = 5, 6, 8, 4
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    good = dict(h=r(t, c), logits=r(t, e), w1=r(e, hd, c), b1=r(e, hd), w2=r(e, c, hd),
                b2=r(e, c), top_k=2)
    cases = [
        (dict(top_k=0), "top_k", True), (dict(top_k=-1), "top_k", True),
        (dict(top_k=5), "top_k", True), (dict(top_k=True), "top_k", True),
        (dict(top_k=2.0), "top_k", True),
        (dict(logits=r(t + 2, e)), "logits", False), (dict(logits=r(t, 3)), "logits", False),
        (dict(logits=r(t, 6)), "logits", False), (dict(logits=r(t * e)), "logits", True),
        (dict(logits=torch.ones(t, e, dtype=torch.long)), "logits", True),
        (dict(idx=torch.full((t, 2), 7)), "idx", True),
        (dict(idx=torch.full((t, 2), -1)), "idx", True),
        (dict(idx=torch.zeros(t, 3, dtype=torch.long)), "idx", True),
        (dict(idx=torch.zeros(t + 1, 2, dtype=torch.long)), "idx", True),
        (dict(idx=torch.zeros(t, 2)), "idx", True), (dict(idx=[[0, 1]] * t), "idx", True),
        (dict(renormalize=1), "renormalize", True),
        (dict(h=r(t * c)), "h", False), (dict(h=r(t, c + 1)), "w1", False),
        (dict(w1=r(e, hd)), "w1", False), (dict(w2=r(e, c, hd + 1)), "w2", False),
        (dict(w2=r(e + 1, c, hd)), "w2", False), (dict(b1=r(e, hd + 1)), "b1", False),
        (dict(b2=r(e, c + 1)), "b2", False),
    ]
    return good, cases


@pytest.mark.parametrize("case", range(len(_bad_moe_forward_args()[1])))
def test_moe_forward_bad_arguments_raise_value_errors_naming_them(case, monkeypatch):
    """top_k=0 gave an all-zero output, logits with fewer columns than experts and an idx of
    the wrong width routed silently, and others failed with IndexError/RuntimeError/TypeError
    from inside: now each is a ValueError naming the argument, before any compute."""
    import bsr_kernels.moe as moe_module
    good, cases = _bad_moe_forward_args()
    bad, name, in_route = cases[case]

    def no_compute(*args):   # moe_forward's first step
        raise AssertionError("computed before checking")
    monkeypatch.setattr(moe_module, "_autocast_input", no_compute)
    with pytest.raises(ValueError, match=f"^{name} "):
        moe_forward(**{**good, **bad})
    if in_route:
        with pytest.raises(ValueError, match=f"^{name} "):
            route(**{"logits": good["logits"], "top_k": 2, **bad})


def test_route_and_moe_mlp_bad_arguments_raise_value_errors_naming_them():
    """route(logits, 0) gave empty weights and MoEMlp(0, 16) an empty MLP; a negative width
    failed inside torch.empty."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, generator=g)
    for top_k in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match="^top_k "):
            route(logits, top_k)
    with pytest.raises(ValueError, match="^logits "):
        route(torch.randn(4, generator=g), 2)
    for args, name in (((0, 16, 4, 2), "in_features"), ((8, -3), "hidden_features"),
                       ((8.5, 16), "in_features"), ((8, True), "hidden_features"),
                       ((8, 16, 0, 1), "num_experts"), ((8, 16, 4, 5), "top_k")):
        with pytest.raises(ValueError, match=f"^{name} "):
            MoEMlp(*args)
    probs, weights, idx = route(logits, 2, idx=torch.tensor([[3, 0], [1, 2], [2, 2]],
                                                           dtype=torch.int32))
    assert torch.equal(weights, probs.gather(1, idx)) and idx.dtype == torch.long


def test_route_checks_idx_values_only_on_cpu():
    """The range of a recorded idx is read on CPU only: on another device (meta here, whose
    values cannot be read at all) reading it would sync with the host."""
    logits = torch.randn(3, 4, device="meta")
    probs, weights, idx = route(logits, 2, idx=torch.zeros(3, 2, dtype=torch.long,
                                                           device="meta"))
    assert weights.shape == (3, 2) and idx.device.type == "meta"
    with pytest.raises(ValueError, match="^idx "):   # the shape still is
        route(logits, 2, idx=torch.zeros(3, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="^idx "):   # and the device
        route(logits, 2, idx=torch.zeros(3, 2, dtype=torch.long))


def test_argument_checks_record_nothing_under_jit_trace():
    """torch.jit.trace gives sizes as tensors: the checks compare none there (a comparison
    would be recorded as a constant, with a TracerWarning), and the traces route new inputs."""
    import warnings
    g = torch.Generator().manual_seed(9)
    moe = MoEMlp(16, 32, num_experts=4, top_k=2).eval()
    w = [torch.randn(*s, generator=g) for s in ((4, 32, 16), (4, 32), (4, 16, 32), (4, 16))]
    h, logits = torch.randn(10, 16, generator=g), torch.randn(10, 4, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced_moe = torch.jit.trace(moe, h)
        traced_op = torch.jit.trace(lambda h, logits: moe_forward(h, logits, *w, 2)[0],
                                    (h, logits))
    h, logits = torch.randn(10, 16, generator=g), torch.randn(10, 4, generator=g)
    torch.testing.assert_close(traced_moe(h), moe(h))
    torch.testing.assert_close(traced_op(h, logits), moe_forward(h, logits, *w, 2)[0])


def test_four_tasks_route_like_the_dense_reference(grouping):
    """4 tasks (gates) on the same tokens: identical expert choices, outputs and gradients
    within rounding; different tasks make different choices."""
    torch.manual_seed(0)   # the Mlp and gate inits, the expert offsets, x and the cotangents
    c, hd, e, k = 16, 24, 8, 2
    mlp = Mlp(c, hd).to(F64)
    moe = MoEMlp.from_mlp(mlp, num_experts=e, top_k=k, num_tasks=4)
    with torch.no_grad():   # experts differ from each other (not only copies)
        for p in (moe.fc1_weight, moe.fc2_weight, moe.fc1_bias, moe.fc2_bias):
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 9, c, dtype=F64)
    chosen = []
    for task in range(4):
        moe.task = task
        h = x.reshape(-1, c)
        logits = moe.gates[task](h)
        _, _, idx = route(logits, k)
        ref, mask = moe_reference(h, logits, moe.fc1_weight, moe.fc1_bias, moe.fc2_weight,
                                  moe.fc2_bias, k)
        routed_mask = torch.zeros_like(mask).scatter_(1, idx, True)
        assert torch.equal(routed_mask, mask), task
        chosen.append(mask)
        out = moe(x).reshape(-1, c)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        params = list(moe.parameters())
        cot = torch.randn_like(out)
        g_r = torch.autograd.grad(out, params, cot, allow_unused=True)
        g_d = torch.autograd.grad(ref, params, cot, allow_unused=True)
        for p, a, b in zip(params, g_r, g_d):
            if b is None:   # the other tasks' gates
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not all(torch.equal(chosen[0], m) for m in chosen[1:])


def test_aux_loss_is_cv_squared_of_importance_and_load_and_trains_the_gate():
    torch.manual_seed(0)   # the Mlp and gate inits and x
    mlp = Mlp(8, 16).to(F64)
    moe = MoEMlp.from_mlp(mlp, num_experts=4, top_k=2, aux_loss_weight=0.01)
    moe.train()
    x = torch.randn(3, 5, 8, dtype=F64)
    moe(x)
    probs = moe.gates[0](x.reshape(-1, 8)).softmax(-1)
    ranks = probs.argsort(dim=-1, descending=True).argsort(dim=-1)
    gates = torch.where(ranks < 2, probs, 0)        # the top-2 gate weights, zero elsewhere
    imp, load = gates.sum(0), (ranks < 2).sum(0).to(F64)
    assert not torch.allclose(imp, probs.sum(0))    # not the dense probabilities' sum
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    torch.testing.assert_close(moe.aux_loss, 0.01 * (cv2(imp) + cv2(load)))
    (g,) = torch.autograd.grad(moe.aux_loss, moe.gates[0].weight)
    assert g.abs().sum() > 0
    moe.eval()
    moe(x)
    assert moe.aux_loss is None


# --- to_moe --------------------------------------------------------------------------------

def test_to_moe_experts_start_as_copies_of_the_dense_mlp():
    """Before training, MoE output == dense MLP output x summed top-k probabilities."""
    model = small_vit(dtype=torch.float32)
    dense = copy.deepcopy(model)
    out = bsr_kernels.to_moe(model, num_experts=8, top_k=3)
    assert out is model and type(model) is VisionTransformer
    assert [i for i, _ in moe_blocks(model)] == [1, 3, 5]   # default train blocks of depth 6
    x = torch.randn(4, 10, 48)
    for i, moe in moe_blocks(model):
        h = x.reshape(-1, 48)
        s = moe.gates[0](h).softmax(-1).topk(3, dim=-1).values.sum(-1)
        expect = dense.blocks[i].mlp(x) * s.reshape(4, 10, 1)
        torch.testing.assert_close(moe(x), expect, rtol=1e-5, atol=1e-6)
        assert (s < 1 - 1e-3).all()   # the factor is really there
    keys = set(model.state_dict())
    assert keys >= {"blocks.3.mlp.fc1_weight", "blocks.3.mlp.fc1_bias", "blocks.3.mlp.fc2_weight",
                    "blocks.3.mlp.fc2_bias", "blocks.3.mlp.gates.0.weight"}
    assert "blocks.3.mlp.fc1.weight" not in keys and "blocks.2.mlp.fc1.weight" in keys
    assert model.blocks[3].mlp.fc1_weight.shape == (8, 192, 48)


@pytest.mark.parametrize("mode", ["autograd", "fast", "lean"])
def test_reprogrammed_moe_without_a_drop_computes_the_plain_moe_model(mode):
    """At keep_rate 1 (nothing dropped) a reprogrammed MoE model's logits and gradients are
    those of the same to_moe model run by timm's own blocks: the block body runs the MoE MLP as
    timm's Block does, on norm2's output (a mutation that skipped norm2 was caught only
    incidentally, by a missing gradient key)."""
    plain = bsr_kernels.to_moe(small_vit(), num_experts=4, top_k=2)
    with torch.no_grad():   # experts that differ
        for _, moe in moe_blocks(plain):
            moe.fc1_weight.add_(0.05 * torch.randn_like(moe.fc1_weight))
    model = bsr_kernels.reprogram(copy.deepcopy(plain), keep_rate=1.0, memory_mode=mode)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in plain.named_parameters():
        p.requires_grad_(n in trained)
    x = images()
    want, got = plain(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want.square().sum().backward()
    got.square().sum().backward()
    gp = grads(plain)
    assert gp.keys() == grads(model).keys() and any(".gates." in n for n in gp)
    for n, g in grads(model).items():
        assert rel_err(g, gp[n]) < 1e-10, n


def test_gate_noise_and_aux_loss_only_in_training_and_to_moe_keeps_eval_mode():
    """Gate noise is drawn in training only: in eval a noisy model's logits repeat and equal
    the noiseless model's, and no aux loss is kept. to_moe of a model in eval mode gives MoE
    MLPs in eval mode (new modules start in training mode). Mutations that drew the noise in
    eval, or left to_moe's modules training, passed every test."""
    base = small_vit(dtype=torch.float32).eval()
    torch.manual_seed(3)   # the same random gates in both
    quiet = bsr_kernels.to_moe(copy.deepcopy(base), num_experts=4, top_k=2)
    torch.manual_seed(3)
    noisy = bsr_kernels.to_moe(copy.deepcopy(base), num_experts=4, top_k=2, noise_std=1.0,
                               aux_loss_weight=0.1)
    assert not any(m.training for m in noisy.modules())
    x = images(dtype=torch.float32)
    with torch.no_grad():
        first, again, want = noisy(x), noisy(x), quiet(x)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    assert all(moe.aux_loss is None for _, moe in moe_blocks(noisy))
    noisy.train()
    with torch.no_grad():
        assert (noisy(x) - want).abs().max() > 1e-3              # the noise is really there
    assert all(moe.aux_loss is not None for _, moe in moe_blocks(noisy))


@pytest.mark.parametrize("bias", [(False, True), (True, False), (False, False)])
def test_to_moe_copies_each_bias_as_its_layer_has_it(bias):
    """timm's Mlp takes a bias per layer (bias=(fc1, fc2)): the MoE experts copy each layer's
    bias, or have none where that layer has none, and still compute the dense MLP x the summed
    top-k probabilities. (fc1 without a bias and fc2 with one raised AttributeError.)"""
    from timm.layers import Mlp
    model = small_vit(dtype=torch.float32)
    model.blocks[1].mlp = Mlp(48, 192, bias=bias)
    dense = copy.deepcopy(model.blocks[1].mlp)
    bsr_kernels.to_moe(model, num_experts=4, top_k=2, blocks=[1])
    moe = model.blocks[1].mlp
    assert (moe.fc1_bias is not None, moe.fc2_bias is not None) == bias
    x = torch.randn(3, 10, 48)
    s = moe.gates[0](x.reshape(-1, 48)).softmax(-1).topk(2, dim=-1).values.sum(-1)
    torch.testing.assert_close(moe(x), dense(x) * s.reshape(3, 10, 1), rtol=1e-5, atol=1e-6)
    keys = set(model.state_dict())
    assert ("blocks.1.mlp.fc1_bias" in keys, "blocks.1.mlp.fc2_bias" in keys) == bias


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()])


def _same(model, snap):
    sd, types = snap
    now = model.state_dict()
    return (set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
            and [type(m) for m in model.modules()] == types)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=-2), "num_experts"),
    (dict(blocks=[6]), "blocks"),
    (dict(blocks=[-1]), "blocks"),
    (dict(blocks=[1, 9]), "blocks"),
    (dict(num_tasks=0), "num_tasks"),
    (dict(noise_std=-0.1), "noise_std"),
    (dict(aux_loss_weight=float("nan")), "aux_loss_weight"),
    (dict(renormalize=1), "renormalize"),
])
def test_to_moe_bad_arguments_raise_and_leave_model_unchanged(kwargs, match):
    model = small_vit(dtype=torch.float32)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        bsr_kernels.to_moe(model, **kwargs)
    assert _same(model, snap)


def test_to_moe_rejects_non_vits_and_reprogrammed_models():
    seq = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not a ViT|VisionTransformer"):
        bsr_kernels.to_moe(seq)
    model = bsr_kernels.reprogram(small_vit(dtype=torch.float32))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="reprogram"):
        bsr_kernels.to_moe(model)
    assert _same(model, snap)
    model = bsr_kernels.to_moe(small_vit(dtype=torch.float32), blocks=[2], num_experts=2, top_k=1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="blocks: block 2 is already a MoE"):
        bsr_kernels.to_moe(model, blocks=[1, 2])
    assert _same(model, snap)


def test_multitask_bad_task_and_task_count():
    vit = bsr_kernels.to_moe(small_vit(dtype=torch.float32), num_experts=4, top_k=2, num_tasks=3)
    with pytest.raises(ValueError, match="num_classes"):
        bsr_kernels.MultiTaskViT(copy.deepcopy(vit), num_classes=[5, 2])
    with pytest.raises(ValueError, match="num_classes"):
        bsr_kernels.MultiTaskViT(copy.deepcopy(vit), num_classes=[5, 0, 2])
    with pytest.raises(ValueError, match="model"):
        bsr_kernels.MultiTaskViT(nn.Linear(3, 3), num_classes=[2])
    mt = bsr_kernels.MultiTaskViT(vit, num_classes=[5, 2, 2])
    x = images(n=2, dtype=torch.float32)
    for bad in (3, -1, 1.0, "0", True):
        with pytest.raises(ValueError, match="task"):
            mt(x, bad)
    assert mt(x, 0).shape == (2, 5) and mt(x, 2).shape == (2, 2)
    snap = _snapshot(mt)
    with pytest.raises(ValueError, match="num_tasks"):
        bsr_kernels.to_moe(mt, blocks=[0], num_tasks=2)
    assert _same(mt, snap)


def test_multitask_heads_and_task_routing():
    vit = bsr_kernels.to_moe(small_vit(dtype=F64), num_experts=4, top_k=2, num_tasks=2)
    mt = bsr_kernels.MultiTaskViT(vit, num_classes=[3, 2])
    mt.eval()
    x = images(n=2)
    feats = mt.vit(x)   # sets nothing: routes with the last task set (0 by default)
    for task in (0, 1):
        mt.set_task(task)
        torch.testing.assert_close(mt(x, task), mt.heads[task](mt.vit(x)))
    mt.set_task(0)
    torch.testing.assert_close(mt.vit(x), feats)
    mt.set_task(1)
    assert not torch.allclose(mt.vit(x), feats)   # another gate, another routing


# --- reprogram on MoE models -----------------------------------------------------------------

def _moe_multitask(seed=0, num_tasks=3, blocks=None, **kw):
    vit = small_vit(seed=seed)
    bsr_kernels.to_moe(vit, blocks=blocks, num_experts=4, top_k=2, num_tasks=num_tasks, **kw)
    with torch.no_grad():   # experts that differ
        for _, moe in moe_blocks(vit):
            for p in (moe.fc1_weight, moe.fc2_weight):
                p.add_(0.05 * torch.randn_like(p))
    return bsr_kernels.MultiTaskViT(vit, num_classes=[4, 2, 3][:num_tasks])


def _plain_autograd(model):
    """The same model under plain autograd (memory_mode="autograd", same other settings)."""
    vit = model.vit if isinstance(model, bsr_kernels.MultiTaskViT) else model
    cfg = vit.bsr_config
    bsr_kernels.reprogram(vit, **{**cfg.reprogram_kwargs(), "memory_mode": "autograd"})
    return model


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
@pytest.mark.parametrize("target", ["wrapper", "vit"])
def test_reprogram_moe_gradients_equal_plain_autograd_float64(memory_mode, target, grouping):
    """Blocks 1, 3, 5 trained (MoE) and block 4 a frozen MoE after the first trained one."""
    base = _moe_multitask(blocks=[1, 3, 4, 5])
    x = images()
    results = {}
    for path in ("plain", memory_mode):
        mt = copy.deepcopy(base)
        out = bsr_kernels.reprogram(mt if target == "wrapper" else mt.vit, train_norm=True,
                                    memory_mode=memory_mode)
        assert out is (mt if target == "wrapper" else mt.vit)
        if path == "plain":
            _plain_autograd(mt)
        for task in (0, 2, 1):   # round-robin: one backward per task batch
            y = torch.randint(0, mt.heads[task].out_features, (x.shape[0],),
                              generator=torch.Generator().manual_seed(task))
            torch.nn.functional.cross_entropy(mt(x, task), y).backward()
        results[path] = grads(mt)
    gp, gb = results["plain"], results[memory_mode]
    assert "vit.blocks.3.mlp.gates.2.weight" in gp and "vit.blocks.4.mlp.fc1_weight" not in gp
    assert "heads.1.weight" in gp and "vit.norm.weight" in gp
    assert "vit.blocks.0.norm1.weight" not in gp
    assert set(gp) == set(gb)
    for name in gp:
        assert rel_err(gb[name], gp[name]) < 1e-10, name


def test_lean_backward_of_a_loss_summed_over_tasks_routes_with_each_forwards_task(grouping):
    """One backward of a sum over tasks: the lean replay of each block routes with the gate of
    the task its forward ran (recorded in forward), not the task set last."""
    base = _moe_multitask(blocks=[1, 3, 4, 5])
    x = images()
    results = {}
    for path in ("plain", "lean"):
        mt = copy.deepcopy(base)
        bsr_kernels.reprogram(mt, memory_mode="lean")
        if path == "plain":
            _plain_autograd(mt)
        loss = sum(mt(x, task).square().mean() * (task + 1) for task in (0, 2, 1))
        loss.backward()
        results[path] = grads(mt)
    gp, gl = results["plain"], results["lean"]
    assert set(gp) == set(gl) and "vit.blocks.3.mlp.gates.2.weight" in gp
    for name in gp:
        assert rel_err(gl[name], gp[name]) < 1e-10, name


def _lean_routings(monkeypatch, replay: bool):
    """(forward, backward) routings of each MoE block of a bf16-compressed lean model, one
    forward and backward; ``replay=False`` switches the recorded routing off (the recompute
    of the routing that lean backward did before it was replayed)."""
    import contextlib

    import bsr_kernels.moe as moe_module
    if not replay:
        monkeypatch.setattr(MoEMlp, "recorded_routing",
                            lambda self, **kw: contextlib.nullcontext())
    real_route, seen = moe_module.route, []

    def route(*args):
        probs, weights, idx = real_route(*args)
        seen.append(idx.sort(dim=-1).values)
        return probs, weights, idx
    monkeypatch.setattr(moe_module, "route", route)
    vit = bsr_kernels.to_moe(small_vit(dtype=torch.float32), num_experts=16, top_k=4,
                             num_tasks=2)
    mt = bsr_kernels.MultiTaskViT(vit, num_classes=[3, 2])
    bsr_kernels.reprogram(mt, activation_dtype=torch.bfloat16)
    out = mt(images(n=8, dtype=torch.float32), 1)
    n_forward = len(seen)
    out.square().mean().backward()
    assert n_forward == 3 and len(seen) == 6   # blocks 1, 3, 5; backward replays 5, 3, 1
    return seen[:n_forward], seen[n_forward:][::-1]


def test_lean_backward_replays_the_forwards_routing_under_compressed_activations(monkeypatch):
    """With bf16-compressed activations, routing again from the stored (rounded) block input
    picks other experts for near-tied tokens, and so differentiates experts the forward never
    ran (shown with the replay switched off, so this test can fail); lean backward replays the
    forward's experts instead, as it replays the token selection."""
    with monkeypatch.context() as m:
        forward, backward = _lean_routings(m, replay=False)
        assert sum((f != b).any(dim=-1).sum().item() for f, b in zip(forward, backward)) > 0
    forward, backward = _lean_routings(monkeypatch, replay=True)
    for f, b in zip(forward, backward):
        assert torch.equal(f, b)


@pytest.mark.parametrize("memory_mode", ["lean", "fast"])
def test_usage_counts_each_forward_once_whatever_backward_replays(memory_mode):
    """``track_usage`` counts the tokens of each forward once: a lean backward's replay of the
    block adds nothing (the counts equal plain autograd's)."""
    usage = {}
    for path in ("plain", memory_mode):
        mt = bsr_kernels.reprogram(_moe_multitask(num_tasks=2), memory_mode=memory_mode)
        if path == "plain":
            _plain_autograd(mt)
        for _, moe in moe_blocks(mt.vit):
            moe.track_usage = True
        for task in (1, 0):
            mt(images(), task).square().mean().backward()
        usage[path] = torch.stack([moe.usage for _, moe in moe_blocks(mt.vit)])
    tokens = 3 * 65 * 2   # 3 images of 64 patches + CLS, top-2; block 1 drops after its MLP
    assert usage["plain"][0].sum(dim=1).tolist() == [tokens, tokens]
    assert torch.equal(usage[memory_mode], usage["plain"])


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Hardswish])
@pytest.mark.parametrize("memory_mode", ["autograd", "lean", "fast"])
def test_an_in_place_activation_gives_the_out_of_place_gradients(act, memory_mode, grouping):
    """The experts' Functions saved fc1's output and applied the activation to it: an in-place
    activation (``act_layer=partial(nn.SiLU, inplace=True)``) overwrote it, and backward
    failed (``a leaf Variable that requires grad is being used in an in-place operation``) or
    would differentiate at the activation's output. In every memory mode the gradients now equal
    the out-of-place model's."""
    import functools
    results = {}
    for inplace in (False, True):
        vit = small_vit(act_layer=functools.partial(act, inplace=inplace))
        bsr_kernels.to_moe(vit, blocks=[1, 3, 4], num_experts=4, top_k=2)
        with torch.no_grad():   # experts that differ (same draws for both models)
            torch.manual_seed(5)
            for _, moe in moe_blocks(vit):
                for p in (moe.fc1_weight, moe.fc2_weight):
                    p.add_(0.05 * torch.randn_like(p))
        bsr_kernels.reprogram(vit, train_blocks=[1, 3], drop_at=[3], memory_mode=memory_mode)
        assert vit.blocks[1].mlp.act.inplace is inplace
        out = vit(images())
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        results[inplace] = (out.detach(), grads(vit))
    (out0, g0), (out1, g1) = results[False], results[True]
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=0)
    assert set(g0) == set(g1) and any("fc1_weight" in n for n in g0)
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-10, name


def test_numpy_integers_are_stored_as_ints_and_the_state_dict_saves(tmp_path):
    """``to_moe(top_k=np.int64(2))`` passed the checks but kept the numpy int, and the
    state_dict's routing metadata (JSON) then failed to serialise."""
    np = pytest.importorskip("numpy")
    vit = small_vit()
    bsr_kernels.to_moe(vit, blocks=[1], num_experts=np.int64(4), top_k=np.int32(2),
                       num_tasks=np.int64(1))
    moe = vit.blocks[1].mlp
    assert [type(v) for v in (moe.num_experts, moe.top_k, moe.num_tasks)] == [int] * 3
    torch.save(vit.state_dict(), tmp_path / "w.pt")
    again = small_vit(seed=1)
    bsr_kernels.to_moe(again, blocks=[1], num_experts=4, top_k=2)
    again.load_state_dict(torch.load(tmp_path / "w.pt"))
    torch.testing.assert_close(again(images()), vit(images()), rtol=0, atol=0)
    for bad in (np.float64(2.0), True):
        with pytest.raises(ValueError, match="top_k"):
            MoEMlp(8, 16, num_experts=4, top_k=bad)


def test_empty_batch_through_routed_experts_and_models(grouping):
    """No tokens: an empty output of the right width and zero expert gradients, as a dense MLP
    gives; a batch of no images through a MoE model, reprogrammed or not."""
    w1, b1, w2, b2 = expert_weights(4, 6, 10)
    h = torch.randn(0, 6, dtype=F64, requires_grad=True)
    gate = torch.randn(6, 4, dtype=F64, requires_grad=True)
    out, probs, idx = moe_forward(h, h @ gate, w1, b1, w2, b2, 2)
    assert out.shape == (0, 6) and idx.shape == (0, 2)
    out.sum().backward()
    for p in (w1, b1, w2, b2, gate):
        assert p.grad is not None and not p.grad.any()
    mt = _moe_multitask(num_tasks=2)
    assert mt(images(n=0), 1).shape == (0, 2)
    bsr_kernels.reprogram(mt)
    out = mt(images(n=0), 0)
    assert out.shape == (0, 4)
    out.sum().backward()


@pytest.mark.parametrize("noise,aux", [(0.5, 0.01), (0.0, 0.01), (0.5, 0.0)],
                         ids=["noise_and_aux", "aux_only", "noise_only"])
def test_reprogram_moe_with_noise_or_aux_loss_runs_under_plain_autograd(noise, aux):
    """Gate noise or an aux loss, each alone too, take a lean model's MoE blocks to plain
    autograd: the same gradients as autograd mode. With the aux loss alone in the lean
    function the gate got no gradient from it (a mutation no test caught: the one case set
    noise too, which alone takes the plain path). MultiTaskViT.aux_loss() is the sum over its
    MoE blocks."""
    base = _moe_multitask(num_tasks=2, noise_std=noise, aux_loss_weight=aux)
    x = images()
    results = {}
    for path in ("plain", "lean"):
        mt = bsr_kernels.reprogram(copy.deepcopy(base))
        if path == "plain":
            _plain_autograd(mt)
        torch.manual_seed(5)
        logits = mt(x, 1)
        loss = logits.square().mean()
        if aux:
            total = mt.aux_loss()
            each = [moe.aux_loss for _, moe in moe_blocks(mt.vit)]
            assert len(each) == 3 and total.requires_grad and all(a > 0 for a in each)
            torch.testing.assert_close(total, torch.stack(each).sum(), rtol=1e-12, atol=0)
            loss = loss + total
        else:
            assert mt.aux_loss() is None
        loss.backward()
        results[path] = grads(mt)
    assert set(results["plain"]) == set(results["lean"])
    for name, g in results["plain"].items():
        assert rel_err(results["lean"][name], g) < 1e-10, name


def test_restore_and_profile_on_the_wrapper():
    mt = _moe_multitask()
    keys = set(mt.state_dict())
    bsr_kernels.reprogram(mt)
    assert set(mt.state_dict()) == keys
    prof = bsr_kernels.profile(mt, images(n=2))
    tokens = prof["tokens_per_block"]
    assert tokens == bsr_kernels.profile(mt.vit, images(n=2))["tokens_per_block"]
    assert len(tokens) == 6 and tokens[0] == 65 and tokens[-1] < tokens[2]   # drops in 2, 3, 4
    bsr_kernels.restore(mt)
    assert all(p.requires_grad for p in mt.parameters())


def test_lean_saved_activations_near_the_dense_model():
    """Lean mode on a MoE model saves no per-expert token copies: at most what the same dense
    model saves in lean mode (plus nothing per expert)."""
    x = images(n=4, dtype=torch.float32)
    dense = small_vit(dtype=torch.float32, depth=12)
    moe = bsr_kernels.to_moe(copy.deepcopy(dense), num_experts=16, top_k=4)
    saved = {}
    for name, m in (("dense", dense), ("moe", moe)):
        bsr_kernels.reprogram(m)
        saved[name] = saved_activations(lambda: m(x).square().mean(), exclude=[m]).bytes
    full = bsr_kernels.to_moe(small_vit(dtype=torch.float32, depth=12), num_experts=16, top_k=4)
    saved["moe_full"] = saved_activations(lambda: full(x).square().mean(), exclude=[full]).bytes
    assert saved["moe"] <= 1.05 * saved["dense"], saved
    assert saved["moe_full"] >= 5 * saved["moe"], saved


# --- bsr-finetune --multitask ----------------------------------------------------------------

def test_multitask_demo_smoke(tmp_path):
    """The demo end to end through the bsr-finetune entry point, on a small budget."""
    import json

    from bsr_kernels.finetune.cli import main

    out = tmp_path / "mt"
    rc = main(["--multitask", "--epochs", "1", "--batch-size", "32", "--max-train-images", "96",
               "--experts", "4", "--top-k", "2", "--timing-rounds", "1", "--profile-batch", "4",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["moe_full", "bsr_moe", "bsr_dense", "linear"]
    from bsr_kernels.finetune.data import DIGITS_TARGET_CLASSES, digits_split
    n_test = len(digits_split(DIGITS_TARGET_CLASSES, summary["img_size"])[1])  # every task's
    for name, r in methods.items():
        accs = [r["tasks"][t]["accuracy"] for t in ("digit", "parity", "ge7")]
        # correct / total over the digits test set: a whole number of its images
        assert all(abs(a * n_test - round(a * n_test)) < 1e-6 and 0 <= round(a * n_test)
                   <= n_test for a in accs), (name, accs, n_test)
        assert r["mean_accuracy"] == pytest.approx(sum(accs) / 3), name
        assert r["saved_activation_mib_per_image"] > 0 and r["step_time_s"] > 0, name
        assert (out / name / "delta.safetensors").is_file(), name
    assert methods["bsr_moe"]["saved_activation_mib_per_image"] * 5 \
        <= methods["moe_full"]["saved_activation_mib_per_image"]
    assert methods["linear"]["trainable_params"] < methods["bsr_dense"]["trainable_params"] \
        < methods["bsr_moe"]["trainable_params"] < methods["moe_full"]["trainable_params"]
    usage = methods["bsr_moe"]["expert_usage"]
    assert sorted(usage, key=int) == ["3", "7", "11"] and "expert_usage" not in methods["linear"]
    for rows in usage.values():
        assert len(rows) == 3 and all(len(r) == 4 and abs(sum(r) - 1) < 1e-9 for r in rows)
    assert (out / "report.png").stat().st_size > 10_000
    assert main(["--multitask", "--top-k", "5", "--experts", "4"]) == 2


def test_delta_of_a_multitask_moe_model_round_trips(tmp_path):
    from bsr_kernels.delta import save_delta

    def build(seed):
        vit = small_vit(seed=0, dtype=torch.float32)        # the same base weights
        torch.manual_seed(seed)                              # other gate and head inits
        bsr_kernels.to_moe(vit, num_experts=4, top_k=2, num_tasks=2)
        return bsr_kernels.MultiTaskViT(vit, num_classes=[3, 2])

    trained = bsr_kernels.reprogram(build(1), train_norm=True)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = save_delta(trained, tmp_path / "mt.safetensors")
    fresh = build(2)
    assert not hasattr(fresh, "bsr_config")
    bsr_kernels.load_delta(fresh, path)
    assert fresh.vit.bsr_config == trained.vit.bsr_config
    x = images(n=2, dtype=torch.float32)
    trained.eval(), fresh.eval()
    for task in (0, 1):
        torch.testing.assert_close(fresh(x, task), trained(x, task), rtol=0, atol=0)
    assert len(bsr_kernels.kept_patches(fresh, x)) == 3


#: bf16's unit roundoff: each rounding to bf16 is off by at most this relative amount.
BF16_U = 2.0 ** -8


def test_delta_records_the_moe_routing_and_refuses_another(tmp_path):
    """A MoE delta records each MoE block's routing settings (no parameter holds them): a model
    built with another top_k or renormalize (other logits) is refused, naming the block and the
    setting, and left unchanged; the training-only ones (noise_std, aux_loss_weight) are set
    from the delta."""
    from bsr_kernels.delta import read_delta, save_delta

    def build(**moe):
        vit = small_vit(seed=0, dtype=torch.float32)
        bsr_kernels.to_moe(vit, num_experts=4, **{"top_k": 2, **moe})
        return bsr_kernels.MultiTaskViT(vit, num_classes=[3])

    trained = bsr_kernels.reprogram(build(noise_std=0.3, aux_loss_weight=0.01))
    path = save_delta(trained, tmp_path / "moe.safetensors")
    saved = read_delta(path)[1]["moe"]
    assert set(saved) == {"vit.blocks.1.mlp", "vit.blocks.3.mlp", "vit.blocks.5.mlp"}
    assert saved["vit.blocks.3.mlp"] == {"top_k": 2, "renormalize": False, "noise_std": 0.3,
                                         "aux_loss_weight": 0.01}
    for other, setting in ((dict(top_k=3), "top_k 2 in the delta, 3 in the model"),
                           (dict(renormalize=True), "renormalize False in the delta, True")):
        model = build(**other)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=f"vit.blocks.1.mlp: {setting}"):
            bsr_kernels.load_delta(model, path)
        assert not hasattr(model, "bsr_config")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = bsr_kernels.load_delta(build(), path)
    assert [(m.noise_std, m.aux_loss_weight) for _, m in moe_blocks(model)] == [(0.3, 0.01)] * 3


def test_state_dict_of_a_moe_warns_when_loaded_into_another_routing(tmp_path):
    """A MoE's state_dict carries its routing settings in its metadata (also through torch.save):
    loading it into a MoE with another top_k or renormalize warns, naming the block and the
    setting; the same routing loads silently."""
    import warnings

    from bsr_kernels import BSRConfigWarning

    def build(**moe):
        vit = small_vit(seed=0, dtype=torch.float32)
        return bsr_kernels.to_moe(vit, num_experts=4, **{"top_k": 2, **moe})

    torch.save(build().state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    with pytest.warns(BSRConfigWarning, match=r"blocks\.[135]\.mlp: .*top_k 2 there, 3 here") \
            as seen:
        build(top_k=3).load_state_dict(sd)
    assert sorted(str(w.message).split(":")[0] for w in seen) == [
        "blocks.1.mlp", "blocks.3.mlp", "blocks.5.mlp"]
    with pytest.warns(BSRConfigWarning, match="renormalize False there, True here"):
        build(renormalize=True).load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSRConfigWarning)
        build(noise_std=0.5).load_state_dict(sd)   # a training-only setting: the same logits


def test_moe_under_autocast_runs_in_the_autocast_dtype(grouping, monkeypatch):
    """Under (CPU) bf16 autocast the experts and the gate run in bf16 with fp32 weights: the
    output and every gradient equal the dense float64 reference on the same bf16-rounded tokens
    and weights, to the few bf16 roundings in between (output 2u, gradients 3u, u = 2^-8; a
    combine weight 3 % off gives 2 %). Experts made to differ, so each combine weight counts."""
    import bsr_kernels.moe as moe_module
    torch.manual_seed(0)   # fixed inputs: bf16 rounding could flip a near-tied routing choice
    moe = MoEMlp.from_mlp(Mlp(32, 64), num_experts=4, top_k=2)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 9, 32, requires_grad=True)
    v = torch.randn(2, 9, 32)   # the gradient of the output
    chosen, real_route = [], moe_module.route

    def route(*args):
        probs, weights, idx = real_route(*args)
        chosen.append(idx)
        return probs, weights, idx
    monkeypatch.setattr(moe_module, "route", route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.dtype == torch.bfloat16 and len(chosen) == 1
    (out.float() * v).sum().backward()
    assert moe.fc1_weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    def rounded(t):
        return t.detach().to(torch.bfloat16).to(F64).requires_grad_()
    h, gate = rounded(x.reshape(-1, 32)), rounded(moe.gates[0].weight)
    w1, b1, w2, b2 = (rounded(p) for p in (moe.fc1_weight, moe.fc1_bias, moe.fc2_weight,
                                            moe.fc2_bias))
    ref, mask = moe_reference(h, h @ gate.t(), w1, b1, w2, b2, 2, act=moe.act)
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, chosen[0], True))  # same routing
    (ref * v.reshape(-1, 32).to(F64)).sum().backward()
    assert rel_err(out.to(F64).reshape(-1, 32), ref) < 2 * BF16_U
    pairs = {"x": (x.grad.reshape(-1, 32), h.grad), "gate": (moe.gates[0].weight.grad, gate.grad),
             "fc1_weight": (moe.fc1_weight.grad, w1.grad), "fc1_bias": (moe.fc1_bias.grad, b1.grad),
             "fc2_weight": (moe.fc2_weight.grad, w2.grad), "fc2_bias": (moe.fc2_bias.grad, b2.grad)}
    for name, (got, want) in pairs.items():
        assert rel_err(got.to(F64), want) < 3 * BF16_U, name


def test_float64_moe_under_autocast_stays_float64():
    """Autocast leaves float64 alone (``nn.Linear`` of float64 under bf16 autocast is float64):
    the MoE cast a float64 model's tokens and weights to bf16 and returned bf16."""
    torch.manual_seed(2)
    moe = MoEMlp.from_mlp(Mlp(16, 32), num_experts=4, top_k=2).to(F64)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 5, 16, dtype=F64)
    want = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, moe.gates[0].weight).dtype == F64   # the rule the MoE follows
        got = moe(x)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_moe_forward_under_autocast_differentiates_in_the_autocast_dtype(grouping):
    """The public op under bf16 autocast failed in backward (``expected scalar type Float but
    found BFloat16``), and with the per-expert loop it ran the expert matmuls in float32: it
    now runs as :class:`MoEMlp` does, in bf16 with float32 leaves (bitwise the op on the
    inputs cast to bf16 by hand), and equals the float64 reference on the bf16-rounded inputs
    to a few bf16 roundings."""
    torch.manual_seed(3)
    e, c, hd = 4, 16, 32
    w1, b1, w2, b2 = (p.detach().float().requires_grad_() for p in expert_weights(e, c, hd))
    h = torch.randn(10, c, requires_grad=True)
    logits = torch.randn(10, e) * 3   # apart enough that bf16 rounding keeps each top-2
    v = torch.randn(10, c)
    leaves = {"h": h, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    by_hand = {k: t.detach().requires_grad_() for k, t in leaves.items()}   # same values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, idx = moe_forward(h, logits, w1, b1, w2, b2, 2)
    assert out.dtype == torch.bfloat16
    (out.float() * v).sum().backward()
    hb, w1b, b1b, w2b, b2b = (t.bfloat16() for t in by_hand.values())
    want, _, _ = moe_forward(hb, logits, w1b, b1b, w2b, b2b, 2)
    (want.float() * v).sum().backward()
    assert torch.equal(out, want)
    for k, t in leaves.items():
        assert torch.equal(t.grad, by_hand[k].grad), k

    def rounded(t):
        return t.detach().to(torch.bfloat16).to(F64).requires_grad_()
    ref_leaves = {k: rounded(t) for k, t in leaves.items()}
    r = ref_leaves
    ref, mask = moe_reference(r["h"], logits.to(F64), r["w1"], r["b1"], r["w2"], r["b2"], 2)
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, idx, True))
    (ref * v.to(F64)).sum().backward()
    assert rel_err(out.to(F64), ref) < 3 * BF16_U
    for k, t in leaves.items():
        assert t.grad.dtype == torch.float32, k
        assert rel_err(t.grad.to(F64), ref_leaves[k].grad) < 4 * BF16_U, k


def test_moe_forward_routes_half_logits_in_float32():
    """The public op routes as :class:`MoEMlp` does: bf16 logits (under CPU autocast, whose
    softmax stays bf16, or given so) are widened to float32 for the softmax and top-k."""
    torch.manual_seed(4)
    w1, b1, w2, b2 = (p.detach().float() for p in expert_weights(8, 16, 32))
    h, logits = torch.randn(40, 16), torch.randn(40, 8).bfloat16()
    want = logits.float().softmax(-1)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, probs, idx = moe_forward(h, logits, w1, b1, w2, b2, 3)
        assert probs.dtype == torch.float32, autocast
        torch.testing.assert_close(probs, want, rtol=0, atol=0)
        assert torch.equal(idx, want.topk(3, dim=-1).indices), autocast


def test_router_softmax_runs_in_float32_under_autocast(monkeypatch):
    """Under bf16 autocast the gate's logits are bf16, but the router takes their softmax and
    top-k in float32 (autocast's policy for softmax): it is handed the bf16 logits widened to
    float32."""
    import bsr_kernels.moe as moe_module
    torch.manual_seed(1)
    moe = MoEMlp.from_mlp(Mlp(64, 128), num_experts=16, top_k=4)
    x = torch.randn(512, 64)
    seen, real_route = [], moe_module.route

    def route(logits, *args):
        seen.append(logits)
        return real_route(logits, *args)
    monkeypatch.setattr(moe_module, "route", route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    logits = seen[0]
    assert logits.dtype == torch.float32
    bf16 = F.linear(x.bfloat16(), moe.gates[0].weight.bfloat16())
    torch.testing.assert_close(logits, bf16.float(), rtol=0, atol=0)  # the bf16 logits, widened


def test_expert_grouping_auto_pads_only_balanced_loads():
    from bsr_kernels.moe import _use_bmm
    assert _use_bmm([100, 104, 98, 101], 403)           # 4 x 104 = 416 <= 1.1 x 403
    assert not _use_bmm([100, 200, 50, 53], 403)        # 4 x 200 = 800 rows for 403
    assert not _use_bmm([0, 0, 0, 40], 40)


def test_bench_moe_tiny_section():
    """benchmarks/bench_moe.py on tiny shapes: its MoE equals the naive masked loop, and the
    target is left unmeasured off the ViT-B shape."""
    from benchmarks import bench_moe
    from benchmarks._suite import SuiteConfig

    section = bench_moe.run(SuiteConfig(tiny=True), log=lambda *a: None)
    rows = section["rows"]
    assert [r["candidate"] for r in rows] == [bench_moe.DENSE, bench_moe.OURS, bench_moe.NAIVE]
    ours = rows[1]
    assert ours["output_rel_err_vs_naive"] < 1e-5 and ours["median_ms"] > 0
    assert rows[0]["time_vs_dense"] == 1.0
    assert section["targets"][0]["verdict"] == "NOT MEASURED"
    assert "bsr_kernels MoEMlp" in bench_moe.table(section)


def _image_folder(root, classes, per_class=6, size=20, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 120).to(torch.uint8)
            img[..., c % 3] += 120
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")


def test_multitask_tasks_from_image_folders(tmp_path):
    import json

    from bsr_kernels.finetune.multitask import main

    _image_folder(tmp_path / "a", ("cat", "dog"))
    _image_folder(tmp_path / "b", ("red", "green", "blue"), seed=1)
    out = tmp_path / "o"
    rc = main(["--task", f"pets={tmp_path / 'a'}", "--task", f"colours={tmp_path / 'b'}",
               "--method", "bsr_moe,linear", "--epochs", "1", "--batch-size", "4",
               "--experts", "4", "--top-k", "2", "--timing-rounds", "0", "--profile-batch", "2",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["pets"]["num_classes"] == 2
    assert summary["tasks"]["colours"]["num_classes"] == 3
    r = summary["methods"]["bsr_moe"]
    assert list(r["tasks"]) == ["pets", "colours"]
    assert all(len(rows) == 2 for rows in r["expert_usage"].values())
    assert main(["--task", "nonsense", "--epochs", "1"]) == 2
    assert main(["--task", f"x={tmp_path / 'missing'}", "--epochs", "1"]) == 2


def test_multitask_resume_continues_exactly(tmp_path, monkeypatch):
    """Interrupted after epoch 1 of 2, --resume gives the uninterrupted run's history."""
    import json

    import bsr_kernels.finetune.multitask as mtd

    args = ["--method", "bsr_moe", "--epochs", "2", "--batch-size", "16", "--max-train-images",
            "48", "--experts", "4", "--top-k", "2", "--timing-rounds", "0", "--profile-batch", "2"]
    assert mtd.main(args + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = mtd.evaluate, []

    def interrupt_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mtd, "evaluate", interrupt_in_epoch_2)
    assert mtd.main(args + ["--out", str(tmp_path / "cut")]) == 130   # Ctrl-C: exit 130
    assert len(calls) == 2
    monkeypatch.setattr(mtd, "evaluate", real)
    assert mtd.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["methods"]["bsr_moe"]
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())["methods"]["bsr_moe"]
    assert cut["resumed_from_epoch"] == 1 and whole["resumed_from_epoch"] == 0
    assert cut["history"] == whole["history"]
    # another setting is refused (--epochs may grow since 84daedf: --batch-size here)
    assert mtd.main(args[:5] + ["8"] + args[6:] + ["--out", str(tmp_path / "cut"),
                                                   "--resume"]) == 2
    # a bare --resume takes the run's options from its args.json (not the four default methods,
    # the default 16 experts, ...): the finished run is reused, nothing trains again
    before = (tmp_path / "cut" / "bsr_moe" / "checkpoint.pt").read_bytes()
    assert mtd.main(["--out", str(tmp_path / "cut"), "--resume", "--timing-rounds", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.is_dir()) == ["bsr_moe"]
    assert (tmp_path / "cut" / "bsr_moe" / "checkpoint.pt").read_bytes() == before
    record = json.loads((tmp_path / "cut" / "args.json").read_text())
    assert record["args"]["experts"] == 4 and record["earlier_argv"][0][:2] == ["--multitask",
                                                                                "--method"]


def test_multitask_under_torchrun(tmp_path):
    """Two gloo processes (DDP with unused other-task heads/gates); main writes the summary."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "bsr_kernels.finetune", "--multitask",
                        "--method", "bsr_moe,moe_full", "--epochs", "1", "--batch-size", "16",
                        "--max-train-images", "48", "--experts", "4", "--top-k", "2",
                        "--timing-rounds", "0", "--profile-batch", "2", "--out",
                        str(tmp_path / "o")], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert set(summary["methods"]) == {"bsr_moe", "moe_full"}
    assert r.stdout.count("bsr_moe epoch 1/1") == 1      # only the main process logs


# --- edges a mutation test found unchecked ------------------------------------------------

def test_route_idx_range_is_0_to_e_minus_1():
    """A recorded idx holds experts 0..E-1: E-1 routes (its weight is that expert's
    probability), E and -1 are refused as ValueErrors naming the range, before ``gather``
    (a mutation that let E through, where gather then fails with an IndexError-like
    RuntimeError, passed the tests)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=g, dtype=F64)
    idx = torch.randint(0, 4, (5, 2), generator=g)
    idx[0, 1] = 3
    probs, weights, got = route(logits, 2, idx=idx)
    torch.testing.assert_close(weights, logits.softmax(-1).gather(1, idx))
    assert torch.equal(got, idx)
    for bad in (4, -1):
        wrong = idx.clone()
        wrong[2, 0] = bad
        with pytest.raises(ValueError, match=r"idx must hold experts in 0\.\.3"):
            route(logits, 2, idx=wrong)


def test_expert_grouping_auto_pads_at_exactly_the_pad_limit():
    """"at most PAD_LIMIT extra rows": padding 4 experts to the largest's 11 rows is 44 rows for
    40 routed, exactly 10 % more, which still pads (a mutation to < passed the tests)."""
    from bsr_kernels.moe import PAD_LIMIT, _use_bmm
    assert PAD_LIMIT == 0.1
    assert _use_bmm([11, 11, 9, 9], 40)
    assert not _use_bmm([12, 10, 9, 9], 40)      # 48 rows for 40: 20 % more


def test_aux_loss_of_a_single_expert_is_zero_not_nan():
    """With one expert (top_k 1) every token goes to it: importance and load are one value
    each, perfectly balanced, and the aux loss is 0, not the NaN an unbiased variance of one
    value gives (which would stop the training as diverged; a mutation that took that variance
    passed the tests)."""
    torch.manual_seed(0)
    moe = MoEMlp(8, 16, num_experts=1, top_k=1, aux_loss_weight=0.5).to(F64).train()
    x = torch.randn(2, 5, 8, dtype=F64)
    out = moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.item() == 0.0
    (out.square().mean() + moe.aux_loss).backward()
    assert moe.fc1_weight.grad.isfinite().all() and moe.fc1_weight.grad.abs().sum() > 0


def test_moe_mlp_refuses_a_task_out_of_range_of_its_gates():
    """MoEMlp.task set out of 0..num_tasks-1 is a ValueError naming it at the next forward,
    also for -1, which indexing would otherwise take as the last task's gate (a mutation that
    dropped the check passed the tests)."""
    torch.manual_seed(0)
    moe = MoEMlp(8, 16, num_experts=4, top_k=2, num_tasks=2).eval()
    x = torch.randn(3, 8)
    moe.task = 1
    assert moe(x).shape == (3, 8)
    for bad in (2, -1):
        moe.task = bad
        with pytest.raises(ValueError, match=f"task {bad} is out of range for 2 gates"):
            moe(x)


def test_to_moe_refuses_an_mlp_with_a_hidden_norm_and_changes_nothing():
    """timm's Mlp with a norm between its layers (``scale_mlp_norm=True``) has no place for it
    in the experts: to_moe refuses it, naming the block, and leaves the model as it was (a
    mutation that took it, dropping the norm from the MLP's function, passed the tests)."""
    model = small_vit(scale_mlp_norm=True)
    assert isinstance(model.blocks[1].mlp.norm, nn.LayerNorm)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="block 1 MLP has a hidden norm"):
        bsr_kernels.to_moe(model, num_experts=4, top_k=2)
    assert moe_blocks(model) == []
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_multitask_forward_without_a_task_uses_the_last_one_set():
    """``forward(images)`` with no task takes :attr:`task`, the last one set (by set_task or by
    a forward given one): its head and its gates (a mutation that took task 0 passed the
    tests)."""
    vit = bsr_kernels.to_moe(small_vit(), num_experts=4, top_k=2, num_tasks=2)
    mt = bsr_kernels.MultiTaskViT(vit, num_classes=[3, 2]).eval()
    x = images(n=2)
    with torch.no_grad():
        mt.set_task(1)
        out = mt(x)
        assert out.shape == (2, 2)
        torch.testing.assert_close(out, mt.heads[1](mt.vit(x)))
        mt(x, 0)
        assert mt.task == 0 and all(m.task == 0 for _, m in moe_blocks(mt))
        torch.testing.assert_close(mt(x), mt.heads[0](mt.vit(x)))
