"""The three memory modes as a user runs them: no host syncs, torch.compile gives the eager
result, what backward stores (never attention probabilities with SDPA, in any block of any
mode), dropout turned on after reprogram, and the model-level argument checks."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels
import bsr_kernels.backward
from bsr_kernels.config import MEMORY_MODES, BSRConfig
from bsr_kernels.ops.dispatch import select_backend

from _backends import OpLog

MODES = list(MEMORY_MODES)


def tiny(seed=0, dtype=torch.float32, depth=12, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=depth, num_heads=4, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).to(dtype)


def images(n=2, seed=1, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


#: What reads a tensor's value on the host (a device sync on CUDA): Tensor methods (also Python's
#: ``if t:``, ``int(t)``, ``float(t)``, ``range(t)``) and torch functions; nonzero, unique,
#: masked_select and argwhere because their output's size depends on the values, as does
#: indexing with a boolean mask (guarded too). any/all are not among them: they return a tensor
#: (``if t.any():`` is caught at ``__bool__``).
_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
                 "equal", "allclose", "nonzero", "unique", "masked_select", "argwhere")
_SYNC_FUNCTIONS = ("equal", "allclose", "is_nonzero", "nonzero", "unique", "masked_select",
                   "argwhere")
_ABSENT = object()


@contextlib.contextmanager
def no_host_syncs():
    """Replaces every call of ``_SYNC_METHODS`` / ``_SYNC_FUNCTIONS`` by one that records its name
    and raises, in every thread (the autograd engine's included) and on every path (the eager
    ``autograd.Function`` path of the ops too: no dispatch or function mode is pushed, which
    would send the ops down the registered-op path). Yields the list of names hit, for code that
    catches the exception. C++ code (the extension) is not seen: on CUDA,
    ``test_cuda_step_without_host_syncs`` checks everything with the sync debug mode."""
    hits: list[str] = []
    patched = []

    def guard(owner, name):
        def sync(*args, **kwargs):
            hits.append(name)
            raise AssertionError(f"host sync: {name}")
        patched.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        setattr(owner, name, sync)

    def guard_mask_index(name):
        orig = getattr(torch.Tensor, name)

        def index(self, idx, *value):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (idx if isinstance(idx, tuple) else (idx,))):
                hits.append(f"{name} with a boolean mask")
                raise AssertionError(f"host sync: {hits[-1]}")
            return orig(self, idx, *value)
        patched.append((torch.Tensor, name, torch.Tensor.__dict__.get(name, _ABSENT)))
        setattr(torch.Tensor, name, index)

    try:
        guard_mask_index("__getitem__")
        guard_mask_index("__setitem__")
        for name in _SYNC_METHODS:
            guard(torch.Tensor, name)
        for name in _SYNC_FUNCTIONS:
            guard(torch, name)
        yield hits
    finally:
        for owner, name, orig in reversed(patched):
            if orig is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


@pytest.mark.parametrize("sync", [
    lambda t: t.item(), lambda t: t.tolist(), lambda t: bool(t), lambda t: int(t),
    lambda t: float(t), lambda t: [0, 1][t], lambda t: torch.equal(t, t), lambda t: t.equal(t),
    lambda t: torch.allclose(t, t), lambda t: t.nonzero(), lambda t: torch.unique(t),
    lambda t: t[t > 0], lambda t: t.__setitem__(t < 0, 0), lambda t: t.numpy()])
def test_no_sync_detector_catches_syncs(sync):
    t = torch.tensor(1)
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_syncs():
            sync(t)
    sync(t)  # and every patched call works again after it


def _eager_path_recorded(monkeypatch):
    """Records, for each drop_tokens call, whether it took the eager autograd.Function path."""
    seen: list[bool] = []
    plain = bsr_kernels.ops._plain_eager

    def spy(*tensors):
        seen.append(plain(*tensors))
        return seen[-1]
    monkeypatch.setattr(bsr_kernels.ops, "_plain_eager", spy)
    return seen


def _step_without_host_syncs(model, x):
    """A training forward + backward under :func:`no_host_syncs`; raises at a host sync."""
    with no_host_syncs() as hits:
        model(x).sum().backward()
    assert not hits, f"host sync: {hits}"  # also when something caught the AssertionError


@pytest.mark.parametrize("mode", MODES)
def test_forward_and_backward_without_host_syncs(mode, monkeypatch):
    """No .item()/torch.equal/bool(tensor)/... anywhere in a training forward + backward, on the
    eager path that training takes (on CUDA, test_cuda_step_without_host_syncs checks the
    same with torch.cuda.set_sync_debug_mode("error"))."""
    model = bsr_kernels.reprogram(tiny(), memory_mode=mode)
    x = images()
    model(x).sum().backward()  # warm (first-call setup may inspect values)
    model.zero_grad()
    eager = _eager_path_recorded(monkeypatch)
    _step_without_host_syncs(model, x)
    # 3 drops in forward, and for fast/lean their 3 replays in backward, all on the eager path
    assert eager == [True] * (3 if mode == "autograd" else 6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _inject(monkeypatch, owner, name, sync):
    """Makes ``owner.name`` (a method or static method) do the host sync ``sync`` first, on its
    first tensor argument."""
    orig = owner.__dict__[name]
    fn = orig.__func__ if isinstance(orig, staticmethod) else orig

    def synced(*args, **kwargs):
        sync(next(a for a in args if isinstance(a, torch.Tensor)))
        return fn(*args, **kwargs)
    monkeypatch.setattr(owner, name, staticmethod(synced) if isinstance(orig, staticmethod)
                        else synced)


#: The backend the CPU steps run, looked up when a test needs it (at collection, a machine
#: without the C++ extension, such as a GPU machine running the CUDA tests from a checkout,
#: would fail the whole file, its CUDA tests included).
_BACKEND = "the CPU backend"


@pytest.mark.parametrize("mode, owner, name, sync, seen", [
    ("autograd", _BACKEND, "drop_forward", lambda t: t.sum().item(), "item"),
    ("autograd", _BACKEND, "drop_backward", lambda t: bool(t.sum() > 0), "__bool__"),
    ("lean", _BACKEND, "drop_replay", lambda t: torch.equal(t, t), "equal"),
    ("fast", bsr_kernels.backward._GradOnlyLinear, "backward", lambda t: t.sum().tolist(),
     "tolist"),
    ("lean", bsr_kernels.backward._LeanBlock, "backward", lambda t: int(t.flatten()[0]),
     "__int__"),
], ids=["backend-forward", "backend-backward", "backend-replay", "grad-only-linear",
        "lean-block-backward"])
def test_host_sync_detector_sees_backend_and_backward_code(mode, owner, name, sync, seen,
                                                           monkeypatch):
    """A host sync added to the backend's Python code (forward, backward, the replay in a lean
    backward) or to the custom backward of backward.py fails the step check."""
    if owner == _BACKEND:
        owner = type(select_backend(torch.device("cpu"), torch.float32))
    model = bsr_kernels.reprogram(tiny(depth=4), memory_mode=mode)
    x = images()
    model(x).sum().backward()
    _step_without_host_syncs(model, x)
    _inject(monkeypatch, owner, name, sync)
    with pytest.raises(AssertionError, match=f"host sync: {seen}$"):
        _step_without_host_syncs(model, x)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch.cuda.set_sync_debug_mode needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_step_without_host_syncs(mode):
    """On CUDA, no host sync anywhere in a training step, C++ and Triton included: the CUDA
    sync debug mode raises at any synchronizing call (checked first on a .item())."""
    model = bsr_kernels.reprogram(tiny().cuda(), memory_mode=mode)
    x = images().cuda()
    model(x).sum().backward()  # warm (first-call setup, Triton compiles)
    torch.cuda.synchronize()
    model.zero_grad()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_memory_modes_give_the_same_gradients(mode):
    """fast/lean give plain autograd's logits and gradients (float64, LayerScale trained)."""
    base = tiny(dtype=torch.float64, init_values=0.3)
    ref = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode="autograd")
    got = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode)
    x = images(dtype=torch.float64)
    torch.testing.assert_close(got(x), ref(x), rtol=0, atol=1e-12)
    ref(x).square().sum().backward()
    got(x).square().sum().backward()
    gr, gg = grads(ref), grads(got)
    assert set(gr) == set(gg) and gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_matches_eager(mode):
    """torch.compile of a reprogrammed model: the eager logits and gradients, in one graph in
    every mode (fast and lean run as selective checkpointing when compiled; their eager
    backward calls torch.autograd.grad, which dynamo does not trace)."""
    base = tiny(depth=4)
    cfg = dict(memory_mode=mode, train_blocks=[1, 3], drop_at=[1, 2])
    eager = bsr_kernels.reprogram(copy.deepcopy(base), **cfg)
    model = bsr_kernels.reprogram(copy.deepcopy(base), **cfg)
    x = images()
    logits = eager(x)
    logits.square().sum().backward()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, \
        [str(r.reason)[:200] for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model)
    out = compiled(x)
    torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ge, gc = grads(eager), grads(model)
    assert set(ge) == set(gc) and ge
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("mode,activation_dtype,backend", [
    ("lean", None, "aot_eager"), ("fast", None, "aot_eager"),
    ("lean", torch.bfloat16, "inductor")])
