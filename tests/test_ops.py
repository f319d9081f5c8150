"""Cross-backend tests of the token-drop ops ``bsr_kernels.drop_tokens`` / ``cls_attention``.

Generated over every backend the dispatcher knows (``backend_params``): a backend that cannot run
on a device/dtype shows up as a skip with its reasons. Each backend is forced with
``BSR_BACKEND`` and compared with the pure-PyTorch definition (``bsr_kernels.ops.reference``) for
values, and with autograd through that definition for gradients. Every case runs twice and must
give bit-identical results.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bsr_kernels
from bsr_kernels import _config
from bsr_kernels.ops import dispatch, reference
from bsr_kernels.ops.common import compute_dtype, num_kept
from bsr_kernels.ops.dispatch import (_reasons, all_backends, available_backends, get_backend,
                                      select_backend)

from _backends import (BACKEND_NAMES, DEVICES, GRAD_ABS_FLOOR, GRAD_REL_FLOOR, SCORE_TOL,
                       TIE_TOL, VALUE_TOL, DropCase, OpLog, assert_drop_matches,
                       assert_grads_accurate, assert_kept_matches, assert_valid_kept,
                       backend_params, examples, expected_from_kept, float64_leaves, gradcheck,
                       grads_of, is_slow, make_inputs, nan_padded, reference_drop,
                       resolved_scale, timm_qk)

CPU = torch.device("cpu")
ALL = backend_params()
F64 = backend_params(dtypes=(torch.float64,))
F32 = backend_params(dtypes=(torch.float32,))
CPU_F32 = backend_params(devices=("cpu",), dtypes=(torch.float32,))


# --- helpers ----------------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Bit-identical tensors (NaN equal to NaN), or equal non-tensors."""
    if isinstance(a, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0),
                                     torch.nan_to_num(b, 7.0, 8.0, 9.0)))
                and bool(torch.equal(a.isnan(), b.isnan())))
    return a == b


def twice(fn):
    """Runs ``fn`` twice and asserts the two results are bit-identical (determinism)."""
    first, second = fn(), fn()
    flat1 = first if isinstance(first, (tuple, list)) else (first,)
    flat2 = second if isinstance(second, (tuple, list)) else (second,)
    assert len(flat1) == len(flat2)
    for i, (a, b) in enumerate(zip(flat1, flat2)):
        assert _same(a, b), f"output {i} differs between two identical runs"
    return first


def drop(x, q, k, case: DropCase):
    return bsr_kernels.drop_tokens(x, q, k, case.keep_rate, case.fuse, case.p, case.scale)


def seeded_like(shape, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def check_values(case: DropCase, device, dtype):
    """Forward values of both ops vs the definition, twice."""
    x, q, k = make_inputs(case, device, dtype)
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert_drop_matches(x_out, kept, x, q, k, case, dtype)
    scores = twice(lambda: bsr_kernels.cls_attention(q, k, case.scale, case.p))
    want = reference.cls_scores(q, k, resolved_scale(case.scale, case.d), case.p)[0]
    assert scores.dtype == want.dtype and scores.shape == (case.b, case.m)
    torch.testing.assert_close(scores, want, **SCORE_TOL[dtype])


def check_grads(case: DropCase, device, dtype):
    """Gradients of both ops to x, q, k vs autograd through the definition, twice.

    The backend's kept set (checked against the definition, near-ties allowed) is replayed in a
    float64 evaluation of the definition; see ``assert_grads_accurate`` for the rule.
    """
    x, q, k = make_inputs(case, device, dtype, requires_grad=True)
    inputs = (x, q, k)
    scale = resolved_scale(case.scale, case.d)

    def run():
        out, kept = drop(x, q, k, case)
        g = seeded_like(out.shape, dtype, device, case.seed)
        return (out, kept, g, *grads_of(out, inputs, g))

    out, kept, g, *got = twice(run)
    ref_out, ref_kept, ref_scores, _ = reference_drop(x, q, k, case)
    assert_kept_matches(kept, ref_kept, ref_scores, TIE_TOL[dtype])
    if not torch.equal(kept, ref_kept):  # a near-tie swapped tokens: follow the backend's choice
        ref_out = expected_from_kept(x, ref_scores, kept, case.p, case.fuse)
    x6, q6, k6 = float64_leaves(x, q, k)
    out6 = expected_from_kept(x6, reference.cls_scores(q6, k6, scale, case.p)[0], kept, case.p,
                              case.fuse)
    assert_grads_accurate(got, grads_of(out6, (x6, q6, k6), g.double()),
                          grads_of(ref_out, inputs, g), ("x", "q", "k"), dtype)

    gs = seeded_like((case.b, case.m), compute_dtype(dtype), device, case.seed + 1)
    got = twice(lambda: grads_of(bsr_kernels.cls_attention(q, k, case.scale, case.p), (q, k), gs))
    ref = grads_of(reference.cls_scores(q, k, scale, case.p)[0], (q, k), gs)
    want = grads_of(reference.cls_scores(q6, k6, scale, case.p)[0], (q6, k6), gs.double())
    # the size of the terms the q and k gradients of the scores sum (scale * |k or q| * |gs|)
    terms = abs(scale) * float(torch.maximum(q.detach().abs().max(), k.detach().abs().max())
                               * gs.abs().max())
    assert_grads_accurate(got, want, ref, ("q", "k"), dtype, term_scale=terms)


@st.composite
def drop_cases(draw, max_n: int = 40):
    """B 1..3, H 1..4, N 2..40, d 1..16, C 1..24, P in {1, 2, 5} (< N), keep_rate in (0, 1]."""
    n = draw(st.integers(2, max_n))
    return DropCase(
        b=draw(st.integers(1, 3)), h=draw(st.integers(1, 4)), n=n, d=draw(st.integers(1, 16)),
        c=draw(st.integers(1, 24)), p=draw(st.sampled_from([p for p in (1, 2, 5) if p < n])),
        keep_rate=draw(st.floats(0.0, 1.0, exclude_min=True)), fuse=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, 0.3, 2.0])),
        spread=draw(st.sampled_from([0.1, 1.0, 3.0])), seed=draw(st.integers(0, 2 ** 31 - 1)))


def separated_case(case: DropCase, dtype=torch.float64, gap: float = 1e-3) -> DropCase:
    """The first seed from ``case.seed`` on whose kept/dropped boundary scores differ by > gap,
    so that finite differences (gradcheck) cannot flip the selection."""
    for seed in range(case.seed, case.seed + 200):
        c = DropCase(**{**case.__dict__, "seed": seed})
        x, q, k = make_inputs(c, CPU, dtype)
        s = reference.cls_scores(q, k, resolved_scale(c.scale, c.d), c.p)[0]
        top = s.sort(dim=1, descending=True).values
        if c.n_keep == c.m or bool((top[:, c.n_keep - 1] - top[:, c.n_keep] > gap).all()):
            return c
    raise AssertionError("no well separated seed found")


# --- backends -----------------------------------------------------------------------------------

def test_known_backends_are_listed():
    assert set(all_backends()) >= {"reference", "cpp", "triton"}
    all_backends().clear()  # a caller's copy: the dispatcher's registry is not changed by it
    assert set(all_backends()) >= {"reference", "cpp", "triton"}
    assert get_backend("reference").name == "reference"
    assert "reference" in available_backends("cpu", torch.float32)
    assert "reference" in available_backends("cpu", torch.float64)
    assert bsr_kernels.available_backends() == available_backends()


def test_cpp_backend_is_built():
    """CI builds the C++ extension, so there the cpp backend must not be skipped."""
    if os.environ.get("BSR_ALLOW_NO_CPP") == "1":
        pytest.skip("BSR_ALLOW_NO_CPP=1: the C++ extension is allowed to be missing")
    reasons = get_backend("cpp").not_supported_reasons(CPU, torch.float32)
    assert "cpp" in available_backends("cpu"), (
        f"the cpp backend is unavailable on CPU ({'; '.join(reasons)}); build it with "
        "`pip install --no-build-isolation -e .`, or set BSR_ALLOW_NO_CPP=1 to allow this")


def test_a_stub_extension_module_makes_cpp_unavailable_not_an_import_error(monkeypatch):
    """A ``bsr_kernels.ops._C`` in sys.modules without a __spec__ (a stub, as mocking leaves)
    makes find_spec raise ValueError: loading the cpp backend module then warns and reports the
    backend unavailable, with the build command, instead of failing the import."""
    import importlib.util
    import sys
    import types

    from bsr_kernels.ops import cpp
    monkeypatch.setitem(sys.modules, "bsr_kernels.ops._C", types.ModuleType("bsr_kernels.ops._C"))
    spec = importlib.util.spec_from_file_location("bsr_kernels.ops._cpp_probe", cpp.__file__)
    probe = importlib.util.module_from_spec(spec)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        spec.loader.exec_module(probe)
    assert probe.extension_error().startswith("ValueError"), probe.extension_error()
    reasons = probe.CppBackend().not_supported_reasons(CPU, torch.float32)
    assert len(reasons) == 1 and "ValueError" in reasons[0] and cpp.BUILD_COMMAND in reasons[0]


def test_triton_interpret_set_before_kernels_were_defined(monkeypatch):
    """conftest.py must set TRITON_INTERPRET before triton.language is imported and before any
    kernel is defined: ``triton.jit`` picks compiler or interpreter at decoration time, and the
    standard library (``tl.sum``, ...) is decorated when ``triton.language`` is first imported."""
    if not _config.triton_interpret():
        pytest.skip("TRITON_INTERPRET is off (CUDA present, or turned off in the environment): "
                    "no interpreted Triton here")
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert isinstance(tl.sum, InterpretedFunction), (
        "triton.language was imported before TRITON_INTERPRET=1 was set: its standard library "
        "is compiled-mode only")
    # The kernels are wrapped per mode inside a cache (triton_backend._kernels), so no module
    # attribute shows their kind: record what a forward and backward through the public API
    # actually launch, and require every kernel to be the interpreted kind.
    from bsr_kernels.ops import _triton_kernels, triton_backend

    if triton_backend.interpreter_problem():
        pytest.skip(triton_backend.interpreter_problem())
    launched = {}
    real = triton_backend._kernel

    def spy(name):
        launched[name] = real(name)
        return launched[name]

    monkeypatch.setattr(triton_backend, "_kernel", spy)
    case = DropCase(b=1, h=1, n=5, d=2, c=3)
    x, q, k = make_inputs(case, CPU, torch.float32, requires_grad=True)
    out = bsr_kernels.drop_tokens(x, q, k, 0.5, backend="triton")[0]
    out.sum().backward()
    bsr_kernels.drop_tokens(x, q, k, 0.5, fuse_token=False, backend="triton")[0].sum().backward()
    assert sorted(launched) == sorted(_triton_kernels.KERNELS), sorted(launched)
    kinds = {name: type(fn).__name__ for name, fn in launched.items()}
    assert all(isinstance(fn, InterpretedFunction) and not isinstance(fn, JITFunction)
               for fn in launched.values()), f"launched compiled kernels on CPU: {kinds}"


def test_assert_kept_matches_catches_duplicates_and_wrong_sets():
    """The helper behind check_grads and the value checks: a repeated index standing in for a
    missing one, an unordered or out-of-range row, a wrong count or a non-tied swap fails; a
    swap of tied candidates passes."""
    scores = torch.tensor([[0.1, 0.5, 0.4, 0.3]], dtype=torch.float64)
    ref = torch.tensor([[1, 2]])
    assert_kept_matches(torch.tensor([[1, 2]]), ref, scores, 1e-6)
    for bad in ([[1, 1]], [[2, 2]], [[2, 1]], [[1, 4]], [[-1, 1]], [[0, 1]], [[1, 2, 3]],
                [[1]]):
        with pytest.raises(AssertionError):
            assert_kept_matches(torch.tensor(bad), ref, scores, 1e-6)
    with pytest.raises(AssertionError):
        assert_kept_matches(torch.tensor([[1.0, 2.0]]), ref, scores, 1e-6)
    tied = torch.tensor([[0.1, 0.5, 0.4, 0.4]], dtype=torch.float64)
    assert_kept_matches(torch.tensor([[1, 3]]), ref, tied, 1e-6)


# --- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_values_random_shapes(backend):
    """x_out, kept sets and scores on hypothesis-generated shapes."""

    @settings(max_examples=examples(backend.name, backend.device, 40, 8))
    @given(case=drop_cases(max_n=40 if backend.name != "triton" else 24))
    def check(case):
        check_values(case, backend.device, backend.dtype)

    check()


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("n", [2, 3, 15, 31])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_values_odd_sizes(backend, n, fuse):
    keep_rates = (0.25,) if is_slow(backend.name, backend.device) else (0.5, 0.25, 0.9)
    for p in (1, 2, 5):
        if p >= n:
            continue
        for keep_rate in keep_rates:
            case = DropCase(b=3, h=3, n=n, d=3, c=15, p=p, keep_rate=keep_rate, fuse=fuse,
                            seed=n * 10 + p)
            check_values(case, backend.device, backend.dtype)


