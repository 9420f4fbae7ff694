// Autograd of metapool::meta_pool, registered once for every device (the CPU kernels in cpu/,
// the Triton CUDA kernels registered from Python). A C++ node, not a Python autograd.Function:
// at the small maps of a search (7×7, 14×14) the Python wrapper cost more than the kernels.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../meta_pool.h"

#include <string>
#include <tuple>

namespace metapool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

c10::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The op's Autograd kernel (defined below the node it applies).
std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_pool_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& pi, const c10::optional<at::Tensor>& gate_h_weight,
    const c10::optional<at::Tensor>& gate_h_bias, const c10::optional<at::Tensor>& gate_w_weight,
    const c10::optional<at::Tensor>& gate_w_bias, c10::string_view candidates);

class MetaPoolFunction : public torch::autograd::Function<MetaPoolFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const c10::optional<at::Tensor>& pi,
      const c10::optional<at::Tensor>& gate_h_weight,
      const c10::optional<at::Tensor>& gate_h_bias,
      const c10::optional<at::Tensor>& gate_w_weight,
      const c10::optional<at::Tensor>& gate_w_bias,
      const std::string& candidates) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metapool::meta_pool", "")
                         .typed<decltype(meta_pool_autograd)>();  // the op's own signature
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, z_h, z_w] =
        op.call(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates);
    // z_h, z_w (the strip means) are saved so that the backward need not recompute them.
    ctx->save_for_backward({x, or_undefined(pi), or_undefined(gate_h_weight), or_undefined(gate_h_bias),
                            or_undefined(gate_w_weight), or_undefined(gate_w_bias), z_h, z_w});
    ctx->saved_data["candidates"] = candidates;
    ctx->saved_data["strip"] = parse_candidates("meta_pool", candidates).strip();
    ctx->mark_non_differentiable({z_h, z_w});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for z_h, z_w
    return {out, z_h, z_w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metapool::meta_pool_backward", "")
                         .typed<decltype(backward_signature)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(7);  // only z_h or z_w was used: no gradient
    const std::string candidates = ctx->saved_data["candidates"].toStringRef();
    auto [grad_x, grad_pi, g_hw, g_hb, g_ww, g_wb] =
        op.call(grads[0], saved[0], or_none(saved[1]), or_none(saved[2]), or_none(saved[3]),
                or_none(saved[4]), or_none(saved[5]), saved[6], saved[7], candidates);
    // Without 'strip' the op returns empty gate gradients: the gates, if given, had no effect.
    const bool strip = ctx->saved_data["strip"].toBool();
    const auto gate = [strip](const at::Tensor& g) { return strip ? g : at::Tensor(); };
    return {grad_x, saved[1].defined() ? grad_pi : at::Tensor(),
            gate(g_hw), gate(g_hb), gate(g_ww), gate(g_wb), at::Tensor()};
  }

 private:
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  backward_signature(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                     const at::Tensor&, const at::Tensor&, c10::string_view);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_pool_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& pi, const c10::optional<at::Tensor>& gate_h_weight,
    const c10::optional<at::Tensor>& gate_h_bias, const c10::optional<at::Tensor>& gate_w_weight,
    const c10::optional<at::Tensor>& gate_w_bias, c10::string_view candidates) {
  auto out = MetaPoolFunction::apply(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias,
                                     std::string(candidates));
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(metapool, Autograd, m) {
  m.impl("meta_pool", &meta_pool_autograd);
}

}  // namespace metapool
