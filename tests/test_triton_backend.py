"""Triton-specific tests of the token-drop ops (the cross-backend ones live in test_ops.py).

On a machine without CUDA every test runs the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, so shapes are small; where CUDA is present the value and
gradient tests also run compiled on CUDA tensors. Everything is compared with the pure-PyTorch
definition in :mod:`bsr_kernels.ops.reference`.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import bsr_kernels  # noqa: E402
from bsr_kernels.ops import reference as ref  # noqa: E402
from bsr_kernels.ops import triton_backend as tb  # noqa: E402
from bsr_kernels.ops.common import num_kept  # noqa: E402
from bsr_kernels.ops.dispatch import select_backend  # noqa: E402

from _backends import (  # noqa: E402
    assert_kept_matches, expected_from_kept, gradcheck, nan_padded)

BACKEND = tb.TritonBackend()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-11, atol=1e-13)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """CPU runs the interpreter; CUDA runs compiled kernels. Forces the triton backend."""
    if request.param == "cpu":
        if tb.interpreter_problem():
            pytest.skip(tb.interpreter_problem())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with bsr_kernels.use_backend("triton"):
        yield torch.device(request.param)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny block sizes, so that every loop of every kernel runs over several tiles."""
    for key, value in dict(tile_elems=32, max_block_c=4, max_block_m=4, rank_block=4).items():
        monkeypatch.setitem(tb.LAUNCH, key, value)


@pytest.fixture(params=[1, 2, 4], ids=lambda r: f"radix{r}")
def radix(request, monkeypatch):
    """Each digit width of the selection's threshold search (``select_radix_bits``, a launch
    setting the GPU sweep measures), which must select the same tokens."""
    monkeypatch.setitem(tb.LAUNCH, "select_radix_bits", request.param)
    return request.param


def _inputs(b, h, n, d, c, device, dtype, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, q, k))


def _selection(scores, n_keep):
    """The selection rule applied to given scores (int32, like the backend)."""
    return ref.select_tokens(scores, n_keep)[0].to(torch.int32)


def _check_forward(x, q, k, p, n_keep, fuse, dtype, scale=None):
    """Runs the backend forward twice, checks determinism and every output against the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = BACKEND.drop_forward(x, q, k, scale, p, n_keep, fuse)
    again = BACKEND.drop_forward(x, q, k, scale, p, n_keep, fuse)
    for a, b in zip(out, again):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a[~a.isnan()], b[~b.isnan()])), \
            "two runs differ"
    x_out, kept, scores, lse = out
    r_out, r_kept, r_scores, r_lse = ref.drop_tokens(x, q, k, scale, p, n_keep, fuse)
    m = x.shape[1] - p
    assert kept.dtype == torch.int32 and kept.shape == (x.shape[0], n_keep)
    assert scores.dtype == r_scores.dtype and lse.dtype == r_lse.dtype
    assert x_out.dtype == x.dtype and x_out.shape == r_out.shape
    # kept is exactly the selection rule on the backend's own scores, and the reference's set
    assert torch.equal(kept, _selection(scores, n_keep))
    assert torch.equal(kept.long(), r_kept), (kept, r_kept)
    torch.testing.assert_close(scores, r_scores, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(lse, r_lse, **TOL[dtype], equal_nan=True)
    rows = p + n_keep
    assert torch.equal(x_out[:, :rows], r_out[:, :rows]), "prefix/kept rows are not copies of x"
    assert x_out.shape[1] == rows + int(fuse and n_keep < m)
    torch.testing.assert_close(x_out[:, rows:], r_out[:, rows:], **TOL[dtype], equal_nan=True)
    return out


def _check_drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p):
    """The backend's drop backward against the reference's on the same inputs: each gradient
    within its dtype's tolerance, and of the reference's dtype. Returns the backend's."""
    got = BACKEND.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    want = ref.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[a.dtype])
    return got


# --- availability and the TRITON_INTERPRET switch ---------------------------------------------