def test_num_kept_is_ceil():
    """n_keep = ceil(keep_rate * (N - P)), robust to float noise, at least 1."""
    assert num_kept(0.5, 196) == 98
    # float noise above an integer keeps that integer (rounded to 6 decimals first):
    assert 0.07 * 100 > 7 and num_kept(0.07, 100) == 7
    rate32 = float(torch.tensor(0.3))   # a keep_rate through float32: 0.30000001192092896
    assert rate32 * 10 > 3 and num_kept(rate32, 10) == 3
    # a real fraction above it still rounds up, in the op too
    assert num_kept(0.50001, 10) == 6 and num_kept(0.5001, 10) == 6
    x, q, k = make_inputs(DropCase(b=1, h=2, n=11, d=3, c=4), "cpu", torch.float32)
    assert bsr_kernels.drop_tokens(x, q, k, 0.50001)[1].shape == (1, 6)
    assert bsr_kernels.drop_tokens(x, q, k, rate32 + 0.2)[1].shape == (1, 5)  # 5.0000001
    assert num_kept(0.7, 10) == 7
    assert num_kept(0.51, 196) == 100
    assert num_kept(1e-9, 5) == 1
    assert num_kept(1.0, 7) == 7
    for m in range(1, 60):
        for i in range(1, 20):
            rate = i / 20
            assert num_kept(rate, m) == max(1, -(-(i * m) // 20)), (rate, m)


@pytest.mark.parametrize("backend", CPU_F32, indirect=True)
def test_vit_b_token_counts(backend):
    """ViT-B/16 at 224 px: 197 tokens -> 100 -> 52 -> 28 with keep_rate 0.5 and fusion."""
    x, q, k = make_inputs(DropCase(b=1, h=1, n=197, d=2, c=3), backend.device, backend.dtype)
    counts = []
    for _ in range(3):
        x, _ = bsr_kernels.drop_tokens(x, q, k, 0.5)
        counts.append(x.shape[1])
        _, q, k = make_inputs(DropCase(b=1, h=1, n=x.shape[1], d=2, c=3, seed=len(counts)),
                              backend.device, backend.dtype)
    assert counts == [100, 52, 28]


# --- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_grads_random_shapes(backend):
    """Gradients to x, q and k vs autograd through the reference, on hypothesis shapes."""

    @settings(max_examples=examples(backend.name, backend.device, 25, 5))
    @given(case=drop_cases(max_n=40 if backend.name != "triton" else 24))
    def check(case):
        check_grads(case, backend.device, backend.dtype)

    check()


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("n", [3, 15, 31])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_grads_odd_sizes(backend, n, fuse):
    for p in (1, 2, 5):
        if p < n:
            check_grads(DropCase(b=2, h=3, n=n, d=3, c=15, p=p, fuse=fuse, seed=n + p),
                        backend.device, backend.dtype)


def _fast_gradcheck(backend) -> bool:
    return is_slow(backend.name, backend.device)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", F64, indirect=True)
def test_gradcheck_drop_tokens(backend, fuse, p):
    """torch.autograd.gradcheck through the public drop_tokens (selection kept away from ties).

    The Triton interpreter is slow on CPU: it gets gradcheck's fast mode (a random projection of
    the Jacobian); full Jacobians of every backend are compared with the reference elsewhere."""
    case = separated_case(DropCase(b=2, h=2, n=7, d=2, c=3, p=p, keep_rate=0.5, fuse=fuse))
    x, q, k = make_inputs(case, backend.device, torch.float64, requires_grad=True)
    assert gradcheck(lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5, fuse, p)[0],
                     (x, q, k), _fast_gradcheck(backend))


VIT_B_FAST = (backend_params(devices=("cpu",), dtypes=(torch.float32,), names=("cpp",))
              + backend_params(devices=("cuda",), dtypes=(torch.float32,), names=("triton",)))


@pytest.mark.parametrize("layout", ["timm-views", "contiguous"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", VIT_B_FAST, indirect=True)
def test_vit_b_size_values_and_grads(backend, fuse, layout):
    """ViT-B at 224 px (H=12, N=197, d=64, C=768), q and k as views of timm's qkv tensor or
    contiguous: the row lengths and strides at which the kernels take their vector paths (the C++
    streaming stores and K prefetch; the Triton tiles), against the float64 definition on the
    backend's own selection, values and gradients to x and to the tensor q and k come from."""
    b, n, h, d = 2, 197, 12, 64
    case = DropCase(b=b, h=h, n=n, d=d, c=h * d, fuse=fuse, seed=3)
    qkv, q, k = timm_qk(b, n, h, d, backend.device, backend.dtype, seed=3, requires_grad=True)
    src = qkv
    if layout == "contiguous":
        q, k = (t.detach().contiguous().requires_grad_() for t in (q, k))
        src = None
    x = seeded_like((b, n, h * d), backend.dtype, backend.device, 3).requires_grad_()
    wrt = (x, qkv) if src is not None else (x, q, k)

    def run():
        out, kept = drop(x, q, k, case)
        g = seeded_like(out.shape, backend.dtype, backend.device, 4)
        return (out, kept, g, *grads_of(out, wrt, g))

    out, kept, g, *got = twice(run)
    ref_out, ref_kept, ref_scores, _ = reference_drop(x, q, k, case)
    assert_kept_matches(kept, ref_kept, ref_scores, TIE_TOL[backend.dtype])
    assert_drop_matches(out, kept, x.detach(), q.detach(), k.detach(), case, backend.dtype)
    wrt6 = float64_leaves(*wrt)
    if src is not None:
        x6, qkv6 = wrt6
        q6, k6, _ = qkv6.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        x6, q6, k6 = wrt6
    out6 = expected_from_kept(x6, reference.cls_scores(q6, k6, d ** -0.5, 1)[0], kept, 1, fuse)
    ref = expected_from_kept(x, ref_scores, kept, 1, fuse)
    assert_grads_accurate(got, grads_of(out6, wrt6, g.double()), grads_of(ref, wrt, g),
                          [f"grad {i}" for i in range(len(wrt))], backend.dtype)


@pytest.mark.parametrize("backend", F64, indirect=True)
def test_gradcheck_drop_tokens_timm_views(backend):
    """gradcheck with q and k as non-contiguous views of one qkv tensor, as timm makes them."""
    b, n, h, d = 2, 7, 2, 2
    for seed in range(50):
        qkv, q, k = timm_qk(b, n, h, d, backend.device, torch.float64, seed=seed)
        s = reference.cls_scores(q, k, d ** -0.5, 1)[0].sort(dim=1, descending=True).values
        if bool((s[:, 2] - s[:, 3] > 1e-3).all()):  # keep 3 of 6: boundary well separated
            break
    else:
        raise AssertionError("no well separated seed found")
    qkv.requires_grad_()
    x = seeded_like((b, n, 3), torch.float64, backend.device, seed).requires_grad_()

    def fn(x, qkv):
        q, k, _ = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return bsr_kernels.drop_tokens(x, q, k, 0.5)[0]

    assert gradcheck(fn, (x, qkv), _fast_gradcheck(backend))


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_replay_with_nothing_dropped_keeps_the_given_order(backend):
    """keep_rate 1 with ``kept=``: the no-op shortcut ran before the replay, so x came back
    unreordered and kept as arange, not the selection given."""
    case = DropCase(b=2, h=2, n=9, d=4, c=3, p=1, keep_rate=1.0, fuse=True, seed=5)
    x, q, k = make_inputs(case, backend.device, backend.dtype, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    order = torch.stack([torch.randperm(case.m, generator=g) for _ in range(case.b)])
    order = order.to(backend.device)
    out, kept = bsr_kernels.drop_tokens(x, q, k, 1.0, True, case.p, kept=order.int())
    assert kept.dtype == torch.int64 and torch.equal(kept, order)
    want = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, order[..., None].expand(-1, -1, 3))],
                     1)
    assert out.shape == (case.b, case.n, case.c) and torch.equal(out, want)
    gout = torch.randn(out.shape, generator=g).to(out)
    gx, = torch.autograd.grad(out, x, gout)
    torch.testing.assert_close(gx, torch.autograd.grad(want, x, gout)[0])


@pytest.mark.parametrize("p", [1, 5])
@pytest.mark.parametrize("backend", F64, indirect=True)
def test_gradcheck_cls_attention(backend, p):
    case = DropCase(b=2, h=2, n=7, d=3, c=1, p=p)
    _, q, k = make_inputs(case, backend.device, torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k: bsr_kernels.cls_attention(q, k, num_prefix_tokens=p), (q, k),
                     _fast_gradcheck(backend))
    assert gradcheck(
        lambda q, k: bsr_kernels.cls_attention(q, k, scale=0.7, num_prefix_tokens=p), (q, k),
        _fast_gradcheck(backend))


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", F64, indirect=True)
def test_gradcheck_replay(backend, fuse, p):
    """torch.autograd.gradcheck through a replay (``kept=``): a given selection that is not the
    rule's, so no tie can flip it; gradients reach x through the kept and fused rows and q, k
    through the fusion weights. The Triton interpreter gets fast mode, as above, x apart from
    q and k."""
    case = DropCase(b=2, h=2, n=8, d=2, c=3, p=p, keep_rate=0.4, fuse=fuse, seed=17)
    x, q, k = make_inputs(case, backend.device, torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(10 + p)
    kept = torch.stack([torch.randperm(case.m, generator=g)[:case.n_keep].sort().values
                        for _ in range(case.b)]).to(backend.device)
    rule = reference_drop(x, q, k, case)[1]
    assert not torch.equal(kept, rule), "the replayed selection should not be the rule's"

    def fn(x, q, k):
        return bsr_kernels.drop_tokens(x, q, k, case.keep_rate, fuse, p, kept=kept)[0]

    assert gradcheck(fn, (x, q, k), _fast_gradcheck(backend))


# --- edge cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_two_tokens_is_identity(backend):
    """N=2: one candidate, always kept: x comes back unchanged, no fused token."""
    for fuse in (True, False):
        case = DropCase(b=2, h=2, n=2, d=3, c=5, keep_rate=0.01, fuse=fuse)
        x, q, k = make_inputs(case, backend.device, backend.dtype)
        x_out, kept = twice(lambda: drop(x, q, k, case))
        assert torch.equal(x_out, x)
        assert kept.tolist() == [[0], [0]]
        check_grads(case, backend.device, backend.dtype)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("n,p", [(2, 1), (7, 3), (9, 1)], ids=["N2", "N7-P3", "N9"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_kernels_when_nothing_is_dropped(backend, n, p, fuse):
    """n_keep == M (N=2 has a single candidate; here also every candidate of N=7 with 3 prefix
    tokens and of N=9): the public drop_tokens returns x without calling a backend, so the
    backend's kernels are called here directly (drop_forward, drop_replay, gather_backward,
    cls_scores, cls_scores_backward), and through the registered ops with the backend's name
    (forward and autograd backward), against the definition and autograd through it. No fused
    token is appended, so drop_backward (the backward of a fused drop) never applies."""
    name, device, dtype = backend.name, backend.device, backend.dtype
    impl = get_backend(name)
    m = n - p
    case = DropCase(b=2, h=2, n=n, d=3, c=5, p=p, keep_rate=1.0, fuse=fuse, seed=40 + n)
    assert case.n_keep == m
    x, q, k = make_inputs(case, device, dtype, requires_grad=True)
    scale = resolved_scale(None, case.d)
    with torch.no_grad():
        r_out, r_kept, r_scores, r_lse = reference.drop_tokens(x, q, k, scale, p, m, fuse)
        out, kept, scores, lse = twice(lambda: impl.drop_forward(x, q, k, scale, p, m, fuse))
        assert kept.dtype == torch.int32 and torch.equal(kept.long(), r_kept)
        assert r_kept.tolist() == [list(range(m))] * 2
        assert out.shape == r_out.shape == x.shape and torch.equal(out, x)
        assert scores.dtype == r_scores.dtype and lse.dtype == r_lse.dtype
        torch.testing.assert_close(scores, r_scores, **SCORE_TOL[dtype])
        torch.testing.assert_close(lse, r_lse, **SCORE_TOL[dtype])
        replayed, scores2, lse2 = twice(lambda: impl.drop_replay(x, q, k, kept, scale, p, fuse))
        assert torch.equal(replayed, x)
        torch.testing.assert_close(scores2, r_scores, **SCORE_TOL[dtype])
        torch.testing.assert_close(lse2, r_lse, **SCORE_TOL[dtype])
        g = seeded_like(x.shape, dtype, device, n)
        gx = twice(lambda: impl.gather_backward(g, kept, n, p))
        assert torch.equal(gx, g) and torch.equal(gx, reference.gather_backward(g, kept, n, p))
        s, lse1 = impl.cls_scores(q, k, scale, p)
        torch.testing.assert_close(s, r_scores, **SCORE_TOL[dtype])
        torch.testing.assert_close(lse1, r_lse, **SCORE_TOL[dtype])
        gs = seeded_like(s.shape, s.dtype, device, n + 1)
        got_cls = impl.cls_scores_backward(gs, q, k, lse1, scale, p)
    x6, q6, k6 = float64_leaves(x, q, k)
    ref_cls = grads_of(reference.cls_scores(q, k, scale, p)[0], (q, k), gs)
    want_cls = grads_of(reference.cls_scores(q6, k6, scale, p)[0], (q6, k6), gs.double())
    assert_grads_accurate(got_cls, want_cls, ref_cls, ("q", "k"), dtype)

    ops = torch.ops.bsr_kernels
    out, kept, _, _ = ops.drop_tokens(x, q, k, scale, p, m, fuse, name)
    assert torch.equal(out, x) and torch.equal(kept.long(), r_kept)
    replayed = ops.drop_tokens_replay(x, q, k, kept, scale, p, fuse, name)[0]
    assert torch.equal(replayed, x)
    ref_out = reference.drop_tokens(x, q, k, scale, p, m, fuse)[0]
    want = grads_of(ref_out, (x, q, k), g)
    assert torch.equal(want[0], g) and not want[1].any() and not want[2].any()
    for got in (grads_of(out, (x, q, k), g), grads_of(replayed, (x, q, k), g)):
        for a, w in zip(got, want):
            assert torch.equal(a, w)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_three_tokens_drops_one(backend):
    case = DropCase(b=3, h=2, n=3, d=3, c=5, keep_rate=0.5, fuse=True, seed=3)
    x, q, k = make_inputs(case, backend.device, backend.dtype)
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert x_out.shape == (3, 3, 5)  # CLS, the kept token, the fused token
    assert_drop_matches(x_out, kept, x, q, k, case, backend.dtype)
    check_grads(case, backend.device, backend.dtype)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_single_kept_token(backend, fuse):
    case = DropCase(b=2, h=3, n=15, d=4, c=6, keep_rate=1e-6, fuse=fuse, seed=5)
    assert case.n_keep == 1
    x, q, k = make_inputs(case, backend.device, backend.dtype)
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert x_out.shape == (2, 1 + 1 + int(fuse), 6)
    assert_drop_matches(x_out, kept, x, q, k, case, backend.dtype)
    check_grads(case, backend.device, backend.dtype)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_replay_of_a_given_selection(backend, fuse):
    """``kept=`` replays a recorded selection: the backend's own selection gives back its forward
    (bit for bit; the C++ backend replays with the reference formulation, so its fused row may
    round differently); any other selection (random, so not the rule's), ascending or in another
    order, gives the definition's output for it (kept rows in its order), and gradients through
    its fusion weights match the definition's."""
    case = DropCase(b=3, h=2, n=23, d=4, c=5, p=2, keep_rate=0.4, fuse=fuse, seed=11)
    x, q, k = make_inputs(case, backend.device, backend.dtype, requires_grad=True)
    out, kept = drop(x, q, k, case)
    replayed, same = twice(lambda: bsr_kernels.drop_tokens(
        x, q, k, case.keep_rate, fuse, case.p, case.scale, kept=kept.to(torch.int32)))
    assert same.dtype == torch.int64 and torch.equal(same, kept.long())   # as documented
    if backend.name == "cpp":
        assert _same(replayed[:, :case.p + case.n_keep], out[:, :case.p + case.n_keep])
        torch.testing.assert_close(replayed, out, **VALUE_TOL[backend.dtype])
    else:
        assert _same(replayed, out)
    g = torch.Generator().manual_seed(3)
    picks = [torch.randperm(case.m, generator=g)[:case.n_keep] for _ in range(case.b)]
    for other in (torch.stack([p.sort().values for p in picks]), torch.stack(picks)):
        other = other.to(backend.device)
        assert not torch.equal(other, kept.cpu().to(other.device))
        got_out = bsr_kernels.drop_tokens(x, q, k, case.keep_rate, fuse, case.p, case.scale,
                                          kept=other)[0]
        scale = resolved_scale(case.scale, case.d)
        want_out = expected_from_kept(x, reference.cls_scores(q, k, scale, case.p)[0], other,
                                      case.p, fuse)
        torch.testing.assert_close(got_out, want_out, **VALUE_TOL[backend.dtype])
        gout = torch.randn(got_out.shape, generator=g).to(got_out)
        x6, q6, k6 = float64_leaves(x, q, k)
        out6 = expected_from_kept(x6, reference.cls_scores(q6, k6, scale, case.p)[0], other,
                                  case.p, fuse)
        assert_grads_accurate(grads_of(got_out, (x, q, k), gout),
                              grads_of(out6, (x6, q6, k6), gout.double()),
                              grads_of(want_out, (x, q, k), gout), ("x", "q", "k"),
                              backend.dtype)
    assert not (other.diff(dim=1) > 0).all()   # the second selection was not ascending


@pytest.mark.parametrize("p", [1, 5])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_prefix_tokens_kept_first(backend, p):
    """Prefix tokens come first, unchanged, and are never candidates (softmax still spans them)."""
    case = DropCase(b=2, h=2, n=15, d=4, c=6, p=p, keep_rate=0.4, seed=7)
    x, q, k = make_inputs(case, backend.device, backend.dtype)
    # Make the prefix keys very attractive: they must still not be picked or shift the indices.
    k = k.clone()
    k[:, :, :p] = q[:, :, :1] * 3
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert torch.equal(x_out[:, :p], x[:, :p])
    assert_drop_matches(x_out, kept, x, q, k, case, backend.dtype)
    scores = bsr_kernels.cls_attention(q, k, num_prefix_tokens=p)
    assert scores.shape == (2, 15 - p)
    # The softmax spans the prefix keys, whose mass is not returned.
    assert float(scores.sum(1).max()) < 0.99
    torch.testing.assert_close(scores, reference.cls_scores(q, k, 0.5, p)[0],
                               **SCORE_TOL[backend.dtype])
    check_grads(case, backend.device, backend.dtype)


@pytest.mark.parametrize("p", [1, 3])
def test_reference_scores_are_the_cls_row_of_full_attention(p):
    """The definition against plain N x N attention: the scores are the CLS query's softmax
    probabilities over all keys (prefix included), columns P.. averaged over the heads; lse is
    that row's logsumexp per head. Independent of every backend compared with the definition."""
    case = DropCase(b=2, h=3, n=9, d=4, c=5, p=p, scale=0.7, seed=5)
    _, q, k = make_inputs(case, CPU, torch.float64)
    logits = q @ k.transpose(-1, -2) * 0.7                                   # (B, H, N, N)
    want = torch.softmax(logits, dim=-1)[:, :, 0, p:].mean(dim=1)
    scores, lse = reference.cls_scores(q, k, 0.7, p)
    torch.testing.assert_close(scores, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lse, torch.logsumexp(logits[:, :, 0], dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_keep_rate_one_is_identity(backend, fuse, monkeypatch):
    """Nothing to drop: the op returns x itself, whatever backend is forced, and no kernel runs
    (the kernels' own no-drop case: test_kernels_when_nothing_is_dropped)."""
    case = DropCase(b=2, h=3, n=15, d=4, c=6, keep_rate=1.0, fuse=fuse)
    x, q, k = make_inputs(case, backend.device, backend.dtype, requires_grad=True)
    impl = get_backend(backend.name)
    for method in ("cls_scores", "cls_scores_backward", "drop_forward", "drop_replay",
                   "drop_backward", "gather_backward"):
        monkeypatch.setattr(impl, method, lambda *a, m=method: pytest.fail(f"{m} was called"))
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert x_out.shape == x.shape and torch.equal(x_out, x)  # no fused token
    assert kept.dtype == torch.int64 and kept.tolist() == [list(range(14))] * 2
    g = seeded_like(x.shape, x.dtype, backend.device, 1)
    gx, gq, gk = grads_of(x_out, (x, q, k), g)
    assert torch.equal(gx, g) and not gq.any() and not gk.any()


@pytest.mark.parametrize("p", [1, 5])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_exact_ties_zero_query_keep_lowest_positions(backend, p):
    """q_cls = 0 makes every score equal: the lowest positions are kept."""
    case = DropCase(b=2, h=3, n=15, d=4, c=6, p=p, keep_rate=0.5, seed=11)
    x, q, k = make_inputs(case, backend.device, backend.dtype)
    q = q.clone()
    q[:, :, 0] = 0
    x_out, kept = twice(lambda: drop(x, q, k, case))
    assert kept.tolist() == [list(range(case.n_keep))] * 2
    scores = bsr_kernels.cls_attention(q, k, num_prefix_tokens=p)
    assert bool((scores == scores[:, :1]).all()), "equal logits must give exactly equal scores"
    want = expected_from_kept(x, reference.cls_scores(q, k, 0.5, p)[0], kept, p, True)
    assert torch.equal(x_out[:, :-1], want[:, :-1])
    torch.testing.assert_close(x_out[:, -1], want[:, -1], **VALUE_TOL[backend.dtype])


@pytest.mark.parametrize("pair", [(0, 13), (5, 6), (2, 11)], ids=lambda t: f"{t[0]}-{t[1]}")
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_exact_ties_duplicate_keys_keep_lower_position(backend, pair):
    """Two candidates with identical key rows (in every head) tie exactly; with room for only one
    of them, the lower position is kept."""
    a, b = pair
    case = DropCase(b=1, h=3, n=15, d=4, c=6, seed=20 + a)
    x, q, k = make_inputs(case, backend.device, backend.dtype)
    k = k.clone()
    k[:, :, 1 + b] = k[:, :, 1 + a]
    s = reference.cls_scores(q, k, 0.5, 1)[0][0]
    assert s[a] == s[b]
    above = sorted(int(i) for i in (s > s[a]).nonzero().flatten())
    keep = DropCase(**{**case.__dict__, "keep_rate": (len(above) + 1) / 14})
    assert keep.n_keep == len(above) + 1
    expected = sorted(above + [a])
    assert reference_drop(x, q, k, keep)[1][0].tolist() == expected  # the definition itself
    x_out, kept = twice(lambda: drop(x, q, k, keep))
    assert kept[0].tolist() == expected
    scores = bsr_kernels.cls_attention(q, k)
    assert scores[0, a] == scores[0, b], "identical key rows must give identical scores"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_selection_rule_by_hand(dtype):
    """The definition's rule on scores written by hand: highest first, +inf level with the
    largest finite value, -inf level with the lowest, NaN below all of them, ties to the lower
    position; the dropped mask is the complement of kept. Also a row of 70 equal scores (long
    enough for an unstable sort to reorder ties): the lowest positions are kept."""
    nan, inf = float("nan"), float("inf")
    big, low = torch.finfo(dtype).max, torch.finfo(dtype).min
    scores = torch.tensor([[nan, low, 0.5, big, inf, 0.5, -inf, nan]], dtype=dtype)
    order = [3, 4, 2, 5, 1, 6, 0, 7]  # by hand from the rule above
    for n_keep in range(1, 9):
        kept, dropped = reference.select_tokens(scores, n_keep)
        assert kept.dtype == torch.int64 and kept[0].tolist() == sorted(order[:n_keep]), n_keep
        assert dropped[0].tolist() == [i not in order[:n_keep] for i in range(8)], n_keep
    ties = torch.full((2, 70), 0.25, dtype=dtype)
    ties[1, 50:] = 0.5  # 20 higher scores at the end of row 1, then the lowest positions
    kept = reference.select_tokens(ties, 35)[0]
    assert kept[0].tolist() == list(range(35))
    assert kept[1].tolist() == list(range(15)) + list(range(50, 70))


# --- NaN and inf -------------------------------------------------------------------------------

def _poison(kind: str, x, q, k, p: int):
    """Returns poisoned copies and the batch elements whose scores become all-NaN."""
    q, k = q.clone(), k.clone()
    nan, inf = float("nan"), float("inf")
    if kind == "nan_q_cls":
        q[0, -1, 0, 0] = nan  # one head of batch 0: every logit of that head is NaN
        return x, q, k, [0]
    if kind == "nan_k_row":
        k[1, 0, p + 2, -1] = nan  # one key of batch 1: that head's softmax is NaN everywhere
        return x, q, k, [1]
    if kind == "nan_k_prefix":
        k[0, 0, p - 1, 0] = nan  # prefix keys (CLS, registers) take part in the softmax too
        return x, q, k, [0]
    if kind == "neg_inf_logit":
        k[0, 0, p + 3] = -inf * torch.sign(q[0, 0, 0])  # logit -inf: probability exactly 0
        return x, q, k, []
    if kind == "pos_inf_logit":
        k[0, 0, p + 3] = inf * torch.sign(q[0, 0, 0])
        return x, q, k, None
    if kind == "inf_q_cls":
        q[1, 0, 0, 0] = inf
        return x, q, k, None
    if kind == "nan_q_other_rows":
        q[:, :, 1:] = nan  # only the CLS query row is part of the op
        return x, q, k, []
    if kind == "pos_inf_beside_large":
        # +inf beside a finite logit whose exp overflows (1000 > log(max) in float32 and float64):
        # lse = +inf, so the probability is NaN at the +inf logit and exactly 0 elsewhere
        k[0, 0, p + 3] = inf * torch.sign(q[0, 0, 0])
        k[0, 0, p + 1] = _key_with_logit(q[0, 0, 0], 1000.0)
        return x, q, k, None
    if kind == "pos_inf_prefix":
        # +inf at a prefix key (CLS, register): that head's scores are all 0 (finite), but its
        # NaN prefix probability reaches the q, k gradients through sum_n p_n g_n (g_n = 0 there)
        k[0, 0, p - 1] = inf * torch.sign(q[0, 0, 0])
        k[2, 1, 0] = inf * torch.sign(q[2, 1, 0])
        return x, q, k, []
    if kind == "pos_inf_several":
        # several +inf logits in one head (prefix and candidates) beside -inf and a large finite
        # one; in another batch element two +inf logits beside a -inf prefix logit
        for n in (0, p + 2, p + 5):
            k[0, 0, n] = inf * torch.sign(q[0, 0, 0])
        k[0, 0, p + 4] = -inf * torch.sign(q[0, 0, 0])
        k[0, 0, p + 1] = _key_with_logit(q[0, 0, 0], 1000.0)
        for n in (p + 7, p + 8):
            k[2, 1, n] = inf * torch.sign(q[2, 1, 0])
        k[2, 1, 0] = -inf * torch.sign(q[2, 1, 0])
        return x, q, k, None
    if kind == "all_neg_inf":
        k[1, 1] = -inf * torch.sign(q[1, 1, 0])  # every logit of a head -inf: lse -inf, NaN
        return x, q, k, [1]
    if kind == "neg_inf_first_tile":
        # the first 128 logits of a head -inf (a whole tile of an online logsumexp, BLOCK_N <=
        # 128), the others finite but below -log(max) of the dtype, so that exp(0 - max)
        # overflows: the probabilities are finite. q0 = (2, 0, ...) with scale 1/2 (d = 4)
        # makes the logit exactly k[..., 0]; values are exact binary fractions.
        assert k.shape[-1] == 4 and k.shape[2] > 128
        low = -100.0 if q.dtype == torch.float32 else -1000.0
        q[0, 0, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
        k[0, 0, :128, 0] = -inf
        n_rest = k.shape[2] - 128
        k[0, 0, 128:, 0] = low - torch.arange(n_rest, dtype=k.dtype) % 32 / 8
        return x, q, k, []
    raise ValueError(kind)


def _key_with_logit(q0, logit: float):
    """A key row whose CLS logit with query ``q0`` (scale d^-0.5) is about ``logit``."""
    return q0 * (logit / (q0.shape[-1] ** -0.5 * float((q0 * q0).sum())))


#: Sequence lengths of test_nan_and_inf_inputs other than the default 15.
_POISON_N = {"neg_inf_first_tile": 160}


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("kind", ["nan_q_cls", "nan_k_row", "nan_k_prefix", "neg_inf_logit",
                                  "pos_inf_logit", "inf_q_cls", "nan_q_other_rows",
                                  "pos_inf_beside_large", "pos_inf_prefix", "pos_inf_several",
                                  "all_neg_inf", "neg_inf_first_tile"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_nan_and_inf_inputs(backend, kind, p, fuse):
    """NaN/inf in q or k: valid indices, no crash, and the definition's scores (NaN where it has
    NaN), kept set (NaN ranks as -inf, ties to the lower position) and output, fused row
    included, for every batch element, with one prefix token or several, fused or not. A head
    whose softmax is NaN makes every score of that batch element NaN, so the lowest positions
    are kept there; +inf logits make single NaN scores (inf - inf) among real ones. Gradients
    to x, q and k equal autograd through the definition on the backend's kept set: NaN and inf
    at the same places, the finite entries as accurate (``assert_grads_accurate``)."""
    case = DropCase(b=3, h=2, n=_POISON_N.get(kind, 15), d=4, c=6, p=p, keep_rate=0.5, fuse=fuse,
                    seed=31)
    dtype = backend.dtype
    x, q, k = make_inputs(case, backend.device, dtype)
    if kind == "nan_q_other_rows":
        clean_out, clean_kept = drop(x, q, k, case)
    x, q, k, all_nan = _poison(kind, x, q, k, case.p)
    x, q, k = (t.detach().requires_grad_() for t in (x, q, k))

    def run():
        out, kept = drop(x, q, k, case)
        g = seeded_like(out.shape, dtype, backend.device, 3)
        return (out, kept, g, *grads_of(out, (x, q, k), g))

    x_out, kept, g, *got = twice(run)
    scores = twice(lambda: bsr_kernels.cls_attention(q, k, num_prefix_tokens=case.p)).detach()
    x_out = x_out.detach()
    ref_out, ref_kept, ref_scores, _ = reference_drop(x, q, k, case)
    ref_scores = ref_scores.detach()
    assert_valid_kept(kept, case.b, case.n_keep, case.m)
    assert x_out.shape == ref_out.shape == (case.b, case.p + case.n_keep + int(fuse), case.c)
    torch.testing.assert_close(scores, ref_scores, **SCORE_TOL[dtype], equal_nan=True)
    assert_kept_matches(kept, ref_kept, ref_scores, TIE_TOL[dtype])
    # The rule, applied to the backend's own scores.
    assert_kept_matches(kept, reference.select_tokens(scores, case.n_keep)[0], scores,
                        TIE_TOL[dtype])
    with torch.no_grad():
        want = expected_from_kept(x, ref_scores, kept, case.p, fuse)
    rows = case.p + case.n_keep
    assert torch.equal(x_out[:, :rows], want[:, :rows]), "prefix/kept rows are not copies of x"
    torch.testing.assert_close(x_out[:, rows:], want[:, rows:], **VALUE_TOL[dtype],
                               equal_nan=True)
    # gradients: autograd through the definition replaying the backend's selection
    scale = resolved_scale(case.scale, case.d)
    ref_k = reference.drop_tokens(x, q, k, scale, case.p, case.n_keep, fuse, kept=kept)[0]
    x6, q6, k6 = float64_leaves(x, q, k)
    out6 = reference.drop_tokens(x6, q6, k6, scale, case.p, case.n_keep, fuse, kept=kept)[0]
    assert_grads_accurate(got, grads_of(out6, (x6, q6, k6), g.double()),
                          grads_of(ref_k, (x, q, k), g), ("x", "q", "k"), dtype, nonfinite=True)
    if fuse and kind != "nan_q_other_rows":  # the poison reaches the gradients
        assert not all(bool(t.isfinite().all()) for t in got), "no NaN/inf reached a gradient"
    if kind == "nan_q_other_rows":
        assert torch.equal(kept, clean_kept) and torch.equal(x_out, clean_out)
    if all_nan is None:  # +inf logits: NaN only where inf - inf happens, among real scores
        assert bool(ref_scores.isnan().any()) and not bool(ref_scores.isnan().all(1).any())
        return
    for bi in range(case.b):
        if bi in all_nan:
            assert bool(scores[bi].isnan().all())
            assert kept[bi].tolist() == list(range(case.n_keep))
            # NaN fusion weights make the fused row NaN; copied rows stay finite
            assert bool(x_out[bi, rows:].isnan().all()) and x_out.shape[1] == rows + int(fuse)
            assert not bool(x_out[bi, :rows].isnan().any())
        else:
            assert not bool(scores[bi].isnan().any())
            assert not bool(x_out[bi].isnan().any())


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_nan_beside_pos_inf_in_one_head_and_an_all_neg_inf_head(backend):
    """Two softmax edge cases the kernels handle apart: a head with a NaN logit beside a +inf
    one is NaN everywhere (torch.logsumexp is NaN), so every score of that image is NaN and its
    lowest positions are kept; a max taken over the non-NaN logits alone gives lse = +inf and
    NaN only at those two positions, 0 elsewhere. A head whose logits are all -inf has lse
    -inf and NaN probabilities. The backend's own kernels (scores and lse) and drop_tokens
    (kept set, rows, fused row, NaN gradients where autograd through the definition has
    them) equal the definition."""
    case = DropCase(b=3, h=2, n=12, d=4, c=5, p=1, keep_rate=0.5, fuse=True, seed=13)
    dtype, nan, inf = backend.dtype, float("nan"), float("inf")
    x, q, k = make_inputs(case, backend.device, dtype)
    k = k.clone()
    k[0, 1, 3, 0] = nan                                  # image 0, head 1: a NaN logit ...
    k[0, 1, 7] = inf * torch.sign(q[0, 1, 0])            # ... and a +inf one
    k[2, 0] = -inf * torch.sign(q[2, 0, 0])              # image 2, head 0: every logit -inf
    scale = resolved_scale(None, case.d)
    scores, lse = get_backend(backend.name).cls_scores(q, k, scale, case.p)
    r_scores, r_lse = reference.cls_scores(q, k, scale, case.p)
    assert bool(r_lse[0, 1].isnan()) and float(r_lse[2, 0]) == -inf   # what the case builds
    torch.testing.assert_close(lse, r_lse, **SCORE_TOL[dtype], equal_nan=True)
    torch.testing.assert_close(scores, r_scores, **SCORE_TOL[dtype], equal_nan=True)
    assert bool(scores[0].isnan().all()) and bool(scores[2].isnan().all())
    assert bool(scores[1].isfinite().all())
    x, q, k = (t.detach().requires_grad_() for t in (x, q, k))
    out, kept = drop(x, q, k, case)
    ref_out, ref_kept, _, _ = reference_drop(x, q, k, case)
    assert torch.equal(kept, ref_kept)
    assert kept[0].tolist() == kept[2].tolist() == list(range(case.n_keep))
    assert _same(out[:, :-1], ref_out[:, :-1])
    torch.testing.assert_close(out, ref_out, **VALUE_TOL[dtype], equal_nan=True)
    g = seeded_like(out.shape, dtype, backend.device, 13)
    x6, q6, k6 = float64_leaves(x, q, k)
    out6 = reference.drop_tokens(x6, q6, k6, scale, case.p, case.n_keep, True, kept=kept)[0]
    assert_grads_accurate(grads_of(out, (x, q, k), g),
                          grads_of(out6, (x6, q6, k6), g.double()),
                          grads_of(ref_out, (x, q, k), g), ("x", "q", "k"), dtype,
                          nonfinite=True)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_nonfinite_x_and_fused_row_gradient_reach_the_zero_weights(backend):
    """The fused row is the definition's einsum over every candidate, the kept ones with weight
    0: an inf or NaN in a kept row of x makes that column of the fused row NaN (0 * inf), and
    an inf in the fused row's upstream gradient makes that column of every kept row's x
    gradient NaN, as autograd through the definition gives (a kernel that skips the zero
    weights gives finite values there)."""
    case = DropCase(b=2, h=2, n=11, d=4, c=6, p=2, keep_rate=0.5, fuse=True, seed=9)
    dtype, rows = backend.dtype, case.p + case.n_keep
    x0, q, k = make_inputs(case, backend.device, dtype)
    kept = reference_drop(x0, q, k, case)[1]        # the selection depends on q and k alone
    x = x0.clone()
    x[0, case.p + int(kept[0, 1]), 2] = float("inf")
    x[1, case.p + int(kept[1, 0]), 4] = float("nan")
    out, got_kept = drop(x, q, k, case)
    ref_out = reference_drop(x, q, k, case)[0]
    assert torch.equal(got_kept, kept) and _same(out[:, :rows], ref_out[:, :rows])
    assert bool(ref_out[0, rows, 2].isnan()) and bool(ref_out[1, rows, 4].isnan())
    torch.testing.assert_close(out, ref_out, **VALUE_TOL[dtype], equal_nan=True)

    x, q, k = (t.detach().requires_grad_() for t in (x0, q, k))
    out = drop(x, q, k, case)[0]
    g = seeded_like(out.shape, dtype, backend.device, 9)
    g[0, rows, 3] = float("inf")
    ref = grads_of(reference_drop(x, q, k, case)[0], (x, q, k), g)
    got = grads_of(out, (x, q, k), g)
    assert bool(ref[0][0, case.p + kept[0], 3].isnan().all())   # what the case builds
    x6, q6, k6 = float64_leaves(x, q, k)
    out6 = reference.drop_tokens(x6, q6, k6, resolved_scale(None, case.d), case.p,
                                 case.n_keep, True, kept=kept)[0]
    assert_grads_accurate(got, grads_of(out6, (x6, q6, k6), g.double()), ref, ("x", "q", "k"),
                          dtype, nonfinite=True)


# --- memory layouts ----------------------------------------------------------------------------

@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_timm_qkv_views(backend, fuse):
    """q and k as timm makes them (non-contiguous views of qkv), x a transposed view."""
    b, n, h, d, c = 2, 15, 3, 4, 7
    dtype = backend.dtype
    qkv, q, k = timm_qk(b, n, h, d, backend.device, dtype, seed=3, requires_grad=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    xt = seeded_like((n, b, c), dtype, backend.device, 3).requires_grad_()
    x = xt.transpose(0, 1)
    case = DropCase(b=b, h=h, n=n, d=d, c=c, keep_rate=0.4, fuse=fuse)

    def run():
        out, kept = drop(x, q, k, case)
        g = seeded_like(out.shape, dtype, backend.device, 4)
        return (out, kept, g, *grads_of(out, (xt, qkv), g))

    out, kept, g, gxt, gqkv = twice(run)
    qc, kc, xc = q.detach().contiguous(), k.detach().contiguous(), x.detach().contiguous()
    assert_drop_matches(out, kept, xc, qc, kc, case, dtype)
    ref_out, ref_kept, ref_scores, _ = reference_drop(x, q, k, case)
    if not torch.equal(kept, ref_kept):
        ref_out = expected_from_kept(x, ref_scores, kept, case.p, fuse)
    xt6, qkv6 = float64_leaves(xt, qkv)
    q6, k6, _ = qkv6.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out6 = expected_from_kept(xt6.transpose(0, 1), reference.cls_scores(q6, k6, d ** -0.5, 1)[0],
                              kept, 1, fuse)
    assert_grads_accurate((gxt, gqkv), grads_of(out6, (xt6, qkv6), g.double()),
                          grads_of(ref_out, (xt, qkv), g), ("x", "qkv"), dtype)
    scores = bsr_kernels.cls_attention(q, k)
    torch.testing.assert_close(scores, reference.cls_scores(qc, kc, d ** -0.5, 1)[0],
                               **SCORE_TOL[dtype])


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("n", [3, 15, 31])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_nan_padding_exposes_out_of_bounds_reads(backend, n, fuse):
    """x, q and k live inside NaN-filled buffers: any read past a view's bounds shows as NaN."""
    case = DropCase(b=2, h=3, n=n, d=5, c=7, p=1 if n < 15 else 5, keep_rate=0.5, fuse=fuse,
                    seed=n)
    dtype = backend.dtype
    x0, q0, k0 = make_inputs(case, backend.device, dtype)
    x, q, k = (nan_padded(t).requires_grad_() for t in (x0, q0, k0))
    assert not x.is_contiguous() and not q.is_contiguous() and not k.is_contiguous()

    def run():
        out, kept = drop(x, q, k, case)
        g = seeded_like(out.shape, dtype, backend.device, n)
        s = bsr_kernels.cls_attention(q, k, None, case.p)
        gs = seeded_like(s.shape, s.dtype, backend.device, n + 1)
        return (out, kept, s, *grads_of(out, (x, q, k), g), *grads_of(s, (q, k), gs))

    out, kept, s, *grads = twice(run)
    for name, t in zip(("x_out", "scores", "gx", "gq", "gk", "gq(cls)", "gk(cls)"),
                       (out, s, *grads)):
        assert not bool(t.isnan().any()), f"{name} has NaN: an out-of-bounds read"
    assert_drop_matches(out, kept, x0, q0, k0, case, dtype)
    torch.testing.assert_close(s, reference.cls_scores(q0, k0, 5 ** -0.5, case.p)[0],
                               **SCORE_TOL[dtype])


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_inputs_strided_along_their_last_dimension(backend):
    """x, q and k stored transposed, so that their last dimension is not the unit-stride one
    (the kernels read rows with unit stride): drop_tokens and cls_attention give the
    definition's values and gradients, and the backward kernels return each gradient in the
    layout torch.empty_like gives its input, as the registered fake kernels promise."""
    case = DropCase(b=2, h=3, n=11, d=4, c=6, p=2, keep_rate=0.5, fuse=True, seed=19)
    dtype, device = backend.dtype, backend.device
    x0, q0, k0 = make_inputs(case, device, dtype)
    x, q, k = (t.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
               for t in (x0, q0, k0))
    assert all(t.stride(-1) > 1 and torch.equal(t, t0) for t, t0 in ((x, x0), (q, q0), (k, k0)))
    scale = resolved_scale(None, case.d)
    out, kept = drop(x, q, k, case)
    assert_drop_matches(out, kept, x0, q0, k0, case, dtype)
    scores = bsr_kernels.cls_attention(q, k, None, case.p)
    torch.testing.assert_close(scores, reference.cls_scores(q0, k0, scale, case.p)[0],
                               **SCORE_TOL[dtype])
    g = seeded_like(out.shape, dtype, device, 19)
    gs = seeded_like(scores.shape, scores.dtype, device, 20)
    x6, q6, k6 = float64_leaves(x, q, k)
    out6 = expected_from_kept(x6, reference.cls_scores(q6, k6, scale, case.p)[0], kept, case.p,
                              True)
    ref = expected_from_kept(x, reference.cls_scores(q, k, scale, case.p)[0], kept, case.p, True)
    assert_grads_accurate(grads_of(out, (x, q, k), g), grads_of(out6, (x6, q6, k6), g.double()),
                          grads_of(ref, (x, q, k), g), ("x", "q", "k"), dtype)
    assert_grads_accurate(grads_of(scores, (q, k), gs),
                          grads_of(reference.cls_scores(q6, k6, scale, case.p)[0], (q6, k6),
                                   gs.double()),
                          grads_of(reference.cls_scores(q, k, scale, case.p)[0], (q, k), gs),
                          ("q", "k"), dtype)
    impl = get_backend(backend.name)
    with torch.no_grad():
        _, kept32, s, lse = impl.drop_forward(x, q, k, scale, case.p, case.n_keep, True)
        grads = (*impl.drop_backward(g, x, q, k, kept32, s, lse, scale, case.p),
                 *impl.cls_scores_backward(gs, q, k, lse, scale, case.p))
    for got, like in zip(grads, (x, q, k, q, k)):
        assert got.stride() == torch.empty_like(like).stride(), (got.stride(), like.stride())


# --- bad input ---------------------------------------------------------------------------------

def _bad(**kw):
    return kw


_X, _Q = (2, 9, 8), (2, 3, 9, 4)
_BAD_DROP = {
    # keep_rate
    "keep_rate=0": (_bad(keep_rate=0), ValueError, "keep_rate"),
    "keep_rate=-0.1": (_bad(keep_rate=-0.1), ValueError, "keep_rate"),
    "keep_rate=1.5": (_bad(keep_rate=1.5), ValueError, "keep_rate"),
    "keep_rate=nan": (_bad(keep_rate=float("nan")), ValueError, "keep_rate"),
    "keep_rate=inf": (_bad(keep_rate=float("inf")), ValueError, "keep_rate"),
    "keep_rate=str": (_bad(keep_rate="0.5"), TypeError, "keep_rate"),
    "keep_rate=None": (_bad(keep_rate=None), TypeError, "keep_rate"),
    "keep_rate=True": (_bad(keep_rate=True), TypeError, "keep_rate"),
    # mismatched sizes
    "x-batch": (_bad(x=(3, 9, 8)), ValueError, "x"),
    "x-tokens": (_bad(x=(2, 8, 8)), ValueError, "x"),
    "k-batch": (_bad(k=(3, 3, 9, 4)), ValueError, "k"),
    "k-heads": (_bad(k=(2, 2, 9, 4)), ValueError, "k"),
    "k-tokens": (_bad(k=(2, 3, 8, 4)), ValueError, "k"),
    "k-dim": (_bad(k=(2, 3, 9, 5)), ValueError, "k"),
    "one-token": (_bad(x=(2, 1, 8), q=(2, 3, 1, 4), k=(2, 3, 1, 4)), ValueError, "q"),
    # ranks
    "q-rank3": (_bad(q=(2, 9, 4)), ValueError, "q"),
    "k-rank5": (_bad(k=(2, 3, 9, 4, 1)), ValueError, "k"),
    "x-rank2": (_bad(x=(9, 8)), ValueError, "x"),
    "x-rank4": (_bad(x=(2, 9, 8, 1)), ValueError, "x"),
    # dtypes and types
    "x-int": (_bad(x_dtype=torch.int32), TypeError, "x"),
    "q-int": (_bad(q_dtype=torch.int64), TypeError, "q"),
    "k-int": (_bad(k_dtype=torch.int16), TypeError, "k"),
    "x-bool": (_bad(x_dtype=torch.bool), TypeError, "x"),
    "k-float64-vs-q-float32": (_bad(k_dtype=torch.float64), TypeError, "k"),
    "q-list": (_bad(q_obj=[[1.0]]), TypeError, "q"),
    "x-numpy": (_bad(x_obj="numpy"), TypeError, "x"),
    "k-meta-device": (_bad(k_device="meta"), ValueError, "k"),
    # num_prefix_tokens
    "prefix=N": (_bad(num_prefix_tokens=9), ValueError, "num_prefix_tokens"),
    "prefix>N": (_bad(num_prefix_tokens=12), ValueError, "num_prefix_tokens"),
    "prefix=0": (_bad(num_prefix_tokens=0), ValueError, "num_prefix_tokens"),
    "prefix=-1": (_bad(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    "prefix=1.0": (_bad(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
    "prefix=True": (_bad(num_prefix_tokens=True), TypeError, "num_prefix_tokens"),
    # scale
    "scale=0": (_bad(scale=0.0), ValueError, "scale"),
    "scale<0": (_bad(scale=-0.5), ValueError, "scale"),
    "scale=nan": (_bad(scale=float("nan")), ValueError, "scale"),
    "scale=inf": (_bad(scale=float("inf")), ValueError, "scale"),
    "scale=str": (_bad(scale="0.5"), TypeError, "scale"),
    "scale=tensor": (_bad(scale=torch.tensor(0.5)), TypeError, "scale"),
    # Found while writing these tests: the checks in ops/common.py let these through.
    "head_dim=0": (_bad(q=(2, 3, 9, 0), k=(2, 3, 9, 0)), ValueError, "q"),
    "heads=0": (_bad(q=(2, 0, 9, 4), k=(2, 0, 9, 4)), ValueError, "q"),
    "fuse_token=str": (_bad(fuse_token="no"), TypeError, "fuse_token"),
}


def _bad_inputs(spec):
    """Builds (x, q, k, kwargs) for one bad-input spec."""
    spec = dict(spec)
    made, g = {}, torch.Generator().manual_seed(0)
    for name, shape in (("x", _X), ("q", _Q), ("k", _Q)):
        shape = spec.pop(name, shape)
        dtype = spec.pop(f"{name}_dtype", torch.float32)
        device = spec.pop(f"{name}_device", "cpu")
        t = (torch.randn(shape, generator=g).to(dtype) if dtype != torch.bool
             else torch.ones(shape, dtype=dtype))
        made[name] = t.to(device)
        obj = spec.pop(f"{name}_obj", None)
        if obj == "numpy":
            made[name] = made[name].numpy()
        elif obj is not None:
            made[name] = obj
    kwargs = dict(keep_rate=0.5)
    kwargs.update(spec)
    return made["x"], made["q"], made["k"], kwargs


#: (x dtype, q/k dtype) pairs: autocast's bf16/fp16 q, k beside an fp32 residual stream, and
#: float32 beside float64 either way.
#: (x dtype, q and k dtype): mixed as under autocast, and all-half (the C++ backend runs those
#: in float32 since 2026-11-28; they were refused)
_MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
          (torch.float32, torch.float64), (torch.float64, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


def _assert_within_one_rounding(got, want64, cd, what):
    """A value or gradient computed in ``cd`` (float32) and rounded once to bf16/fp16: per
    element within that rounding of the float64 definition, plus the ``cd`` floors."""
    eps, big = torch.finfo(got.dtype).eps, float(want64.abs().max())
    err = (got.double() - want64).abs()
    bound = eps * want64.abs() + GRAD_REL_FLOOR[cd] * big + GRAD_ABS_FLOOR[cd]
    assert bool((err <= bound).all()), (what, float(err.max()), float(bound.min()))


def _mixed_refusal(name: str, device: str, x_dtype, q_dtype) -> list[str]:
    """Why the dispatcher refuses this backend for x and q of these (different) dtypes (its
    rule: both dtypes for a backend that takes mixed dtypes; the others get all three cast to
    the compute dtype, so that one: a bf16 x beside float32 q and k was refused on CPU for x's
    dtype alone, though the C++ backend would have run it in float32)."""
    b, dev = get_backend(name), torch.device(device)
    if not b.mixed_dtypes:
        return b.not_supported_reasons(dev, compute_dtype(x_dtype, q_dtype))
    return b.not_supported_reasons(dev, x_dtype) + [
        r for r in b.not_supported_reasons(dev, q_dtype)
        if r not in b.not_supported_reasons(dev, x_dtype)]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_x_beside_float32_q_and_k_runs_in_float32_on_cpu(x_dtype):
    """The dispatcher judged the C++ backend by x's dtype alone, so a bf16 or fp16 x beside
    float32 q and k was refused on CPU, though the op casts all three to the compute dtype
    (float32), as it does for a float32 x beside bf16 q and k. Now it runs: the definition's
    kept set, rows and x's dtype (all-half inputs: test_mixed_dtypes_follow_the_compute_dtype
    and test_half_precision_inputs_run_in_float32_on_cpu)."""
    case = DropCase(b=2, h=2, n=13, d=4, c=6, p=1, keep_rate=0.5, fuse=True, seed=8)
    x32, q, k = make_inputs(case, "cpu", torch.float32)
    x = x32.to(x_dtype).requires_grad_()
    out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5, True, case.p)
    assert bsr_kernels.ops.dispatch.select_backend(x.device, x_dtype, q.dtype).name == "cpp"
    ref_out, ref_kept, _, _ = reference.drop_tokens(x, q, k, resolved_scale(None, case.d),
                                                    case.p, case.n_keep, True)
    rows = case.p + case.n_keep
    assert out.dtype == x_dtype and torch.equal(kept, ref_kept)
    assert torch.equal(out[:, :rows], ref_out[:, :rows])
    torch.testing.assert_close(out[:, rows:], ref_out[:, rows:])   # x_dtype's own tolerance
    g_out = seeded_like(out.shape, x_dtype, "cpu", 5)
    gx, = torch.autograd.grad(out, x, g_out)
    assert gx.dtype == x_dtype
    torch.testing.assert_close(gx, torch.autograd.grad(ref_out, x, g_out)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_run_in_float32_on_cpu(dtype):
    """x, q and k all in bf16 or fp16 on CPU were refused ("no bsr_kernels backend can run"):
    the C++ backend takes float32 and float64, and only mixed dtypes were cast. The definition
    accumulates half inputs in float32 anyway, so the ops now cast them for C++ and cast the
    results back: the dispatcher and ``available_backends`` say so, and ``cls_attention`` gives
    the definition's float32 scores and gradients within one rounding to the inputs' dtype (the
    drop: ``test_mixed_dtypes_follow_the_compute_dtype``, whose pairs include all-half ones)."""
    case = DropCase(b=3, h=2, n=17, d=8, c=12, p=2, keep_rate=0.4, fuse=True, seed=21)
    _, q64, k64 = make_inputs(case, "cpu", torch.float64)
    q, k = (t.to(dtype).requires_grad_() for t in (q64, k64))
    assert select_backend(q.device, dtype, dtype).name == "cpp"
    assert select_backend(q.device, dtype).name == "cpp"
    assert "cpp" in available_backends("cpu", dtype)
    scale = resolved_scale(None, case.d)
    scores = bsr_kernels.cls_attention(q, k, num_prefix_tokens=case.p)
    ref_scores = reference.cls_scores(q, k, scale, case.p)[0]
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, **VALUE_TOL[torch.float32])
    g_s = seeded_like(scores.shape, torch.float32, "cpu", 7)
    q6, k6 = float64_leaves(q, k)
    want64 = grads_of(reference.cls_scores(q6, k6, scale, case.p)[0], (q6, k6), g_s.double())
    for g, w, nm in zip(grads_of(scores, (q, k), g_s), want64, "qk"):
        assert g.dtype == dtype
        _assert_within_one_rounding(g, w, torch.float32, nm)


def _near_tie_inputs(x_dtype, q_dtype, device):
    """N=4, P=1, one head: candidates 0 and 1 have keys that differ by a factor 1 + 1e-9 (exact
    in float64, equal once rounded to float32), candidate 2 a low score. Keeping one token, a
    float64 computation keeps candidate 1, a float32 one sees an exact tie and keeps 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    q[0, 0, 0] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    k = torch.tensor([[[[0.25, 0.0], [1.0, 0.5], [1.0, 0.5], [-1.0, -0.5]]]],
                     dtype=torch.float64)
    k[0, 0, 2] *= 1 + 1e-9
    return x.to(device, x_dtype), q.to(device, q_dtype), k.to(device, q_dtype)


@pytest.mark.parametrize("xq", _MIXED, ids=lambda t: f"x{str(t[0])[6:]}-q{str(t[1])[6:]}")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_mixed_dtypes_follow_the_compute_dtype(name, device, xq):
    """x may have another dtype than q and k (``drop_tokens``; ``common.compute_dtype``): scores
    and the fused token accumulate in float32, float64 when either input is float64; x_out has
    x's dtype, each gradient its input's. So every backend that runs the pair equals the
    definition on those very inputs (which casts q, k up to the compute dtype): the kept set
    exactly, including a float64 near-tie that float32 scores would break the other way; copied
    rows exactly, the fused row and the gradients as accurate as the definition's. A backend
    that cannot run the pair here refuses it with its reasons."""
    x_dtype, q_dtype = xq
    cd = compute_dtype(x_dtype, q_dtype)
    reasons = _mixed_refusal(name, device, x_dtype, q_dtype)
    case = DropCase(b=3, h=2, n=17, d=4, c=8, p=2, keep_rate=0.5, fuse=True, seed=21)
    x64, q64, k64 = make_inputs(case, device, torch.float64)
    x = x64.to(x_dtype).requires_grad_()
    q, k = (t.to(q_dtype).requires_grad_() for t in (q64, k64))
    if reasons:
        with pytest.raises(RuntimeError) as err:
            bsr_kernels.drop_tokens(x, q, k, 0.5, backend=name)
        assert all(r in str(err.value) for r in reasons), str(err.value)
        return

    tx, tq, tk = _near_tie_inputs(x_dtype, q_dtype, device)
    out, kept = bsr_kernels.drop_tokens(tx, tq, tk, 1 / 3, backend=name)
    r_kept = reference.drop_tokens(tx, tq, tk, 2 ** -0.5, 1, 1, True)[1]
    want = 1 if cd == torch.float64 and q_dtype == torch.float64 else 0
    assert r_kept.tolist() == [[want]]  # the construction does what it says
    assert kept.tolist() == [[want]], f"kept {kept.tolist()}: scored in another dtype than {cd}"
    assert out.dtype == x_dtype

    scale = resolved_scale(None, case.d)
    out, kept = twice(lambda: bsr_kernels.drop_tokens(x, q, k, 0.5, True, case.p, backend=name))
    assert out.dtype == x_dtype and kept.dtype == torch.int64
    ref_out, ref_kept, ref_scores, _ = reference.drop_tokens(x, q, k, scale, case.p,
                                                            case.n_keep, True)
    assert ref_scores.dtype == cd
    assert torch.equal(kept, ref_kept)
    rows = case.p + case.n_keep
    assert torch.equal(out[:, :rows], ref_out[:, :rows])
    x6, q6, k6 = float64_leaves(x, q, k)
    if x_dtype in VALUE_TOL:
        torch.testing.assert_close(out[:, rows:], ref_out[:, rows:], **VALUE_TOL[x_dtype])
    else:   # the fused row accumulated in float32 and rounded once to x's half dtype
        fused64 = reference.drop_tokens(x6, q6, k6, scale, case.p, case.n_keep, True,
                                        kept=kept)[0][:, rows:]
        _assert_within_one_rounding(out[:, rows:], fused64.detach(), cd, "fused row")
    g_out = seeded_like(out.shape, x_dtype, device, 5)
    got = grads_of(out, (x, q, k), g_out)
    assert [t.dtype for t in got] == [x_dtype, q_dtype, q_dtype]
    ref = grads_of(ref_out, (x, q, k), g_out)
    want64 = grads_of(reference.drop_tokens(x6, q6, k6, scale, case.p, case.n_keep, True,
                                            kept=kept)[0], (x6, q6, k6), g_out.double())
    for a, w, r, nm in zip(got, want64, ref, "xqk"):
        if a.dtype in (torch.float32, torch.float64):
            assert_grads_accurate([a], [w], [r], [nm], a.dtype)
        else:  # computed in float32, rounded once to bf16/fp16: within that rounding
            _assert_within_one_rounding(a, w, cd, nm)


@pytest.mark.parametrize("spec,exc,arg", list(_BAD_DROP.values()), ids=list(_BAD_DROP))
def test_drop_tokens_bad_input(spec, exc, arg, monkeypatch):
    monkeypatch.setenv("BSR_BACKEND", "reference")
    x, q, k, kwargs = _bad_inputs(spec)
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        bsr_kernels.drop_tokens(x, q, k, **kwargs)


_CLS_KEYS = ("k-", "q-", "one-token", "prefix", "scale", "head_dim", "heads")


@pytest.mark.parametrize(
    "spec,exc,arg",
    [v for key, v in _BAD_DROP.items() if key.startswith(_CLS_KEYS) and "vs-q" not in key
     or key == "k-float64-vs-q-float32"],
    ids=[key for key in _BAD_DROP if key.startswith(_CLS_KEYS) and "vs-q" not in key
         or key == "k-float64-vs-q-float32"])
def test_cls_attention_bad_input(spec, exc, arg, monkeypatch):
    monkeypatch.setenv("BSR_BACKEND", "reference")
    _, q, k, kwargs = _bad_inputs(spec)
    kwargs.pop("keep_rate")
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        bsr_kernels.cls_attention(q, k, **kwargs)


# --- dispatch ----------------------------------------------------------------------------------

def test_nonsense_backend_raises(monkeypatch):
    monkeypatch.setenv("BSR_BACKEND", "nonsense")
    x, q, k = make_inputs(DropCase(b=1, h=1, n=5, d=2, c=3), CPU, torch.float32)
    with pytest.raises(ValueError, match="BSR_BACKEND"):
        bsr_kernels.drop_tokens(x, q, k, 0.5)
    with pytest.raises(ValueError, match="BSR_BACKEND"):
        bsr_kernels.cls_attention(q, k)
    with pytest.raises(ValueError, match="unknown backend 'nonsense'") as err:  # looked up by name
        get_backend("nonsense")
    assert all(name in str(err.value) for name in ("reference", "cpp", "triton")), err.value


def test_bsr_backend_is_read_at_each_call_in_any_case(monkeypatch):
    """BSR_BACKEND names a backend in any case, spaces around it ignored; unset or blank it
    forces none, and an unknown name raises, naming it."""
    for value, want in (("", None), ("  ", None), (" CPP ", "cpp"), ("Reference", "reference")):
        monkeypatch.setenv("BSR_BACKEND", value)
        assert _config.forced_backend() == want, value
    monkeypatch.delenv("BSR_BACKEND")
    assert _config.forced_backend() is None
    monkeypatch.setenv("BSR_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BSR_BACKEND='cuda' is not a backend"):
        _config.forced_backend()


def _unavailable_here():
    """(backend, dtype) pairs that cannot run on CPU here, as the dispatcher judges them: at
    least Triton's interpreter for bfloat16 and float16, whatever is built (the C++ backend runs
    those in float32)."""
    pairs = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
             for name in all_backends()
             for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
             if name not in available_backends(CPU, dtype)]
    assert {(p.values[0], p.values[1]) for p in pairs} >= {
        ("triton", torch.bfloat16), ("triton", torch.float16)}, pairs
    return pairs


@pytest.mark.parametrize("name,dtype", _unavailable_here())
def test_forcing_an_unavailable_backend_raises_with_reasons(name, dtype, monkeypatch):
    """Forcing a backend that cannot take these CPU inputs (BSR_BACKEND, use_backend or
    backend=) raises, naming the backend and each of its reasons, for both ops; no silent
    fallback to another backend."""
    reasons = _reasons(get_backend(name), CPU, (dtype,))
    assert reasons
    x, q, k = make_inputs(DropCase(b=1, h=1, n=5, d=2, c=3), CPU, dtype)
    for route in ("BSR_BACKEND", "use_backend", "backend="):
        if route == "BSR_BACKEND":
            monkeypatch.setenv("BSR_BACKEND", name)
        else:
            monkeypatch.delenv("BSR_BACKEND", raising=False)
        kw = {"backend": name} if route == "backend=" else {}
        for op in (lambda: bsr_kernels.drop_tokens(x, q, k, 0.5, **kw),
                   lambda: bsr_kernels.cls_attention(q, k, **kw)):
            with (bsr_kernels.use_backend(name) if route == "use_backend"
                  else contextlib.nullcontext()), pytest.raises(RuntimeError) as err:
                op()
            for reason in reasons:
                assert reason in str(err.value), (route, str(err.value))
            assert f"backend {name!r} was forced" in str(err.value), (route, str(err.value))


def test_use_backend_is_ahead_of_bsr_backend_and_the_choice_follows_triton_interpret(
        monkeypatch):
    """The forcing order of the dispatcher: an op's backend=, then the innermost use_backend,
    then BSR_BACKEND. Its cached choice follows TRITON_INTERPRET (read when called: Triton
    takes CPU tensors only in its interpreter), and a backend that takes mixed dtypes is
    judged by each of them (Triton's interpreter has no bfloat16, beside float32 or not)."""
    monkeypatch.setenv("BSR_BACKEND", "cpp")
    assert dispatch.forced_backend() == "cpp"
    with bsr_kernels.use_backend("reference"):
        assert dispatch.forced_backend() == "reference"
        assert select_backend(CPU, torch.float32).name == "reference"
    assert dispatch.forced_backend() == "cpp"
    monkeypatch.delenv("BSR_BACKEND")
    triton = get_backend("triton")
    for dtypes in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        assert any("bfloat16" in r for r in _reasons(triton, CPU, dtypes)), dtypes
        with pytest.raises(RuntimeError, match="bfloat16"):
            select_backend(CPU, *dtypes, name="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton.not_supported_reasons(CPU, torch.float32):
        pytest.skip("Triton's interpreter cannot run here: "
                    + "; ".join(triton.not_supported_reasons(CPU, torch.float32)))
    assert select_backend(CPU, torch.float32, name="triton").name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(CPU, torch.float32, name="triton")


def test_nested_use_backend_blocks_give_back_the_outer_choice(monkeypatch):
    """Leaving an inner use_backend block, normally or by an exception, forces the outer
    block's backend again; use_backend(None) forces nothing inside it; after the outermost block
    nothing is forced."""
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    with bsr_kernels.use_backend("reference"):
        with bsr_kernels.use_backend("cpp"):
            assert dispatch.forced_backend() == "cpp"
        assert dispatch.forced_backend() == "reference"
        with pytest.raises(KeyError), bsr_kernels.use_backend("cpp"):
            raise KeyError("inside")
        assert select_backend(CPU, torch.float32).name == "reference"
        with bsr_kernels.use_backend(None):
            assert dispatch.forced_backend() is None
        assert dispatch.forced_backend() == "reference"
    assert dispatch.forced_backend() is None


def test_forced_backend_patched_unavailable_raises(monkeypatch):
    """Always runs, whatever is built: a backend that reports a reason is refused when forced."""
    monkeypatch.setattr(get_backend("reference"), "not_supported_reasons",
                        lambda device, dtype: ["patched reason for the test"])
    monkeypatch.setattr(dispatch, "_SELECTED", {})  # select_backend's answers were cached
    monkeypatch.setenv("BSR_BACKEND", "reference")
    x, q, k = make_inputs(DropCase(b=1, h=1, n=5, d=2, c=3), CPU, torch.float32)
    for call in (lambda: bsr_kernels.drop_tokens(x, q, k, 0.5),
                 lambda: bsr_kernels.cls_attention(q, k)):
        with pytest.raises(RuntimeError, match="reference: patched reason for the test"):
            call()


def test_default_cpu_backend_has_no_silent_fallback(monkeypatch):
    """Unforced CPU tensors go to cpp; when cpp cannot run, the error lists every backend."""
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    monkeypatch.setattr(get_backend("cpp"), "not_supported_reasons",
                        lambda device, dtype: ["patched: not built"])
    monkeypatch.setattr(dispatch, "_SELECTED", {})  # select_backend's answers were cached
    x, q, k = make_inputs(DropCase(b=1, h=1, n=5, d=2, c=3), CPU, torch.float32)
    with pytest.raises(RuntimeError) as err:
        bsr_kernels.drop_tokens(x, q, k, 0.5)
    msg = str(err.value)
    assert "cpp: patched: not built" in msg and "reference" in msg and "triton" in msg


def test_a_device_type_without_a_default_backend_goes_to_cpp_which_refuses_it(monkeypatch):
    """Tensors on a device type with no default of its own (xpu here) go to cpp, which says why
    it cannot run them: no silent fallback to the reference."""
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="the default for xpu tensors is cpp") as err:
        select_backend(torch.device("xpu"), torch.float32)
    assert "cpp: runs on CPU tensors only, got device xpu" in str(err.value)


def test_a_mixed_dtype_backend_gives_each_reason_once(monkeypatch):
    """A backend that takes mixed dtypes is judged by each dtype; a reason both dtypes give is
    listed once, in order."""
    monkeypatch.setattr(get_backend("reference"), "not_supported_reasons",
                        lambda device, dtype: ["patched: no device", f"patched: no {dtype}"])
    assert _reasons(get_backend("reference"), CPU, (torch.float32, torch.bfloat16)) == [
        "patched: no device", "patched: no torch.float32", "patched: no torch.bfloat16"]


def test_the_cached_choice_depends_on_every_dtype(monkeypatch):
    """A backend chosen for float32 tensors is not reused for float32 x beside bfloat16 q and k
    that it cannot take: select_backend's cache keys on all the dtypes."""
    monkeypatch.setattr(get_backend("reference"), "not_supported_reasons",
                        lambda device, dtype: ["patched: no bf16"] if dtype == torch.bfloat16
                        else [])
    monkeypatch.setattr(dispatch, "_SELECTED", {})  # select_backend's answers were cached
    assert select_backend(CPU, torch.float32, name="reference").name == "reference"
    with pytest.raises(RuntimeError, match="reference: patched: no bf16"):
        select_backend(CPU, torch.float32, torch.bfloat16, name="reference")


def test_default_cpu_backend_is_cpp(monkeypatch):
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    if get_backend("cpp").not_supported_reasons(CPU, torch.float32):
        pytest.skip("cpp backend unavailable here: "
                    + "; ".join(get_backend("cpp").not_supported_reasons(CPU, torch.float32)))
    assert select_backend(CPU, torch.float32).name == "cpp"



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensors_get_the_reference_and_the_cpu_shapes(monkeypatch, dtype):
    """Meta tensors (shape inference: no data, nothing computed) go to the reference by default,
    the one backend that takes them; both ops and their backward give the shapes and dtypes of
    the CPU call, with P=2 and fused token. A forced backend that cannot run them still raises."""
    monkeypatch.delenv("BSR_BACKEND", raising=False)
    meta = torch.device("meta")
    assert select_backend(meta, dtype).name == "reference"
    assert "reference" in available_backends(meta, dtype)
    x, q, k = make_inputs(DropCase(b=3, h=2, n=11, d=4, c=6), CPU, dtype, requires_grad=True)
    on_meta = [t.detach().to(meta).requires_grad_() for t in (x, q, k)]
    for call in (lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.4, num_prefix_tokens=2),
                 lambda x, q, k: (bsr_kernels.cls_attention(q, k, num_prefix_tokens=2),)):
        want = call(x, q, k)
        got = call(*on_meta)
        assert [(t.shape, t.dtype, t.device.type) for t in got] \
            == [(t.shape, t.dtype, "meta") for t in want]
        want_grads = torch.autograd.grad(want[0].square().sum(), (x, q, k), allow_unused=True)
        got_grads = torch.autograd.grad(got[0].square().sum(), on_meta, allow_unused=True)
        assert [None if g is None else (g.shape, g.dtype) for g in got_grads] \
            == [None if g is None else (g.shape, g.dtype) for g in want_grads]
    with pytest.raises(RuntimeError, match="cpp: runs on CPU tensors only"):
        bsr_kernels.drop_tokens(*on_meta, 0.4, backend="cpp")


# --- torch.compile and torch.library -----------------------------------------------------------

class _DropBlock(torch.nn.Module):
    """A timm-like attention block followed by a token drop."""

    def __init__(self, dim: int = 12, heads: int = 3, keep_rate: float = 0.5,
                 fuse: bool = True, contiguous_qk: bool = False):
        super().__init__()
        self.heads, self.keep_rate, self.fuse = heads, keep_rate, fuse
        self.contiguous_qk = contiguous_qk
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        if self.contiguous_qk:
            q, k = q.contiguous(), k.contiguous()
        x, kept = bsr_kernels.drop_tokens(x, q, k, self.keep_rate, self.fuse)
        return x, kept


def _compile_case(backend, compiler: str, fuse: bool, contiguous_qk: bool):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _DropBlock(fuse=fuse, contiguous_qk=contiguous_qk).to(backend.device)
    x = torch.randn(2, 11, 12, device=backend.device, requires_grad=True)
    params = [x, *model.parameters()]

    def loss_and_grads(m):
        out, kept = m(x)
        w = seeded_like(out.shape, out.dtype, backend.device, 0)
        return (out, kept, *torch.autograd.grad((out * w).sum(), params))

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, backend=compiler, fullgraph=True))
    assert torch.equal(compiled[1], eager[1])
    for i, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"[{i}] {m}")


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", CPU_F32, indirect=True)
def test_torch_compile_aot_eager(backend, fuse):
    _compile_case(backend, "aot_eager", fuse, contiguous_qk=False)


@pytest.mark.parametrize("contiguous_qk", [False, True], ids=["timm_views", "contiguous"])
@pytest.mark.parametrize("backend", CPU_F32, indirect=True)
def test_torch_compile_inductor(backend, contiguous_qk):
    _compile_case(backend, "inductor", True, contiguous_qk=contiguous_qk)


def _layout_inputs(layout: str, dtype, device, b=2, h=3, n=9, d=4, c=5):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device,
                                                                         dtype=dtype)
    if layout == "contiguous":
        return rnd(b, n, c), rnd(b, h, n, d), rnd(b, h, n, d)
    if layout == "timm_views":
        _, q, k = timm_qk(b, n, h, d, device, dtype)
        return rnd(b, n, c), q, k
    if layout == "dense_permuted":  # non-contiguous but dense: what inductor may hand an op
        return (rnd(n, b, c).transpose(0, 1), rnd(b, n, h, d).transpose(1, 2),
                rnd(b, n, h, d).transpose(1, 2))
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["contiguous", "timm_views", "dense_permuted"])
@pytest.mark.parametrize("backend", CPU_F32, indirect=True)
def test_opcheck_registered_ops(backend, layout):
    """torch.library.opcheck (schema, fake kernels incl. strides, autograd registration, AOT
    dispatch) on every registered op and backward op."""
    ops = torch.ops.bsr_kernels
    x, q, k = _layout_inputs(layout, backend.dtype, backend.device)
    scale, p, n_keep = 0.5, 1, 4
    n = x.shape[1]
    failures = []

    def check(name, op, args):
        try:
            torch.library.opcheck(op, args)
        except Exception as exc:  # collect all, report together
            failures.append(f"{name}: {str(exc).splitlines()[0][:400]}")

    xr, qr, kr = (t.detach().requires_grad_() for t in (x, q, k))
    be = ""  # the fixture forces the backend through BSR_BACKEND
    check("drop_tokens(fuse)", ops.drop_tokens.default, (xr, qr, kr, scale, p, n_keep, True, be))
    check("drop_tokens(nofuse)", ops.drop_tokens.default,
          (xr, qr, kr, scale, p, n_keep, False, be))
    check("cls_attention", ops.cls_attention.default, (qr, kr, scale, p, be))
    out, kept, scores, lse = ops.drop_tokens(x, q, k, scale, p, n_keep, True, be)
    for fuse in (True, False):
        check(f"drop_tokens_replay({fuse})", ops.drop_tokens_replay.default,
              (xr, qr, kr, kept, scale, p, fuse, be))
    g = seeded_like(out.shape, out.dtype, backend.device, 1)
    check("drop_tokens_backward", ops.drop_tokens_backward.default,
          (g, x, q, k, kept, scores, lse, scale, p, be))
    check("gather_tokens_backward", ops.gather_tokens_backward.default,
          (seeded_like((2, p + n_keep, x.shape[2]), x.dtype, backend.device, 2), kept, n, p,
           be))
    check("cls_attention_backward", ops.cls_attention_backward.default,
          (seeded_like(scores.shape, scores.dtype, backend.device, 3), q, k, lse, scale, p,
           be))
    assert not failures, "\n".join(failures)


# --- the eager path and the registered ops ------------------------------------------------------

_REGISTERED = ("_cls_attention_op", "_cls_attention_bwd_op", "_drop_op", "_replay_op",
               "_drop_bwd_op", "_gather_bwd_op")


def _all_paths_of_the_ops(x, q, k, case: DropCase, kept):
    """Outputs and gradients of drop_tokens, of its replay of ``kept`` and of cls_attention."""
    out, got_kept = drop(x, q, k, case)
    g = seeded_like(out.shape, out.dtype, x.device, case.seed)
    replayed = bsr_kernels.drop_tokens(x, q, k, case.keep_rate, case.fuse, case.p, case.scale,
                                       kept=kept)[0]
    scores = bsr_kernels.cls_attention(q, k, case.scale, case.p)
    gs = seeded_like(scores.shape, scores.dtype, x.device, case.seed + 1)
    return (out, got_kept, *grads_of(out, (x, q, k), g), replayed,
            *grads_of(replayed, (x, q, k), g), scores, *grads_of(scores, (q, k), gs))


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_eager_path_and_registered_ops_agree(backend, fuse, monkeypatch):
    """A plain call skips the registered ops (they are made to raise) and runs the backend
    through an autograd.Function; the same call under a dispatch mode (what a tracer is) goes
    through the registered forward and backward ops. Both give bit-identical outputs, kept sets
    and gradients, for the drop, its replay of another selection and cls_attention."""
    case = DropCase(b=3, h=2, n=19, d=5, c=7, p=2, keep_rate=0.4, fuse=fuse, seed=5)
    x, q, k = make_inputs(case, backend.device, backend.dtype, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    other = torch.stack([torch.randperm(case.m, generator=g)[:case.n_keep].sort().values
                         for _ in range(case.b)]).to(backend.device)

    log = OpLog()
    with log:
        registered = _all_paths_of_the_ops(x, q, k, case, other)
    backward = "drop_tokens_backward" if fuse else "gather_tokens_backward"
    for name in ("drop_tokens", "drop_tokens_replay", backward, "cls_attention",
                 "cls_attention_backward"):
        assert f"bsr_kernels.{name}.default" in log.names, (name, sorted(set(log.names)))

    def refuse(*args, **kwargs):
        raise AssertionError("a plain eager call reached a registered op")
    for name in _REGISTERED:
        monkeypatch.setattr(bsr_kernels.ops, name, refuse)
    eager = _all_paths_of_the_ops(x, q, k, case, other)
    assert len(eager) == len(registered) == 12
    for i, (a, b) in enumerate(zip(eager, registered)):
        assert _same(a, b), f"output {i} differs between the eager path and the registered ops"


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", F64, indirect=True)
def test_second_order_gradients_on_both_paths(backend, fuse):
    """gradgradcheck (float64) of the drop, of its replay of a recorded selection and of
    cls_attention, on the eager path and through the registered ops: under create_graph=True
    the backward differentiates the pure-PyTorch definition on the recorded selection (the
    kernels' backward has no derivative; a second backward through it used to raise). The
    Triton interpreter is slow on CPU: gradgradcheck's fast mode there."""
    case = separated_case(DropCase(b=2, h=2, n=7, d=2, c=3, p=2, keep_rate=0.5, fuse=fuse,
                                   seed=4))
    x, q, k = make_inputs(case, backend.device, torch.float64, requires_grad=True)
    kept = drop(x, q, k, case)[1].detach()
    fast = _fast_gradcheck(backend)
    ops = {"drop": lambda x, q, k: drop(x, q, k, case)[0],
           "replay": lambda x, q, k: bsr_kernels.drop_tokens(
               x, q, k, case.keep_rate, case.fuse, case.p, case.scale, kept=kept)[0],
           "cls_attention": lambda x, q, k: bsr_kernels.cls_attention(q, k, case.scale, case.p)}
    for mode in (contextlib.nullcontext, OpLog):
        for name, fn in ops.items():
            with mode():
                inputs = (q, k) if name == "cls_attention" else (x, q, k)
                f = (lambda q, k: fn(x, q, k)) if name == "cls_attention" else fn
                assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast), (name, mode)


@pytest.mark.parametrize("backend", F64, indirect=True)
def test_create_graph_gradients_when_x_depends_on_q_and_k(backend):
    """Under create_graph=True the backward differentiates the definition through an alias of
    each input, so that it returns each input's own partial derivative. In a block x depends
    on q and k (through attention); differentiated through the inputs themselves, the path
    from x to q and k was added once more. Here x is made from q and k: the gradients with
    create_graph equal those without it (the kernels' backward) and pure autograd through the
    reference on the same selection."""
    case = DropCase(b=2, h=2, n=7, d=2, c=4, p=1, keep_rate=0.5, fuse=True, seed=6)
    _, q, k = make_inputs(case, backend.device, torch.float64, requires_grad=True)
    w = seeded_like((case.b, case.p + case.n_keep + 1, case.c), torch.float64, backend.device, 3)

    def x_of(q, k):          # (B, N, H * d) from q and k, as attention makes x of them
        return (q * k.tanh()).transpose(1, 2).reshape(case.b, case.n, case.h * case.d)

    kept = drop(x_of(q, k), q, k, case)[1]

    def grads(create_graph, op=True):
        x = x_of(q, k)
        out = (drop(x, q, k, case)[0] if op else reference.drop_tokens(
            x, q, k, resolved_scale(case.scale, case.d), case.p, case.n_keep, True,
            kept=kept)[0])
        return torch.autograd.grad((out * w).sum(), (q, k), create_graph=create_graph)

    want = grads(False, op=False)
    for create_graph in (False, True):
        for got, ref in zip(grads(create_graph), want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_plain_eager_is_false_under_tracers_and_modes():
    """What sends a call to the registered ops: a dispatch mode, a function mode (a device
    context), jit.trace, a functorch transform, a tensor subclass; plain tensors do not."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bsr_kernels.ops import _plain_eager
    t = torch.randn(2, 3)
    assert _plain_eager(t, t.requires_grad_())
    with OpLog():
        assert not _plain_eager(t)
    with torch.device("cpu"):
        assert not _plain_eager(t)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2))
    assert not _plain_eager(fake)

    class Sub(torch.Tensor):
        pass
    assert not _plain_eager(t, torch.randn(2).as_subclass(Sub))
    seen = []
    torch.jit.trace(lambda a: seen.append(_plain_eager(a)) or a * 2, (torch.randn(2),),
                    check_trace=False)  # the check re-runs it untraced
    torch.func.grad(lambda a: seen.append(_plain_eager(a)) or a.sum())(torch.randn(2))
    make_fx(lambda a: seen.append(_plain_eager(a)) or a * 2)(torch.randn(2))
    assert seen == [False, False, False]


def test_make_fx_graph_keeps_the_registered_ops():
    """A traced forward and backward (make_fx, as AOTAutograd and export trace) record the
    registered drop ops, not the backend's kernels."""
    from torch.fx.experimental.proxy_tensor import make_fx
    case = DropCase(b=2, h=2, n=9, d=4, c=6, p=1, keep_rate=0.5, fuse=True, seed=2)
    x, q, k = make_inputs(case, CPU, torch.float32)

    def fwd_bwd(x, q, k):
        x, q, k = (t.requires_grad_() for t in (x, q, k))
        out = drop(x, q, k, case)[0]
        return torch.autograd.grad(out.sum(), (x, q, k))

    graph = str(make_fx(fwd_bwd)(x.clone(), q.clone(), k.clone()).graph)
    assert "bsr_kernels.drop_tokens.default" in graph
    assert "bsr_kernels.drop_tokens_backward.default" in graph
    assert "cpp_drop" not in graph


# --- saved for backward ------------------------------------------------------------------------

@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("backend", F32, indirect=True)
def test_saved_for_backward(backend, fuse):
    """The drop saves no (N x N)-per-(batch, head) tensor, and saves its indices as int32."""
    case = DropCase(b=2, h=2, n=31, d=4, c=8, keep_rate=0.5, fuse=fuse)
    x, q, k = make_inputs(case, backend.device, backend.dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, kept = drop(x, q, k, case)
    assert saved, "nothing saved for backward"
    big = case.b * case.h * case.n * case.n
    for t in saved:
        assert t.numel() < big, f"saved {tuple(t.shape)}: an N x N per (batch, head) tensor"
        assert list(t.shape).count(case.n) < 2, f"saved {tuple(t.shape)}"
    idx = [t for t in saved if not t.is_floating_point()]
    assert idx and all(t.dtype == torch.int32 for t in idx), [t.dtype for t in idx]
    assert any(tuple(t.shape) == (case.b, case.n_keep) for t in idx)
    g = seeded_like(out.shape, out.dtype, backend.device, 1)
    (out * g).sum().backward()  # the saved state suffices for backward

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bsr_kernels.cls_attention(q, k)
    assert all(t.numel() < big and list(t.shape).count(case.n) < 2 for t in saved)


def test_use_backend_and_backend_argument_force_forward_and_backward(monkeypatch):
    """``use_backend`` and ``backend=`` pick the backend of the forward and of its backward
    (resolved at the call and carried into backward, which may run in another thread); the
    innermost choice wins, ahead of BSR_BACKEND; a bad name is a ValueError naming backend."""
    from bsr_kernels.ops.dispatch import all_backends

    calls = []
    for name, b in all_backends().items():
        for method in ("drop_forward", "drop_backward", "drop_replay", "cls_scores",
                       "cls_scores_backward"):
            real = getattr(type(b), method)

            def spy(self, *a, _real=real, _name=name, _m=method):
                calls.append((_name, _m))
                return _real(self, *a)
            monkeypatch.setattr(type(b), method, spy)
    monkeypatch.setenv("BSR_BACKEND", "cpp")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, generator=g, requires_grad=True)
    q, k = (torch.randn(2, 2, 9, 3, generator=g, requires_grad=True) for _ in range(2))
    with bsr_kernels.use_backend("reference"):
        out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
    out.sum().backward()  # outside the block: the forward's choice still holds
    assert calls == [("reference", "drop_forward"), ("reference", "drop_backward")], calls
    calls.clear()
    with bsr_kernels.use_backend("reference"):
        out, _ = bsr_kernels.drop_tokens(x, q, k, 0.5, kept=kept, backend="cpp")
    out.sum().backward()
    assert calls == [("cpp", "drop_replay"), ("cpp", "drop_backward")], calls
    calls.clear()
    for forced in ("reference", "cpp"):        # cls_attention: backend= ahead of the block
        with bsr_kernels.use_backend("cpp" if forced == "reference" else "reference"):
            scores = bsr_kernels.cls_attention(q, k, backend=forced)
        scores.sum().backward()
        assert calls == [(forced, "cls_scores"), (forced, "cls_scores_backward")], calls
        calls.clear()
    with pytest.raises(ValueError, match="backend"):
        bsr_kernels.drop_tokens(x, q, k, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        with bsr_kernels.use_backend("nonsense"):
            pass


def test_use_backend_under_torch_compile_and_in_threads(monkeypatch):
    """A compiled op call has no graph break inside or outside a ``use_backend`` block (torch
    2.11's dynamo cannot trace ``ContextVar.get``, where the forced name used to live: a graph
    break at every op call, an error under ``fullgraph=True``); entering a block recompiles and
    runs the forced backend, leaving it runs the default again. A block forces nothing in another
    thread, and one left by an exception gives the outer block's choice back."""
    import threading
    from bsr_kernels.ops import dispatch

    forwards = []
    for name, b in dispatch.all_backends().items():
        real = type(b).drop_forward

        def spy(self, *a, _real=real, _name=name):
            forwards.append((threading.current_thread().name, _name))
            return _real(self, *a)
        monkeypatch.setattr(type(b), "drop_forward", spy)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 4, generator=g)
    q, k = (torch.randn(2, 2, 9, 3, generator=g) for _ in range(2))

    def fn(x, q, k):
        return bsr_kernels.drop_tokens(x, q, k, 0.5)[0] * 2

    def breaks():
        explained = torch._dynamo.explain(fn)(x, q, k)
        return explained.graph_break_count, [str(r.reason)[:200] for r in explained.break_reasons]

    main = threading.current_thread().name
    torch._dynamo.reset()
    eager = fn(x, q, k)
    assert breaks()[0] == 0, breaks()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, q, k), eager)
    assert set(forwards) == {(main, "cpp")}, forwards
    forwards.clear()
    with bsr_kernels.use_backend("reference"):
        out = compiled(x, q, k)
        assert forwards == [(main, "reference")], forwards
        assert breaks()[0] == 0, breaks()
        forwards.clear()
        worker = threading.Thread(target=fn, args=(x, q, k), name="worker")
        worker.start()
        worker.join()
        assert forwards == [("worker", "cpp")], forwards
    torch.testing.assert_close(out, eager)
    forwards.clear()
    assert torch.equal(compiled(x, q, k), eager) and forwards == [(main, "cpp")], forwards
    with bsr_kernels.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="inside"):
            with bsr_kernels.use_backend("reference"):
                raise RuntimeError("raised inside the block")
        assert dispatch.context_backend() == "cpp"
    assert dispatch.context_backend() == ""
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", ["float32", torch.int32, None, 32])
def test_available_backends_refuses_a_dtype_that_is_not_a_floating_torch_dtype(bad):
    """available_backends("cpu", "float32") answered ['reference'] (as if the C++ kernels could
    not run float32); now a TypeError naming dtype."""
    assert "cpp" in bsr_kernels.available_backends("cpu", torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        bsr_kernels.available_backends("cpu", bad)


# --- torch.func transforms and replayed selections ---------------------------------------------

@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES if n != "triton"])
def test_torch_func_transforms_give_the_definitions_derivatives(name, monkeypatch):
    """torch.func.grad and vjp of either op raised (torch's Function for a registered op's
    autograd refuses functorch), and torch.func.jvp returned a zero tangent without a word, also
    with respect to x, on which x_out depends linearly. Under a transform the ops now compute
    the definition: grad, vjp and jvp equal autograd's derivatives of the eager op (which runs
    the forced backend), and vmap over images equals the batched call."""
    monkeypatch.setenv("BSR_BACKEND", name)
    case = DropCase(b=3, h=2, n=11, d=4, c=6, p=2, keep_rate=0.5, fuse=True, seed=41)
    x, q, k = make_inputs(case, CPU, torch.float64)
    g_out = seeded_like((case.b, case.p + case.n_keep + 1, case.c), torch.float64, CPU, 42)
    v = [seeded_like(t.shape, torch.float64, CPU, 43 + i) for i, t in enumerate((x, q, k))]

    def loss(x, q, k):
        return (bsr_kernels.drop_tokens(x, q, k, 0.5, True, case.p)[0] * g_out).sum()

    leaves = float64_leaves(x, q, k)
    want = torch.autograd.grad(loss(*leaves), leaves)
    assert all(w.abs().max() > 0 for w in want)
    got = torch.func.grad(loss, argnums=(0, 1, 2))(x, q, k)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
    _, vjp = torch.func.vjp(loss, x, q, k)
    for a, w in zip(vjp(torch.tensor(1.0, dtype=torch.float64)), want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
    tangent = torch.func.jvp(loss, (x, q, k), tuple(v))[1]
    torch.testing.assert_close(tangent, sum((w * t).sum() for w, t in zip(want, v)),
                               rtol=1e-10, atol=1e-12)
    sq = torch.func.grad(lambda q: bsr_kernels.cls_attention(q, k, None, case.p).square().sum())
    q6 = q.clone().requires_grad_()
    want_q = torch.autograd.grad(bsr_kernels.cls_attention(q6, k, None, case.p).square().sum(),
                                 q6)[0]
    torch.testing.assert_close(sq(q), want_q, rtol=1e-10, atol=1e-12)
    per_image = torch.func.vmap(
        lambda a, b, c: bsr_kernels.drop_tokens(a[None], b[None], c[None], 0.5, True, case.p))
    out, kept = per_image(x, q, k)
    ref_out, ref_kept = bsr_kernels.drop_tokens(x, q, k, 0.5, True, case.p)
    assert torch.equal(kept[:, 0], ref_kept)
    torch.testing.assert_close(out[:, 0], ref_out, rtol=1e-12, atol=1e-12)


def test_a_replayed_selection_is_checked_on_cpu():
    """A replayed ``kept`` out of range gave the reference's and C++'s IndexError from inside,
    and Triton left rows of ``torch.empty`` in x_out; an int64 position of 2**32 + 3 was cut to
    int32 and replayed as 3; a kept on another device than x reached the kernels. On CPU the
    positions are checked (no host sync there), before anything is computed."""
    g = torch.Generator().manual_seed(44)
    x, q, k = torch.randn(2, 9, 8, generator=g), *torch.randn(2, 2, 3, 9, 4, generator=g)
    good = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])
    out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5, kept=good)   # M = 8, n_keep = 4
    assert torch.equal(kept, good)
    for bad, match in ((good + 1, r"0\.\.7 .* got 1\.\.8"), (good - 1, r"got -1\.\.6"),
                       (good + 2 ** 32, r"got 4294967296"),
                       (good.to("meta"), "on x's device cpu, got meta")):
        with pytest.raises(ValueError, match=f"^kept must .*{match}"):
            bsr_kernels.drop_tokens(x, q, k, 0.5, kept=bad)


def test_a_replayed_selection_traces_and_its_check_runs_where_values_read():
    """The range check of a replayed ``kept`` read its values under make_fx and fake tensors
    too (GuardOnDataDependentSymNode, DataDependentOutputException: public drop_tokens with
    ``kept=`` no longer traced), and skipped them under torch.func.grad, where they read. It
    reads them only on a plain CPU call (grad and jvp included, vmap not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    g = torch.Generator().manual_seed(45)
    x, q, k = torch.randn(2, 9, 8, generator=g), *torch.randn(2, 2, 3, 9, 4, generator=g)
    good = torch.tensor([[0, 2, 5, 7], [1, 3, 4, 6]])

    def replay(x, q, k, kept):
        return bsr_kernels.drop_tokens(x, q, k, 0.5, kept=kept)[0]

    want = replay(x, q, k, good)
    for mode in ("real", "fake", "symbolic"):
        graph = make_fx(replay, tracing_mode=mode)(x, q, k, good)
        assert "bsr_kernels.drop_tokens_replay" in graph.code, graph.code
    torch.testing.assert_close(make_fx(replay)(x, q, k, good)(x, q, k, good), want)
    with FakeTensorMode() as fake:
        out = replay(*(fake.from_tensor(t) for t in (x, q, k, good)))
    assert out.shape == want.shape
    with pytest.raises(ValueError, match=r"^kept must hold positions 0\.\.7"):
        torch.func.grad(lambda q: replay(x, q, k, good + 1).sum())(q)
    per_image = torch.func.vmap(lambda a, b, c, d: replay(a[None], b[None], c[None], d[None]))
    torch.testing.assert_close(per_image(x, q, k, good)[:, 0], want)


def test_torch_func_transforms_ignore_autocast_as_the_kernels_do():
    """Under a torch.func transform the ops compute the definition, which followed autocast:
    bf16 scores under CPU autocast (2.4 % off, another kept set for some images), while the
    kernels of the eager call score in float32 whatever autocast says."""
    case = DropCase(b=4, h=3, n=197, d=16, c=24, p=1, keep_rate=0.5, fuse=True, seed=46)
    x, q, k = make_inputs(case, CPU, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
        scores = bsr_kernels.cls_attention(q, k)
        per_image = torch.func.vmap(
            lambda a, b, c: bsr_kernels.drop_tokens(a[None], b[None], c[None], 0.5))(x, q, k)
        per_scores = torch.func.vmap(lambda b, c: bsr_kernels.cls_attention(b[None], c[None]))(
            q, k)
    assert torch.equal(per_image[1][:, 0], kept)
    torch.testing.assert_close(per_image[0][:, 0], out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_scores[:, 0], scores, rtol=1e-6, atol=1e-7)


#: x (2, 9, 8), q and k (2, 3, 9, 4): the shape of the replay and refusal tests below.
_SMALL = DropCase(b=2, h=3, n=9, d=4, c=8)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_replay_gives_the_drops_output_and_saves_int32_indices(x_dtype):
    """A replay (``kept=``, as a lean/fast backward runs it) returns what the drop returned:
    x's dtype (a bf16/fp16 x beside float32 q and k, as under autocast, runs in float32 on
    CPU and is cast back), the same rows, int64 positions whatever integer dtype ``kept``
    came in; and, like the drop, it saves its indices for backward as int32 (the C++ backend
    replays with torch ops, so the fused row may differ in its last bits)."""
    x, q, k = make_inputs(_SMALL, "cpu", torch.float32, requires_grad=True)
    x = x.detach().to(x_dtype).requires_grad_()
    out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
    assert out.dtype == x_dtype and out.shape == (2, 6, 8)
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t
    for recorded in (kept, kept.int()):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            again, kept_again = bsr_kernels.drop_tokens(x, q, k, 0.5, kept=recorded)
        assert again.dtype == x_dtype and kept_again.dtype == torch.int64
        assert torch.equal(kept_again, kept) and torch.equal(again[:, :5], out[:, :5])
        torch.testing.assert_close(again, out)   # the fused row: the C++ forward's vs torch ops
        ints = [d for d in saved if not d.is_floating_point]
        assert ints == [torch.int32], saved


def test_drop_tokens_refuses_x_elsewhere_and_a_boolean_kept_naming_them():
    """x on another device than q and k, and a boolean ``kept``, are refused by name before
    anything runs (x on meta reached the kernels; a mask is no list of positions)."""
    x, q, k = make_inputs(_SMALL, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"^x must be on the device of q"):
        bsr_kernels.drop_tokens(x.to("meta"), q, k, 0.5)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"^kept must be an integer tensor"):
        bsr_kernels.drop_tokens(x, q, k, 0.5, kept=mask)


def test_a_drop_of_nothing_returns_x_itself_and_an_empty_batch_replays():
    """keep_rate 1 (no ``kept``) returns x itself, as nn.Identity returns its input (no copy
    of the residual stream); an empty batch replays an empty selection (its range check has
    no values to read) and gives the drop's shapes."""
    x, q, k = make_inputs(_SMALL, "cpu", torch.float32)
    assert bsr_kernels.drop_tokens(x, q, k, 1.0)[0] is x
    empty = [t[:0] for t in (x, q, k)]
    want = bsr_kernels.drop_tokens(*empty, 0.5)
    assert want[0].shape == (0, 6, 8) and want[1].shape == (0, 4)
    out, kept = bsr_kernels.drop_tokens(*empty, 0.5, kept=want[1])
    assert out.shape == (0, 6, 8) and kept.shape == (0, 4) and kept.dtype == torch.int64


def test_fake_kernels_give_a_full_replay_no_fused_token():
    """A replay that keeps every token (keep_rate 1, a given order) appends no fused token; the
    fake kernels (torch.compile, export and FakeTensorMode trace with them) give that shape
    too, not one token more."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, q, k = make_inputs(_SMALL, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(8, generator=g) for _ in range(2)])
    want, _ = bsr_kernels.drop_tokens(x, q, k, 1.0, kept=order)
    assert want.shape == (2, 9, 8) and torch.equal(want[:, 1:], x[:, 1:][[[0], [1]], order])
    with FakeTensorMode() as fake:
        got, kept = bsr_kernels.drop_tokens(*(fake.from_tensor(t) for t in (x, q, k)), 1.0,
                                            kept=fake.from_tensor(order))
    assert got.shape == want.shape and kept.shape == order.shape
