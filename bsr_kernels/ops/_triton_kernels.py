"""Triton kernels of the token-drop ops (raw functions; :mod:`.triton_backend` wraps and launches).

The functions here are *not* decorated with ``@triton.jit``. In triton 3.8 the choice between the
compiler (``JITFunction``) and the CPU interpreter (``InterpretedFunction``) is made once, by
``triton.jit`` at decoration time, from ``TRITON_INTERPRET``. The backend therefore wraps these
functions itself, per mode, when it first launches them (see ``triton_backend._kernels``), with
their global names ``_SUM`` and ``_MAX`` bound to combine functions of that mode, so the
environment variable may be set or changed at any time. The kernels call no other ``@triton.jit``
function, neither ours nor triton's standard library (``tl.sum``, ``tl.max``, ``tl.cumsum``,
``tl.zeros``, ...).

Conventions (as in the Triton tutorials): pointers, then sizes, then the scale, then strides, then
``tl.constexpr`` flags and block sizes. Loads and stores are masked; accumulation is in ``ACC``
(float32, or float64 for float64 inputs). Tensors the backend allocates itself (``kept``,
``scores``, ``lse``, workspaces) are contiguous and indexed without strides. Every program owns
its outputs: one (batch, head) (logits), one batch element (selection), one (batch, channel tile)
(gather), one (batch, row tile) / (batch, head) pair (backward), so there are no cross-program
races and no atomics (results are deterministic); ``tl.debug_barrier()`` orders a program's own
global-memory writes before the reads of a later phase.
"""
import triton.language as tl

__all__ = ["KERNELS", "cls_logits_kernel", "select_kernel", "gather_kernel", "rows_bwd_kernel",
           "cls_bwd_kernel", "add_combine", "max_combine"]

#: The launchable kernels (the combine functions are helpers, bound per mode by the backend).
KERNELS = ("cls_logits_kernel", "select_kernel", "gather_kernel", "rows_bwd_kernel",
           "cls_bwd_kernel")

# Reductions and scans go through ``tl.reduce`` / ``tl.associative_scan`` with the combine
# functions ``_SUM`` and ``_MAX`` instead of ``tl.sum`` / ``tl.max`` / ``tl.cumsum``: those are
# themselves ``@triton.jit`` functions of triton's standard library, decorated (compiled or
# interpreted) when ``triton.language`` was first imported, and they fail in the other mode. The
# backend binds ``_SUM``/``_MAX`` per mode: ``JITFunction(add_combine)`` and
# ``JITFunction(max_combine)`` for the compiler; ``tl.standard._sum_combine`` and
# ``tl.standard._elementwise_max`` for the interpreter, which recognises those two by identity and
# reduces with numpy (any other combine function runs element by element in Python). These
# placeholders are never used directly.
_SUM = None
_MAX = None


def add_combine(a, b):
    """Combine function of a sum (reduction or inclusive scan)."""
    return a + b


def max_combine(a, b):
    """Combine function of a max reduction."""
    return tl.maximum(a, b)