def test_not_supported_reasons(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET" in r for r in BACKEND.not_supported_reasons(cpu, torch.float32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = [tb.interpreter_problem()] if tb.interpreter_problem() else []
    assert BACKEND.not_supported_reasons(cpu, torch.float32) == problem
    assert BACKEND.not_supported_reasons(cpu, torch.float64) == problem
    assert any("bfloat16" in r for r in BACKEND.not_supported_reasons(cpu, torch.bfloat16))
    assert any("int32" in r for r in BACKEND.not_supported_reasons(cuda, torch.int32))
    assert BACKEND.not_supported_reasons(torch.device("meta"), torch.float32)
    cuda_reasons = BACKEND.not_supported_reasons(cuda, torch.bfloat16)
    assert (cuda_reasons == []) == torch.cuda.is_available(), cuda_reasons


@pytest.mark.parametrize("value, on", [
    ("1", True), ("true", True), ("TRUE", True), ("On", True), ("yes", True), ("Y", True),
    ("0", False), ("", False), ("false", False), ("off", False), ("No", False), ("2", False),
    ("01", False), (" 1 ", False), ("t", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """bsr_kernels and Triton agree on every value of TRITON_INTERPRET: "false" or "off" turns
    the interpreter off for this backend too (it sent CPU tensors to the interpreter while
    Triton read the switch as off), and a value Triton does not read as on is off."""
    import triton
    from bsr_kernels import _config
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _config.triton_interpret() is on and triton.knobs.runtime.interpret is on
    refused = any("need TRITON_INTERPRET" in r
                  for r in BACKEND.not_supported_reasons(cpu, DTYPES[0]))
    assert refused is not on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _config.triton_interpret() is False and triton.knobs.runtime.interpret is False


def test_kernels_wrapped_per_mode_at_call_time(monkeypatch):
    """The interpreter flag is read at launch; kernels exist in both modes, whatever the import
    order."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert all(isinstance(f, InterpretedFunction) for f in tb._kernels(True).values())
    assert all(isinstance(f, JITFunction) for f in tb._kernels(False).values())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(tb._kernel("select_kernel"), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(tb._kernel("select_kernel"), JITFunction)


_IMPORT_ORDER_SCRIPT = r"""
import os, sys, torch
import triton.language as tl                        # decorates triton's stdlib in compiled mode
assert type(tl.standard._sum_combine).__name__ == "JITFunction"
os.environ["TRITON_INTERPRET"] = "1"                # set only now
os.environ["BSR_BACKEND"] = "triton"
import bsr_kernels
from bsr_kernels.ops import reference as ref
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 11, 5, generator=g)
q, k = torch.randn(2, 2, 11, 4, generator=g), torch.randn(2, 2, 11, 4, generator=g)
x_out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
r_out, r_kept, _, _ = ref.drop_tokens(x, q, k, 0.5, 1, 5, True)
assert torch.equal(kept, r_kept), (kept, r_kept)
torch.testing.assert_close(x_out, r_out)
print("OK")
"""


@pytest.mark.skipif(tb.interpreter_problem() is not None, reason=str(tb.interpreter_problem()))
def test_interpreter_set_after_import_triton():
    """TRITON_INTERPRET=1 set *after* ``import triton`` still runs the kernels (the reverse order,
    compiling while the variable is set, is covered by test_kernels_compile_for_gpu under
    conftest)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSR_BACKEND")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_forced_triton_without_interpreter_raises_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("BSR_BACKEND", "triton")
    x, q, k = _inputs(1, 1, 5, 4, 3, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bsr_kernels.drop_tokens(x, q, k, 0.5)


def test_select_radix_bits_outside_the_choices_is_a_value_error():
    for bad in (0, 3, 8, "4"):
        with tb.launch_settings(select_radix_bits=bad), \
                pytest.raises(ValueError, match=r"LAUNCH\['select_radix_bits'\]"):
            tb.select_blocks(196, torch.float32)


def _compile_for_sm90(name, pointers, constexprs, num_warps):
    """Compiles one kernel to a cubin for an H100 (sm_90) with triton's bundled ptxas; no GPU."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bsr_kernels.ops import _triton_kernels as raw

    fn = getattr(raw, name)
    params = list(inspect.signature(fn).parameters)
    signature = {p: ("constexpr" if p in constexprs else pointers.get(p, "fp64" if p == "scale"
                                                                      else "i32"))
                 for p in params}
    src = ASTSource(fn=tb._kernels(False)[name], signature=signature,
                    constexprs={(params.index(p),): v for p, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_interpreter_problem_names_the_versions(monkeypatch):
    """Triton < 3.7 with numpy >= 2.4 cannot interpret the kernels: a reason naming both versions,
    not an InterpreterError from inside a kernel; compiled CUDA kernels are unaffected."""
    import numpy
    monkeypatch.setattr(tb.triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    reason = tb.interpreter_problem()
    assert reason and "3.6.0" in reason and "2.4.6" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert reason in BACKEND.not_supported_reasons(torch.device("cpu"), torch.float32)
    if torch.cuda.is_available():
        assert BACKEND.not_supported_reasons(torch.device("cuda"), torch.float32) == []
    monkeypatch.setattr(numpy, "__version__", "2.3.1")
    assert tb.interpreter_problem() is None
    monkeypatch.setattr(tb.triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert tb.interpreter_problem() is None


def test_kernels_compile_for_gpu():
    """The interpreter accepts code the compiler rejects: compile each kernel for sm_90 (ViT-B
    sizes, bf16 and fp64, selecting and scores-only, fused and plain gather, both backward
    kernels) without a GPU, and check the launch table fills an H100 (132 SMs)."""
    import triton.language as tl

    for dt, cd in (("bf16", torch.float32), ("fp64", torch.float64)):
        acc = "fp64" if dt == "fp64" else "fp32"
        kernel = _compile_for_sm90(
            "cls_logits_kernel", dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", logit_ws_ptr=f"*{acc}",
                                      lse_ptr=f"*{acc}"),
            dict(ACC=tb._acc(cd), **tb.logits_blocks(64)), tb.LAUNCH["num_warps"])
        assert "cubin" in kernel.asm and ".entry cls_logits_kernel" in kernel.asm["ptx"]
        sw = tb.LAUNCH["select_warps"]
        for select, replay, warps in ((True, False, 1), (True, False, 4), (False, False, sw),
                                      (False, True, sw)):
            kernel = _compile_for_sm90(
                "select_kernel", dict(logit_ws_ptr=f"*{acc}", lse_ptr=f"*{acc}",
                                      scores_ptr=f"*{acc}", kept_ptr="*i32", slot_ws_ptr="*i32",
                                      key_ws_ptr="*i64" if acc == "fp64" else "*i32"),
                dict(ACC=tb._acc(cd), DO_SELECT=select, REPLAY=replay,
                     **tb.select_blocks(196, cd)), warps)
            assert "cubin" in kernel.asm
            if select and warps == 1:  # the counting passes need no block barrier: only the
                # one that orders the key workspace (tl.debug_barrier) is left
                assert kernel.asm["ptx"].count("bar.sync") == 1
        for radix, m in ((2, 196), (4, 196), (4, 576)):   # the sweep's other digit widths
            with tb.launch_settings(select_radix_bits=radix):
                kernel = _compile_for_sm90(
                    "select_kernel", dict(logit_ws_ptr=f"*{acc}", lse_ptr=f"*{acc}",
                                          scores_ptr=f"*{acc}", kept_ptr="*i32",
                                          slot_ws_ptr="*i32",
                                          key_ws_ptr="*i64" if acc == "fp64" else "*i32"),
                    dict(ACC=tb._acc(cd), DO_SELECT=True, REPLAY=False,
                         **tb.select_blocks(m, cd)), sw)
            assert "cubin" in kernel.asm
        for fuse in (True, False):
            blocks = tb.gather_blocks(128, 197, 768, 132)
            kernel = _compile_for_sm90(
                "gather_kernel", dict(x_ptr=f"*{dt}", slot_ws_ptr="*i32", scores_ptr=f"*{acc}",
                                      out_ptr=f"*{dt}"),
                dict(ACC=tb._acc(cd), FUSE=fuse, **blocks), tb.LAUNCH["num_warps"])
            assert "cubin" in kernel.asm
    # the gather grid gives every SM several programs at ViT-B sizes, small batches included
    for b in (8, 32, 128, 256):
        blocks = tb.gather_blocks(b, 197, 768, 132)
        programs = b * -(-768 // blocks["BLOCK_C"])
        assert programs >= min(tb.LAUNCH["programs_per_sm"] * 132, b * 768 // 32), (b, blocks)
    rows_ptrs = dict(gout_ptr="*bf16", kept_ptr="*i32", x_ptr="*bf16", scores_ptr="*fp32",
                     gx_ptr="*bf16", gs_ptr="*fp32")
    kernel = _compile_for_sm90("rows_bwd_kernel", rows_ptrs,
                               dict(ACC=tl.float32, FUSE=True, BLOCK_ROWS=16, BLOCK_K=64,
                                    BLOCK_C=256), tb.LAUNCH["num_warps"])
    assert "cubin" in kernel.asm
    cls_ptrs = dict(gs_ptr="*fp32", q_ptr="*bf16", k_ptr="*bf16", lse_ptr="*fp32",
                    gq_ptr="*bf16", gk_ptr="*bf16")
    kernel = _compile_for_sm90("cls_bwd_kernel", cls_ptrs,
                               dict(ACC=tl.float32, BLOCK_N=64, BLOCK_D=64),
                               tb.LAUNCH["num_warps"])
    assert "cubin" in kernel.asm


# --- forward ----------------------------------------------------------------------------------

FORWARD_CASES = [
    # (B, H, N, d, C, P, n_keep, fuse)
    (2, 3, 15, 8, 12, 1, 7, True),     # N not a power of two
    (2, 2, 31, 16, 20, 5, 8, True),    # 5 prefix tokens (CLS + 4 registers)
    (2, 3, 15, 8, 12, 1, 1, True),     # one kept token
    (2, 2, 15, 8, 12, 1, 13, True),    # exactly one dropped token
    (2, 2, 17, 8, 12, 5, 4, False),    # no fused token
    (3, 2, 2, 4, 6, 1, 1, True),       # N = 2: one candidate, kept, nothing fused
    (1, 1, 9, 3, 5, 1, 4, True),       # one head, odd head dim
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FORWARD_CASES,
                         ids=lambda c: "B{}H{}N{}d{}C{}P{}k{}f{:d}".format(*c))
def test_forward_matches_reference(case, dtype, device):
    b, h, n, d, c, p, n_keep, fuse = case
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=n * 7 + p)
    _check_forward(x, q, k, p, n_keep, fuse, dtype)
    scores, lse = BACKEND.cls_scores(q, k, d ** -0.5, p)
    r_scores, r_lse = ref.cls_scores(q, k, d ** -0.5, p)
    torch.testing.assert_close(scores, r_scores, **TOL[dtype])
    torch.testing.assert_close(lse, r_lse, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_many_tiles(dtype, device, small_tiles, radix):
    """Every loop runs over several tiles: logits, scores, ranks (with the cumsum carry), copies."""
    x, q, k = _inputs(2, 2, 31, 8, 10, device, dtype, seed=3)
    _check_forward(x, q, k, 5, 11, True, dtype, scale=0.7)
    _check_forward(x, q, k, 1, 9, False, dtype)


@pytest.mark.parametrize("fuse", [True, False])
def test_replay_many_tiles(device, small_tiles, fuse):
    """``drop_replay`` writes the slots of a given selection inside the selection kernel, over
    several tiles of M and of kept: equal to the reference's replay of the same set."""
    x, q, k = _inputs(3, 2, 31, 8, 10, device, torch.float64, seed=8)
    g = torch.Generator().manual_seed(4)
    kept = torch.stack([torch.randperm(26, generator=g)[:11].sort().values for _ in range(3)])
    kept = kept.to(device=device, dtype=torch.int32)
    got = BACKEND.drop_replay(x, q, k, kept, 0.7, 5, fuse)
    want = ref.drop_replay(x, q, k, kept, 0.7, 5, fuse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, 26])
def test_replay_entry_out_of_range_writes_nothing(device, bad):
    """On CUDA a replayed selection is not range-checked (reading it would sync with the host):
    the selection kernel promises that an entry outside [0, M) writes no slot, neither another
    image's nor memory out of bounds. Image 1 holds one (M = 26): image 0, whose slots lie just
    before image 1's, is the reference replay exactly, and so are image 1's other kept rows."""
    x, q, k = _inputs(2, 2, 31, 8, 10, device, torch.float64, seed=9)
    g = torch.Generator().manual_seed(5)
    kept = torch.stack([torch.randperm(26, generator=g)[:11].sort().values for _ in range(2)])
    bad_kept = kept.clone()
    bad_kept[1, 3] = bad
    got = BACKEND.drop_replay(x, q, k, bad_kept.to(device=device, dtype=torch.int32), 0.7, 5,
                              True)[0]
    want = ref.drop_replay(x, q, k, kept.to(device), 0.7, 5, True)[0]
    assert torch.equal(got[0, :16], want[0, :16])       # prefix and kept rows: copies of x
    torch.testing.assert_close(got[0, 16], want[0, 16], rtol=1e-12, atol=1e-12)   # fused
    rows = [r for r in range(5 + 11) if r != 5 + 3]     # not the bad entry's row, nor fused
    assert torch.equal(got[1, rows], want[1, rows])


def test_forward_large_shapes(device, radix):
    """N = 577 (ViT at 384 px) and C = 1024 with the default tiles."""
    x, q, k = _inputs(1, 2, 577, 8, 16, device, torch.float32, seed=11, spread=3.0)
    _check_forward(x, q, k, 1, num_kept(0.5, 576), True, torch.float32)
    x, q, k = _inputs(1, 2, 15, 8, 1024, device, torch.float32, seed=12)
    _check_forward(x, q, k, 1, 7, True, torch.float32)


@pytest.mark.parametrize("d, c", [(4, 6), (3, 5)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_nan_padded_inputs(dtype, d, c, device):
    """q, k as timm's qkv views, x and grad_out inside NaN buffers: wrong strides or
    out-of-bounds reads show, also a load that ignores the head-dim or channel mask where
    those (3, 5) are no powers of two."""
    b, h, n, p = 2, 2, 15, 1
    g = torch.Generator().manual_seed(5)
    qkv = torch.full((b, n, 3, h, d + 2), float("nan"), dtype=torch.float64)
    qkv[..., :d] = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)
    q, k, _ = qkv.to(device=device, dtype=dtype)[..., :d].permute(2, 0, 3, 1, 4).unbind(0)
    xbig = torch.full((b + 1, n + 3, c + 4), float("nan"), dtype=torch.float64)
    xbig[1:, 2:n + 2, 1:c + 1] = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    x = xbig.to(device=device, dtype=dtype)[1:, 2:n + 2, 1:c + 1]
    assert not (q.is_contiguous() or k.is_contiguous() or x.is_contiguous())
    x_out, kept, scores, lse = _check_forward(x, q, k, p, 6, True, dtype)
    assert not x_out.isnan().any() and not scores.isnan().any()

    gbig = torch.full((b, x_out.shape[1] + 2, c + 3), float("nan"), dtype=dtype, device=device)
    grad_out = gbig[:, 1:-1, 2:-1]
    grad_out.copy_(torch.randn(x_out.shape, generator=g, dtype=torch.float64))
    got = _check_drop_backward(grad_out, x, q, k, kept, scores, lse, d ** -0.5, p)
    for a, t in zip(got, (x, q, k)):
        assert not a.isnan().any()
        assert a.stride() == torch.empty_like(t).stride()  # the layout of the fake kernel
    got = BACKEND.gather_backward(grad_out[:, :p + 6], kept, n, p)
    assert torch.equal(got, ref.gather_backward(grad_out[:, :p + 6], kept, n, p))


@pytest.mark.parametrize("p, tiles", [(1, "default"), (5, "default"), (1, "small")])
def test_exact_ties_go_to_lower_positions(p, tiles, device, radix, request):
    """Equal scores are kept lowest position first. With small tiles (BLOCK_M = 4) a group of
    equal scores spans several tiles of candidates: the count of equal keys seen in earlier
    tiles carries over to the next."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    dtype = torch.float32
    b, h, n, d, c = 3, 2, 16, 4, 5
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=21)
    q[0, :, 0] = 0.0                       # batch 0: uniform attention, every score tied
    k[1] = k[1, :, :1].expand(h, n, d)     # batch 1: identical keys, every score tied
    pairs = k[2, :, p::2].clone()          # batch 2: candidates tied in pairs
    k[2, :, p::2] = pairs
    k[2, :, p + 1::2] = pairs[:, :(n - p) // 2]
    m = n - p
    for n_keep in (1, m // 2 + 1, m - 1):  # the boundary splits a group of equal scores
        x_out, kept, scores, _ = _check_forward(x, q, k, p, n_keep, True, dtype)
        want0 = torch.arange(n_keep, dtype=torch.int32)
        assert torch.equal(kept[0].cpu(), want0) and torch.equal(kept[1].cpu(), want0)
        s2 = scores[2, :m - m % 2].view(-1, 2)
        assert torch.equal(s2[:, 0], s2[:, 1]), "pairs should tie exactly"


def test_nan_ranks_lowest(device, radix):
    dtype = torch.float32
    b, h, n, d, c, p, n_keep = 3, 2, 13, 4, 6, 1, 5
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=8)
    q[0, 1, 0, 2] = float("nan")           # batch 0: NaN in the CLS query -> every score NaN
    q[1, 0, 4, :] = float("nan")           # batch 1: NaN in a non-CLS query row -> no effect
    x_out, kept, scores, lse = _check_forward(x, q, k, p, n_keep, True, dtype)
    assert scores[0].isnan().all() and torch.equal(kept[0].cpu(), torch.arange(n_keep).int())
    assert x_out[0, -1].isnan().all()      # NaN weights reach the fused token, as in the reference
    assert not scores[1:].isnan().any() and not x_out[1:].isnan().any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_nan_scores_rank_below_real_ones(device, radix):
    """+inf keys make single NaN scores among real ones (torch.logsumexp gives +inf, then
    exp(inf - inf) = NaN): those candidates rank lowest, tied among themselves by position."""
    dtype = torch.float64
    b, h, n, d, c, p = 2, 2, 12, 3, 4, 2
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=31)
    q[:, 0, 0] = q[:, 0, 0].abs() + 0.1    # positive CLS query in head 0
    k[0, 0, 5] = float("inf")              # batch 0: candidate 3 gets a NaN score
    k[1, 0, 4] = float("inf")              # batch 1: candidates 2 and 7 get NaN scores
    k[1, 0, 9] = float("inf")
    m = n - p
    for n_keep in (1, m // 2, m - 2, m - 1):
        x_out, kept, scores, _ = _check_forward(x, q, k, p, n_keep, True, dtype)
        assert scores[0].isnan().sum() == 1 and scores[0, 3].isnan()
        assert scores[1].isnan().sum() == 2 and scores[1, [2, 7]].isnan().all()
        assert 3 not in kept[0].tolist() and 7 not in kept[1].tolist()
        assert (2 in kept[1].tolist()) == (n_keep == m - 1)   # the NaN tie goes to position 2
        assert x_out[:, -1].isnan().all()


# --- backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 3, 15, 8, 12, 1, 7), (2, 2, 31, 4, 9, 5, 1),
                                  (1, 2, 9, 4, 5, 2, 6)],
                         ids=lambda c: "B{}H{}N{}d{}C{}P{}k{}".format(*c))
def test_backward_matches_reference(case, dtype, device):
    b, h, n, d, c, p, n_keep = case
    scale = d ** -0.5
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=n + p)
    x_out, kept, scores, lse = BACKEND.drop_forward(x, q, k, scale, p, n_keep, True)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=torch.float64).to(device, dtype)

    got = BACKEND.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    want = ref.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    # ... and autograd through the definition, the ground truth
    xr, qr, kr = (t.detach().clone().requires_grad_() for t in (x, q, k))
    auto = torch.autograd.grad(ref.drop_tokens(xr, qr, kr, scale, p, n_keep, True)[0],
                               (xr, qr, kr), grad_out)
    for name, a, w, t in zip("xqk", got, want, auto):
        assert a.shape == w.shape and a.dtype == w.dtype, name
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype], msg=lambda s, n=name: f"d{n}: {s}")
        torch.testing.assert_close(a, t, **GRAD_TOL[dtype], msg=lambda s, n=name: f"d{n}: {s}")
    assert got[1][:, :, 1:].abs().max() == 0 and got[1][:, :, 0].abs().max() > 0

    go = grad_out[:, :p + n_keep]
    assert torch.equal(BACKEND.gather_backward(go, kept, n, p), ref.gather_backward(go, kept, n, p))

    gs = torch.randn(b, n - p, generator=g, dtype=torch.float64).to(device, scores.dtype)
    got = BACKEND.cls_scores_backward(gs, q, k, lse, scale, p)
    want = ref.cls_scores_backward(gs, q, k, lse, scale, p)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype])


def test_backward_many_tiles(device, small_tiles):
    """The backward over several tiles of tokens, channels and candidates, at a scale other than
    the default (the forward's too: its lse goes into the backward), against the reference
    backward and against autograd through the definition."""
    dtype = torch.float64
    b, h, n, d, c, p, n_keep = 2, 2, 31, 8, 10, 5, 11
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=4)
    x_out, kept, scores, lse = _check_forward(x, q, k, p, n_keep, True, dtype, scale=0.3)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=torch.float64).to(device, dtype)
    got = _check_drop_backward(grad_out, x, q, k, kept, scores, lse, 0.3, p)
    xr, qr, kr = (t.detach().clone().requires_grad_() for t in (x, q, k))
    auto = torch.autograd.grad(ref.drop_tokens(xr, qr, kr, 0.3, p, n_keep, True)[0],
                               (xr, qr, kr), grad_out)
    for a, t in zip(got, auto):
        torch.testing.assert_close(a, t, **GRAD_TOL[dtype])
    go = grad_out[:, :p + n_keep]
    assert torch.equal(BACKEND.gather_backward(go, kept, n, p), ref.gather_backward(go, kept, n, p))


# --- the public API with BSR_BACKEND=triton ---------------------------------------------------

@pytest.fixture
def calls(monkeypatch):
    """Counts backend calls, to prove the public API really ran the Triton kernels."""
    counts = {}
    for name in ("drop_forward", "drop_backward", "gather_backward", "cls_scores",
                 "cls_scores_backward"):
        original = getattr(tb.TritonBackend, name)

        def spy(self, *args, _name=name, _original=original):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args)

        monkeypatch.setattr(tb.TritonBackend, name, spy)
    return counts


def test_public_api_uses_triton_and_matches_reference(device, calls):
    assert select_backend(device, torch.float32).name == "triton"
    x, q, k = _inputs(2, 3, 15, 8, 6, device, torch.float32, seed=9)
    x, q, k = (t.requires_grad_() for t in (x, q, k))
    g = torch.Generator().manual_seed(2)
    for fuse in (True, False):
        x_out, kept = bsr_kernels.drop_tokens(x, q, k, 0.4, fuse_token=fuse, num_prefix_tokens=2)
        r_out, r_kept, _, _ = ref.drop_tokens(x, q, k, 8 ** -0.5, 2, num_kept(0.4, 13), fuse)
        assert kept.dtype == torch.int64 and torch.equal(kept, r_kept)
        torch.testing.assert_close(x_out, r_out, **TOL[torch.float32])
        go = torch.randn(x_out.shape, generator=g, dtype=torch.float64).to(x_out)
        got = torch.autograd.grad(x_out, (x, q, k), go, allow_unused=True)
        want = torch.autograd.grad(r_out, (x, q, k), go, allow_unused=True)
        for a, w in zip(got, want):
            if w is None:
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, w, **GRAD_TOL[torch.float32])
    scores = bsr_kernels.cls_attention(q, k, num_prefix_tokens=2)
    torch.testing.assert_close(scores, ref.cls_scores(q, k, 8 ** -0.5, 2)[0], **TOL[torch.float32])
    assert calls["drop_forward"] == 2 and calls["drop_backward"] == 1
    assert calls["gather_backward"] == 1 and calls["cls_scores"] == 1


def test_gradcheck_public_api(device, calls):
    """float64 gradcheck through bsr_kernels.drop_tokens / cls_attention on the Triton kernels."""
    dt = torch.float64
    x, q, k = (t.requires_grad_() for t in _inputs(1, 2, 6, 2, 2, device, dt, seed=13))
    assert torch.autograd.gradcheck(
        lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5)[0], (x, q, k))
    assert torch.autograd.gradcheck(
        lambda x: bsr_kernels.drop_tokens(x, q, k, 0.5, fuse_token=False)[0], (x,))
    assert torch.autograd.gradcheck(
        lambda q, k: bsr_kernels.cls_attention(q, k, num_prefix_tokens=2), (q, k))
    # larger, with registers and a custom scale: fast mode (random projections of the Jacobian)
    x, q, k = (t.requires_grad_() for t in _inputs(2, 3, 11, 4, 5, device, dt, seed=14))
    assert gradcheck(
        lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.3, num_prefix_tokens=3, scale=0.8)[0],
        (x, q, k), fast=True)
    assert calls["drop_backward"] > 0 and calls["gather_backward"] > 0
    assert calls["cls_scores_backward"] > 0


def test_opcheck_drop_op(device):
    from bsr_kernels.ops import _drop_op, _replay_op

    x, q, k = _inputs(2, 2, 9, 4, 5, device, torch.float32, seed=15)
    x, q, k = (t.requires_grad_() for t in (x, q, k))
    torch.library.opcheck(_drop_op, (x, q, k, 0.5, 1, 3, True, "triton"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    kept = torch.tensor([[0, 3, 5], [1, 2, 7]], dtype=torch.int32, device=x.device)
    torch.library.opcheck(_replay_op, (x, q, k, kept, 0.5, 1, True, "triton"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def _check_low_precision_forward(x, q, k, p, n_keep):
    """Checks a kernel forward whose inputs are rounded (bf16/fp16; fp32 in the interpreter
    variant) and whose scores accumulate in fp32, against the reference on the same inputs:
    scores and lse, kept (the rule on the kernel's own scores, and the reference's set up to
    swaps of candidates that the score tolerance cannot tell apart), copied rows exact, and the
    fused row, finite, against fp32 arithmetic on the reference's scores and the kernel's set."""
    d, c = q.shape[-1], x.shape[-1]
    x_out, kept, scores, lse = BACKEND.drop_forward(x, q, k, d ** -0.5, p, n_keep, True)
    r_out, r_kept, r_scores, r_lse = ref.drop_tokens(x, q, k, d ** -0.5, p, n_keep, True)
    assert scores.dtype == torch.float32 and x_out.dtype == x.dtype
    assert x_out.shape == r_out.shape and kept.shape == r_kept.shape
    rtol, atol = 1e-4, 1e-6
    torch.testing.assert_close(scores, r_scores, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, r_lse, rtol=1e-4, atol=1e-4)
    assert torch.equal(kept, _selection(scores, n_keep))
    # two candidates may swap only if the scores' tolerance cannot order them
    tie_tol = 2 * (atol + rtol * float(r_scores.abs().max()))
    assert_kept_matches(kept.long(), r_kept, r_scores, tie_tol)
    assert bool(x_out.isfinite().all()), "NaN or inf in the kernel's output"
    rows = p + n_keep
    assert torch.equal(x_out[:, :p], x[:, :p])
    assert torch.equal(x_out[:, p:rows], x[:, p:].gather(
        1, kept.long().unsqueeze(-1).expand(-1, -1, c)))
    want = expected_from_kept(x, r_scores, kept, p, True)  # fp32 sum, rounded to x's dtype
    tol = dict(rtol=1e-2, atol=1e-2) if x.element_size() < 4 else TOL[torch.float32]
    torch.testing.assert_close(x_out[:, -1].float(), want[:, -1].float(), **tol)
    return x_out, kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled half precision)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_cuda(dtype, monkeypatch):
    """bf16/fp16 compiled kernels on a ViT-B/16-sized drop against the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, h, n, d, c, p, n_keep = 4, 12, 197, 64, 768, 1, 98
    x, q, k = _inputs(b, h, n, d, c, "cuda", dtype, seed=16)
    _check_low_precision_forward(x, q, k, p, n_keep)


def _check_low_precision_backward(x, q, k, p, n_keep):
    """Checks the backward kernels (drop_backward, gather_backward, cls_scores_backward) on
    inputs of a rounded dtype (bf16/fp16; fp32 in the interpreter variant) against autograd
    through the definition on float32 copies of the same inputs (exact upcasts), on the kernel's
    own selection, with the kernel's scores and lse as its backward takes them.

    Tolerance, per element: the kernels accumulate in float32 and round each gradient once to
    the input dtype, which moves it by at most half an ulp (``eps * |grad|`` bounds one ulp);
    float32 accumulation in another order differs by ~1e-7 of the summed magnitudes, bounded by
    ``1e-5 * max|grad|`` (the fp32 absolute tolerance of GRAD_TOL); and fp16 gradients below
    6e-5 are subnormal, with half a subnormal spacing of rounding (``eps * smallest_normal``).
    Gathered rows are copies of grad_out: exact."""
    dtype, dev = x.dtype, x.device
    n, d = x.shape[1], q.shape[-1]
    scale = d ** -0.5
    fi = torch.finfo(dtype)

    def close(got, want, name):
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        assert bool(got.isfinite().all()), f"{name}: NaN or inf"
        err = (got.float() - want).abs()
        bound = (fi.eps * want.abs() + 1e-5 * float(want.abs().max())
                 + fi.eps * fi.smallest_normal)
        bad = err > bound
        assert not bool(bad.any()), (f"{name}: {int(bad.sum())} of {bad.numel()} elements "
                                     f"off, max error {float(err.max()):.3g}, max|grad| "
                                     f"{float(want.abs().max()):.3g}")

    x_out, kept, scores, lse = BACKEND.drop_forward(x, q, k, scale, p, n_keep, True)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(x_out.shape, generator=g).to(dev, dtype)
    xf, qf, kf = (t.detach().float().requires_grad_() for t in (x, q, k))
    out_f = ref.drop_tokens(xf, qf, kf, scale, p, n_keep, True, kept=kept)[0]
    want = torch.autograd.grad(out_f, (xf, qf, kf), grad_out.float())
    got = BACKEND.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    for name, a, w in zip(("grad_x", "grad_q", "grad_k"), got, want):
        close(a, w, name)
    assert not bool(got[1][:, :, 1:].any()) and bool(got[1][:, :, 0].any())

    go = grad_out[:, :p + n_keep]
    out_f = ref.drop_tokens(xf, qf, kf, scale, p, n_keep, False, kept=kept)[0]
    want = torch.autograd.grad(out_f, xf, go.float())[0]
    gx = BACKEND.gather_backward(go, kept, n, p)
    assert gx.dtype == dtype and torch.equal(gx.float(), want), "gathered rows are not copies"

    s, lse = BACKEND.cls_scores(q, k, scale, p)
    gs = torch.randn(s.shape, generator=g).to(dev, s.dtype)
    want = torch.autograd.grad(ref.cls_scores(qf, kf, scale, p)[0], (qf, kf), gs)
    got = BACKEND.cls_scores_backward(gs, q, k, lse, scale, p)
    for name, a, w in zip(("cls grad_q", "cls grad_k"), got, want):
        close(a, w, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled half precision)")
@pytest.mark.parametrize("p,n_keep", [(1, 98), (5, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_backward_cuda(dtype, p, n_keep, monkeypatch):
    """bf16/fp16 compiled backward kernels on a ViT-B/16-sized drop against the definition on
    the same inputs upcast to fp32 (tolerance: ``_check_low_precision_backward``)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, h, n, d, c = 4, 12, 197, 64, 768
    x, q, k = _inputs(b, h, n, d, c, "cuda", dtype, seed=17)
    _check_low_precision_backward(x, q, k, p, n_keep)


def test_low_precision_backward_checks_in_the_interpreter(device):
    """The checks of ``test_half_precision_backward_cuda`` on fp32 inputs (the dtypes the
    interpreter takes), on a small shape with registers: the helper runs wherever Triton does."""
    x, q, k = _inputs(2, 3, 21, 8, 10, device, torch.float32, seed=17)
    _check_low_precision_backward(x, q, k, 3, 8)


def test_low_precision_checks_in_the_interpreter(device):
    """The checks of ``test_half_precision_cuda`` on fp32 inputs (the dtypes the interpreter
    takes), on a small shape: the helper runs wherever Triton does."""
    x, q, k = _inputs(2, 3, 21, 8, 10, device, torch.float32, seed=16)
    x_out, kept = _check_low_precision_forward(x, q, k, 1, 9)
    assert x_out.shape == (2, 1 + 9 + 1, 10) and kept.shape == (2, 9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_gpu_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device: inputs on another GPU still run there (forward
    and backward), with the reference's outputs and gradients."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, h, n, d, c, p = 2, 2, 17, 8, 12, 1
    x, q, k = (t.requires_grad_() for t in _inputs(b, h, n, d, c, "cuda:1", torch.float32, 21))
    assert torch.cuda.current_device() == 0
    out, kept = bsr_kernels.drop_tokens(x, q, k, 0.4, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (x, q, k))
    want = ref.drop_tokens(x, q, k, d ** -0.5, p, kept.shape[1], True,
                           kept=kept.to(torch.int32))[0]
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    for got, w in zip(grads, torch.autograd.grad(want.square().sum(), (x, q, k))):
        assert got.device == x.device
        torch.testing.assert_close(got, w, **TOL[torch.float32])


# --- gaps found by mutation testing of the kernels and their launch code ----------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf
def test_far_negative_logits_keep_a_finite_lse(device):
    """Every CLS logit far below the smallest normal's log (about -1500 here, float64): the
    online logsumexp starts from a zero sum, which must stay zero instead of being rescaled by
    exp(0 - max logit) = inf (0 * inf = NaN would make every score NaN)."""
    dtype = torch.float64
    x, q, k = _inputs(2, 2, 11, 4, 5, device, dtype, seed=41)
    q[:, :, 0, 0] = 10.0
    k[..., 0] -= 300.0
    x_out, kept, scores, lse = _check_forward(x, q, k, 1, 4, True, dtype, scale=0.5)
    assert bool(lse.isfinite().all()) and float(lse.max()) < -1000, lse
    assert bool(scores.isfinite().all()) and float(scores.max()) > 0.1


def test_near_ties_in_the_last_bits(device, radix):
    """Scores a few ulps apart (keys differing in the lowest digits only, some equal): the
    threshold search must resolve its last digit. kept is the selection rule on the kernel's
    own scores, for every n_keep; the rows follow that set."""
    dtype = torch.float32
    b, h, n, d, c, p = 2, 1, 12, 2, 5, 1
    m = n - p
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=23)
    q[:, :, 0] = torch.tensor([1.0, 0.0])
    g = torch.Generator().manual_seed(24)
    for bi in range(b):                    # key j: 0.5 moved up by a random 0..3 ulps each step
        steps = torch.randint(0, 4, (m,), generator=g).cumsum(0)[torch.randperm(m, generator=g)]
        col = torch.full((m,), 0.5, dtype=dtype)
        for _ in range(int(steps.max())):
            col = torch.where(steps > 0, torch.nextafter(col, torch.tensor(1.0)), col)
            steps = steps - 1
        k[bi, 0, p:, 0] = col.to(device)
    r_scores = ref.cls_scores(q, k, 1.0, p)[0]
    sensitive = 0
    for n_keep in range(1, m):
        x_out, kept, scores, _ = BACKEND.drop_forward(x, q, k, 1.0, p, n_keep, True)
        torch.testing.assert_close(scores, r_scores, **TOL[dtype])
        assert torch.equal(kept, _selection(scores, n_keep)), (n_keep, scores, kept)
        want = expected_from_kept(x, scores, kept, p, True)
        assert torch.equal(x_out[:, :p + n_keep], want[:, :p + n_keep])
        torch.testing.assert_close(x_out, want, **TOL[dtype])
        top = scores.sort(dim=1, descending=True).values.view(torch.int32)
        gap = top[:, n_keep - 1] - top[:, n_keep]
        sensitive += int(((gap > 0) & (gap < 16)).sum())
    assert sensitive > 0, "no selection boundary fell between scores a few ulps apart"


def test_q_and_k_in_different_layouts(device):
    """q with its head dim outermost (stride_qd != 1) and k with its heads outermost: each
    tensor's own strides reach every kernel (forward, drop backward, scores backward), and
    grad_q / grad_k come back in q's / k's layouts."""
    dtype = torch.float64
    b, h, n, d, c, p, n_keep = 2, 3, 9, 5, 4, 2, 3
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=25)
    q = q.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    k = k.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert q.stride(-1) != 1 and q.stride()[:2] != k.stride()[:2]
    scale = d ** -0.5
    x_out, kept, scores, lse = _check_forward(x, q, k, p, n_keep, True, dtype)
    g = torch.Generator().manual_seed(26)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=dtype).to(device)
    got = _check_drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    for a, t in zip(got, (x, q, k)):
        assert a.stride() == torch.empty_like(t).stride()
    gs = torch.randn(b, n - p, generator=g, dtype=dtype).to(device)
    got = BACKEND.cls_scores_backward(gs, q, k, lse, scale, p)
    want = ref.cls_scores_backward(gs, q, k, lse, scale, p)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype])


def test_non_contiguous_selection_scores_and_lse(device):
    """kept, scores, lse and the score gradient as non-contiguous views (what a caller may hold
    after indexing): the backend makes them contiguous before the kernels index them flat."""
    dtype = torch.float64
    b, h, n, d, c, p, n_keep = 2, 2, 11, 4, 5, 2, 4
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=29)
    scale = d ** -0.5
    x_out, kept, scores, lse = BACKEND.drop_forward(x, q, k, scale, p, n_keep, True)
    kept_v, scores_v, lse_v = nan_padded(kept, fill=0), nan_padded(scores), nan_padded(lse)
    assert not (kept_v.is_contiguous() or scores_v.is_contiguous() or lse_v.is_contiguous())
    for fuse in (True, False):
        got = BACKEND.drop_replay(x, q, k, kept_v, scale, p, fuse)
        want = ref.drop_replay(x, q, k, kept, scale, p, fuse)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, **TOL[dtype])
    g = torch.Generator().manual_seed(30)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=dtype).to(device)
    got = BACKEND.drop_backward(grad_out, x, q, k, kept_v, scores_v, lse_v, scale, p)
    want = ref.drop_backward(grad_out, x, q, k, kept, scores, lse, scale, p)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype])
    go = grad_out[:, :p + n_keep]
    assert torch.equal(BACKEND.gather_backward(go, kept_v, n, p),
                       ref.gather_backward(go, kept, n, p))
    gs = torch.randn(b, n - p, generator=g, dtype=dtype).to(device)
    got = BACKEND.cls_scores_backward(nan_padded(gs), q, k, lse_v, scale, p)
    want = ref.cls_scores_backward(gs, q, k, lse, scale, p)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_infinite_prefix_rows_and_keys(device):
    """Prefix rows of x at +-inf are copied but never enter the fused token (0 * inf would make
    it NaN) nor the score gradient; a +inf prefix key makes its head's gradients NaN everywhere,
    as in the reference (the softmax backward's sum runs over the prefix keys too)."""
    dtype = torch.float64
    b, h, n, d, c, p, n_keep = 2, 2, 11, 3, 4, 2, 4
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=31)
    x[:, 0], x[:, 1] = float("inf"), float("-inf")
    x_out, kept, scores, lse = _check_forward(x, q, k, p, n_keep, True, dtype)
    assert bool(x_out[:, -1].isfinite().all())
    g = torch.Generator().manual_seed(32)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=dtype).to(device)
    got = _check_drop_backward(grad_out, x, q, k, kept, scores, lse, d ** -0.5, p)
    assert all(bool(a.isfinite().all()) for a in got)

    q[0, 0, 0] = q[0, 0, 0].abs() + 0.1
    k[0, 0, 1] = float("inf")              # image 0, head 0: a +inf prefix logit
    scores, lse = BACKEND.cls_scores(q, k, d ** -0.5, p)
    gs = torch.randn(b, n - p, generator=g, dtype=dtype).to(device)
    got = BACKEND.cls_scores_backward(gs, q, k, lse, d ** -0.5, p)
    want = ref.cls_scores_backward(gs, q, k, ref.cls_scores(q, k, d ** -0.5, p)[1], d ** -0.5, p)
    assert bool(want[1][0, 0].isnan().all()) and bool(want[1][1].isfinite().all())
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **GRAD_TOL[dtype], equal_nan=True)


def _select_launch(logits, lse, p, n_keep=0, kept=None, slot_ws=None):
    """Runs ``select_kernel`` alone on a given (B, H, N) logit workspace and (B, H) lse:
    selecting ``n_keep`` or replaying ``kept``; returns (scores, kept, slot_ws)."""
    b, h, n = logits.shape
    m, dtype, dev = n - p, logits.dtype, logits.device
    replay = kept is not None
    if not replay:
        kept = torch.empty(b, n_keep, dtype=torch.int32, device=dev)
    if slot_ws is None:
        slot_ws = torch.empty(b, m, dtype=torch.int32, device=dev)
    scores = torch.empty(b, m, dtype=dtype, device=dev)
    key_ws = torch.empty(b, m, dtype=tb._KEY_TORCH[dtype], device=dev)
    tb._kernel("select_kernel")[(b,)](
        logits, lse, scores, kept, slot_ws, key_ws, h, n, p, kept.shape[1],
        ACC=tb._acc(dtype), DO_SELECT=not replay, REPLAY=replay, **tb.select_blocks(m, dtype),
        num_warps=tb.LAUNCH["select_warps"])
    return scores, kept, slot_ws


def test_replay_writes_no_slot_outside_the_image(device):
    """The selection kernel's replay writes slots at positions [0, M) of its own image only:
    entries M and -1 leave the words around the slot workspace untouched. (In a two-image launch
    the interpreter would hide a stray write into the next image, which resets its slots after;
    so one image runs here, its workspace a view with guard words on either side.)"""
    dtype = torch.float32
    b, h, n, d, p = 1, 2, 9, 4, 2
    m = n - p
    _, q, k = _inputs(b, h, n, d, 1, device, dtype, seed=33)
    logits = (torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * 0.5).contiguous()
    kept = torch.tensor([[5, m, 2, -1, 0]], dtype=torch.int32, device=device)
    buf = torch.full((b * m + 6,), 77, dtype=torch.int32, device=device)
    scores, _, slot_ws = _select_launch(logits, logits.logsumexp(-1), p, kept=kept,
                                        slot_ws=buf[3:3 + b * m])
    want = torch.full((m,), -1, dtype=torch.int32)
    want[5], want[2], want[0] = 0, 2, 4
    assert torch.equal(slot_ws.cpu(), want), slot_ws
    assert bool((buf[:3] == 77).all()) and bool((buf[-3:] == 77).all()), buf
    torch.testing.assert_close(scores, ref.cls_scores(q, k, 0.5, p)[0], **TOL[dtype])


def test_nan_of_either_sign_ranks_lowest(device, radix):
    """NaN scores rank below every real score whatever their sign bit. inf - inf makes the
    negative default NaN on x86 (the interpreter; test_nan_scores_rank_below_real_ones) but the
    positive canonical NaN on a GPU, whose bits read as the largest key unless NaN is mapped
    to -inf first: here the selection kernel runs on logits holding positive NaN."""
    dtype = torch.float32
    b, h, n, p = 2, 2, 13, 1
    m = n - p
    g = torch.Generator().manual_seed(36)
    logits = torch.randn(b, h, n, generator=g, dtype=dtype)
    lse = logits.logsumexp(-1)
    pos = torch.tensor(float("nan"), dtype=dtype).abs()
    for bi, hi, j, v in ((0, 1, 3, pos), (0, 0, 7, -pos), (1, 0, 0, pos), (1, 1, 10, pos),
                         (1, 1, 5, -pos)):
        logits[bi, hi, p + j] = v
    logits, lse = logits.to(device), lse.to(device)
    want_scores = (logits - lse[..., None]).exp()[:, :, p:].mean(1)
    for n_keep in (1, m // 2, m - 3, m, m - 1):   # m: nothing dropped, NaN kept too
        scores, kept, _ = _select_launch(logits, lse, p, n_keep)
        torch.testing.assert_close(scores, want_scores, **TOL[dtype], equal_nan=True)
        bits = scores.view(torch.int32)
        assert bool((scores.isnan() & (bits > 0)).any()), "no positive NaN score"
        assert torch.equal(kept, _selection(scores, n_keep)), (n_keep, kept)
        assert not ({3, 7} & set(kept[0].tolist()) or {0, 5, 10} & set(kept[1].tolist())) \
            or n_keep > m - 3
    assert kept[0].tolist().count(3) == 1 and 0 in kept[1].tolist()   # NaN ties: lower position


def test_mixed_dtypes_accumulate_in_float64(device):
    """x float32 beside float64 q, k, and the reverse: logits, scores, the fused row and the
    score gradient accumulate in float64 (``compute_dtype``), so scores and the gradients of the
    float64 inputs match the definition to float64 accuracy and the float32 fused row is its
    float64 value rounded once (float32 accumulation is off by ulps); the same for a replay."""
    b, h, n, d, c, p, n_keep = 2, 2, 11, 4, 6, 1, 4
    x64, q64, k64 = _inputs(b, h, n, d, c, device, torch.float64, seed=34)
    g = torch.Generator().manual_seed(35)
    for x, q, k in ((x64.float(), q64, k64), (x64, q64.float(), k64.float())):
        x_out, kept, scores, lse = _check_forward(x, q, k, p, n_keep, True, torch.float64)
        assert scores.dtype == lse.dtype == torch.float64
        want = ref.drop_tokens(x, q, k, d ** -0.5, p, n_keep, True)[0]
        if x.dtype == torch.float32:
            assert torch.equal(x_out[:, -1], want[:, -1]), "fused row not rounded from float64"
        grad_out = torch.randn(x_out.shape, generator=g, dtype=torch.float64).to(device, x.dtype)
        _check_drop_backward(grad_out, x, q, k, kept, scores, lse, d ** -0.5, p)   # dtypes too
        got = BACKEND.drop_replay(x, q, k, kept, d ** -0.5, p, True)   # the replay's dtypes too
        want = ref.drop_replay(x, q, k, kept, d ** -0.5, p, True)
        for a, w in zip(got, want):
            assert a.dtype == w.dtype
            torch.testing.assert_close(a, w, **TOL[torch.float64])


def test_replay_in_the_given_order(device):
    """A replayed selection keeps the order it is given, not ascending: candidate 0 at a later
    slot lands in that slot (not in row P, where a prefix rule taking row P would put it), and
    the backward scatters each slot back to its candidate."""
    dtype = torch.float64
    b, h, n, d, c, p = 2, 2, 10, 4, 5, 2
    x, q, k = _inputs(b, h, n, d, c, device, dtype, seed=37)
    kept = torch.tensor([[5, 3, 0, 6], [7, 0, 2, 4]], dtype=torch.int32, device=device)
    for fuse in (True, False):
        got = BACKEND.drop_replay(x, q, k, kept, 0.6, p, fuse)
        want = ref.drop_replay(x, q, k, kept, 0.6, p, fuse)
        assert torch.equal(got[0][:, :p + 4], want[0][:, :p + 4])
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, **TOL[dtype])
    x_out, scores, lse = BACKEND.drop_replay(x, q, k, kept, 0.6, p, True)
    g = torch.Generator().manual_seed(38)
    grad_out = torch.randn(x_out.shape, generator=g, dtype=dtype).to(device)
    _check_drop_backward(grad_out, x, q, k, kept, scores, lse, 0.6, p)


_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}


def test_launched_constants_compile_for_mixed_dtypes(device, monkeypatch):
    """The interpreter lets a loop-carried accumulator change dtype (float32 ACC times float64
    scores), the compiler refuses it: every kernel that a float32 x beside float64 q, k launches
    (forward, backward, replay) compiles for sm_90 with the constants the launch code chose."""
    import inspect

    from bsr_kernels.ops import _triton_kernels as raw

    launched, real = [], tb._kernel

    class _Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.name, args, kwargs))
                return real(self.name)[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, "_kernel", _Spy)
    x, q, k = _inputs(2, 2, 9, 4, 5, device, torch.float64, seed=39)
    x = x.float()
    x_out, kept, scores, lse = BACKEND.drop_forward(x, q, k, 0.5, 1, 3, True)
    BACKEND.drop_backward(torch.ones_like(x_out), x, q, k, kept, scores, lse, 0.5, 1)
    BACKEND.drop_replay(x, q, k, kept, 0.5, 1, True)
    assert {name for name, _, _ in launched} == set(raw.KERNELS)
    for name, args, kwargs in launched:
        params = list(inspect.signature(getattr(raw, name)).parameters)
        pointers = {p: _PTR[a.dtype] for p, a in zip(params, args) if isinstance(a, torch.Tensor)}
        constexprs = {p: v for p, v in kwargs.items() if p not in ("num_warps", "num_stages")}
        kernel = _compile_for_sm90(name, pointers, constexprs, kwargs["num_warps"])
        assert "cubin" in kernel.asm, name
