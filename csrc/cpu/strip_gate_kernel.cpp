// CPU kernels of the strip-gate op: one (n, c) plane per task, parallel over planes. Every
// reduction runs in a fixed order inside one plane, so results are bitwise reproducible whatever
// the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../strip_gate.h"

namespace metapool {

namespace {

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

// Planes small enough that splitting them across threads costs more than it saves.
int64_t grain(int64_t plane) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane));
}

template <typename scalar_t>
void strip_gate_forward_kernel_impl(const StripGateArgs& a, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t NC = a.x.size(0) * a.x.size(1), H = a.x.size(2), W = a.x.size(3);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* base = a.base.defined() ? a.base.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* gh = a.g_h.const_data_ptr<acc_t>();
  const acc_t* gw = a.g_w.const_data_ptr<acc_t>();
  const acc_t weight = a.weight.defined() ? *a.weight.const_data_ptr<acc_t>() : acc_t(1);
  scalar_t* out = y.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, NC, grain(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sw(W);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < W; ++j) sw[j] = sigmoid(gw[p * W + j]);
      for (int64_t i = 0; i < H; ++i) {
        const acc_t s = weight * sigmoid(gh[p * H + i]);
        const int64_t row = (p * H + i) * W;
        for (int64_t j = 0; j < W; ++j) {
          acc_t v = s * static_cast<acc_t>(x[row + j]) * sw[j];
          if (base) v += static_cast<acc_t>(base[row + j]);
          out[row + j] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

template <typename scalar_t>
void strip_gate_backward_kernel_impl(const at::Tensor& grad_t, const StripGateArgs& a,
                                     at::Tensor& grad_x_t, at::Tensor& grad_gh_t, at::Tensor& grad_gw_t,
                                     at::Tensor& plane_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t NC = a.x.size(0) * a.x.size(1), H = a.x.size(2), W = a.x.size(3);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* grad = grad_t.const_data_ptr<scalar_t>();
  const acc_t* gh = a.g_h.const_data_ptr<acc_t>();
  const acc_t* gw = a.g_w.const_data_ptr<acc_t>();
  const acc_t weight = a.weight.defined() ? *a.weight.const_data_ptr<acc_t>() : acc_t(1);
  scalar_t* grad_x = grad_x_t.mutable_data_ptr<scalar_t>();
  acc_t* grad_gh = grad_gh_t.mutable_data_ptr<acc_t>();
  acc_t* grad_gw = grad_gw_t.mutable_data_ptr<acc_t>();
  acc_t* plane = plane_t.mutable_data_ptr<acc_t>();

  at::parallel_for(0, NC, grain(H * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sw(W), col(W);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < W; ++j) {
        sw[j] = sigmoid(gw[p * W + j]);
        col[j] = acc_t(0);
      }
      acc_t total = acc_t(0);  // Σ grad·x·σh·σw over the plane: this plane's share of grad_weight
      for (int64_t i = 0; i < H; ++i) {
        const acc_t sh = sigmoid(gh[p * H + i]);
        const int64_t row = (p * H + i) * W;
        acc_t row_sum = acc_t(0);  // Σ_w grad·x·σw
        for (int64_t j = 0; j < W; ++j) {
          const acc_t g = static_cast<acc_t>(grad[row + j]);
          const acc_t q = g * static_cast<acc_t>(x[row + j]);
          row_sum += q * sw[j];
          col[j] += q * sh;
          grad_x[row + j] = static_cast<scalar_t>(weight * g * sh * sw[j]);
        }
        grad_gh[p * H + i] = weight * row_sum * sh * (acc_t(1) - sh);
        total += row_sum * sh;
      }
      for (int64_t j = 0; j < W; ++j) {
        grad_gw[p * W + j] = weight * col[j] * sw[j] * (acc_t(1) - sw[j]);
      }
      plane[p] = total;
    }
  });
}

// channels_last (NHWC) memory: the gates are transposed once to (N, H, C) and (N, W, C) so the
// innermost loop over channels reads x, the gates and the output contiguously.
template <typename scalar_t>
void strip_gate_forward_kernel_nhwc_impl(const StripGateArgs& a, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.x.size(0), C = a.x.size(1), H = a.x.size(2), W = a.x.size(3);
  const at::Tensor sh_t = a.g_h.sigmoid().transpose(1, 2).contiguous();  // (N, H, C)
  const at::Tensor sw_t = a.g_w.sigmoid().transpose(1, 2).contiguous();  // (N, W, C)
  const acc_t* sh = sh_t.const_data_ptr<acc_t>();
  const acc_t* sw = sw_t.const_data_ptr<acc_t>();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* base = a.base.defined() ? a.base.const_data_ptr<scalar_t>() : nullptr;
  const acc_t weight = a.weight.defined() ? *a.weight.const_data_ptr<acc_t>() : acc_t(1);
  scalar_t* out = y.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, N * H, grain(W * C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = n * H + h
      const int64_t n = r / H;
      const acc_t* shr = sh + r * C;
      for (int64_t j = 0; j < W; ++j) {
        const acc_t* swr = sw + (n * W + j) * C;
        const int64_t off = (r * W + j) * C;
        for (int64_t c = 0; c < C; ++c) {
          acc_t v = weight * static_cast<acc_t>(x[off + c]) * shr[c] * swr[c];
          if (base) v += static_cast<acc_t>(base[off + c]);
          out[off + c] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// One task per image: its row and column sums accumulate in (H, C) and (W, C) buffers in a
// fixed order, so results do not depend on the thread count.
template <typename scalar_t>
void strip_gate_backward_kernel_nhwc_impl(const at::Tensor& grad_t, const StripGateArgs& a,
                                          at::Tensor& grad_x_t, at::Tensor& grad_gh_t, at::Tensor& grad_gw_t,
                                          at::Tensor& plane_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.x.size(0), C = a.x.size(1), H = a.x.size(2), W = a.x.size(3);
  const at::Tensor sh_t = a.g_h.sigmoid().transpose(1, 2).contiguous();  // (N, H, C)
  const at::Tensor sw_t = a.g_w.sigmoid().transpose(1, 2).contiguous();  // (N, W, C)
  const acc_t* sh = sh_t.const_data_ptr<acc_t>();
  const acc_t* sw = sw_t.const_data_ptr<acc_t>();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* grad = grad_t.const_data_ptr<scalar_t>();
  const acc_t weight = a.weight.defined() ? *a.weight.const_data_ptr<acc_t>() : acc_t(1);
  scalar_t* grad_x = grad_x_t.mutable_data_ptr<scalar_t>();
  acc_t* grad_gh = grad_gh_t.mutable_data_ptr<acc_t>();
  acc_t* grad_gw = grad_gw_t.mutable_data_ptr<acc_t>();
  acc_t* plane = plane_t.mutable_data_ptr<acc_t>();

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(H * C), cols(W * C);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(rows.begin(), rows.end(), acc_t(0));
      std::fill(cols.begin(), cols.end(), acc_t(0));
      for (int64_t i = 0; i < H; ++i) {
        const acc_t* shr = sh + (n * H + i) * C;
        acc_t* rowr = rows.data() + i * C;
        for (int64_t j = 0; j < W; ++j) {
          const acc_t* swr = sw + (n * W + j) * C;
          acc_t* colr = cols.data() + j * C;
          const int64_t off = ((n * H + i) * W + j) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t g = static_cast<acc_t>(grad[off + c]);
            const acc_t q = g * static_cast<acc_t>(x[off + c]);
            rowr[c] += q * swr[c];
            colr[c] += q * shr[c];
            grad_x[off + c] = static_cast<scalar_t>(weight * g * shr[c] * swr[c]);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t total = acc_t(0);
        for (int64_t i = 0; i < H; ++i) {
          const acc_t s = sh[(n * H + i) * C + c];
          const acc_t row = rows[i * C + c];
          grad_gh[(n * C + c) * H + i] = weight * row * s * (acc_t(1) - s);
          total += row * s;
        }
        for (int64_t j = 0; j < W; ++j) {
          const acc_t s = sw[(n * W + j) * C + c];
          grad_gw[(n * C + c) * W + j] = weight * cols[j * C + c] * s * (acc_t(1) - s);
        }
        plane[n * C + c] = total;
      }
    }
  });
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& g_h, const at::Tensor& g_w,
                   const c10::optional<at::Tensor>& base, const c10::optional<at::Tensor>& weight) {
  const StripGateArgs a = prepare_strip_gate("strip_gate", x, g_h, g_w, base, weight);
  return strip_gate_forward_cpu(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g_h, const at::Tensor& g_w,
    const c10::optional<at::Tensor>& weight) {
  const StripGateArgs a = prepare_strip_gate("strip_gate_backward", x, g_h, g_w, c10::nullopt, weight);
  return strip_gate_backward_cpu(prepare_grad("strip_gate_backward", grad, a), a);
}

}  // namespace

at::Tensor strip_gate_forward_cpu(const StripGateArgs& a) {
  at::Tensor y = at::empty_like(a.x, a.format());
  if (a.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "strip_gate_cpu", [&] {
    if (a.channels_last) {
      strip_gate_forward_kernel_nhwc_impl<scalar_t>(a, y);
    } else {
      strip_gate_forward_kernel_impl<scalar_t>(a, y);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> strip_gate_backward_cpu(
    const at::Tensor& grad, const StripGateArgs& a) {
  const auto acc = acc_type(a.x.scalar_type());
  at::Tensor grad_x = at::empty_like(a.x, a.format());
  at::Tensor grad_gh = at::zeros(a.g_h.sizes(), a.g_h.options());
  at::Tensor grad_gw = at::zeros(a.g_w.sizes(), a.g_w.options());
  at::Tensor plane = at::zeros({a.x.size(0) * a.x.size(1)}, a.x.options().dtype(acc));
  if (a.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "strip_gate_backward_cpu", [&] {
      if (a.channels_last) {
        strip_gate_backward_kernel_nhwc_impl<scalar_t>(grad, a, grad_x, grad_gh, grad_gw, plane);
      } else {
        strip_gate_backward_kernel_impl<scalar_t>(grad, a, grad_x, grad_gh, grad_gw, plane);
      }
    });
  }
  return {grad_x, grad_gh, grad_gw, plane.sum()};
}

TORCH_LIBRARY_IMPL(metapool, CPU, m) {
  m.impl("strip_gate", &forward);
  m.impl("strip_gate_backward", &backward);
}

}  // namespace metapool
