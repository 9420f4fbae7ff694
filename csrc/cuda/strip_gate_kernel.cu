// CUDA kernels of the strip-gate op.
//
// Forward is elementwise: one read of x (and base), one write of y; the gate logits are tiny and
// stay in cache. Backward gives each (n, c) plane to one block. The block walks the plane in
// chunks of 32 columns: lane = column, warp = a set of rows. Row sums (for grad_g_h) are warp
// shuffles accumulated chunk by chunk by the one lane that owns the row; column sums (for grad_g_w)
// stay in registers and are combined across warps in shared memory in a fixed order. No atomics:
// the same input gives bitwise the same gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../strip_gate.h"

namespace metapool {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + exp(-g));
}

template <typename scalar_t, typename acc_t>
__global__ void strip_gate_forward_kernel(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ base,
                                          const acc_t* __restrict__ gh,
                                          const acc_t* __restrict__ gw,
                                          const acc_t* __restrict__ weight,
                                          scalar_t* __restrict__ y,
                                          int64_t numel, int64_t C, int64_t H, int64_t W, bool channels_last) {
  const acc_t w = weight ? *weight : acc_t(1);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    int64_t plane, row, col;  // plane = n*C + c, row = plane*H + h
    if (channels_last) {
      const int64_t c = i % C;
      const int64_t nhw = i / C;
      col = nhw % W;
      const int64_t nh = nhw / W;
      plane = (nh / H) * C + c;
      row = plane * H + nh % H;
    } else {
      col = i % W;
      row = i / W;
      plane = row / H;
    }
    acc_t v = w * sigmoid(gh[row]) * sigmoid(gw[plane * W + col]) * static_cast<acc_t>(x[i]);
    if (base) v += static_cast<acc_t>(base[i]);
    y[i] = static_cast<scalar_t>(v);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
strip_gate_backward_kernel(const scalar_t* __restrict__ grad,
                           const scalar_t* __restrict__ x,
                           const acc_t* __restrict__ gh,
                           const acc_t* __restrict__ gw,
                           const acc_t* __restrict__ weight,
                           scalar_t* __restrict__ grad_x,
                           acc_t* __restrict__ grad_gh,   // zeroed; row sums accumulate here first
                           acc_t* __restrict__ grad_gw,
                           acc_t* __restrict__ plane_total,
                           int64_t H, int64_t W) {
  __shared__ acc_t col_part[kWarps][32];
  __shared__ acc_t warp_total[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t p = blockIdx.x;
  const acc_t w = weight ? *weight : acc_t(1);
  const scalar_t* gp = grad + p * H * W;
  const scalar_t* xp = x + p * H * W;
  scalar_t* gxp = grad_x + p * H * W;
  acc_t* rows = grad_gh + p * H;

  for (int64_t c0 = 0; c0 < W; c0 += 32) {
    const int64_t j = c0 + lane;
    const bool live = j < W;
    const acc_t sw = live ? sigmoid(gw[p * W + j]) : acc_t(0);
    acc_t col = acc_t(0);
    for (int64_t i = warp; i < H; i += kWarps) {
      const acc_t sh = sigmoid(gh[p * H + i]);
      acc_t q = acc_t(0);
      if (live) {
        const acc_t g = static_cast<acc_t>(gp[i * W + j]);
        q = g * static_cast<acc_t>(xp[i * W + j]);
        gxp[i * W + j] = static_cast<scalar_t>(w * g * sh * sw);
      }
      col += q * sh;
      const acc_t row = warp_sum(q * sw);
      if (lane == 0) rows[i] += row;
    }
    col_part[warp][lane] = col;
    __syncthreads();
    if (warp == 0 && live) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int k = 0; k < kWarps; ++k) s += col_part[k][lane];
      grad_gw[p * W + j] = w * s * sw * (acc_t(1) - sw);
    }
    __syncthreads();
  }

  // Each row is finished by the lane that accumulated it; the plane's share of grad_weight
  // (Σ_h σh · rowsum_h) is combined across warps in a fixed order.
  acc_t total = acc_t(0);
  if (lane == 0) {
    for (int64_t i = warp; i < H; i += kWarps) {
      const acc_t sh = sigmoid(gh[p * H + i]);
      const acc_t row = rows[i];
      total += row * sh;
      rows[i] = w * row * sh * (acc_t(1) - sh);
    }
    warp_total[warp] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = acc_t(0);
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += warp_total[k];
    plane_total[p] = s;
  }
}