def cls_logits_kernel(
        q_ptr, k_ptr, logit_ws_ptr, lse_ptr,
        H, N, D,
        scale: "fp64",
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1 of the forward, one (batch, head) per program; grid (B, H).

    Writes the scaled CLS-row logits ``q_cls . k_n * scale`` of every key n to ``logit_ws``
    (B, H, N) and their logsumexp to ``lse`` (B, H), both in ACC. Reads the q_cls row and K once.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sc = tl.full([], scale, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q0 = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=dmask,
                 other=0.0).to(ACC)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    ws_base = logit_ws_ptr + (b * H + h) * N
    # online logsumexp with torch's convention: the shift is the running max, or 0 while that max
    # is infinite (so a +inf logit gives lse = +inf, as torch.logsumexp does). A sum that is still
    # 0 (every logit so far -inf) stays 0 when rescaled: 0 * exp(0 - m) would be 0 * inf = NaN
    # for a later max m below -log(max) of ACC.
    m_i = tl.full([], float("-inf"), ACC)
    shift = tl.full([], 0.0, ACC)
    l_i = tl.full([], 0.0, ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        logit = tl.reduce(kt * q0[None, :], 1, _SUM) * sc
        logit = tl.where(nmask, logit, float("-inf"))
        tl.store(ws_base + offs_n, logit, mask=nmask)
        m_i = tl.maximum(m_i, tl.reduce(logit, 0, _MAX))
        new_shift = tl.where(tl.abs(m_i) == float("inf"), 0.0, m_i)
        l_i = (tl.where(l_i == 0.0, l_i, l_i * tl.exp(shift - new_shift))
               + tl.reduce(tl.exp(logit - new_shift), 0, _SUM))
        shift = new_shift
    tl.store(lse_ptr + b * H + h, shift + tl.log(l_i))


def select_kernel(
        logit_ws_ptr, lse_ptr, scores_ptr, kept_ptr, slot_ws_ptr, key_ws_ptr,
        H, N, P, n_keep,
        ACC: tl.constexpr, KEY: tl.constexpr, KEY_BITS: tl.constexpr, KEY_MIN: tl.constexpr,
        KEY_FLIP: tl.constexpr, DO_SELECT: tl.constexpr, REPLAY: tl.constexpr,
        BLOCK_M: tl.constexpr, RADIX_BITS: tl.constexpr, RADIX_BINS: tl.constexpr):
    """Pass 2 of the forward, one batch element per program; grid (B,).

    1. ``scores[j] = mean_h exp(logit[h, P + j] - lse[h])`` for the M = N - P candidates.
    2. With DO_SELECT, the exact selection rule without sorting: each score becomes an integer
       key of the same order (NaN -> -inf, -0.0 -> +0.0, IEEE bits with the magnitude bits
       flipped for negatives; kept in ``key_ws``), the n_keep-th largest key T is found digit by
       digit from the top, RADIX_BITS bits a digit (T is the largest value with
       #{key >= T} >= n_keep): KEY_BITS / RADIX_BITS counting passes over the M keys, each
       counting the keys at or above all RADIX_BINS values of the next digit at once; the
       largest digit whose count reaches n_keep is T's (the counts fall as the digit rises, and
       digit 0's reaches n_keep by construction). The top digit holds the sign bit: its values
       rank in the order of its top bit flipped. Then every key > T is kept, and of the keys
       == T the lowest positions fill the remaining places. ``kept`` (B, n_keep) gets the
       kept positions in ascending order and ``slot_ws`` (B, M) each candidate's output slot
       (-1 when dropped).
    3. With REPLAY instead, ``kept`` is given (a recorded selection: distinct positions, in any
       order): ``slot_ws`` gets slot s at position kept[s] and -1 elsewhere. An entry outside
       [0, M) writes nothing (its output row is then left unwritten, never memory out of
       bounds).
    Work is O(KEY_BITS / RADIX_BITS * RADIX_BINS * M) per batch element, against O(M^2) for
    pairwise ranks; the counting passes are dependent block-wide sums, so RADIX_BITS trades
    their number (the latency) against the compares of each. The keys of the
    first tile (all of them when M <= BLOCK_M, the ViT shapes) stay in registers (``key0``): the
    counting passes then make no memory round trip; later tiles are read back from ``key_ws``.
    """
    b = tl.program_id(0).to(tl.int64)
    M = N - P
    hf = H * 1.0
    key0 = tl.full([BLOCK_M], KEY_MIN, KEY)
    for j0 in range(0, M, BLOCK_M):
        offs_j = j0 + tl.arange(0, BLOCK_M)
        jmask = offs_j < M
        acc = tl.full([BLOCK_M], 0.0, ACC)
        for h in range(0, H):
            lse = tl.load(lse_ptr + b * H + h)
            logit = tl.load(logit_ws_ptr + (b * H + h) * N + P + offs_j, mask=jmask,
                            other=float("-inf"))
            acc += tl.exp(logit - lse)
        s = acc / hf
        tl.store(scores_ptr + b * M + offs_j, s, mask=jmask)
        if DO_SELECT:
            bits = (tl.where(s != s, float("-inf"), s) + 0.0).to(KEY, bitcast=True)
            key = tl.where(bits >= 0, bits, bits ^ KEY_FLIP)
            tl.store(key_ws_ptr + b * M + offs_j, key, mask=jmask)
            key0 = tl.where(j0 == 0, key, key0)
    if REPLAY:
        for j0 in range(0, M, BLOCK_M):
            offs_j = j0 + tl.arange(0, BLOCK_M)
            tl.store(slot_ws_ptr + b * M + offs_j, tl.full([BLOCK_M], -1, tl.int32),
                     mask=offs_j < M)
        tl.debug_barrier()  # the -1s land before the slots written over them
        for s0 in range(0, n_keep, BLOCK_M):
            offs_s = s0 + tl.arange(0, BLOCK_M)
            smask = offs_s < n_keep
            kv = tl.load(kept_ptr + b * n_keep + offs_s, mask=smask, other=0)
            tl.store(slot_ws_ptr + b * M + kv, offs_s.to(tl.int32),
                     mask=smask & (kv >= 0) & (kv < M))
    if DO_SELECT:
        tl.debug_barrier()
        # digit by digit from the top; the top digit's values rank with its top (sign) bit
        # flipped: as KEY_MIN (sign set, all else clear) is the smallest key
        digits = tl.arange(0, RADIX_BINS).to(KEY)
        thr = tl.full([], 0, KEY)
        for i in range(0, KEY_BITS // RADIX_BITS):
            shift = tl.full([], KEY_BITS - RADIX_BITS * (i + 1), KEY)
            flip = tl.where(i == 0, tl.full([], RADIX_BINS // 2, KEY), tl.full([], 0, KEY))
            trial = thr | ((digits ^ flip) << shift)          # rising with the digit
            cnt = tl.full([RADIX_BINS], 0, tl.int32)
            for j0 in range(0, M, BLOCK_M):
                offs_j = j0 + tl.arange(0, BLOCK_M)
                jmask = offs_j < M
                key = tl.where(j0 == 0, key0, tl.load(key_ws_ptr + b * M + offs_j,
                                                      mask=jmask & (j0 > 0), other=KEY_MIN))
                at_least = (key[:, None] >= trial[None, :]) & jmask[:, None]
                cnt += tl.reduce(at_least.to(tl.int32), 0, _SUM)
            best = tl.reduce((cnt >= n_keep).to(tl.int32), 0, _SUM) - 1
            thr = thr | ((best.to(KEY) ^ flip) << shift)
        # keys above the threshold, then the lowest positions among the keys equal to it
        above = tl.full([], 0, tl.int32)
        for j0 in range(0, M, BLOCK_M):
            offs_j = j0 + tl.arange(0, BLOCK_M)
            jmask = offs_j < M
            key = tl.where(j0 == 0, key0, tl.load(key_ws_ptr + b * M + offs_j,
                                                  mask=jmask & (j0 > 0), other=KEY_MIN))
            above += tl.reduce(((key > thr) & jmask).to(tl.int32), 0, _SUM)
        n_equal = n_keep - above
        eq_seen = tl.full([], 0, tl.int32)
        slot_base = tl.full([], 0, tl.int32)
        for j0 in range(0, M, BLOCK_M):
            offs_j = j0 + tl.arange(0, BLOCK_M)
            jmask = offs_j < M
            key = tl.where(j0 == 0, key0, tl.load(key_ws_ptr + b * M + offs_j,
                                                  mask=jmask & (j0 > 0), other=KEY_MIN))
            eq = ((key == thr) & jmask).to(tl.int32)
            eq_rank = eq_seen + tl.associative_scan(eq, 0, _SUM) - eq
            keep = jmask & ((key > thr) | ((eq > 0) & (eq_rank < n_equal)))
            flag = keep.to(tl.int32)
            slot = slot_base + tl.associative_scan(flag, 0, _SUM) - flag
            tl.store(kept_ptr + b * n_keep + slot, offs_j.to(tl.int32), mask=keep)
            tl.store(slot_ws_ptr + b * M + offs_j, tl.where(keep, slot, -1), mask=jmask)
            eq_seen += tl.reduce(eq, 0, _SUM)
            slot_base += tl.reduce(flag, 0, _SUM)


def gather_kernel(
        x_ptr, slot_ws_ptr, scores_ptr, out_ptr,
        N, C, P, n_keep,
        stride_xb, stride_xn, stride_xc,
        stride_ob, stride_on, stride_oc,
        ACC: tl.constexpr, FUSE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 3 of the forward, one (batch, channel tile) per program; grid (B, cdiv(C, BLOCK_C)).

    Copies the prefix rows and the kept rows of x (their slots from ``slot_ws``) to out, and with
    FUSE sums the dropped rows weighted by their scores into the fused row P + n_keep. Without
    FUSE dropped rows are never read. Each x element is read once over the whole grid.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    M = N - P
    fused = tl.full([BLOCK_C], 0, ACC)
    for n0 in range(0, N, BLOCK_ROWS):
        offs_n = n0 + tl.arange(0, BLOCK_ROWS)
        nmask = offs_n < N
        is_pre = offs_n < P
        is_cand = nmask & (offs_n >= P)
        j = offs_n - P
        slot = tl.load(slot_ws_ptr + b * M + j, mask=is_cand, other=-1)
        is_kept = is_cand & (slot >= 0)
        write = is_pre | is_kept
        dest = tl.where(is_pre, offs_n, P + slot)
        if FUSE:
            rmask = nmask
        else:
            rmask = write
        xt = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn
                     + offs_c[None, :] * stride_xc,
                     mask=rmask[:, None] & cmask[None, :], other=0.0)
        tl.store(out_ptr + b * stride_ob + dest[:, None] * stride_on + offs_c[None, :] * stride_oc,
                 xt, mask=write[:, None] & cmask[None, :])
        if FUSE:
            s = tl.load(scores_ptr + b * M + j, mask=is_cand, other=0.0)
            w = tl.where(is_kept, 0.0, s)
            contrib = tl.where(is_cand[:, None], w[:, None] * xt.to(ACC), 0.0)
            fused += tl.reduce(contrib, 0, _SUM)
    if FUSE:
        tl.store(out_ptr + b * stride_ob + (P + n_keep) * stride_on + offs_c * stride_oc,
                 fused.to(out_ptr.dtype.element_ty), mask=cmask)


def rows_bwd_kernel(
        gout_ptr, kept_ptr, x_ptr, scores_ptr, gx_ptr, gs_ptr,
        N, C, P, n_keep,
        stride_gb, stride_gn, stride_gc,
        stride_xb, stride_xn, stride_xc,
        stride_gxb, stride_gxn, stride_gxc,
        ACC: tl.constexpr, FUSE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row gradients of a drop; grid (B, cdiv(N, BLOCK_ROWS)).

    grad_x[n] = grad_out[n] for prefix rows, grad_out[P + slot] for kept rows, 0 for dropped rows;
    with FUSE every candidate row also gets ``w_j * grad_out[fused]`` (w_j = score_j if dropped,
    else 0) and the score gradient ``gs[j] = <grad_out[fused], x[P + j]>`` is written for dropped j
    (0 for kept j). The slot of row j is the s with kept[s] = j (kept holds distinct
    positions, in any order: a replay keeps the order it is given).

    Shapes: grad_out (B, P + n_keep [+1], C), kept (B, n_keep) int32, x (B, N, C),
    scores (B, M) and gs (B, M) in ACC, grad_x (B, N, C).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    M = N - P
    nmask = offs_n < N
    is_pre = offs_n < P
    is_cand = nmask & (offs_n >= P)
    j = offs_n - P

    slot = tl.full([BLOCK_ROWS], 0, tl.int32)
    hits = tl.full([BLOCK_ROWS], 0, tl.int32)
    for s0 in range(0, n_keep, BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        smask = offs_s < n_keep
        kv = tl.load(kept_ptr + b * n_keep + offs_s, mask=smask, other=0)
        match = (kv[None, :] == j[:, None]) & smask[None, :]
        slot += tl.reduce(tl.where(match, offs_s[None, :], 0), 1, _SUM)
        hits += tl.reduce(match.to(tl.int32), 1, _SUM)
    is_kept = is_cand & (hits > 0)
    is_drop = is_cand & (hits == 0)
    src = tl.where(is_pre, offs_n, P + slot)
    read = is_pre | is_kept

    if FUSE:
        s = tl.load(scores_ptr + b * M + j, mask=is_drop, other=0.0)
        w = tl.where(is_drop, s, 0.0)
        gdot = tl.full([BLOCK_ROWS], 0, ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        g = tl.load(gout_ptr + b * stride_gb + src[:, None] * stride_gn
                    + offs_c[None, :] * stride_gc,
                    mask=read[:, None] & cmask[None, :], other=0.0).to(ACC)
        if FUSE:
            gf = tl.load(gout_ptr + b * stride_gb + (P + n_keep) * stride_gn + offs_c * stride_gc,
                         mask=cmask, other=0.0).to(ACC)
            g = tl.where(is_cand[:, None], g + w[:, None] * gf[None, :], g)
            xt = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn
                         + offs_c[None, :] * stride_xc,
                         mask=is_drop[:, None] & cmask[None, :], other=0.0).to(ACC)
            gdot += tl.reduce(xt * gf[None, :], 1, _SUM)
        tl.store(gx_ptr + b * stride_gxb + offs_n[:, None] * stride_gxn
                 + offs_c[None, :] * stride_gxc, g.to(gx_ptr.dtype.element_ty),
                 mask=nmask[:, None] & cmask[None, :])
    if FUSE:
        tl.store(gs_ptr + b * M + j, tl.where(is_drop, gdot, 0.0), mask=is_cand)


def cls_bwd_kernel(
        gs_ptr, q_ptr, k_ptr, lse_ptr, gq_ptr, gk_ptr,
        H, N, D, P,
        scale: "fp64",
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_gqb, stride_gqh, stride_gqn, stride_gqd,
        stride_gkb, stride_gkh, stride_gkn, stride_gkd,
        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of the CLS scores for one (batch, head); grid (B, H).

    With p = exp(q0 . k_n * scale - lse) and gp_n = gs[n - P] / H for n >= P (0 for prefix keys):
    gl_n = p_n (gp_n - sum_m p_m gp_m) * scale, grad_q[0] = sum_n gl_n k_n, grad_k[n] = gl_n q0,
    grad_q[n > 0] = 0. The sum over m includes the prefix keys: their p_m * 0 is NaN where p_m
    is (a +inf prefix logit), as in the reference. Two passes over K; nothing N x N.

    Shapes: gs (B, M) and lse (B, H) in ACC, q/k/grad_q/grad_k (B, H, N, D).
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    M = N - P
    hf = H * 1.0
    sc = tl.full([], scale, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q0 = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=dmask,
                 other=0.0).to(ACC)
    lse = tl.load(lse_ptr + b * H + h)
    k_base = k_ptr + b * stride_kb + h * stride_kh

    dot_acc = tl.full([BLOCK_N], 0, ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        cand = nmask & (offs_n >= P)
        kt = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        prob = tl.exp(tl.reduce(kt * q0[None, :], 1, _SUM) * sc - lse)
        gp = tl.load(gs_ptr + b * M + offs_n - P, mask=cand, other=0.0) / hf
        dot_acc += tl.where(nmask, prob * gp, 0.0)
    dot = tl.reduce(dot_acc, 0, _SUM)

    gq0 = tl.full([BLOCK_D], 0, ACC)
    gq_base = gq_ptr + b * stride_gqb + h * stride_gqh
    gk_base = gk_ptr + b * stride_gkb + h * stride_gkh
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        cand = nmask & (offs_n >= P)
        tile_mask = nmask[:, None] & dmask[None, :]
        kt = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=tile_mask, other=0.0).to(ACC)
        prob = tl.exp(tl.reduce(kt * q0[None, :], 1, _SUM) * sc - lse)
        gp = tl.load(gs_ptr + b * M + offs_n - P, mask=cand, other=0.0) / hf
        gl = tl.where(nmask, prob * (gp - dot) * sc, 0.0)
        gq0 += tl.reduce(gl[:, None] * kt, 0, _SUM)
        tl.store(gk_base + offs_n[:, None] * stride_gkn + offs_d[None, :] * stride_gkd,
                 (gl[:, None] * q0[None, :]).to(gk_ptr.dtype.element_ty), mask=tile_mask)
        zero = tl.full([BLOCK_N, BLOCK_D], 0, gq_ptr.dtype.element_ty)
        tl.store(gq_base + offs_n[:, None] * stride_gqn + offs_d[None, :] * stride_gqd, zero,
                 mask=tile_mask & (offs_n > 0)[:, None])
    tl.store(gq_base + offs_d * stride_gqd, gq0.to(gq_ptr.dtype.element_ty), mask=dmask)
