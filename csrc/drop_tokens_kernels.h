// Per-batch-element CPU kernels of the token-drop ops, on raw pointers.
//
// Everything here works on one batch element at a time; drop_tokens.cpp runs these functions in
// parallel over the batch with at::parallel_for. There is no ATen in this file, only the
// arithmetic, so that it reads side by side with bsr_kernels/ops/reference.py.
//
// Layouts (T is float or double, and accumulation happens in T, as in the reference):
//   q, k: (B, H, N, D) with unit stride along D and arbitrary strides elsewhere (Heads<T>).
//   x:    (B, N, C) with unit stride along C (Rows<T>).
//   Outputs are contiguous.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace bsr_kernels {
namespace cpu {

// A (B, H, N, D) tensor whose innermost dimension is contiguous.
template <typename T>
struct Heads {
  const T* data;
  int64_t stride_b, stride_h, stride_n;

  const T* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * stride_b + h * stride_h + n * stride_n;
  }
};

// A writable (B, H, N, D) tensor whose innermost dimension is contiguous.
template <typename T>
struct OutHeads {
  T* data;
  int64_t stride_b, stride_h, stride_n;

  T* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * stride_b + h * stride_h + n * stride_n;
  }
};

// A (B, N, C) tensor whose innermost dimension is contiguous.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride_b, stride_n;

  const T* row(int64_t b, int64_t n) const { return data + b * stride_b + n * stride_n; }
};

// Dot product with eight independent partial sums, so that -O3 vectorises it without
// -ffast-math (the summation order is fixed by the code, not by the compiler).
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int kLanes = 8;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  T s = T(0);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += alpha * x[i].
template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// --- streaming stores ---------------------------------------------------------------------------
// The outputs of these kernels (x_out, grad_x, grad_q, grad_k) are written once, row by row, and
// not read again here; at ViT sizes they are far larger than the caches. An ordinary store first
// reads the destination cache line from memory (read for ownership), so every output byte costs
// two bytes of memory traffic. Non-temporal (streaming) stores write the line without reading it.
// They are used on x86-64 (SSE2, part of the base ISA) where the row is 16-byte aligned, and plain
// stores elsewhere; the values written are the same either way. stream_fence() must end every
// task that streamed, before another thread may read what it wrote.

// dst[i] = src[i] for i < n.
template <typename T>
inline void stream_copy(const T* __restrict src, T* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    } else if constexpr (std::is_same_v<T, double>) {
      for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// dst[i] = 0 for i < n.
template <typename T>
inline void stream_zero(T* dst, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_setzero_ps());
    } else if constexpr (std::is_same_v<T, double>) {
      for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_setzero_pd());
    }
  }
#endif
  for (; i < n; ++i) dst[i] = T(0);
}

// Orders this thread's streaming stores before its later stores (and the end of its task).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Software prefetch of the K rows a few tokens ahead. In timm's layout (q, k, v views of one qkv
// tensor) the K rows of a token are 3 of every 9 KB (ViT-B), a pattern the hardware prefetchers
// follow poorly: reading K from there ran at a third of the speed of a contiguous K (CPU,
// ViT-B, B=32). Issuing the loads of token n + kPrefetchTokens while token n is computed hides
// that latency.
constexpr int64_t kPrefetchTokens = 4;

template <typename T>
inline void prefetch_token(const Heads<T>& k, int64_t b, int64_t H, int64_t n, int64_t D) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t h = 0; h < H; ++h) {
    const char* row = reinterpret_cast<const char*>(k.row(b, h, n));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// Scaled CLS-row logits of every head: out[h * N + n] = (q[b,h,0,:] . k[b,h,n,:]) * scale.
// Token-major loop: in timm's layout (q, k views of one qkv tensor) the H rows k[b, :, n, :] are
// adjacent in memory, so k is read as one stream instead of H strided ones.
template <typename T>
inline void cls_logits(const Heads<T>& q, const Heads<T>& k, int64_t b, int64_t H, int64_t N,
                       int64_t D, T scale, T* out) {
  for (int64_t n = 0; n < N; ++n) {
    if (n + kPrefetchTokens < N) prefetch_token(k, b, H, n + kPrefetchTokens, D);
    for (int64_t h = 0; h < H; ++h) {
      out[h * N + n] = dot(q.row(b, h, 0), k.row(b, h, n), D) * scale;
    }
  }
}

// Replaces logits l[0..N) by softmax probabilities and returns their logsumexp, with the edge
// cases of torch.logsumexp / exp(l - lse): a NaN anywhere gives NaN everywhere; an infinite
// maximum is the logsumexp itself, and the probabilities are exp(l - lse): a +inf logit gives
// lse = +inf, NaN at every +inf logit (inf - inf) and exactly 0 elsewhere, finite logits
// included however large (exp of a large finite logit must not be taken: it overflows, and
// inf / inf would be NaN); all -inf gives lse = -inf and NaN probabilities.
template <typename T>
inline T softmax_inplace(T* l, int64_t N) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T mx = -kInf;
  bool has_nan = false;
  for (int64_t n = 0; n < N; ++n) {
    if (std::isnan(l[n])) has_nan = true;
    else if (l[n] > mx) mx = l[n];
  }
  if (has_nan) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t n = 0; n < N; ++n) l[n] = nan;
    return nan;
  }
  if (std::isinf(mx)) {
    for (int64_t n = 0; n < N; ++n) l[n] = std::exp(l[n] - mx);
    return mx;
  }
  T sum = T(0);
  for (int64_t n = 0; n < N; ++n) {
    l[n] = std::exp(l[n] - mx);
    sum += l[n];
  }
  const T lse = std::log(sum) + mx;
  for (int64_t n = 0; n < N; ++n) l[n] /= sum;
  return lse;
}

