"""Triton backend of the token-drop ops: a three-pass forward that fills the GPU at every batch
size, and Triton backward kernels.

Kernels live in :mod:`._triton_kernels`; this module chooses block sizes, allocates outputs and
launches them.

Forward (``drop_forward``; ``cls_scores`` runs passes 1-2 only; ``drop_replay`` runs 1, 2 with the
recorded rows in place of the selection, and 3):

1. ``cls_logits_kernel``, grid (B, H): the CLS-row logits of one head (q_cls against every key,
   tile by tile) and their logsumexp. Reads each K row once. (B, H, N) fp32 logits go to a
   workspace: 4 bytes per key row against K's 128 (bf16, head dim 64), written here and read
   back by pass 2, so about 6 % over K's traffic (2.4 MB of the 97 MB at ViT-B B=128).
2. ``select_kernel``, grid (B,): head-mean probabilities of the candidates, then the exact
   selection without a sort: the n_keep-th largest score is found digit by digit on an integer
   key of the same order (``select_radix_bits`` bits a digit: 32 / bits counting passes for
   fp32, 64 / bits for fp64, each over the M scores in L1, counting the keys at or above every
   value of the digit at once), ties to the lower position by a prefix count. O(32 M) compares
   for 1-bit digits instead of O(M^2) pairwise ranks. Writes ``kept`` and each candidate's
   output slot.
3. ``gather_kernel``, grid (B, cdiv(C, BLOCK_C)): copies the prefix and kept rows to their slots
   and sums the dropped rows, weighted by their scores, into the fused row. Reads each x element
   once; without a fused token dropped rows are never read.

Occupancy (H100: 132 SMs, 4 warps per program). Passes 1 and 3 carry almost all the bytes (K, x,
x_out). Pass 1 has B*H programs: 1536 at ViT-B B=128 (11.6 per SM), 384 at B=32 N=577 (2.9 per
SM, each walking 577 keys), 96 at B=8 (under one per SM, but 8 images move only ~6 MB). Pass 3
picks the widest channel tile that still gives ``programs_per_sm`` (8) programs per SM:
BLOCK_C=64 at B=128 (1536 programs), 32 at B=32 (768: the narrowest tile, rows of 64 bytes in
bf16), 32 at B=8 (192). Pass 2 has B programs of small work and is latency bound at every size:
32 dependent counts over the M keys, each a block-wide sum.

The launch table is measured, not predicted (``bench_gpu --parts sweep``: programs per SM 2/4/8
x gather warps 4/8 x selection warps 1/2/4, each forward a CUDA-graph replay over rotated inputs;
H100, bf16, 2026-11-27, benchmarks/results/2026-11-27-h100.md). The selection's warps decide
most of it: one warp per image (its counts as warp shuffles, no block barrier; the table until
then) was the slowest choice at every shape, four the fastest: 82 -> 72 us at ViT-B B=128,
128 -> 67 us at B=32 N=577, 36 -> 28 us at B=8. With four warps each warp holds a quarter of
the keys, so a count costs a barrier but a quarter of the serial work, and N=577 (BLOCK_M=1024)
no longer keeps 32 keys per thread. Eight programs per SM in the gather then take B=128 from 72
to 66 us (pass 3 at 64-channel tiles); at the other shapes the narrowest tile is already
reached and 4 or 8 measure alike. Gather warps 4 beat 8 except at B=8 (27.6 against 26.9 us).
Called eagerly, the three launches and the op's dispatch add host-side time of the same order;
inside a captured or compiled step it vanishes.

The selection's passes are dependent block-wide sums, so its latency grows with their number,
which ``select_radix_bits`` divides: 2 or 4 bits a digit make 16 or 8 passes for fp32 instead of
32, each counting 4 or 16 candidate thresholds at once (more compares, one reduction each).
Why it may pay, from the figures above (an estimate, not a measurement): at B=8, where the op
moves about 6 MB, the forward takes 27.7 us, nearly all launch and latency, and the selection's
warps alone moved it by 8 us; the selection's grid is one wave of B programs up to B=132, so
its latency is no smaller at B=128 (65 us, 50 % of the copy bound). The table keeps 1 bit,
as measured, until the sweep (which now also tries 2 and 4 bits) has timed the others on a
GPU. Compiled for sm_90 without a GPU (``ptxas -v``), 4 bits need 40 registers at M=196 and 80
at M=576 (4 warps), without spills; 8 bits spill at M=576 and are refused.

Backward: ``rows_bwd_kernel`` (grid (B, row tiles)) scatters grad_out back, adds the fusion-weight
rows and computes the score gradient ``<g_fused, x_j>`` of the dropped tokens; ``drop_backward``
then runs ``cls_bwd_kernel`` (grid (B, H)) for grad_q and grad_k. Both grids are already
parallel over more than the batch.

Strides: every input (x, q, k, grad_out) may be non-contiguous; its strides go to the kernel.
Outputs get the layouts of the fake kernels registered in ``bsr_kernels.ops`` (torch.compile
checks them): x_out, kept, scores, lse and gather_backward's grad_x contiguous; drop_backward's
grad_x like x, grad_q / grad_k like q / k (``torch.empty_like``). x may have another dtype than q
and k (autocast); scores accumulate in float32 (float64 when either is float64).

TRITON_INTERPRET (finding for triton 3.8.0, from ``triton/runtime/jit.py``, ``triton/knobs.py``,
``triton/language/standard.py`` and ``triton/runtime/interpreter.py``):

* ``triton.knobs.runtime.interpret`` reads the environment variable on every access; nothing caches
  it at import. But ``triton.jit`` consults it only once, when it *decorates* a function: it
  returns an ``InterpretedFunction`` when set and a compiling ``JITFunction`` otherwise, and that
  object never changes mode.
* Triton's own standard library is made of such decorated functions (``tl.sum``, ``tl.max``,
  ``tl.cumsum``, ``tl.zeros``, the reduction combine functions, ...), decorated when
  ``triton.language`` is imported, which ``import triton`` does (and so does
  ``import torch._dynamo``). A kernel that calls them only runs in the mode that was active at
  that import: an interpreted kernel calling a compiled ``tl.sum`` fails with "Cannot call
  @triton.jit'd outside of the scope of a kernel", and a compiled kernel calling an interpreted
  one fails to compile.
* So for ordinary ``@triton.jit`` code the answer is yes: ``TRITON_INTERPRET=1`` must be set
  before ``import triton`` (and before anything that imports it).

This backend does not depend on that order. Its kernels are kept undecorated and are wrapped at
launch time, once per mode (``_kernels(interpret)``), with
:func:`bsr_kernels._config.triton_interpret` read on every call. They call no standard-library
``@jit`` function: reductions and scans use the builtins ``tl.reduce`` / ``tl.associative_scan``
with combine functions bound per mode (``tl.standard._sum_combine`` / ``_elementwise_max`` for
the interpreter, which recognises those by identity and reduces with numpy; our own
``JITFunction`` combines for the compiler), and ``tl.full`` replaces ``tl.zeros``. Setting or
clearing ``TRITON_INTERPRET=1`` at any time takes effect on the next call, whatever the import
order (tested in ``tests/test_triton_backend.py``).
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

from .. import _config
from .common import Backend, compute_dtype, out_tokens

try:  # triton is optional: a missing triton is a reason, not an ImportError
    import triton
    import triton.language as tl
    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["TritonBackend", "LAUNCH", "launch_settings"]

_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.float64)

#: Launch parameters (the benchmark sweeps them; tests shrink them to force multi-tile loops):
#: warps per program, element budget of a 2-D tile, widest channel tile of the gather, widest
#: score tile of the selection, programs per SM the gather grid aims for, pipeline stages, and
#: the warps of the selection (measured on an H100 by ``bench_gpu --parts sweep``; see the module
#: docstring).
LAUNCH = {"num_warps": 4, "tile_elems": 4096, "max_block_c": 256, "min_block_c": 32,
          "max_block_m": 1024, "programs_per_sm": 8, "num_stages": 3, "rank_block": 64,
          "select_warps": 4, "select_radix_bits": 1}

#: Selection keys per compute dtype: (int dtype, bits, most negative value, magnitude-bit mask).
_KEYS = {torch.float32: ("int32", 32, -(2 ** 31), 2 ** 31 - 1),
         torch.float64: ("int64", 64, -(2 ** 63), 2 ** 63 - 1)}
_KEY_TORCH = {torch.float32: torch.int32, torch.float64: torch.int64}


def _rebind(fn, bindings: dict):
    """A copy of ``fn`` whose global namespace is a copy of its module's with ``bindings`` set."""
    namespace = dict(fn.__globals__)
    namespace.update(bindings)
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    functools.update_wrapper(new, fn, updated=())
    del new.__wrapped__  # triton reads the source of ``fn`` itself, through the code object
    return new


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> dict:
    """The kernels wrapped for the compiler (``interpret=False``) or the CPU interpreter.

    Works whatever ``TRITON_INTERPRET`` was when triton was imported: see the module docstring.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from . import _triton_kernels as raw

    if interpret:
        wrap = InterpretedFunction
        helpers = {"_SUM": tl.standard._sum_combine, "_MAX": tl.standard._elementwise_max}
    else:
        wrap = JITFunction
        helpers = {"_SUM": JITFunction(_rebind(raw.add_combine, {})),
                   "_MAX": JITFunction(_rebind(raw.max_combine, {}))}
    return {name: wrap(_rebind(getattr(raw, name), helpers)) for name in raw.KERNELS}


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here, or None.

    Triton before 3.7 wraps every scalar of an interpreted kernel in a 1-element array whose
    ``__index__`` (a loop bound such as ``range(0, N, BLOCK_N)``) calls ``int()`` on it; numpy
    2.4 and later refuse that ("only 0-dimensional arrays can be converted to Python scalars").
    Triton 3.8 makes them 0-d. Compiled (CUDA) kernels are unaffected.
    """
    if _TRITON_ERROR is not None:
        return None
    import numpy
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with numpy "
                f"{numpy.__version__} (it calls int() on 1-element arrays); use triton >= 3.7 or "
                "numpy < 2.4 for TRITON_INTERPRET=1")
    return None


