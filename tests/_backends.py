"""Helpers for the generated cross-backend tests of the token-drop ops.

Tests are generated from what each backend declares: every (backend, device, dtype) triple becomes
one pytest parameter, and a backend that reports ``not_supported_reasons`` becomes a *visible* skip
carrying those reasons. New backends are picked up automatically once
``bsr_kernels.ops.dispatch.all_backends()`` lists them.

Everything is compared with the pure-PyTorch definition in ``bsr_kernels.ops.reference`` (values)
and with autograd through it (gradients).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bsr_kernels.ops import reference
from bsr_kernels.ops.common import num_kept
from bsr_kernels.ops.dispatch import all_backends

__all__ = [
    "DEVICES", "DTYPES", "BACKEND_NAMES", "VALUE_TOL", "SCORE_TOL", "GRAD_REL_FLOOR",
    "GRAD_ABS_FLOOR", "TIE_TOL",
    "backend_params", "is_slow", "examples", "DropCase", "make_inputs", "timm_qk", "nan_padded",
    "resolved_scale", "reference_drop", "expected_from_kept", "assert_kept_matches",
    "assert_valid_kept", "assert_drop_matches", "grads_of", "float64_leaves",
    "assert_grads_accurate", "FAST_GRADCHECK", "gradcheck", "OpLog",
]

#: Devices tests are generated for. CUDA joins when present (then without TRITON_INTERPRET).
DEVICES: tuple[str, ...] = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
#: Dtypes tests are generated for.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
#: Every backend known to the dispatcher, available here or not.
BACKEND_NAMES: tuple[str, ...] = tuple(all_backends())

# Tolerances. Gathered rows (prefix and kept tokens) are copies and must match exactly; these
# apply to the fused token, the scores and the gradients.
VALUE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
SCORE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-13)}
#: Gradients (flash-attention's self-calibrating rule): a backend's error against a float64
#: evaluation of the definition may be at most twice the error of autograd through the definition
#: at the backend's precision, plus this fraction of the gradient's largest magnitude, plus an
#: absolute floor (inputs and upstream gradients are O(1): ~8 ulps at 1). The absolute floor
#: covers small gradients that are sums of much larger, cancelling terms.
GRAD_REL_FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12}
GRAD_ABS_FLOOR = {torch.float32: 1e-6, torch.float64: 1e-14}
#: Two candidates whose reference scores differ by less than this may swap places in the kept set
#: (scores are probabilities in [0, 1], so an absolute tolerance is meaningful).
TIE_TOL = {torch.float32: 1e-5, torch.float64: 1e-11}

#: Backends that run much slower than the others on CPU (the Triton interpreter): fewer examples.
_SLOW_ON_CPU = ("triton",)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def backend_params(devices=DEVICES, dtypes=DTYPES, names=None) -> list:
    """One ``pytest.param((name, device, dtype))`` per backend, device and dtype.

    A backend that cannot run there is still listed, marked skip with its own reasons, so it shows
    in the report instead of vanishing.
    """
    params = []
    backends = all_backends()
    for name in names or BACKEND_NAMES:
        for device in devices:
            for dtype in dtypes:
                reasons = backends[name].not_supported_reasons(torch.device(device), dtype)
                marks = (pytest.mark.skip(reason=f"backend {name!r} unavailable on {device} "
                                          f"{_dtype_id(dtype)}: {'; '.join(reasons)}")
                         if reasons else ())
                params.append(pytest.param((name, device, dtype), marks=marks,
                                           id=f"{name}-{device}-{_dtype_id(dtype)}"))
    return params


def is_slow(name: str, device: str) -> bool:
    """Whether this backend runs interpreted (much slower) on this device."""
    return name in _SLOW_ON_CPU and device == "cpu"


def examples(name: str, device: str, fast: int, slow: int) -> int:
    """Hypothesis example count: ``slow`` for interpreted Triton on CPU, else ``fast``; both
    multiplied by ``BSR_TEST_EXAMPLES_SCALE`` (default 1) for longer soak runs."""
    factor = float(os.environ.get("BSR_TEST_EXAMPLES_SCALE", "1"))
    return max(1, round(factor * (slow if is_slow(name, device) else fast)))


@dataclass(frozen=True)
class DropCase:
    """One token-drop problem: sizes, options and the seed of its random inputs."""

    b: int
    h: int
    n: int
    d: int
    c: int
    p: int = 1
    keep_rate: float = 0.5
    fuse: bool = True
    scale: float | None = None
    spread: float = 1.0  # multiplies q: larger spreads make the CLS attention peakier
    seed: int = 0

    @property
    def m(self) -> int:
        """Candidates: non-prefix tokens."""
        return self.n - self.p

    @property
    def n_keep(self) -> int:
        return num_kept(self.keep_rate, self.m)


def make_inputs(case: DropCase, device, dtype, requires_grad: bool = False):
    """Random x (B, N, C), q and k (B, H, N, d), contiguous, from ``case.seed``."""
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.b, case.n, case.c, generator=g, dtype=torch.float64)
    q = torch.randn(case.b, case.h, case.n, case.d, generator=g, dtype=torch.float64) * case.spread
    k = torch.randn(case.b, case.h, case.n, case.d, generator=g, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (x, q, k)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return tuple(out)


def timm_qk(b: int, n: int, h: int, d: int, device, dtype, seed: int = 0,
            requires_grad: bool = False):
    """q and k as timm's Attention makes them: views into one fused qkv tensor.

    ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``: neither is contiguous, and
    they are not even dense (they interleave with each other and with v).

    Returns:
        (qkv leaf (B, N, 3*H*d), q, k).
    """
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64).to(device=device,
                                                                             dtype=dtype)
    qkv.requires_grad_(requires_grad)
    q, k, _ = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q, k


def nan_padded(t: torch.Tensor, pad: int = 2, fill: float = float("nan")) -> torch.Tensor:
    """A copy of ``t`` that is a strided (non-contiguous) view into a larger NaN-filled buffer.

    Any read outside the view's bounds (a wrong stride, an off-by-one, flat indexing) pulls NaN
    into the result. ``fill`` replaces NaN for an integer tensor.
    """
    big = torch.full([s + 2 * pad for s in t.shape], fill, dtype=t.dtype, device=t.device)
    view = big[tuple(slice(pad, pad + s) for s in t.shape)]
    view.copy_(t.detach())
    return view


def resolved_scale(scale, d: int) -> float:
    return d ** -0.5 if scale is None else float(scale)


def reference_drop(x, q, k, case: DropCase):
    """The definition: (x_out, kept int64, scores, lse), differentiable in x, q, k."""
    return reference.drop_tokens(x, q, k, resolved_scale(case.scale, q.shape[-1]), case.p,
                                 case.n_keep, case.fuse)


def expected_from_kept(x, scores, kept, p: int, fuse: bool):
    """The output the definition gives for a *given* kept set (used when near-ties swap tokens).

    Args:
        x: (B, N, C).
        scores: (B, N - P) reference scores (may carry autograd to q and k).
        kept: (B, n_keep) positions among the non-prefix tokens.
    """
    b, n, c = x.shape
    kept = kept.long()
    xp = x[:, p:]
    parts = [x[:, :p], torch.gather(xp, 1, kept.unsqueeze(-1).expand(-1, -1, c))]
    if fuse and kept.shape[1] < n - p:
        dropped = torch.ones(b, n - p, dtype=torch.bool, device=x.device).scatter(1, kept, False)
        w = torch.where(dropped, scores, torch.zeros_like(scores))
        parts.append((w.unsqueeze(-1) * xp.to(w.dtype)).sum(1).to(x.dtype).unsqueeze(1))
    return torch.cat(parts, dim=1)


def assert_valid_kept(kept: torch.Tensor, b: int, n_keep: int, m: int) -> None:
    """kept is (B, n_keep) int64, strictly ascending, inside [0, M)."""
    assert kept.dtype == torch.int64, kept.dtype
    assert tuple(kept.shape) == (b, n_keep), (tuple(kept.shape), (b, n_keep))
    if kept.numel():
        assert int(kept.min()) >= 0 and int(kept.max()) < m, kept
        assert bool((kept[:, 1:] > kept[:, :-1]).all()), f"not strictly ascending: {kept}"


def assert_kept_matches(kept, ref_kept, ref_scores, tie_tol: float) -> None:
    """kept equals ref_kept, except for swaps between candidates that are (near-)tied.

    Each row of ``kept`` must be a valid selection first: strictly ascending (so no index twice)
    and inside [0, M), M the number of reference scores; comparing sets alone would let a
    duplicated index, standing in for a missing one, pass. Every token kept by one side and not
    the other must have a reference score within ``tie_tol`` of every token in the opposite
    situation. NaN scores tie with NaN only.
    """
    assert kept.shape == ref_kept.shape, (kept.shape, ref_kept.shape)
    assert not kept.is_floating_point(), kept.dtype
    m = ref_scores.shape[-1]
    for bi in range(kept.shape[0]):
        row = kept[bi].tolist()
        assert all(a < b for a, b in zip(row, row[1:])), (
            f"batch {bi}: kept {row} is not strictly ascending (an index repeated or out of "
            "order)")
        assert all(0 <= a < m for a in row), f"batch {bi}: kept {row} leaves [0, {m})"
        got, want = set(row), set(ref_kept[bi].tolist())
        extra, missing = sorted(got - want), sorted(want - got)
        assert len(extra) == len(missing), (bi, row, sorted(want))
        s = ref_scores[bi].detach().double().cpu()
        for a in extra:
            for r in missing:
                sa, sr = float(s[a]), float(s[r])
                tied = (math.isnan(sa) and math.isnan(sr)) or abs(sa - sr) < tie_tol
                assert tied, (f"batch {bi}: kept token {a} (score {sa!r}) instead of token {r} "
                              f"(score {sr!r}); they differ by more than {tie_tol}")


def assert_drop_matches(x_out, kept, x, q, k, case: DropCase, dtype) -> torch.Tensor:
    """Checks one drop_tokens result against the definition; returns the expected x_out.

    Kept sets may differ only by near-ties; x_out is then checked against the definition for the
    backend's own kept set. Prefix and kept rows must be exact copies of x's rows.
    """
    with torch.no_grad():
        ref_out, ref_kept, ref_scores, _ = reference_drop(x, q, k, case)
    assert_valid_kept(kept, case.b, case.n_keep, case.m)
    assert_kept_matches(kept, ref_kept, ref_scores, TIE_TOL[dtype])
    if not torch.equal(kept, ref_kept):
        with torch.no_grad():
            ref_out = expected_from_kept(x, ref_scores, kept, case.p, case.fuse)
    assert x_out.dtype == x.dtype
    assert x_out.shape == ref_out.shape, (x_out.shape, ref_out.shape)
    rows = case.p + case.n_keep
    assert torch.equal(x_out[:, :rows], ref_out[:, :rows]), "prefix/kept rows are not copies of x"
    if x_out.shape[1] > rows:
        torch.testing.assert_close(x_out[:, rows:], ref_out[:, rows:], **VALUE_TOL[dtype])
    return ref_out


def grads_of(out, inputs, grad_out):
    """d(out . grad_out)/d(inputs); zeros where an input does not reach out."""
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def float64_leaves(*tensors):
    """Detached float64 copies that require grad (for the high-precision gradient reference)."""
    return tuple(t.detach().double().requires_grad_() for t in tensors)


def assert_grads_accurate(got, want64, ref, names, dtype, nonfinite: bool = False,
                          term_scale: float = 1.0) -> None:
    """Each gradient in ``got`` (backend) is as accurate as ``ref`` (autograd through the
    definition at the same precision), both measured against ``want64`` (float64 definition).

    ``max|got - want64| <= 2 * max|ref - want64| + GRAD_REL_FLOOR * max|want64| + GRAD_ABS_FLOOR``.

    In float64 ``ref`` is ``want64`` itself, so the rule measures no reference error and the
    floors alone stand for float64 rounding, which grows with the terms a gradient sums, not
    with the result: through a peaked softmax the terms of the q gradient (about scale * |k| *
    |cotangent|) cancel to a result thousands of times smaller, and a correct kernel's error
    was seen at 3.9e-14 against a bound of 1.1e-14 (hypothesis' drawn cases, about one run in
    300). ``term_scale`` is the size of those terms; in float64 the absolute floor is
    multiplied by it when above 1 (other dtypes keep their floors: their ``ref`` measures).

    With ``nonfinite`` (NaN / inf inputs), ``got`` and ``want64`` must first have NaN exactly
    where ``ref`` has NaN and the same infinities where it has them; the rule then applies to the
    entries where ``ref`` is finite. Without it, any NaN fails (it makes the error NaN).
    """
    for g, w, r, name in zip(got, want64, ref, names):
        assert g.shape == w.shape == r.shape, (name, g.shape, w.shape, r.shape)
        assert g.dtype == r.dtype, (name, g.dtype, r.dtype)
        w = w.detach().double()
        g, r = g.detach(), r.detach()
        if nonfinite:
            fin = r.isfinite()
            for t, what in ((g, "backend"), (w, "float64 definition")):
                assert torch.equal(t.isnan(), r.isnan()), (
                    f"grad {name}: the {what} has NaN at {int(t.isnan().sum())} places, "
                    f"autograd through the definition at {int(r.isnan().sum())}, or elsewhere")
                inf = r.isinf()
                assert torch.equal(t.isinf(), inf) and torch.equal(
                    t[inf].double(), r[inf].double()), f"grad {name}: infinities differ"
            g, w, r = g[fin], w[fin], r[fin]
        err = float((g.double() - w).abs().max()) if g.numel() else 0.0
        err_ref = float((r.double() - w).abs().max()) if g.numel() else 0.0
        scale = float(w.abs().max()) if g.numel() else 0.0
        floor = GRAD_ABS_FLOOR[dtype] * (max(1.0, term_scale) if dtype == torch.float64 else 1.0)
        bound = 2 * err_ref + GRAD_REL_FLOOR[dtype] * scale + floor
        assert err <= bound, (f"grad {name}: max error {err:.3g} vs float64 definition exceeds "
                              f"{bound:.3g} (2 x reference error {err_ref:.3g} + "
                              f"{GRAD_REL_FLOOR[dtype]:g} x max|grad| {scale:.3g} + "
                              f"{floor:.3g})")


#: gradcheck's fast mode compares one random projection of the Jacobian onto unit vectors. For the
#: q, k part of a drop that is a number of order 1e-3, so the default atol (1e-5) would pass a 1 %
#: error there (seen with a mutated kernel). Central differences in float64 are good to ~1e-10.
FAST_GRADCHECK = dict(fast_mode=True, atol=1e-8, rtol=1e-5)


def gradcheck(fn, inputs, fast: bool) -> bool:
    """``torch.autograd.gradcheck`` of ``fn(*inputs)``; with ``fast`` (the slow Triton
    interpreter), fast mode at :data:`FAST_GRADCHECK`, one input at a time, so that x's large
    part of the projection cannot hide an error in q's and k's small one."""
    if not fast:   # tolerances that a float32 computation of the float64 backward fails
        # (gradcheck's default atol 1e-5, even 1e-8 with rtol 1e-6, let it pass); float64
        # finite differences are good to about 1e-10
        return torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-9, rtol=1e-8)
    for i, t in enumerate(inputs):
        def only(t_i, i=i):
            return fn(*inputs[:i], t_i, *inputs[i + 1:])
        assert torch.autograd.gradcheck(only, (t,), **FAST_GRADCHECK), f"input {i}"
    return True


class OpLog(TorchDispatchMode):
    """Runs the ops that reach the Python dispatch mode and records each one with its output
    in ``calls``; ``names`` lists them as ``str(op)`` (``bsr_kernels.drop_tokens.default``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, out))
        return out

    @property
    def names(self) -> list[str]:
        return [str(func) for func, _ in self.calls]