def test_torch_compile_stays_within_the_recompile_limit(mode, activation_dtype, backend):
    """12 blocks under torch.compile, where a block keeps the custom backward (compressed
    storage: each block a frame of its own) or not: blocks compile into one entry per kind of
    block (they read their role, not their index), so dynamo's recompile limit (8) is not hit
    and no block silently falls back to eager; logits and gradients are the eager ones.
    Recompiles are dynamo's, the same under any backend. Lean and fast (no compression) compile
    into one graph, with no recompile at all (they pass with a limit of 1; compressed storage
    does not), so they run AOTAutograd without inductor here: inductor's code for them is
    checked in test_torch_compile_matches_eager, and each 12-block inductor compile took 30-36 s
    on a cold cache."""
    base = tiny()
    cfg = dict(memory_mode=mode, activation_dtype=activation_dtype)
    eager = bsr_kernels.reprogram(copy.deepcopy(base), **cfg)
    model = bsr_kernels.reprogram(copy.deepcopy(base), **cfg)
    x = images()
    logits = eager(x)
    logits.square().sum().backward()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        out = torch.compile(model, backend=backend)(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    ge, gc = grads(eager), grads(model)
    assert set(ge) == set(gc) and ge
    # bf16 storage: both backwards are approximate, and compiled recomputes round otherwise
    for n in ge:
        if activation_dtype is None:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)
        else:
            rel = float((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12))
            assert rel < 2e-2, (n, rel)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_checkpointed_form_gives_autograd_gradients(mode):
    """The form compiled lean/fast run (selective checkpointing, bsr_kernels.backward), run
    eagerly: plain autograd's logits and float64 gradients (LayerScale trained, so fc2's output
    is recomputed where its gamma needs it), through the registered drop op."""
    base = tiny(dtype=torch.float64, init_values=0.3, depth=6)
    cfg = dict(train_blocks=[2, 5], drop_at=[1, 3, 4])
    ref = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode="autograd", **cfg)
    got = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode, **cfg)
    x = images(dtype=torch.float64)
    ref(x).square().sum().backward()
    checkpointed = run_checkpointed(got)
    got(x).square().sum().backward()
    assert checkpointed == [2, 3, 4, 5]
    gr, gg = grads(ref), grads(got)
    assert set(gr) == set(gg) and gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)