// Scores of batch element b: scores[m] = mean_h softmax_h[P + m], m < M = N - P, and the per-head
// logsumexp lse[h]. work holds H * N values.
template <typename T>
void cls_scores_one(const Heads<T>& q, const Heads<T>& k, int64_t b, int64_t H, int64_t N,
                    int64_t D, T scale, int64_t P, T* scores, T* lse, T* work) {
  const int64_t M = N - P;
  cls_logits(q, k, b, H, N, D, scale, work);
  std::fill(scores, scores + M, T(0));
  for (int64_t h = 0; h < H; ++h) {
    T* p = work + h * N;
    lse[h] = softmax_inplace(p, N);
    for (int64_t m = 0; m < M; ++m) scores[m] += p[P + m];
  }
  for (int64_t m = 0; m < M; ++m) scores[m] /= static_cast<T>(H);
}

// The ranking key of a score, as torch.nan_to_num(score, nan=-inf) makes it in the reference:
// NaN ranks lowest, +-inf become the largest/lowest finite values.
template <typename T>
inline T rank_key(T s) {
  if (std::isnan(s)) return -std::numeric_limits<T>::infinity();
  if (s == std::numeric_limits<T>::infinity()) return std::numeric_limits<T>::max();
  if (s == -std::numeric_limits<T>::infinity()) return std::numeric_limits<T>::lowest();
  return s;
}

// slot[m] = position of candidate m in kept[0..n_keep), or -1 when it is dropped (for duplicate
// entries in kept, the last one).
inline void fill_slots(const int32_t* kept, int64_t n_keep, int64_t M, int32_t* slot) {
  std::fill(slot, slot + M, int32_t(-1));
  for (int64_t i = 0; i < n_keep; ++i) slot[kept[i]] = static_cast<int32_t>(i);
}

// The selection rule: the n_keep best of M scores (highest first, NaN lowest, ties to the lower
// position), written to kept[0..n_keep) in ascending order. slot[m] is set to the position of m in
// kept, or -1 when m is dropped. keys holds M values, order holds M indices.
//
// The keys contain no NaN, so the comparison is a strict total order and every index written is a
// permutation entry in [0, M): no input can make an index go out of range.
template <typename T>
void select_one(const T* scores, int64_t M, int64_t n_keep, T* keys, int32_t* order,
                int32_t* kept, int32_t* slot) {
  for (int64_t m = 0; m < M; ++m) {
    keys[m] = rank_key(scores[m]);
    order[m] = static_cast<int32_t>(m);
  }
  auto better = [keys](int32_t a, int32_t b) {
    return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
  };
  if (n_keep < M) std::nth_element(order, order + n_keep, order + M, better);
  std::sort(order, order + n_keep);
  std::copy(order, order + n_keep, kept);
  fill_slots(kept, n_keep, M, slot);
}

// Output rows of batch element b: the P prefix rows, the kept rows, and when fuse is set the
// fused row sum_m w_m x[P + m] with w_m = scores[m] for dropped m and 0 for kept m. One pass over
// the rows of x: a kept row is copied and, as in the reference einsum, multiplied by its zero
// weight into the fused row, so a non-finite kept row propagates exactly as there. The fused row
// is accumulated in place (it stays in cache); the other rows are streamed.
template <typename T>
void drop_rows_one(const Rows<T>& x, int64_t b, int64_t C, int64_t P, int64_t M,
                   int64_t n_keep, const int32_t* slot, const T* scores, bool fuse, T* out) {
  for (int64_t p = 0; p < P; ++p) stream_copy(x.row(b, p), out + p * C, C);
  T* fused = fuse ? out + (P + n_keep) * C : nullptr;
  if (fuse) std::fill(fused, fused + C, T(0));
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict xr = x.row(b, P + m);
    if (slot[m] >= 0) {
      stream_copy(xr, out + (P + slot[m]) * C, C);
      if (fuse) {
        for (int64_t c = 0; c < C; ++c) fused[c] += T(0) * xr[c];
      }
    } else if (fuse) {
      axpy(scores[m], xr, fused, C);
    }
  }
}

