// Autograd of metapool::strip_gate, registered once for every device (CPU and CUDA kernels in
// cpu/ and cuda/): gradients to every tensor input through metapool::strip_gate_backward.
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace metapool {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class StripGateFunction : public torch::autograd::Function<StripGateFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& g_h,
      const at::Tensor& g_w,
      const c10::optional<at::Tensor>& base,
      const c10::optional<at::Tensor>& weight) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metapool::strip_gate", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const c10::optional<at::Tensor>&,
                                           const c10::optional<at::Tensor>&)>();
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_base = base.has_value() && base->defined();
    // The kernel's backward is needed unless base is the only input that wants a gradient.
    ctx->saved_data["gate_grads"] = x.requires_grad() || g_h.requires_grad() || g_w.requires_grad() ||
                                    (has_weight && weight->requires_grad());
    if (has_base) ctx->saved_data["base_dtype"] = base->scalar_type();
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = op.call(x, g_h, g_w, base, weight);
    ctx->save_for_backward({x, g_h, g_w, has_weight ? *weight : at::Tensor()});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metapool::strip_gate_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &g_h = saved[1], &g_w = saved[2], &weight = saved[3];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_gh, grad_gw, grad_base, grad_weight;
    if (ctx->saved_data["gate_grads"].toBool()) {
      auto [gx, ggh, ggw, gwt] =
          op.call(grad, x, g_h, g_w, weight.defined() ? c10::optional<at::Tensor>(weight) : c10::nullopt);
      grad_x = gx;
      grad_gh = ggh.to(g_h.scalar_type());
      grad_gw = ggw.to(g_w.scalar_type());
      if (weight.defined()) grad_weight = gwt.reshape(weight.sizes()).to(weight.scalar_type());
    }
    if (ctx->saved_data.count("base_dtype"))
      grad_base = grad.to(ctx->saved_data["base_dtype"].toScalarType());
    return {grad_x, grad_gh, grad_gw, grad_base, grad_weight};
  }
};

at::Tensor strip_gate_autograd(const at::Tensor& x, const at::Tensor& g_h, const at::Tensor& g_w,
                               const c10::optional<at::Tensor>& base,
                               const c10::optional<at::Tensor>& weight) {
  return StripGateFunction::apply(x, g_h, g_w, base, weight)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(metapool, Autograd, m) {
  m.impl("strip_gate", &strip_gate_autograd);
}

}  // namespace metapool
