// CPU implementation of the token-drop ops, registered as bsr_kernels::cpp_* operators.
//
// Semantics are those of bsr_kernels/ops/reference.py (see the docstring of
// bsr_kernels/ops/common.py). Each op checks its inputs, then runs the per-batch-element kernels
// of drop_tokens_kernels.h in parallel over the batch (at::parallel_for). No N x N matrix is ever
// built: per element and head only the CLS row of the logits (N values) exists.
//
// Ops (schemas below): cpp_cls_scores, cpp_cls_scores_backward, cpp_drop_forward,
// cpp_drop_backward, cpp_gather_backward. Each has a CPU kernel and a Meta kernel (shapes only).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "drop_tokens_kernels.h"

namespace bsr_kernels {
namespace {

using at::Tensor;

// --- input checks ------------------------------------------------------------------------------

void check_float_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 for the cpp backend, got ", t.scalar_type());
}

void check_qk(const Tensor& q, const Tensor& k) {
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have 4 dimensions (B, H, N, d), got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_VALUE(q.size(2) >= 2, "q must hold at least 2 tokens (N >= 2), got N=", q.size(2));
  TORCH_CHECK_VALUE(q.size(2) < std::numeric_limits<int32_t>::max(),
                    "q has too many tokens for int32 indices: N=", q.size(2));
}

void check_prefix(int64_t P, int64_t N) {
  TORCH_CHECK_VALUE(P >= 1 && P < N, "num_prefix_tokens must be in [1, N) with N=", N, ", got ",
                    P);
}

void check_x(const Tensor& x, const Tensor& q) {
  check_float_cpu(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must have 3 dimensions (B, N, C), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == q.size(0), "x has batch size ", x.size(0), " but q has ",
                    q.size(0));
  TORCH_CHECK_VALUE(x.size(1) == q.size(2), "x has ", x.size(1), " tokens but q has N=",
                    q.size(2));
  TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), "x must have the dtype of q (",
                   q.scalar_type(), "), got ", x.scalar_type());
}

void check_small(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
}

// kept: (B, n_keep) int32 (int64 accepted) with every index in [0, M). Returns it contiguous int32.
Tensor checked_kept(const Tensor& kept, int64_t B, int64_t M) {
  TORCH_CHECK_VALUE(kept.device().is_cpu(), "kept must be a CPU tensor, got device ",
                    kept.device());
  TORCH_CHECK_TYPE(kept.scalar_type() == at::kInt || kept.scalar_type() == at::kLong,
                   "kept must be int32 (or int64), got ", kept.scalar_type());
  TORCH_CHECK_VALUE(kept.dim() == 2 && kept.size(0) == B && kept.size(1) <= M,
                    "kept must have shape (B=", B, ", n_keep <= ", M, "), got ", kept.sizes());
  if (kept.numel() > 0) {
    const int64_t lo = kept.min().item<int64_t>();
    const int64_t hi = kept.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < M, "kept indices must lie in [0, ", M, "), got [", lo, ", ",
                      hi, "]");
  }
  return kept.to(at::kInt).contiguous();
}

// --- views with a unit innermost stride ----------------------------------------------------------

