// Shared declarations for the Meta-Pooling op (metapool::meta_pool and its backward):
//   out = Σ_k π_k op_k(x) over the candidates, op_k ∈ {skip, avg3/5/7, max3/5/7, strip}.
// Argument checks live in metapool.cpp; the CPU kernels in cpu/meta_pool_kernel.cpp see their
// inputs validated and parsed. (The CUDA kernels of this op are Triton, registered from Python.)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace metapool {

// Slots of the local candidates, in the order of reference.LOCAL_CANDIDATES.
enum LocalSlot : int { kSkip = 0, kAvg3, kAvg5, kAvg7, kMax3, kMax5, kMax7, kLocalSlots };

inline bool is_avg(int slot) { return slot >= kAvg3 && slot <= kAvg7; }
inline bool is_max(int slot) { return slot >= kMax3 && slot <= kMax7; }
// Window radius: avg3/max3 → 1, avg5/max5 → 2, avg7/max7 → 3.
inline int radius(int slot) { return is_avg(slot) ? slot - kAvg3 + 1 : is_max(slot) ? slot - kMax3 + 1 : 0; }

// The parsed candidate list: where each op sits in it (its index into pi), or -1.
struct Candidates {
  int count = 0;
  int local_pos[kLocalSlots] = {-1, -1, -1, -1, -1, -1, -1};
  int strip_pos = -1;
  bool has(int slot) const { return local_pos[slot] >= 0; }
  bool strip() const { return strip_pos >= 0; }
  bool any_local() const;
  int avg_radius() const;  // largest radius among the avg candidates present (0 if none)
  int max_radius() const;  // the same among the max candidates
};

// Parses a comma-joined candidate list, with a message naming an unknown or repeated op.
Candidates parse_candidates(const char* op, const std::string& candidates);

struct MetaPoolArgs {
  Candidates cand;
  bool channels_last = false;  // x (and grad) are channels_last; outputs are made so too
  at::Tensor x;                // (N, C, H, W), contiguous in `format()`
  at::Tensor pi;               // undefined (a fixed layer: one op, weight 1) or (K,), acc_type, contiguous
  at::Tensor gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias;  // defined with 'strip', acc_type
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// Validates every argument with a message that names the problem and returns them normalised.
MetaPoolArgs prepare_meta_pool(
    const char* op,
    const at::Tensor& x,
    const c10::optional<at::Tensor>& pi,
    const c10::optional<at::Tensor>& gate_h_weight,
    const c10::optional<at::Tensor>& gate_h_bias,
    const c10::optional<at::Tensor>& gate_w_weight,
    const c10::optional<at::Tensor>& gate_w_bias,
    const std::string& candidates);

}  // namespace metapool