// Backward of cls_scores_one for batch element b, from the saved lse (the probabilities are
// recomputed, never stored):
//   g_p[h, n]  = n >= P ? grad_scores[n - P] / H : 0
//   g_l[h, n]  = p[h, n] * (g_p[h, n] - sum_n' p[h, n'] g_p[h, n']) * scale
//   grad_q[b, h, 0] = sum_n g_l[h, n] k[b, h, n];   grad_q[b, h, n > 0] = 0
//   grad_k[b, h, n] = g_l[h, n] q[b, h, 0]
// The sum over n' runs over the prefix keys too, where g_p = 0: their p * 0 is 0, or NaN where
// p is NaN (a +inf prefix logit), which then makes the whole head's gradient NaN, as in the
// reference. grad_q and grad_k are written through their strides (rows n > 0 of grad_q and
// every row of grad_k streamed); work holds H * N values, row D values.
template <typename T>
void cls_scores_backward_one(const T* grad_scores, const Heads<T>& q, const Heads<T>& k,
                             const T* lse, int64_t b, int64_t H, int64_t N, int64_t D, T scale,
                             int64_t P, const OutHeads<T>& grad_q, const OutHeads<T>& grad_k,
                             T* work, T* row) {
  const T hh = static_cast<T>(H);
  cls_logits(q, k, b, H, N, D, scale, work);
  // work[h * N + n] becomes the logit gradient g_l[h, n].
  for (int64_t h = 0; h < H; ++h) {
    T* p = work + h * N;
    const T l = lse[h];
    T s = T(0);
    for (int64_t n = 0; n < P; ++n) {
      p[n] = std::exp(p[n] - l);
      s += p[n] * T(0);
    }
    for (int64_t n = P; n < N; ++n) {
      p[n] = std::exp(p[n] - l);
      s += p[n] * (grad_scores[n - P] / hh);
    }
    for (int64_t n = 0; n < P; ++n) p[n] = p[n] * (T(0) - s) * scale;
    for (int64_t n = P; n < N; ++n) p[n] = p[n] * (grad_scores[n - P] / hh - s) * scale;
  }
  // Token-major, like the reads of k: in timm's layout this is also the memory order of outputs
  // allocated like q and k.
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(T);
  for (int64_t h = 0; h < H; ++h) std::memset(grad_q.row(b, h, 0), 0, row_bytes);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < H; ++h) {
      const T g = work[h * N + n];
      axpy(g, k.row(b, h, n), grad_q.row(b, h, 0), D);
      if (n > 0) stream_zero(grad_q.row(b, h, n), D);
      const T* __restrict q0 = q.row(b, h, 0);
      for (int64_t d = 0; d < D; ++d) row[d] = g * q0[d];
      stream_copy(row, grad_k.row(b, h, n), D);
    }
  }
}

// Scatter of grad_out rows back to the N input rows of batch element b (no fused token):
// prefix rows copied, kept rows copied to their positions, dropped rows zero, every row streamed
// in memory order. go has >= P + n_keep rows of C values, gx has N contiguous rows; slot[m] is the
// position of candidate m in kept, or -1 (as select_one makes it).
template <typename T>
void gather_backward_one(const T* go, const int32_t* slot, int64_t N, int64_t C, int64_t P,
                         T* gx) {
  stream_copy(go, gx, P * C);
  for (int64_t m = 0; m < N - P; ++m) {
    T* gxr = gx + (P + m) * C;
    if (slot[m] >= 0) stream_copy(go + (P + slot[m]) * C, gxr, C);
    else stream_zero(gxr, C);
  }
}

// Backward of the drop with a fused token for batch element b, up to the score gradient:
//   grad_x[P + m] = (kept ? grad_out[P + slot[m]] : 0) + w_m * g_f,  g_f = grad_out[P + n_keep]
//   grad_scores[m] = dropped ? g_f . x[P + m] : 0
// go has P + n_keep + 1 contiguous rows; row n of grad_x is gx + n * gx_stride (streamed);
// grad_scores holds M values, row C values.
template <typename T>
void drop_rows_backward_one(const T* go, const Rows<T>& x, int64_t b, const int32_t* slot,
                            const T* scores, int64_t n_keep, int64_t M, int64_t C, int64_t P,
                            T* gx, int64_t gx_stride, T* grad_scores, T* row) {
  const T* gf = go + (P + n_keep) * C;
  for (int64_t p = 0; p < P; ++p) stream_copy(go + p * C, gx + p * gx_stride, C);
  for (int64_t m = 0; m < M; ++m) {
    if (slot[m] >= 0) {
      const T* g = go + (P + slot[m]) * C;
      // w_m = 0: the product is kept (0 * inf = NaN propagates as in the reference).
      for (int64_t c = 0; c < C; ++c) row[c] = g[c] + T(0) * gf[c];
      grad_scores[m] = T(0);
    } else {
      const T w = scores[m];
      for (int64_t c = 0; c < C; ++c) row[c] = w * gf[c];
      grad_scores[m] = dot(gf, x.row(b, P + m), C);
    }
    stream_copy(row, gx + (P + m) * gx_stride, C);
  }
}

}  // namespace cpu
}  // namespace bsr_kernels
