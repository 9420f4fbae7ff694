// Schemas of the metapool ops, their argument checks, and the module's build information.
// Device kernels live in cpu/ and cuda/ and are registered per dispatch key there; autograd and
// the fake (meta) kernels are registered once, in Python (metapool_kernels/ops/strip_gate.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "strip_gate.h"

#ifndef METAPOOL_SOURCE_HASH
#define METAPOOL_SOURCE_HASH "unknown"
#endif
#ifndef METAPOOL_TORCH_VERSION
#define METAPOOL_TORCH_VERSION "unknown"
#endif

namespace metapool {

namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              op, ": ", name, " must be a real floating-point tensor, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(),
              op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on the same device");
}

}  // namespace

StripGateArgs prepare_strip_gate(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& g_h,
    const at::Tensor& g_w,
    const c10::optional<at::Tensor>& base,
    const c10::optional<at::Tensor>& weight) {
  check_float(op, "x", x);
  check_float(op, "g_h", g_h);
  check_float(op, "g_w", g_w);
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D ", x.sizes());
  const auto N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(g_h.dim() == 3 && g_h.size(0) == N && g_h.size(1) == C && g_h.size(2) == H,
              op, ": g_h must have shape (N, C, H) = (", N, ", ", C, ", ", H, "), got ", g_h.sizes());
  TORCH_CHECK(g_w.dim() == 3 && g_w.size(0) == N && g_w.size(1) == C && g_w.size(2) == W,
              op, ": g_w must have shape (N, C, W) = (", N, ", ", C, ", ", W, "), got ", g_w.sizes());
  check_device(op, "g_h", g_h, x);
  check_device(op, "g_w", g_w, x);

  const auto acc = acc_type(x.scalar_type());
  StripGateArgs a;
  a.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  a.x = x.contiguous(a.format());
  a.g_h = g_h.to(acc).contiguous();
  a.g_w = g_w.to(acc).contiguous();
  if (base.has_value() && base->defined()) {
    check_float(op, "base", *base);
    check_device(op, "base", *base, x);
    TORCH_CHECK(base->sizes() == x.sizes(),
                op, ": base must have the shape of x ", x.sizes(), ", got ", base->sizes());
    a.base = base->to(x.scalar_type()).contiguous(a.format());
  }
  if (weight.has_value() && weight->defined()) {
    check_float(op, "weight", *weight);
    check_device(op, "weight", *weight, x);
    TORCH_CHECK(weight->numel() == 1,
                op, ": weight must hold one element, got shape ", weight->sizes());
    a.weight = weight->to(acc).reshape({1}).contiguous();
  }
  return a;
}

at::Tensor prepare_grad(const char* op, const at::Tensor& grad, const StripGateArgs& a) {
  check_float(op, "grad", grad);
  check_device(op, "grad", grad, a.x);
  TORCH_CHECK(grad.sizes() == a.x.sizes(),
              op, ": grad must have the shape of x ", a.x.sizes(), ", got ", grad.sizes());
  return grad.to(a.x.scalar_type()).contiguous(a.format());
}

TORCH_LIBRARY(metapool, m) {
  // Fake kernels and autograd for these ops are registered in this Python package; torch imports
  // it on demand when an op is traced without them. meta_pool's CUDA kernels are Triton, also
  // registered there.
  m.set_python_module("metapool_kernels.ops");
  m.def("strip_gate(Tensor x, Tensor g_h, Tensor g_w, Tensor? base=None, Tensor? weight=None) -> Tensor");
  m.def(
      "strip_gate_backward(Tensor grad, Tensor x, Tensor g_h, Tensor g_w, Tensor? weight=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // candidates: comma-joined op names; pi: their weights, None for a fixed layer (one op, no
  // weight); returns (out, z_h, z_w), z the strip means ((N, C, 0) without 'strip').
  m.def(
      "meta_pool(Tensor x, Tensor? pi, Tensor? gate_h_weight, Tensor? gate_h_bias, "
      "Tensor? gate_w_weight, Tensor? gate_w_bias, str candidates) -> (Tensor, Tensor, Tensor)");
  m.def(
      "meta_pool_backward(Tensor grad, Tensor x, Tensor? pi, Tensor? gate_h_weight, "
      "Tensor? gate_h_bias, Tensor? gate_w_weight, Tensor? gate_w_bias, Tensor z_h, Tensor z_w, "
      "str candidates) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace metapool

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metapool_kernels C++/CUDA ops (registered under torch.ops.metapool)";
  m.def("source_hash", [] { return std::string(METAPOOL_SOURCE_HASH); },
        "Hash of csrc/ this module was built from");
  m.def("torch_version", [] { return std::string(METAPOOL_TORCH_VERSION); },
        "torch version this module was built against");
  m.def("with_cuda", [] {
#ifdef METAPOOL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether CUDA kernels were compiled in");
}
