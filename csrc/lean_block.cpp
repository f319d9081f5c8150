// The memory-lean backward of a frozen BSR block: bsr_kernels::frozen_block_backward.
//
// A frozen block that lies after the first trained block only passes gradients to its input. Its
// forward (bsr_kernels/backward.py) runs without autograd and saves just the block input x and, if
// the block drops tokens, the int32 kept indices. This op recomputes, from x and the block's
// weights, exactly what the input gradient needs and then runs the chain rule by hand:
//
//   forward replay           h1 = LN1(x); qkv = h1 Wqkv^T + b; q,k = q_norm/k_norm; o = SDPA(q,k,v)
//                            x1 = x + ls1 * (o Wp^T + bp); x2 = drop(x1) (recorded selection)
//                            u = LN2(x2) W1^T + b1                 (fc2 output: never needed)
//   backward                 g_u  = GELU'(u) * ((ls2 * g) W2)
//                            g_x2 = g + LN2'(g_u W1)
//                            g_x1, g_q, g_k = drop'(g_x2)          (bsr_kernels::*_backward ops)
//                            g_q, g_k, g_v += SDPA'(Wp^T (ls1 * g_x1))
//                            g_x  = g_x1 + LN1'(qkv'(g_q, g_k, g_v) Wqkv)
//
// No weight gradient is computed, no attention probabilities are stored (SDPA's own backward
// recomputes them blockwise), and nothing outlives the call but g_x. The token-drop backward goes
// through the registered ops (torch.ops.bsr_kernels.drop_tokens_backward /
// gather_tokens_backward), i.e. through the one dispatcher that picks the backend. Gradients equal
// plain autograd through BSRBlock.body (tests/test_reprogram.py).
//
// Registered as CompositeImplicitAutograd: it is made of ATen ops, so FlopCounterMode sees each
// of them, and SDPA's backward runs through a local autograd graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace bsr_kernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Order of the `weights` argument (Tensor?[]); absent entries are None.
enum Weight {
  kNorm1W, kNorm1B, kQkvW, kQkvB, kQNormW, kQNormB, kKNormW, kKNormB, kProjW, kProjB, kLs1,
  kNorm2W, kNorm2B, kFc1W, kFc1B, kFc2W, kLs2, kNumWeights
};
// Order of the `eps` argument; a negative q_norm/k_norm eps means that norm is absent (Identity).
enum Eps { kEpsNorm1, kEpsQNorm, kEpsKNorm, kEpsNorm2, kNumEps };

struct LayerNormOut {
  Tensor out, mean, rstd;
};