// Keeps t unless its innermost dimension is strided; the kernels read rows with unit stride.
Tensor unit_inner(const Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

template <typename T>
cpu::Heads<T> heads_of(const Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
cpu::OutHeads<T> out_heads_of(Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// An output laid out like `like` (torch.empty_like, as the registered fake kernels promise), or,
// when that layout would not have a unit innermost stride, a contiguous one; the caller copies the
// latter into the former at the end (see finish_like).
std::pair<Tensor, Tensor> empty_like_unit_inner(const Tensor& like) {
  Tensor out = at::empty_like(like);
  if (out.size(-1) <= 1 || out.stride(-1) == 1) return {out, out};
  return {out, at::empty(like.sizes(), like.options())};
}

Tensor finish_like(std::pair<Tensor, Tensor>& outs) {
  if (!outs.first.is_same(outs.second)) outs.first.copy_(outs.second);
  return outs.first;
}

template <typename T>
cpu::Rows<T> rows_of(const Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// Batch elements per task of at::parallel_for: enough that a task touches at least 32768 values
// (ATen's grain size), so tiny inputs run on one thread without fork/join overhead.
int64_t batch_grain(int64_t values_per_element) {
  constexpr int64_t kGrainValues = 32768;
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_element));
}

// --- CPU kernels ---------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> cls_scores_cpu(const Tensor& q_in, const Tensor& k_in, double scale,
                                          int64_t P) {
  check_qk(q_in, k_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  check_prefix(P, N);
  const Tensor q = unit_inner(q_in), k = unit_inner(k_in);
  const int64_t M = N - P;
  Tensor scores = at::empty({B, M}, q.options());
  Tensor lse = at::empty({B, H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "bsr_kernels::cpp_cls_scores", [&] {
    using T = scalar_t;
    const auto qv = heads_of<T>(q), kv = heads_of<T>(k);
    T* s = scores.data_ptr<T>();
    T* l = lse.data_ptr<T>();
    at::parallel_for(0, B, batch_grain(H * N * D), [&](int64_t b0, int64_t b1) {
      std::vector<T> work(H * N);
      for (int64_t b = b0; b < b1; ++b) {
        cpu::cls_scores_one<T>(qv, kv, b, H, N, D, static_cast<T>(scale), P, s + b * M,
                               l + b * H, work.data());
      }
    });
  });
  return {scores, lse};
}

std::tuple<Tensor, Tensor> cls_scores_backward_cpu(const Tensor& grad_scores_in,
                                                   const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& lse_in, double scale, int64_t P) {
  check_qk(q_in, k_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  check_prefix(P, N);
  const int64_t M = N - P;
  TORCH_CHECK_VALUE(grad_scores_in.device().is_cpu() && grad_scores_in.is_floating_point(),
                    "grad_scores must be a floating CPU tensor");
  TORCH_CHECK_VALUE(grad_scores_in.sizes() == at::IntArrayRef({B, M}),
                    "grad_scores must have shape (", B, ", ", M, "), got ",
                    grad_scores_in.sizes());
  check_small(lse_in, "lse", {B, H}, q_in.scalar_type());
  const Tensor q = unit_inner(q_in), k = unit_inner(k_in);
  const Tensor grad_scores = grad_scores_in.to(q.scalar_type()).contiguous();
  const Tensor lse = lse_in.contiguous();
  auto grad_q = empty_like_unit_inner(q_in);
  auto grad_k = empty_like_unit_inner(k_in);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "bsr_kernels::cpp_cls_scores_backward", [&] {
    using T = scalar_t;
    const auto qv = heads_of<T>(q), kv = heads_of<T>(k);
    const T* gs = grad_scores.const_data_ptr<T>();
    const T* l = lse.const_data_ptr<T>();
    const auto gq = out_heads_of<T>(grad_q.second), gk = out_heads_of<T>(grad_k.second);
    at::parallel_for(0, B, batch_grain(2 * H * N * D), [&](int64_t b0, int64_t b1) {
      std::vector<T> work(H * N), row(D);
      for (int64_t b = b0; b < b1; ++b) {
        cpu::cls_scores_backward_one<T>(gs + b * M, qv, kv, l + b * H, b, H, N, D,
                                        static_cast<T>(scale), P, gq, gk, work.data(),
                                        row.data());
      }
      cpu::stream_fence();
    });
  });
  return {finish_like(grad_q), finish_like(grad_k)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> drop_forward_cpu(const Tensor& x_in, const Tensor& q_in,
                                                            const Tensor& k_in, double scale,
                                                            int64_t P, int64_t n_keep,
                                                            bool fuse_token) {
  check_qk(q_in, k_in);
  check_x(x_in, q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const int64_t C = x_in.size(2);
  check_prefix(P, N);
  const int64_t M = N - P;
  TORCH_CHECK_VALUE(n_keep >= 0 && n_keep <= M, "n_keep must be in [0, N - P = ", M, "], got ",
                    n_keep);
  const bool fuse = fuse_token && n_keep < M;
  const int64_t n_out = P + n_keep + (fuse ? 1 : 0);
  const Tensor q = unit_inner(q_in), k = unit_inner(k_in), x = unit_inner(x_in);
  Tensor x_out = at::empty({B, n_out, C}, x.options());
  Tensor kept = at::empty({B, n_keep}, x.options().dtype(at::kInt));
  Tensor scores = at::empty({B, M}, q.options());
  Tensor lse = at::empty({B, H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "bsr_kernels::cpp_drop_forward", [&] {
    using T = scalar_t;
    const auto qv = heads_of<T>(q), kv = heads_of<T>(k);
    const auto xv = rows_of<T>(x);
    T* out = x_out.data_ptr<T>();
    int32_t* kp = kept.data_ptr<int32_t>();
    T* s = scores.data_ptr<T>();
    T* l = lse.data_ptr<T>();
    at::parallel_for(0, B, batch_grain(H * N * D + N * C), [&](int64_t b0, int64_t b1) {
      std::vector<T> work(H * N);
      std::vector<T> keys(M);
      std::vector<int32_t> order(M), slot(M);
      for (int64_t b = b0; b < b1; ++b) {
        T* sb = s + b * M;
        int32_t* kb = kp + b * n_keep;
        cpu::cls_scores_one<T>(qv, kv, b, H, N, D, static_cast<T>(scale), P, sb, l + b * H,
                               work.data());
        cpu::select_one<T>(sb, M, n_keep, keys.data(), order.data(), kb, slot.data());
        cpu::drop_rows_one<T>(xv, b, C, P, M, n_keep, slot.data(), sb, fuse,
                              out + b * n_out * C);
      }
      cpu::stream_fence();
    });
  });
  return {x_out, kept, scores, lse};
}

std::tuple<Tensor, Tensor, Tensor> drop_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                                                     const Tensor& q_in, const Tensor& k_in,
                                                     const Tensor& kept_in,
                                                     const Tensor& scores_in,
                                                     const Tensor& lse_in, double scale,
                                                     int64_t P) {
  check_qk(q_in, k_in);
  check_x(x_in, q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const int64_t C = x_in.size(2);
  check_prefix(P, N);
  const int64_t M = N - P;
  const Tensor kept = checked_kept(kept_in, B, M);
  const int64_t n_keep = kept.size(1);
  TORCH_CHECK_VALUE(n_keep < M, "drop_backward is the backward of a drop with a fused token, "
                    "which needs n_keep < N - P = ", M, ", got n_keep=", n_keep);
  check_small(grad_out_in, "grad_out", {B, P + n_keep + 1, C}, x_in.scalar_type());
  check_small(scores_in, "scores", {B, M}, q_in.scalar_type());
  check_small(lse_in, "lse", {B, H}, q_in.scalar_type());
  const Tensor q = unit_inner(q_in), k = unit_inner(k_in), x = unit_inner(x_in);
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor scores = scores_in.contiguous(), lse = lse_in.contiguous();
  auto grad_x = empty_like_unit_inner(x_in);
  auto grad_q = empty_like_unit_inner(q_in);
  auto grad_k = empty_like_unit_inner(k_in);
  const int64_t gx_sb = grad_x.second.stride(0), gx_sn = grad_x.second.stride(1);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "bsr_kernels::cpp_drop_backward", [&] {
    using T = scalar_t;
    const auto qv = heads_of<T>(q), kv = heads_of<T>(k);
    const auto xv = rows_of<T>(x);
    const T* go = grad_out.const_data_ptr<T>();
    const int32_t* kp = kept.const_data_ptr<int32_t>();
    const T* s = scores.const_data_ptr<T>();
    const T* l = lse.const_data_ptr<T>();
    T* gx = grad_x.second.data_ptr<T>();
    const auto gq = out_heads_of<T>(grad_q.second), gk = out_heads_of<T>(grad_k.second);
    at::parallel_for(0, B, batch_grain(2 * H * N * D + N * C), [&](int64_t b0, int64_t b1) {
      std::vector<T> work(H * N), grad_scores(M), row(std::max(C, D));
      std::vector<int32_t> slot(M);
      for (int64_t b = b0; b < b1; ++b) {
        cpu::fill_slots(kp + b * n_keep, n_keep, M, slot.data());
        cpu::drop_rows_backward_one<T>(go + b * (P + n_keep + 1) * C, xv, b, slot.data(),
                                       s + b * M, n_keep, M, C, P, gx + b * gx_sb, gx_sn,
                                       grad_scores.data(), row.data());
        cpu::cls_scores_backward_one<T>(grad_scores.data(), qv, kv, l + b * H, b, H, N, D,
                                        static_cast<T>(scale), P, gq, gk, work.data(),
                                        row.data());
      }
      cpu::stream_fence();
    });
  });
  return {finish_like(grad_x), finish_like(grad_q), finish_like(grad_k)};
}

Tensor gather_backward_cpu(const Tensor& grad_out_in, const Tensor& kept_in, int64_t n_tokens,
                           int64_t P) {
  TORCH_CHECK_VALUE(grad_out_in.device().is_cpu(), "grad_out must be a CPU tensor, got device ",
                    grad_out_in.device());
  TORCH_CHECK_TYPE(grad_out_in.is_floating_point(), "grad_out must be floating, got ",
                   grad_out_in.scalar_type());
  TORCH_CHECK_VALUE(grad_out_in.dim() == 3, "grad_out must have 3 dimensions (B, T, C), got ",
                    grad_out_in.sizes());
  check_prefix(P, n_tokens);
  const int64_t B = grad_out_in.size(0), C = grad_out_in.size(2), N = n_tokens, M = N - P;
  const Tensor kept = checked_kept(kept_in, B, M);
  const int64_t n_keep = kept.size(1);
  TORCH_CHECK_VALUE(grad_out_in.size(1) >= P + n_keep, "grad_out must have at least P + n_keep = ",
                    P + n_keep, " tokens, got ", grad_out_in.size(1));
  const Tensor grad_out = grad_out_in.contiguous();
  const int64_t T_out = grad_out.size(1);
  Tensor grad_x = at::empty({B, N, C}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "bsr_kernels::cpp_gather_backward", [&] {
    using T = scalar_t;
    const T* go = grad_out.const_data_ptr<T>();
    const int32_t* kp = kept.const_data_ptr<int32_t>();
    T* gx = grad_x.data_ptr<T>();
    at::parallel_for(0, B, batch_grain(N * C), [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> slot(M);
      for (int64_t b = b0; b < b1; ++b) {
        cpu::fill_slots(kp + b * n_keep, n_keep, M, slot.data());
        cpu::gather_backward_one<T>(go + b * T_out * C, slot.data(), N, C, P, gx + b * N * C);
      }
      cpu::stream_fence();
    });
  });
  return grad_x;
}

// --- Meta kernels (shapes and dtypes only; symbolic sizes pass through) ---------------------------

std::tuple<Tensor, Tensor> cls_scores_meta(const Tensor& q, const Tensor& k, double scale,
                                           int64_t P) {
  return {at::empty_symint({q.sym_size(0), q.sym_size(2) - P}, q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1)}, q.options())};
}

std::tuple<Tensor, Tensor> cls_scores_backward_meta(const Tensor& grad_scores, const Tensor& q,
                                                    const Tensor& k, const Tensor& lse,
                                                    double scale, int64_t P) {
  return {at::empty_like(q), at::empty_like(k)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> drop_forward_meta(const Tensor& x, const Tensor& q,
                                                             const Tensor& k, double scale,
                                                             int64_t P, int64_t n_keep,
                                                             bool fuse_token) {
  const c10::SymInt M = q.sym_size(2) - P;
  // out_tokens() of common.py: the fused token exists when something is dropped.
  const bool fuse = fuse_token && M > n_keep;
  const c10::SymInt n_out = c10::SymInt(P + n_keep + (fuse ? 1 : 0));
  return {at::empty_symint({x.sym_size(0), n_out, x.sym_size(2)}, x.options()),
          at::empty_symint({x.sym_size(0), c10::SymInt(n_keep)}, x.options().dtype(at::kInt)),
          at::empty_symint({q.sym_size(0), M}, q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1)}, q.options())};
}

std::tuple<Tensor, Tensor, Tensor> drop_backward_meta(const Tensor& grad_out, const Tensor& x,
                                                      const Tensor& q, const Tensor& k,
                                                      const Tensor& kept, const Tensor& scores,
                                                      const Tensor& lse, double scale, int64_t P) {
  return {at::empty_like(x), at::empty_like(q), at::empty_like(k)};
}

Tensor gather_backward_meta(const Tensor& grad_out, const Tensor& kept, int64_t n_tokens,
                            int64_t P) {
  return at::empty_symint({grad_out.sym_size(0), c10::SymInt(n_tokens), grad_out.sym_size(2)},
                          grad_out.options());
}

}  // namespace

// The Python side (bsr_kernels/ops/__init__.py) defines other ops of the same namespace with
// torch.library.custom_op, which uses library fragments; the one TORCH_LIBRARY block lives here.
TORCH_LIBRARY(bsr_kernels, m) {
  m.def("cpp_cls_scores(Tensor q, Tensor k, float scale, int num_prefix_tokens)"
        " -> (Tensor, Tensor)");
  m.def("cpp_cls_scores_backward(Tensor grad_scores, Tensor q, Tensor k, Tensor lse, float scale,"
        " int num_prefix_tokens) -> (Tensor, Tensor)");
  m.def("cpp_drop_forward(Tensor x, Tensor q, Tensor k, float scale, int num_prefix_tokens,"
        " int n_keep, bool fuse_token) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpp_drop_backward(Tensor grad_out, Tensor x, Tensor q, Tensor k, Tensor kept,"
        " Tensor scores, Tensor lse, float scale, int num_prefix_tokens)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("cpp_gather_backward(Tensor grad_out, Tensor kept, int n_tokens, int num_prefix_tokens)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(bsr_kernels, CPU, m) {
  m.impl("cpp_cls_scores", &cls_scores_cpu);
  m.impl("cpp_cls_scores_backward", &cls_scores_backward_cpu);
  m.impl("cpp_drop_forward", &drop_forward_cpu);
  m.impl("cpp_drop_backward", &drop_backward_cpu);
  m.impl("cpp_gather_backward", &gather_backward_cpu);
}

TORCH_LIBRARY_IMPL(bsr_kernels, Meta, m) {
  m.impl("cpp_cls_scores", &cls_scores_meta);
  m.impl("cpp_cls_scores_backward", &cls_scores_backward_meta);
  m.impl("cpp_drop_forward", &drop_forward_meta);
  m.impl("cpp_drop_backward", &drop_backward_meta);
  m.impl("cpp_gather_backward", &gather_backward_meta);
}

}  // namespace bsr_kernels