def run_checkpointed(model) -> list:
    """Has ``model``'s blocks that need a backward run as :func:`checkpointed_block` (the form
    compiled lean/fast trace) eagerly; returns the list their indices are appended to."""
    checkpointed = []
    real = bsr_kernels.backward.checkpointed_block

    def forward(blk, x, attn_mask=None, is_causal=False):
        if blk.bsr_no_grad:
            with torch.no_grad():
                return blk.body(x)
        checkpointed.append(blk.bsr_index)
        return real(blk, x)
    for blk in model.blocks:
        blk.forward = forward.__get__(blk)
    return checkpointed


@pytest.mark.parametrize("writer", ["layer_scale", "activation"])
@pytest.mark.parametrize("mode,form", [("autograd", "eager"), ("fast", "eager"),
                                       ("lean", "eager"), ("fast", "checkpointed"),
                                       ("lean", "checkpointed")])
def test_modules_writing_in_place_give_autograd_gradients(mode, form, writer):
    """Modules that write their input in place (timm's ``LayerScale(inplace=True)``, an
    ``nn.SiLU(inplace=True)`` activation): the logits and float64 gradients of the same model
    computing out of place, in autograd mode. Fast saves and replays the proj output that ls1
    scales and trained blocks the fc1 output the activation reads; lean stands a broadcast
    zero for a frozen block's fc2 output, which ls2 scales. Writing those in place overwrote
    what was saved (wrong gradients, silently for the activation) or could not write the
    placeholder (the backward raised). The modules still work in place afterwards."""
    kw = (dict(init_values=0.3) if writer == "layer_scale"
          else dict(act_layer=torch.nn.SiLU))
    base = tiny(dtype=torch.float64, depth=6, **kw)
    cfg = dict(train_blocks=[2, 5], drop_at=[1, 3, 4])
    ref = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode="autograd", **cfg)
    got = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode, **cfg)
    writers = ([m for blk in got.blocks for m in (blk.ls1, blk.ls2)]
               if writer == "layer_scale" else [blk.mlp.act for blk in got.blocks])
    for m in writers:
        m.inplace = True
    checkpointed = run_checkpointed(got) if form == "checkpointed" else None
    x = images(dtype=torch.float64)
    logits, expected = got(x), ref(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    expected.square().sum().backward()
    logits.square().sum().backward()
    assert checkpointed in (None, [2, 3, 4, 5])
    gr, gg = grads(ref), grads(got)
    assert set(gr) == set(gg) and "blocks.2.mlp.fc1.weight" in gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)
    assert all(m.inplace for m in writers)


def test_checkpointable_leaves_what_it_cannot_express_to_the_custom_backward():
    """Compressed storage, a MoE MLP, a projection that is not a plain nn.Linear (a subclass)
    and dropout drawn keep the custom autograd function under torch.compile (a block whose
    parts have hooks runs plain autograd: reprogram.parts_hooked)."""
    from bsr_kernels.backward import checkpointable
    model = bsr_kernels.reprogram(tiny(depth=4), memory_mode="lean")
    blk = model.blocks[3]
    assert checkpointable(blk)
    assert not checkpointable(bsr_kernels.reprogram(
        tiny(depth=4), memory_mode="lean", activation_dtype=torch.bfloat16).blocks[3])
    fc1 = blk.mlp.fc1
    blk.mlp.fc1 = type("Sub", (torch.nn.Linear,), {})(fc1.in_features, fc1.out_features)
    assert not checkpointable(blk)      # not a plain nn.Linear
    blk.mlp.fc1 = fc1
    blk.attn.proj_drop.p = 0.1
    assert not checkpointable(blk)      # training mode: dropout is drawn
    blk.eval()
    assert checkpointable(blk)
    blk.attn.proj_drop.p = 0.0
    blk.train()
    moe = bsr_kernels.reprogram(bsr_kernels.to_moe(tiny(depth=4), num_experts=2, top_k=1),
                                memory_mode="lean")
    assert not checkpointable(moe.blocks[3])