int grid_for(int64_t numel, int threads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (numel + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 32)));
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& g_h, const at::Tensor& g_w,
                   const c10::optional<at::Tensor>& base, const c10::optional<at::Tensor>& weight) {
  const StripGateArgs a = prepare_strip_gate("strip_gate", x, g_h, g_w, base, weight);
  return strip_gate_forward_cuda(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g_h, const at::Tensor& g_w,
    const c10::optional<at::Tensor>& weight) {
  const StripGateArgs a = prepare_strip_gate("strip_gate_backward", x, g_h, g_w, c10::nullopt, weight);
  return strip_gate_backward_cuda(prepare_grad("strip_gate_backward", grad, a), a);
}

}  // namespace

at::Tensor strip_gate_forward_cuda(const StripGateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  at::Tensor y = at::empty_like(a.x, a.format());
  const int64_t numel = a.x.numel();
  if (numel == 0) return y;
  const int threads = 256;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "strip_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    strip_gate_forward_kernel<scalar_t, acc_t><<<grid_for(numel, threads), threads, 0, stream>>>(
        a.x.const_data_ptr<scalar_t>(),
        a.base.defined() ? a.base.const_data_ptr<scalar_t>() : nullptr,
        a.g_h.const_data_ptr<acc_t>(), a.g_w.const_data_ptr<acc_t>(),
        a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), numel, a.x.size(1), a.x.size(2), a.x.size(3), a.channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> strip_gate_backward_cuda(
    const at::Tensor& grad_in, const StripGateArgs& a_in) {
  const c10::cuda::CUDAGuard guard(a_in.x.device());
  // The block-per-plane reduction walks NCHW planes: a channels_last input is reduced on NCHW
  // copies and its grad_x handed back channels_last, as the caller's layout.
  StripGateArgs a = a_in;
  at::Tensor grad = grad_in;
  if (a.channels_last) {
    a.x = a_in.x.contiguous();
    grad = grad_in.contiguous();
  }
  const auto acc = acc_type(a.x.scalar_type());
  const int64_t planes = a.x.size(0) * a.x.size(1);
  at::Tensor grad_x = at::empty_like(a.x);
  at::Tensor grad_gh = at::zeros(a.g_h.sizes(), a.g_h.options());
  at::Tensor grad_gw = at::zeros(a.g_w.sizes(), a.g_w.options());
  at::Tensor plane = at::zeros({planes}, a.x.options().dtype(acc));
  if (a.x.numel() > 0) {
    TORCH_CHECK(planes <= std::numeric_limits<int32_t>::max(),
                "strip_gate_backward: N*C = ", planes, " planes exceeds the CUDA grid limit");
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "strip_gate_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      strip_gate_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(planes), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
          a.g_h.const_data_ptr<acc_t>(), a.g_w.const_data_ptr<acc_t>(),
          a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr,
          grad_x.mutable_data_ptr<scalar_t>(), grad_gh.mutable_data_ptr<acc_t>(),
          grad_gw.mutable_data_ptr<acc_t>(), plane.mutable_data_ptr<acc_t>(),
          a.x.size(2), a.x.size(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (a_in.channels_last) grad_x = grad_x.contiguous(at::MemoryFormat::ChannelsLast);
  return {grad_x, grad_gh, grad_gw, plane.sum()};
}

TORCH_LIBRARY_IMPL(metapool, CUDA, m) {
  m.impl("strip_gate", &forward);
  m.impl("strip_gate_backward", &backward);
}

}  // namespace metapool
