// Shared declarations for the strip-gate op:
//   y = base + weight * x * sigmoid(g_h)[..., :, None] * sigmoid(g_w)[..., None, :]
// `base` and `weight` are optional (absent: 0 and 1). Both kernels (cpu/, cuda/) see their
// inputs already validated and normalised by the helpers below, so checks live in one place.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace metapool {

// Float32 for float32/float16/bfloat16 inputs, float64 for float64: every kernel accumulates
// in this type, and the gate logits, weight and gate gradients are carried in it.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct StripGateArgs {
  // channels_last inputs stay channels_last (downstream convs and pooling are faster in it);
  // every other layout is made contiguous. x, base and grad share the chosen format.
  bool channels_last = false;
  at::Tensor x;       // (N, C, H, W), contiguous in `format()`
  at::Tensor g_h;     // (N, C, H), contiguous, acc_type
  at::Tensor g_w;     // (N, C, W), contiguous, acc_type
  at::Tensor base;    // undefined, or (N, C, H, W) in x's dtype and format
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  at::Tensor weight;  // undefined, or a one-element acc_type tensor
};

// Validates shapes, dtypes and devices with messages that name the problem, and returns
// contiguous tensors in the dtypes the kernels expect.
StripGateArgs prepare_strip_gate(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& g_h,
    const at::Tensor& g_w,
    const c10::optional<at::Tensor>& base,
    const c10::optional<at::Tensor>& weight);

// Checks grad against x and returns it in x's dtype and the args' format.
at::Tensor prepare_grad(const char* op, const at::Tensor& grad, const StripGateArgs& a);

// Kernel entry points. Forward returns y (x's dtype). Backward returns
// (grad_x, grad_g_h, grad_g_w, grad_weight): grad_x in x's dtype, the rest in acc_type;
// grad_weight is a 0-d tensor, Σ grad * x * σ(g_h) σ(g_w).
at::Tensor strip_gate_forward_cpu(const StripGateArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> strip_gate_backward_cpu(
    const at::Tensor& grad, const StripGateArgs& a);

#ifdef METAPOOL_WITH_CUDA
at::Tensor strip_gate_forward_cuda(const StripGateArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> strip_gate_backward_cuda(
    const at::Tensor& grad, const StripGateArgs& a);
#endif

}  // namespace metapool