def _kernel(name: str):
    return _kernels(_config.triton_interpret())[name]


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one "SM", so the smallest grid rule applies
    return torch.cuda.get_device_properties(device).multi_processor_count


def logits_blocks(d: int) -> dict:
    """Tiles of :func:`cls_logits_kernel`: the whole head dim, as many keys as the budget allows."""
    block_d = _p2(d)
    return dict(BLOCK_D=block_d, BLOCK_N=max(1, min(128, LAUNCH["tile_elems"] // block_d)))


@contextlib.contextmanager
def launch_settings(**settings):
    """:data:`LAUNCH` with ``settings`` for the ``with`` block, restored whole after it (the
    benchmark's sweep and check, tests)."""
    saved = dict(LAUNCH)
    LAUNCH.update(settings)
    try:
        yield
    finally:
        LAUNCH.clear()
        LAUNCH.update(saved)


def select_blocks(m: int, cd: torch.dtype) -> dict:
    """Constants of :func:`select_kernel` for M candidates and compute dtype ``cd``."""
    key, bits, kmin, flip = _KEYS[cd]
    radix = LAUNCH["select_radix_bits"]
    if not isinstance(radix, int) or radix not in (1, 2, 4):
        # 8 bits spill registers at N=577 (4 warps): 11.7 KB of spill stores for sm_90
        raise ValueError(f"LAUNCH['select_radix_bits'] must be 1, 2 or 4, got {radix!r}")
    return dict(KEY=getattr(tl, key), KEY_BITS=bits, KEY_MIN=kmin, KEY_FLIP=flip,
                BLOCK_M=min(_p2(m), LAUNCH["max_block_m"]), RADIX_BITS=radix,
                RADIX_BINS=1 << radix)


def gather_blocks(b: int, n: int, c: int, sm_count: int) -> dict:
    """Tiles of :func:`gather_kernel`: the widest channel tile that still gives every SM
    ``programs_per_sm`` programs (B * cdiv(C, BLOCK_C) of them), then as many rows as the
    element budget allows."""
    want = LAUNCH["programs_per_sm"] * sm_count
    block_c = max(1, min(_p2(c), LAUNCH["max_block_c"]))
    while block_c > LAUNCH["min_block_c"] and b * triton.cdiv(c, block_c) < want:
        block_c //= 2
    return dict(BLOCK_C=block_c, BLOCK_ROWS=max(1, min(_p2(n), LAUNCH["tile_elems"] // block_c)))


def _launch_scores(q, k, scale, p, cd, n_keep=0, kept=None):
    """Passes 1 and 2: logits and lse, then scores, and with ``n_keep`` the selection, or with
    ``kept`` (int32, contiguous) the output slots of that recorded selection."""
    b, h, n, d = q.shape
    m = n - p
    dev = q.device
    logit_ws = torch.empty(b, h, n, dtype=cd, device=dev)
    lse = torch.empty(b, h, dtype=cd, device=dev)
    scores = torch.empty(b, m, dtype=cd, device=dev)
    _kernel("cls_logits_kernel")[(b, h)](
        q, k, logit_ws, lse, h, n, d, float(scale),
        q.stride(0), q.stride(1), q.stride(3), *k.stride(),
        ACC=_acc(cd), **logits_blocks(d), num_warps=LAUNCH["num_warps"])
    replay = kept is not None
    select = n_keep > 0 and not replay
    if replay:
        n_keep = kept.shape[1]
    else:
        kept = torch.empty(b, n_keep if select else 1, dtype=torch.int32, device=dev)
    slot_ws = torch.empty(b, m if select or replay else 1, dtype=torch.int32, device=dev)
    key_ws = torch.empty(b, m if select else 1, dtype=_KEY_TORCH[cd], device=dev)
    _kernel("select_kernel")[(b,)](
        logit_ws, lse, scores, kept, slot_ws, key_ws, h, n, p, n_keep,
        ACC=_acc(cd), DO_SELECT=select, REPLAY=replay, **select_blocks(m, cd),
        num_warps=LAUNCH["select_warps"])
    return scores, lse, kept, slot_ws


def _launch_gather(x, slot_ws, scores, p, n_keep, fuse):
    b, n, c = x.shape
    x_out = torch.empty(b, out_tokens(p, n_keep, n - p, fuse), c, dtype=x.dtype, device=x.device)
    blocks = gather_blocks(b, n, c, _sm_count(x.device))
    grid = (b, triton.cdiv(c, blocks["BLOCK_C"]))
    _kernel("gather_kernel")[grid](
        x, slot_ws, scores, x_out, n, c, p, n_keep, *x.stride(), *x_out.stride(),
        ACC=_acc(scores.dtype), FUSE=x_out.shape[1] > p + n_keep, **blocks,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
    return x_out


def _launch_fwd(x, q, k, scale, p, n_keep, fuse):
    cd = compute_dtype(x.dtype, q.dtype)
    scores, lse, kept, slot_ws = _launch_scores(q, k, scale, p, cd, n_keep)
    return _launch_gather(x, slot_ws, scores, p, n_keep, fuse), kept, scores, lse


def _launch_replay(x, q, k, kept, scale, p, fuse):
    """The forward with a given selection: scores from q and k, the rows of ``kept``."""
    cd = compute_dtype(x.dtype, q.dtype)
    kept = kept.to(torch.int32).contiguous()
    scores, lse, _, slot_ws = _launch_scores(q, k, scale, p, cd, kept=kept)
    return _launch_gather(x, slot_ws, scores, p, kept.shape[1], fuse), scores, lse


def _launch_rows_bwd(grad_out, kept, x, scores, n_tokens, p, fuse):
    b, _, c = grad_out.shape
    n_keep = kept.shape[1]
    kept = kept.to(torch.int32).contiguous()
    # layouts follow the registered fake kernels: empty_like(x) with a fused token, else contiguous
    grad_x = (torch.empty_like(x) if fuse
              else torch.empty(b, n_tokens, c, dtype=grad_out.dtype, device=grad_out.device))
    if fuse:
        scores = scores.contiguous()
        grad_scores = torch.empty_like(scores)
    else:  # placeholders, never touched
        x, scores, grad_scores = grad_out, grad_x, grad_x
    block_c = min(_p2(c), LAUNCH["max_block_c"])
    block_rows = max(1, min(_p2(n_tokens), LAUNCH["tile_elems"] // block_c, 32))
    gs, xs, gxs = grad_out.stride(), x.stride(), grad_x.stride()
    grid = (b, triton.cdiv(n_tokens, block_rows))
    _kernel("rows_bwd_kernel")[grid](
        grad_out, kept, x, scores, grad_x, grad_scores,
        n_tokens, c, p, n_keep,
        gs[0], gs[1], gs[2], xs[0], xs[1], xs[2], gxs[0], gxs[1], gxs[2],
        ACC=_acc(scores.dtype if fuse else grad_out.dtype), FUSE=bool(fuse),
        BLOCK_ROWS=block_rows, BLOCK_K=min(_p2(n_keep), LAUNCH["rank_block"]), BLOCK_C=block_c,
        num_warps=LAUNCH["num_warps"])
    return (grad_x, grad_scores) if fuse else grad_x


def _launch_cls_bwd(grad_scores, q, k, lse, scale, p):
    b, h, n, d = q.shape
    grad_scores = grad_scores.to(lse.dtype).contiguous()
    lse = lse.contiguous()
    grad_q = torch.empty_like(q)  # the layouts of the registered fake kernels
    grad_k = torch.empty_like(k)
    block_d = _p2(d)
    block_n = max(1, min(_p2(n), LAUNCH["tile_elems"] // block_d))
    _kernel("cls_bwd_kernel")[(b, h)](
        grad_scores, q, k, lse, grad_q, grad_k,
        h, n, d, p, float(scale),
        *q.stride(), *k.stride(), *grad_q.stride(), *grad_k.stride(),
        ACC=_acc(lse.dtype), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=LAUNCH["num_warps"])
    return grad_q, grad_k


def _on_tensors_device(method):
    """Runs a backend method with the current CUDA device set to its tensors' (Triton launches
    on the current device and its current stream), when they lie on another GPU."""
    @functools.wraps(method)
    def guarded(self, first, *args):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return method(self, first, *args)
        return method(self, first, *args)
    return guarded


class TritonBackend(Backend):
    """Fused Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    mixed_dtypes = True

    def not_supported_reasons(self, device, dtype):
        reasons = []
        if _TRITON_ERROR is not None:
            reasons.append(f"triton is not importable ({_TRITON_ERROR})")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                reasons.append("CUDA is not available")
            if dtype not in _CUDA_DTYPES:
                reasons.append(f"dtype {dtype} is not supported on CUDA "
                               "(float32, float64, bfloat16, float16 are)")
        elif device.type == "cpu":
            if not _config.triton_interpret():
                reasons.append("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")
            elif problem := interpreter_problem():
                reasons.append(problem)
            if dtype not in _CPU_DTYPES:
                reasons.append(f"dtype {dtype} is not supported by the interpreter here "
                               "(float32, float64 are)")
        else:
            reasons.append(f"device type {device.type!r} is not supported (cuda, or cpu with "
                           "TRITON_INTERPRET=1)")
        return reasons

    @_on_tensors_device
    def cls_scores(self, q, k, scale, num_prefix_tokens):
        return _launch_scores(q, k, scale, num_prefix_tokens, compute_dtype(q.dtype))[:2]

    @_on_tensors_device
    def cls_scores_backward(self, grad_scores, q, k, lse, scale, num_prefix_tokens):
        return _launch_cls_bwd(grad_scores, q, k, lse, scale, num_prefix_tokens)

    @_on_tensors_device
    def drop_forward(self, x, q, k, scale, num_prefix_tokens, n_keep, fuse_token):
        return _launch_fwd(x, q, k, scale, num_prefix_tokens, n_keep, fuse_token)

    @_on_tensors_device
    def drop_replay(self, x, q, k, kept, scale, num_prefix_tokens, fuse_token):
        return _launch_replay(x, q, k, kept, scale, num_prefix_tokens, fuse_token)

    @_on_tensors_device
    def drop_backward(self, grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens):
        grad_x, grad_scores = _launch_rows_bwd(grad_out, kept, x, scores, x.shape[1],
                                               num_prefix_tokens, fuse=True)
        grad_q, grad_k = _launch_cls_bwd(grad_scores, q, k, lse, scale, num_prefix_tokens)
        return grad_x, grad_q, grad_k

    @_on_tensors_device
    def gather_backward(self, grad_out, kept, n_tokens, num_prefix_tokens):
        return _launch_rows_bwd(grad_out, kept, None, None, n_tokens, num_prefix_tokens,
                                fuse=False)