LayerNormOut layer_norm(const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  auto r = at::native_layer_norm(x, {x.size(-1)}, w, b, eps);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

Tensor layer_norm_input_grad(const Tensor& grad, const Tensor& x, const LayerNormOut& ln,
                             const OptTensor& w, const OptTensor& b) {
  return std::get<0>(at::native_layer_norm_backward(grad, x, {x.size(-1)}, ln.mean, ln.rstd, w,
                                                    b, {true, false, false}));
}

Tensor scaled(const Tensor& t, const OptTensor& gamma) {
  return gamma.has_value() ? t * *gamma : t;
}

// Calls an operator registered by the Python side (torch.library.custom_op) through the dispatcher.
std::vector<c10::IValue> call_op(const char* name, std::vector<c10::IValue> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  std::vector<c10::IValue> stack(std::make_move_iterator(args.begin()),
                                 std::make_move_iterator(args.end()));
  op.callBoxed(&stack);
  return stack;
}

Tensor frozen_block_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& kept,
                             const c10::List<OptTensor>& weight_list, int64_t num_heads,
                             at::ArrayRef<double> eps, double scale, int64_t num_prefix_tokens,
                             bool fuse_token, c10::string_view gelu_approximate) {
  TORCH_CHECK(weight_list.size() == kNumWeights, "frozen_block_backward: expected ", kNumWeights,
              " weights, got ", weight_list.size());
  TORCH_CHECK(eps.size() == kNumEps, "frozen_block_backward: expected ", kNumEps, " eps values");
  TORCH_CHECK(x.dim() == 3 && grad_out.dim() == 3, "frozen_block_backward: x and grad_out must "
              "be (B, N, C)");
  std::vector<OptTensor> w(weight_list.begin(), weight_list.end());
  for (int i : {kQkvW, kProjW, kFc1W, kFc2W}) {
    TORCH_CHECK(w[i].has_value(), "frozen_block_backward: weight ", i, " is required");
  }
  const bool has_q_norm = eps[kEpsQNorm] >= 0, has_k_norm = eps[kEpsKNorm] >= 0;
  const int64_t B = x.size(0), N = x.size(1), P = num_prefix_tokens;
  const int64_t A = w[kQkvW]->size(0) / 3, H = num_heads, D = A / H;
  const std::string approx(gelu_approximate);

  c10::NoGradGuard no_grad;

  // --- forward replay: attention --------------------------------------------------------------
  LayerNormOut ln1 = layer_norm(x, w[kNorm1W], w[kNorm1B], eps[kEpsNorm1]);
  Tensor qkv = at::linear(ln1.out, *w[kQkvW], w[kQkvB]).view({B, N, 3, H, D}).permute({2, 0, 3, 1, 4});
  Tensor q_in = qkv[0], k_in = qkv[1], v = qkv[2];
  LayerNormOut qn, kn;
  Tensor q = q_in, k = k_in;
  if (has_q_norm) {
    qn = layer_norm(q_in, w[kQNormW], w[kQNormB], eps[kEpsQNorm]);
    q = qn.out;
  }
  if (has_k_norm) {
    kn = layer_norm(k_in, w[kKNormW], w[kKNormB], eps[kEpsKNorm]);
    k = kn.out;
  }
  // SDPA under a local autograd graph: its backward recomputes the probabilities blockwise.
  Tensor qg = q.detach().requires_grad_(true), kg = k.detach().requires_grad_(true),
         vg = v.detach().requires_grad_(true), o;
  {
    c10::AutoGradMode grad_on(true);
    o = at::scaled_dot_product_attention(qg, kg, vg);
  }
  Tensor attn = o.detach().transpose(1, 2).reshape({B, N, A});
  Tensor x1 = x + scaled(at::linear(attn, *w[kProjW], w[kProjB]), w[kLs1]);

  // --- forward replay: the recorded token selection ------------------------------------------
  Tensor x2 = x1, scores, lse, kept_long;
  const bool drops = kept.has_value();
  bool fused = false;
  if (drops) {
    const int64_t M = N - P, n_keep = kept->size(1), C = x.size(2);
    TORCH_CHECK(kept->dim() == 2 && kept->size(0) == B && n_keep <= M,
                "frozen_block_backward: kept must be (B, n_keep) with n_keep <= N - P");
    fused = fuse_token && n_keep < M;
    kept_long = kept->to(at::kLong);
    Tensor xp = x1.narrow(1, P, M);
    std::vector<Tensor> parts = {x1.narrow(1, 0, P),
                                 at::gather(xp, 1, kept_long.unsqueeze(-1).expand({B, n_keep, C}))};
    if (fused) {
      auto s = call_op("bsr_kernels::cls_attention", {q, k, scale, P, std::string()});
      scores = s[0].toTensor();
      lse = s[1].toTensor();
      Tensor weights = scores.scatter(1, kept_long, 0.0);  // dropped tokens' scores, kept: 0
      Tensor token = at::einsum("bm,bmc->bc", {weights, xp.to(scores.scalar_type())});
      parts.push_back(token.to(x1.scalar_type()).unsqueeze(1));
    }
    x2 = at::cat(parts, 1);
  }
  TORCH_CHECK(grad_out.sizes() == x2.sizes(), "frozen_block_backward: grad_out has shape ",
              grad_out.sizes(), ", the block's output has ", x2.sizes());

  // --- backward: MLP --------------------------------------------------------------------------
  LayerNormOut ln2 = layer_norm(x2, w[kNorm2W], w[kNorm2B], eps[kEpsNorm2]);
  Tensor u = at::linear(ln2.out, *w[kFc1W], w[kFc1B]);
  Tensor g_u = at::gelu_backward(at::matmul(scaled(grad_out, w[kLs2]), *w[kFc2W]), u, approx);
  u = Tensor();
  Tensor g_x2 = grad_out + layer_norm_input_grad(at::matmul(g_u, *w[kFc1W]), x2, ln2, w[kNorm2W],
                                                 w[kNorm2B]);
  g_u = Tensor();

  // --- backward: token drop -------------------------------------------------------------------
  Tensor g_x1 = g_x2, g_q_drop, g_k_drop;
  if (fused) {
    auto g = call_op("bsr_kernels::drop_tokens_backward",
                     {g_x2.contiguous(), x1, q, k, *kept, scores, lse, scale, P,
                      std::string()});
    g_x1 = g[0].toTensor();
    g_q_drop = g[1].toTensor();
    g_k_drop = g[2].toTensor();
  } else if (drops) {
    g_x1 = call_op("bsr_kernels::gather_tokens_backward", {g_x2.contiguous(), *kept, N, P, std::string()})[0]
               .toTensor();
  }

  // --- backward: attention --------------------------------------------------------------------
  Tensor g_attn = at::matmul(scaled(g_x1, w[kLs1]), *w[kProjW]);
  Tensor g_o = g_attn.view({B, N, H, D}).transpose(1, 2);
  auto g_qkv = torch::autograd::grad({o}, {qg, kg, vg}, {g_o});
  o = Tensor();
  Tensor g_q = g_qkv[0], g_k = g_qkv[1], g_v = g_qkv[2];
  if (fused) {
    g_q = g_q + g_q_drop;
    g_k = g_k + g_k_drop;
  }
  if (has_q_norm) g_q = layer_norm_input_grad(g_q, q_in, qn, w[kQNormW], w[kQNormB]);
  if (has_k_norm) g_k = layer_norm_input_grad(g_k, k_in, kn, w[kKNormW], w[kKNormB]);
  Tensor g_qkv_flat = at::stack({g_q, g_k, g_v}, 0).permute({1, 3, 0, 2, 4}).reshape({B, N, 3 * A});
  return g_x1 + layer_norm_input_grad(at::matmul(g_qkv_flat, *w[kQkvW]), x, ln1, w[kNorm1W],
                                      w[kNorm1B]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bsr_kernels, m) {
  m.def("frozen_block_backward(Tensor grad_out, Tensor x, Tensor? kept, Tensor?[] weights,"
        " int num_heads, float[] eps, float scale, int num_prefix_tokens, bool fuse_token,"
        " str gelu_approximate) -> Tensor");
}

TORCH_LIBRARY_IMPL(bsr_kernels, CompositeImplicitAutograd, m) {
  m.impl("frozen_block_backward", &frozen_block_backward);
}

}  // namespace bsr_kernels