def test_compiled_code_does_not_guard_on_the_backend_cache():
    """select_backend's cache is for eager calls: a compiled entry guarded on its contents would
    be dead after the first eager write, and take one of dynamo's 8 entries per code object."""
    from bsr_kernels.ops import dispatch
    model = bsr_kernels.reprogram(tiny(depth=4), memory_mode="autograd", train_blocks=[1, 3],
                                  drop_at=[1, 2])
    dispatch._SELECTED.clear()
    torch._dynamo.reset()
    guards = [g.name for g in torch._dynamo.explain(model)(images()).out_guards]
    assert any("_drop_op" in g for g in guards)  # the trace went through the drop
    assert not [g for g in guards if "_SELECTED" in g]
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_no_block_stores_attention_probabilities(mode):
    """Whatever backward keeps, in every block and at every token count the blocks see (65, then
    34, 19 and 11 after the drops), holds no (.., n, n) attention matrix. With SDPA, timm's
    default, set here whatever TIMM_FUSED_ATTN says (``fused_attn=False`` asks for the
    explicit N x N path)."""
    model = bsr_kernels.reprogram(tiny(), memory_mode=mode)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    counts = set()
    hooks = [blk.register_forward_pre_hook(lambda m, a: counts.add(a[0].shape[1]))
             for blk in model.blocks]
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images()).sum().backward()
    for h in hooks:
        h.remove()
    assert counts == {65, 34, 19, 11}, counts
    assert saved
    square = [s for s in saved if len(s) >= 3 and s[-1] == s[-2] and s[-1] in counts]
    assert not square, square


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("kind", ["dropout", "drop_path"])
def test_dropout_turned_on_after_reprogram_gives_exact_gradients(mode, kind):
    """Dropout enabled after reprogram (issue 13, item 2): the replaying backward draws the
    forward's masks, so gradients equal plain autograd's with the same seed. Drop-path alone
    (no dropout in the block) too: a replay that did not see it as random drew other masks
    (gradient error 6.9 in a mutation test that no test caught)."""
    from timm.layers import DropPath
    base = tiny(dtype=torch.float64)
    models = {}
    for m in (mode, "autograd"):
        models[m] = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=m)
        if kind == "dropout":
            models[m].blocks[7].mlp.drop1.p = 0.5
            models[m].blocks[5].attn.proj_drop.p = 0.3
        else:
            models[m].blocks[7].drop_path2 = DropPath(0.5)
            models[m].blocks[5].drop_path1 = DropPath(0.3)
        models[m].train()
    x = images(n=8, dtype=torch.float64)
    logits = {}
    for name, m in models.items():
        torch.manual_seed(123)
        logits[name] = m(x)
        logits[name].square().sum().backward()
    torch.testing.assert_close(logits[mode], logits["autograd"], rtol=0, atol=1e-12)
    with torch.no_grad():  # dropout is really active: another seed draws other masks
        torch.manual_seed(124)
        other = models[mode](x)
    assert (other - logits[mode]).abs().max() > 1e-3
    gr, gg = grads(models["autograd"]), grads(models[mode])
    assert set(gr) == set(gg) and gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)
    # and against finite differences along a random direction of block 7's fc1 weight
    model = models[mode]
    w = model.blocks[7].mlp.fc1.weight
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=w.dtype)

    def loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return model(x).square().sum()
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * v)
    up = loss()
    with torch.no_grad():
        w.sub_(2 * eps * v)
    down = loss()
    with torch.no_grad():
        w.add_(eps * v)
    fd = (up - down) / (2 * eps)
    torch.testing.assert_close((gg["blocks.7.mlp.fc1.weight"] * v).sum(), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("forward_training", [True, False])
def test_train_eval_switched_before_backward_gives_the_forwards_gradients(mode, forward_training):
    """model.train()/eval() between forward and backward: backward differentiates the forward
    that ran, as plain autograd does (the replay used to read the modules' new flags: dropout
    and drop-path masks drawn afresh or left out, 44-76 % relative gradient error)."""
    from timm.layers import DropPath
    base = tiny(dtype=torch.float64)
    models = {}
    for m in (mode, "autograd"):
        models[m] = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=m)
        for i in (5, 7, 10):   # a frozen block after the first trained one, two trained ones
            models[m].blocks[i].mlp.drop1.p = 0.4
            models[m].blocks[i].drop_path2 = DropPath(0.3)
    x = images(dtype=torch.float64)
    for name, m in models.items():
        m.train(forward_training)
        torch.manual_seed(7)
        loss = m(x).square().sum()
        m.train(not forward_training)
        loss.backward()
        assert all(mod.training is not forward_training for mod in m.modules())
    gr, gg = grads(models["autograd"]), grads(models[mode])
    assert set(gr) == set(gg) and gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)
    if forward_training:   # dropout was drawn: another seed gives other gradients
        models[mode].zero_grad()
        torch.manual_seed(8)
        models[mode](x).square().sum().backward()
        other = grads(models[mode])["blocks.7.mlp.fc1.weight"]
        assert (other - gg["blocks.7.mlp.fc1.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("param", ["blocks.7.mlp.fc1.weight", "blocks.5.attn.qkv.weight"])
def test_parameter_changed_in_place_before_backward_raises(mode, param):
    """A trained or frozen block's weight changed in place between forward and backward: plain
    autograd raises, and so do the replaying modes (which used to replay with the new values,
    silently giving other gradients)."""
    model = bsr_kernels.reprogram(tiny(), memory_mode=mode)
    loss = model(images()).square().sum()
    with torch.no_grad():
        model.get_parameter(param).mul_(2)
    match = "modified by an inplace operation"
    if mode != "autograd":
        match += ".*" + param.split(".", 2)[2]
    with pytest.raises(RuntimeError, match=match):
        loss.backward()


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_restore_or_other_drop_settings_before_backward_raise(mode):
    """restore() between forward and backward failed in lean and fast backward with
    "AttributeError: 'Block' object has no attribute 'body'"; reprogramming with other drop
    settings replayed the block as it now is. Both raise naming what happened; a change that
    leaves the replay as it was (another memory mode; another keep_rate where the replayed
    blocks drop nothing) still gives the same gradients."""
    drops_early = dict(train_blocks=(6, 7), drop_at=(2, 4))   # blocks 6-11 replay, none drops
    model = tiny()
    want = {}
    for name, settings in (("default", {}), ("early", drops_early)):
        bsr_kernels.reprogram(model, memory_mode=mode, **settings)
        model.zero_grad()
        model(images()).square().sum().backward()
        want[name] = grads(model)
    for change in (bsr_kernels.restore,
                   lambda m: bsr_kernels.reprogram(m, memory_mode=mode, keep_rate=0.7)):
        bsr_kernels.reprogram(model, memory_mode=mode)
        loss = model(images()).square().sum()
        change(model)
        with pytest.raises(RuntimeError, match=r"block \d* ?was restored \(bsr_kernels.restore"
                                               r"\) or reprogrammed .* call backward first"):
            loss.backward()
    other = "fast" if mode == "lean" else "lean"
    for name, settings, change in (
            ("default", {}, dict(memory_mode=other)),
            ("early", drops_early, dict(drops_early, memory_mode=mode, keep_rate=0.7))):
        bsr_kernels.reprogram(model, memory_mode=mode, **settings)
        loss = model(images()).square().sum()
        bsr_kernels.reprogram(model, **change)
        model.zero_grad()
        loss.backward()
        got = grads(model)
        assert got.keys() == want[name].keys()
        for n in got:
            torch.testing.assert_close(got[n], want[name][n], rtol=1e-10, atol=0, msg=(name, n))


def test_reset_classifier_refuses_what_reprogram_refuses():
    """reset_classifier(global_pool=...) on a reprogrammed model refuses a pool that would
    average the fused token in (reprogram refuses such a model), naming global_pool, and
    changes nothing; a new head or a pool that fits is taken as timm takes it."""
    model = bsr_kernels.reprogram(tiny())
    head = model.head
    with pytest.raises(ValueError, match="global_pool='avg'.*fused token"):
        model.reset_classifier(7, global_pool="avg")
    assert model.global_pool == "token" and model.head is head and model.num_classes == 5
    model.reset_classifier(7)
    assert model(images()).shape == (2, 7) and model.head.weight.requires_grad
    plain = bsr_kernels.reprogram(tiny(), fuse_token=False)
    plain.reset_classifier(3, "avg")
    assert plain.global_pool == "avg" and plain(images()).shape == (2, 3)
    bsr_kernels.restore(model)
    model.reset_classifier(4, global_pool="avg")   # timm's own method again
    assert model.global_pool == "avg"


def test_avg_pool_with_fused_token_is_refused_and_model_unchanged():
    model = tiny(global_pool="avg", class_token=True)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="global_pool='avg'.*fused token"):
        bsr_kernels.reprogram(model)
    assert not hasattr(model, "bsr_config")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    bsr_kernels.reprogram(model, fuse_token=False)  # then pooling averages the kept tokens
    assert model(images()).shape == (2, 5)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_keep_rate_of_wrong_type_is_a_value_error(bad):
    model = tiny()
    with pytest.raises(ValueError, match="keep_rate"):
        bsr_kernels.reprogram(model, keep_rate=bad)
    assert not hasattr(model, "bsr_config")


def test_keep_rate_one_returns_a_fresh_index():
    g = torch.Generator().manual_seed(0)
    x, q, k = torch.randn(2, 9, 4, generator=g), *torch.randn(2, 2, 2, 9, 3, generator=g)
    out, kept = bsr_kernels.drop_tokens(x, q, k, 1.0)
    assert torch.equal(kept, torch.arange(8).repeat(2, 1))
    assert 0 not in kept.stride()
    kept[0, 0] = 5  # writable, and not shared between rows
    assert kept[1, 0] == 0


def test_config_round_trips_and_is_shared():
    """Every field, each away from its default (a from_dict that dropped fuse_token passed a
    test that round-tripped the default), round-trips through to_dict/from_dict."""
    model = bsr_kernels.reprogram(tiny(reg_tokens=4), keep_rate=0.7, drop_at=[2, 5],
                                  train_blocks=[5, 9], memory_mode="fast",
                                  activation_dtype=torch.bfloat16, fuse_token=False,
                                  train_norm=True)
    cfg = model.bsr_config
    assert all(blk.bsr_config is cfg for blk in model.blocks)
    d = cfg.to_dict()
    assert d["activation_dtype"] == "bfloat16" and d["drop_at"] == [2, 5]
    default = BSRConfig.create(12).to_dict()
    assert {k for k in d if d[k] == default[k]} == {"depth"}, d
    assert BSRConfig.from_dict(d) == cfg
    assert [cfg.drops(i) for i in range(12)] == [i in (2, 5) for i in range(12)]
    assert [cfg.without_grad(i) for i in range(12)] == [i < 5 for i in range(12)]
    with pytest.raises(ValueError, match="memory_mode"):
        BSRConfig.from_dict({**d, "memory_mode": "plain"})
    with pytest.raises(ValueError, match="malformed"):
        BSRConfig.from_dict({k: v for k, v in d.items() if k != "train_blocks"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_every_activation_dtype_a_config_takes_round_trips(dtype):
    """A float8 activation_dtype was accepted by reprogram and then refused on loading (its
    checkpoint's config named a dtype from_dict does not read). Every dtype the config takes
    now round-trips through to_dict/from_dict, and the others are refused where they are given,
    naming the argument, before the model changes."""
    model = bsr_kernels.reprogram(tiny(), memory_mode="lean", activation_dtype=dtype)
    cfg = model.bsr_config
    assert BSRConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, "bfloat16"):
        with pytest.raises(ValueError, match="activation_dtype must be one of torch.bfloat16"):
            bsr_kernels.reprogram(model, activation_dtype=bad)
        assert model.bsr_config is cfg


@pytest.mark.parametrize("bad", [0, -3, 1.9, True, None, "x"])
def test_config_refuses_a_bad_prefix_token_count(bad):
    """num_prefix_tokens was cast with int(): 1.9 and True became 1, 0 and -3 were taken, and
    "x" or None raised an error that named no argument."""
    d = bsr_kernels.reprogram(tiny()).bsr_config.to_dict()
    with pytest.raises(ValueError, match="num_prefix_tokens must be a positive int"):
        BSRConfig.from_dict({**d, "num_prefix_tokens": bad})
    with pytest.raises(ValueError, match="num_prefix_tokens must be a positive int"):
        BSRConfig.create(12, num_prefix_tokens=bad)
    assert BSRConfig.from_dict({**d, "num_prefix_tokens": 5}).num_prefix_tokens == 5


@pytest.mark.parametrize("mode", MODES)
def test_backward_uses_the_parameters_of_its_forward(mode):
    """requires_grad switched off between forward and backward: as in plain autograd (whose
    AccumulateGrad then skips the parameter) that parameter gets no gradient and every other one
    gets its usual gradient (before, the replay re-listed the parameters in backward and raised,
    or could hand a gradient to the wrong parameter)."""
    model = bsr_kernels.reprogram(tiny(), memory_mode=mode)
    x = images()
    model(x).square().sum().backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    frozen = model.blocks[7].attn.qkv.weight  # in a trained block, not its last parameter
    assert frozen.requires_grad
    frozen.requires_grad_(False)
    loss.backward()
    got = grads(model)
    assert set(got) == set(want) - {"blocks.7.attn.qkv.weight"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("moe", [False, True], ids=["mlp", "moe"])
@pytest.mark.parametrize("mode", MODES)
def test_torch_func_per_sample_gradients_equal_backward(mode, moe):
    """torch.func.grad of a reprogrammed model raised in every mode (the drop op's registered
    autograd, the lean/fast blocks' and the MoE grouping's autograd.Functions refuse functorch;
    jvp got zero tangents through the drop). Under a transform the blocks now run their plain
    body, the drop its definition and the MoE its dense combine: per-sample gradients (vmap of
    grad, float64) equal backward image by image, and jvp equals the gradient's dot product."""
    from bsr_kernels.moe import to_moe
    model = tiny(depth=4, dtype=torch.float64, patch_size=8)
    if moe:   # usage tracking on: its in-place count raised under a transform
        to_moe(model, blocks=[1, 3], num_experts=4, top_k=2)
        for m in model.modules():
            m.track_usage = getattr(m, "bsr_moe", False)
    bsr_kernels.reprogram(model, train_blocks=[1, 3], memory_mode=mode)
    x = images(3, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, image):
        return torch.func.functional_call(model, p, (image[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    usage = [m.usage for m in model.modules() if getattr(m, "bsr_moe", False)]
    assert all(u.sum() == 0 for u in usage)   # a transform's forwards are not counted
    for i in range(len(x)):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i]).backward()
        want = grads(model)
        assert want.keys() == per_sample.keys()
        for n, w in want.items():
            torch.testing.assert_close(per_sample[n][i], w, rtol=1e-10, atol=1e-12, msg=n)
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    # forward AD needs SDPA's math kernel (its fused CPU kernel has no jvp, in timm alike)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        got = torch.func.jvp(lambda p: loss(p, x[0]), (params,), (tangents,))[1]
    model.zero_grad()
    loss(dict(model.named_parameters()), x[0]).backward()
    want = sum((p.grad * tangents[n]).sum() for n, p in model.named_parameters()
               if p.grad is not None)
    assert want.abs() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_user_checkpointing_and_offload_hooks_around_the_model(mode):
    """The lean/fast backward read ``ctx.saved_tensors`` three times, unpacking every saved
    tensor again each time: non-reentrant ``torch.utils.checkpoint`` around the model or its
    blocks (FSDP, accelerate, Lightning wrap models so) raised CheckpointError, and offload
    hooks (save_on_cpu) brought each tensor back up to three times. Each is unpacked once now,
    and the gradients are those of the plain step."""
    import collections
    from torch.utils.checkpoint import checkpoint
    model = bsr_kernels.reprogram(tiny(depth=4, dtype=torch.float64), train_blocks=[1, 3],
                                  drop_at=[1, 2], memory_mode=mode)
    x = images(dtype=torch.float64)
    model(x).square().sum().backward()
    want = grads(model)
    packed, unpacked = [], collections.Counter()

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(i):
        unpacked[i] += 1
        return packed[i]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = model(x).square().sum()
    model.zero_grad()
    loss.backward()
    assert unpacked and max(unpacked.values()) == 1, unpacked

    def blockwise(x):
        h = model._pos_embed(model.patch_embed(x))
        for b in model.blocks:
            h = checkpoint(b, h, use_reentrant=False)
        return model.forward_head(model.norm(h))

    for step in (lambda: checkpoint(model, x, use_reentrant=False), lambda: blockwise(x)):
        model.zero_grad()
        step().square().sum().backward()
        got = grads(model)
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("moe", [False, True])
def test_meta_device_shape_inference(mode, moe):
    """``model.to("meta")`` (shape inference, no data: as accelerate's empty weights or a
    memory estimate use it) runs a reprogrammed model as it runs timm's: forward in training
    and eval, and backward, give the CPU model's shapes, a MoE MLP included. (Autocast, which
    torch refuses to be asked about on meta, failed every block's drop; the drop ops' default
    backend refused meta tensors; a MoE grouped its experts by loads that meta has not.)"""
    model = tiny(depth=6)
    if moe:
        bsr_kernels.to_moe(model, num_experts=4, top_k=2)
    bsr_kernels.reprogram(model, memory_mode=mode, train_blocks=[1, 4], drop_at=[1, 3])
    x = images()
    want = model(x)
    want.square().sum().backward()
    want_grads = {n: g.shape for n, g in grads(model).items()}
    model.zero_grad(set_to_none=True)
    model.to("meta")
    out = model(x.to("meta"))
    assert out.device.type == "meta" and out.shape == want.shape
    out.square().sum().backward()
    got = grads(model)
    assert {n: g.shape for n, g in got.items()} == want_grads and want_grads
    assert all(g.device.type == "meta" for g in got.values())
    with torch.no_grad():
        assert model.eval()(x.to("meta")).shape == want.shape


def _drops_and_projections(log: OpLog) -> tuple[Counter, list[torch.Tensor]]:
    """What an :class:`OpLog` around a backward saw: the bsr_kernels ops run, counted by name,
    and the outputs of ``addmm`` (a projection's forward run again: its backward runs ``mm``)."""
    drops = Counter(f.overloadpacket.__name__ for f, _ in log.calls if f.namespace == "bsr_kernels")
    return drops, [out for f, out in log.calls if f is torch.ops.aten.addmm.default]


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("form", ["eager", "checkpointed"])
def test_backward_replays_the_selection_and_recomputes_only_what_its_mode_says(mode, form):
    """What a lean/fast backward runs again, op by op (seen by a dispatch mode around
    backward): never the drop's selection (the recorded one is replayed: the
    ``bsr_kernels::drop_tokens`` op does not run; in float64 a fresh selection picks the same
    tokens, so the gradients alone cannot tell), and only the projections its mode does not
    save, told apart by width: fast none; lean the proj of a trained block and the qkv, proj
    and fc1 of a frozen one; fc2 never (no trained LayerScale here). In both forms (the
    autograd function, and the selective checkpointing that compiled models run), with plain
    autograd's gradients."""
    base = tiny(dtype=torch.float64, depth=6)
    cfg = dict(train_blocks=[2, 5], drop_at=[1, 3, 4])   # 2, 5 trained, 3, 4 frozen
    ref = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode="autograd", **cfg)
    got = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=mode, **cfg)
    checkpointed = run_checkpointed(got) if form == "checkpointed" else None
    x = images(dtype=torch.float64)
    ref(x).square().sum().backward()
    loss = got(x).square().sum()
    with OpLog() as log:
        loss.backward()
    drops, projections = _drops_and_projections(log)
    assert checkpointed in (None, [2, 3, 4, 5])
    c = 48   # tiny()'s width: qkv 3c, proj c, fc1 4c
    widths = Counter(out.shape[-1] for out in projections)
    assert widths == (Counter() if mode == "fast" else Counter({c: 4, 3 * c: 2, 4 * c: 2})), widths
    assert "drop_tokens" not in drops, drops
    assert drops["drop_tokens_backward"] == 2   # the two fused drops that need one (3, 4)
    if form == "eager":
        assert drops["drop_tokens_replay"] == 2
    gr, gg = grads(ref), grads(got)
    assert set(gr) == set(gg) and gr
    for n in gr:
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_replaying_dropout_leaves_the_random_stream_as_plain_autograd(mode):
    """A lean/fast backward that replays dropout from the forward's generator state puts the
    state back afterwards: what the program draws next (the next batch's masks, a shuffle) is
    what it draws after plain autograd's backward, not a rewound stream."""
    base = tiny(depth=6)
    draws = {}
    for m in ("autograd", mode):
        model = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=m, train_blocks=[2, 5])
        for i in (3, 5):   # a frozen and a trained block after the first trained one
            model.blocks[i].mlp.drop1.p = 0.5
        model.train()
        torch.manual_seed(11)
        model(images()).square().sum().backward()
        draws[m] = torch.rand(8)
    assert torch.equal(draws[mode], draws["autograd"])


def test_lean_backward_of_a_moe_block_leaves_the_task_set_since():
    """The lean backward of a MoE block, which replays with the forward's task, gives the block
    back the task set between forward and backward (the next forward routes with it)."""
    model = bsr_kernels.to_moe(tiny(depth=4), num_experts=2, top_k=1, num_tasks=2)
    bsr_kernels.reprogram(model, memory_mode="lean")
    moes = [m for m in model.modules() if getattr(m, "bsr_moe", False)]
    assert moes and all(m.task == 0 for m in moes)
    loss = model(images()).square().sum()
    for m in moes:
        m.task = 1
    loss.backward()
    assert [m.task for m in moes] == [1] * len(moes)


@pytest.mark.parametrize("mode", ["fast", "lean"])
@pytest.mark.parametrize("change", ["drop_at", "fuse_token", "num_prefix_tokens"])
def test_other_drop_roles_or_settings_before_backward_raise(mode, change):
    """Between forward and backward, blocks that drop elsewhere (the same keep_rate), another
    fuse_token, or another prefix count in the config the blocks read: the replay would not
    be the forward, so backward raises naming what happened (not a shape error from inside,
    or a silently different gradient)."""
    model = bsr_kernels.reprogram(tiny(), memory_mode=mode)
    loss = model(images()).square().sum()
    if change == "num_prefix_tokens":
        cfg = dataclasses.replace(model.bsr_config, num_prefix_tokens=2)
        for blk in model.blocks:
            blk.bsr_config = cfg
    else:
        other = {"drop_at": (4, 8, 10), "fuse_token": False}[change]
        bsr_kernels.reprogram(model, memory_mode=mode, **{change: other})
    with pytest.raises(RuntimeError, match=r"block \d* ?was restored \(bsr_kernels.restore"
                                           r"\) or reprogrammed .* call backward first"):
        loss.backward()


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_backward_under_autocast_replays_the_forwards_precision(mode):
    """A forward run without autocast, its backward called inside a ``torch.autocast``
    region: the replay recomputes the forward as it ran, in float32 (the projections a lean
    backward runs again are float32 matmuls), not in the bf16 of the backward's region."""
    model = bsr_kernels.reprogram(tiny(depth=6), memory_mode=mode, train_blocks=[2, 5])
    loss = model(images()).square().sum()
    with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        loss.backward()
    dtypes = [out.dtype for out in _drops_and_projections(log)[1]]
    assert dtypes == ([] if mode == "fast" else [torch.float32] * len(dtypes))
    assert mode == "fast" or dtypes   # lean recomputes projections (test above)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_attention_and_second_mlp_dropout_give_exact_gradients(mode):
    """Dropout on attention probabilities (attn_drop, which SDPA draws) and after fc2 (drop2),
    turned on after reprogram, count as random too: the replay draws the forward's masks, so
    gradients equal plain autograd's with the same seed (the dropout test above turns on
    drop1 and proj_drop only)."""
    base = tiny(dtype=torch.float64, depth=6)
    got = {}
    for m in ("autograd", mode):
        model = bsr_kernels.reprogram(copy.deepcopy(base), memory_mode=m, train_blocks=[2, 5])
        model.blocks[3].attn.attn_drop.p = 0.4   # a frozen block, then a trained one
        model.blocks[5].mlp.drop2.p = 0.5
        model.train()
        torch.manual_seed(5)
        model(images(dtype=torch.float64)).square().sum().backward()
        got[m] = grads(model)
    assert set(got[mode]) == set(got["autograd"]) and got[mode]
    for n, g in got["autograd"].items():
        torch.testing.assert_close(got[mode][n], g, rtol=1e-9, atol=1e-12, msg=n)
