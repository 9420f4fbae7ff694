// CPU kernels of metapool::meta_pool and its backward.
//
// One mechanism serves both memory formats. The work is cut into items: a group of channels of one
// image (NCHW: one (n, c) plane; channels_last: a block of `lanes` channels of image n) times a
// chunk of rows. Each row of an item is copied into a packed float row (float32, or float64 for
// float64 inputs) of length L = W · lanes, where column j, lane l sits at j · lanes + l; shifting
// a row by d columns is then a shift by d · lanes, and every computation is a vector loop over
// the packed row, vectorised along W in NCHW and along channels in channels_last.
//
// Window ops are separable. As a row arrives, its horizontal partials (sums, maxima and
// first-argmax columns over 3, 5 and 7 columns; k = 3/5/7 share the shifted loads) go into a ring
// of the last 8 rows; an output row then reduces its window's rows from the ring. Rows are
// visited once per item, plus a halo of rows at chunk edges.
//
// Forward (bytes: 2|x| without 'strip', 3|x| with it — the floor):
//   strip_sums: z_h, z_w (one read of x), then the gates σ(W z + b) (one small GEMM each, gemm_rows);
//   forward:    out = Σ_local π_k op_k(x) + π_strip · x · σ(g_h) σ(g_w), one read of x, one write.
// Backward (5|x|):
//   strip_sums on grad · x: Σ_j grad·x·σ(g_w) and Σ_i grad·x·σ(g_h), which every element's gradient
//     depends on through the strip means; the gate gradients from them (gemm_rows);
//   backward: grad x of every candidate at once — avg: box sums of grad / window counts; max: a
//     gather from the windows whose recomputed argmax is this element (PyTorch's rule: the first
//     maximum in row-major order, or the last NaN); strip and strip-mean adjoints — and the α
//     partial sums Σ grad · op_k(x) in the same pass.
// No atomics; every reduction has a fixed order that depends on the shape alone, and items are
// cut by shape alone, so results are bitwise identical for any number of threads.
//
// Where each candidate lives (fwd: meta_pool_forward_kernel_impl, bwd: meta_pool_backward_kernel_impl):
//   skip      fwd: π_skip · x; bwd: π_skip · grad
//   avg3/5/7  horizontal (row sums) then Window over the Ring, divided by window_count;
//             bwd: box sums of grad / window counts
//   max3/5/7  horizontal (row maxima and first-argmax columns) then Window; bwd: the gather from
//             the windows whose argmax is this element
//   strip     strip_sums (z_h, z_w), strip_gate_values (σ(W z + b)), fwd: π · x · σ_h σ_w;
//             bwd: strip_sums of grad · x, strip_gate_grads, the strip adjoints
//   π         Weights; α's partial sums Σ grad · op_k(x) in bwd
//   fixed avg/max layer, fwd: local_forward_kernel_impl (op and radius compiled in, rows in place)
//   fixed strip layer, fwd and bwd: strip_sums, the gate GEMMs and strip_apply (rows in place)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../meta_pool.h"
#include "../strip_gate.h"

namespace metapool {

namespace {

using at::vec::Vectorized;

constexpr int kRing = 8;  // rows kept per ring: ≥ 2·3 + 2, the widest window plus the backward's lag

// ---------------------------------------------------------------------------------------------
// Vector loop helpers: full vectors, then one partial vector; `n` is a compile-time constant in
// the main loop once the body is inlined.
// ---------------------------------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX2)
// Lane masks for partial vectors: the first n lanes are set. AVX2's masked loads and stores take
// one instruction where ATen's partial loadu/store copy through memory.
inline __m256i float_mask(int64_t n) {  // 8 × 32-bit lanes
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}
inline __m256i double_mask(int64_t n) {  // 4 × 64-bit lanes
  alignas(32) static const int64_t m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 4 - n));
}
#endif

template <typename T>
inline Vectorized<T> load(const T* p, int64_t n) {
  if (n == Vectorized<T>::size()) return Vectorized<T>::loadu(p);
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return Vectorized<float>(_mm256_maskload_ps(p, float_mask(n)));
  if constexpr (std::is_same_v<T, double>) return Vectorized<double>(_mm256_maskload_pd(p, double_mask(n)));
#endif
  return Vectorized<T>::loadu(p, n);
}

template <typename T>
inline void store(T* p, const Vectorized<T>& v, int64_t n) {
  if (n == Vectorized<T>::size()) {
    v.store(p);
    return;
  }
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_maskstore_ps(p, float_mask(n), v);
    return;
  }
  if constexpr (std::is_same_v<T, double>) {
    _mm256_maskstore_pd(p, double_mask(n), v);
    return;
  }
#endif
  v.store(p, n);
}

// v with the lanes past n zeroed (a partial vector's garbage never enters a sum).
template <typename T>
inline Vectorized<T> masked(const Vectorized<T>& v, int64_t n) {
  return n == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(T(0)), v, n);
}

template <typename T, typename F>
inline void vec_loop(int64_t L, F&& body) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t f = 0;
  for (; f + V <= L; f += V) body(f, V);
  if (f < L) body(f, L - f);
}

// Lanes summed in a fixed order.
template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = lanes[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}

// ---------------------------------------------------------------------------------------------
// How the tensor is cut into items.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kRowTarget = 2048;   // packed row length to aim for (~8 KiB of float32)
constexpr int64_t kPackBelowW = 32;    // NCHW rows narrower than this pack several channels per row
constexpr int64_t kItemTarget = 32;    // split rows into chunks until there are this many items
constexpr int64_t kMinChunkRows = 32;  // ... but not into chunks shorter than this (halo cost)

struct Layout {
  int64_t N, C, H, W;
  bool cl;
  int64_t lanes;    // channels per packed row
  int64_t cblocks;  // channel blocks per image
  int64_t chunk;    // rows per chunk
  int64_t chunks;

  // `pack_narrow`: whether narrow NCHW rows pack several channels. The window ops want it; the
  // strip sums and the strip term read rows in place and vectorise along W at any width.
  Layout(const at::Tensor& x, bool channels_last, bool pack_narrow = true) {
    N = x.size(0); C = x.size(1); H = x.size(2); W = x.size(3);
    cl = channels_last;
    // channels_last rows hold channels contiguously: vectorise along them. NCHW rows are
    // vectorised along W when wide enough; narrow ones (the 14×14, 7×7 maps of deep blocks) are
    // transposed on the fly so that channels fill the vectors there too.
    const bool pack = cl || (pack_narrow && W < kPackBelowW);
    // A block of channels is a whole number of vectors (8 float32), so its columns copy in whole vectors.
    lanes = pack ? std::min<int64_t>(C, std::max<int64_t>(8, kRowTarget / std::max<int64_t>(W, 1) / 8 * 8)) : 1;
    // Few images (batch 1 in a deployed network): narrower channel blocks before any row split.
    // Channels are independent, so this costs no halo and changes no sum; a channels_last block
    // keeps at least a cache line of float32 so that no two items share one.
    const int64_t few = kItemTarget / 4;
    if (pack && N * ((C + lanes - 1) / lanes) < few) {
      const int64_t per_image = (few + N - 1) / N, narrowest = cl ? 16 : 8;
      lanes = std::min(lanes, std::max<int64_t>(narrowest, ((C + per_image - 1) / per_image + 7) / 8 * 8));
    }
    cblocks = (C + lanes - 1) / lanes;
    const int64_t groups = N * cblocks;
    chunks = 1;
    if (groups < kItemTarget && H > kMinChunkRows)
      chunks = std::min((kItemTarget + groups - 1) / groups, H / kMinChunkRows);
    chunk = (H + chunks - 1) / chunks;
    chunks = (H + chunk - 1) / chunk;
  }
  int64_t groups() const { return N * cblocks; }
  int64_t items() const { return groups() * chunks; }
};

// One item: its channels and rows, and where its rows are in memory.
struct Item {
  int64_t n, c0, clen, r0, r1, chunk, L;
  int64_t base;     // offset of (n, c0, row 0, col 0)
  int64_t rstride;  // elements between rows
  int64_t cstride;  // elements between columns
  int64_t lstride;  // elements between channels

  Item(const Layout& g, int64_t index) {
    const int64_t group = index / g.chunks;
    chunk = index % g.chunks;
    n = group / g.cblocks;
    c0 = (group % g.cblocks) * g.lanes;
    clen = std::min(g.lanes, g.C - c0);
    r0 = chunk * g.chunk;
    r1 = std::min(r0 + g.chunk, g.H);
    L = g.W * clen;
    rstride = g.cl ? g.W * g.C : g.W;
    cstride = g.cl ? g.C : 1;
    lstride = g.cl ? 1 : g.H * g.W;
    base = n * g.C * g.H * g.W + c0 * lstride;
  }
  // Index of lane l's (n, c) in a (N, C, ·) strip tensor.
  int64_t nc(const Layout& g, int64_t l) const { return n * g.C + c0 + l; }
};

template <typename S, typename D>
inline void convert_contiguous(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D> && (std::is_same_v<D, float> || std::is_same_v<D, double>)) {
    vec_loop<D>(n, [&](int64_t f, int64_t m) { store(dst + f, load(src + f, m), m); });  // inline, short or long
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(src[k]);
  }
}

// dst[j · ld_dst + i] = src[i · ld_src + j] for i < M, j < N (converting); 8×8 vector blocks for
// float32.
template <typename S, typename D>
void transpose(const S* src, int64_t ld_src, D* dst, int64_t ld_dst, int64_t M, int64_t N) {
  int64_t i = 0;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    for (; i + 8 <= M; i += 8) {
      int64_t j = 0;
      for (; j + 8 <= N; j += 8)
        at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      for (; j < N; ++j)
        for (int64_t k = i; k < i + 8; ++k) dst[j * ld_dst + k] = src[k * ld_src + j];
    }
  }
  for (; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = static_cast<D>(src[i * ld_src + j]);
}

// Whether an item's packed row is laid out as its memory row.
inline bool packed_is_contiguous(const Item& it, int64_t W) {
  return (it.clen == 1 && (it.cstride == 1 || W == 1)) || (it.lstride == 1 && (it.cstride == it.clen || W == 1));
}

// Packs row `src` of an item into dst[j · clen + l] (converting to the accumulation type).
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, const Item& it, int64_t W, acc_t* dst) {
  if (packed_is_contiguous(it, W)) {
    convert_contiguous(src, dst, it.L);  // the packed row is the memory row
  } else if (it.clen == 1) {
    for (int64_t j = 0; j < W; ++j) dst[j] = static_cast<acc_t>(src[j * it.cstride]);
  } else if (it.lstride == 1) {  // channels_last, a block of channels
    for (int64_t j = 0; j < W; ++j) convert_contiguous(src + j * it.cstride, dst + j * it.clen, it.clen);
  } else {  // NCHW, several channels packed: a transpose
    transpose(src, it.lstride, dst, it.clen, it.clen, W);
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, const Item& it, int64_t W, scalar_t* dst) {
  if (packed_is_contiguous(it, W)) {
    convert_contiguous(src, dst, it.L);
  } else if (it.clen == 1) {
    for (int64_t j = 0; j < W; ++j) dst[j * it.cstride] = static_cast<scalar_t>(src[j]);
  } else if (it.lstride == 1) {
    for (int64_t j = 0; j < W; ++j) convert_contiguous(src + j * it.clen, dst + j * it.cstride, it.clen);
  } else {
    transpose(src, it.clen, dst, it.lstride, W, it.clen);
  }
}

// dst[j · lanes + l] = src[l · src_stride]: a per-channel value spread over a packed row.
template <typename acc_t>
void spread_lanes(const acc_t* src, int64_t src_stride, const Item& it, int64_t W, acc_t* dst) {
  if (it.clen == 1) {
    std::fill(dst, dst + W, src[0]);
    return;
  }
  for (int64_t l = 0; l < it.clen; ++l) dst[l] = src[l * src_stride];
  for (int64_t j = 1; j < W; ++j) std::copy(dst, dst + it.clen, dst + j * it.clen);
}

// dst[j · lanes + l] = src[l · src_stride + j]: a per-channel, per-column value as a packed row.
template <typename acc_t>
void pack_columns(const acc_t* src, int64_t src_stride, const Item& it, int64_t W, acc_t* dst) {
  for (int64_t l = 0; l < it.clen; ++l)
    for (int64_t j = 0; j < W; ++j) dst[j * it.clen + l] = src[l * src_stride + j];
}

// Valid positions in the window [i - r, i + r] of a length-n axis (count_include_pad=False).
inline int64_t window_count(int64_t i, int r, int64_t n) {
  return std::min<int64_t>(i + r, n - 1) - std::max<int64_t>(i - r, 0) + 1;
}

// Storage reused by the items of one thread, grown when needed and never initialised as a whole:
// each user writes what it reads.
template <typename T>
struct Buffer {
  std::unique_ptr<T[]> mem;
  int64_t cap = 0;
  T* get(int64_t n) {
    if (n > cap) {
      mem.reset(new T[n]);
      cap = n;
    }
    return mem.get();
  }
};

// A packed row of length L with `pad` positions either side holding `value`; returns its interior.
template <typename T>
T* padded_row(Buffer<T>& b, int64_t L, int64_t pad, T value) {
  T* p = b.get(L + 2 * pad);
  std::fill(p, p + pad, value);
  std::fill(p + pad + L, p + L + 2 * pad, value);
  return p + pad;
}

// Constants of an item's packed row, shared by all its rows.
template <typename acc_t>
struct Columns {
  Buffer<acc_t> col_buf, inv_buf[4], first_buf[4];
  const acc_t* col = nullptr;  // column index of each packed position
  const acc_t* inv[4] = {};    // [r]: 1 / (window count along W), r = 1..3
  const acc_t* first[4] = {};  // [r]: first column of the window, r = 1..3

  void init(const Item& it, int64_t W, int R) {
    acc_t* c = col_buf.get(it.L);
    for (int64_t j = 0; j < W; ++j) std::fill(c + j * it.clen, c + (j + 1) * it.clen, static_cast<acc_t>(j));
    col = c;
    for (int r = 1; r <= R; ++r) {
      acc_t* iv = inv_buf[r].get(it.L);
      acc_t* fi = first_buf[r].get(it.L);
      for (int64_t j = 0; j < W; ++j) {
        std::fill(iv + j * it.clen, iv + (j + 1) * it.clen, acc_t(1) / static_cast<acc_t>(window_count(j, r, W)));
        std::fill(fi + j * it.clen, fi + (j + 1) * it.clen, static_cast<acc_t>(std::max<int64_t>(j - r, 0)));
      }
      inv[r] = iv;
      first[r] = fi;
    }
  }
};

// A ring of kRing packed rows, each with `pad` positions either side holding `pad_value`.
// `stride == 0` marks a ring the call does not use.
template <typename acc_t>
struct Ring {
  int64_t stride = 0, pad = 0;
  Buffer<acc_t> buf;
  acc_t* data = nullptr;
  std::array<int64_t, kRing> tag;

  void init(int64_t L, int64_t pad_, acc_t pad_value) {
    pad = pad_;
    stride = L + 2 * pad;
    data = buf.get(kRing * stride);
    for (int k = 0; k < kRing; ++k) {
      std::fill(data + k * stride, data + k * stride + pad, pad_value);
      std::fill(data + k * stride + pad + L, data + (k + 1) * stride, pad_value);
    }
    tag.fill(std::numeric_limits<int64_t>::min());
  }
  acc_t* row(int64_t r) { return data + (r & (kRing - 1)) * stride + pad; }
  // The row for r, zeroed the first time r claims its slot.
  acc_t* claim(int64_t r, int64_t L) {
    acc_t* p = row(r);
    if (tag[r & (kRing - 1)] != r) {
      std::fill(p, p + L, acc_t(0));
      tag[r & (kRing - 1)] = r;
    }
    return p;
  }
};

// The ring rows of one vertical window [p - r, p + r] ∩ [0, H), as plain pointers: the vector
// loops then do no address arithmetic.
template <typename acc_t>
struct Window {
  acc_t* row[7];
  int count = 0;
  int64_t first = 0;

  Window() = default;
  Window(Ring<acc_t>& ring, int64_t p, int r, int64_t H) {
    first = std::max<int64_t>(p - r, 0);
    const int64_t last = std::min<int64_t>(p + r, H - 1);
    for (int64_t i = first; i <= last; ++i) row[count++] = ring.row(i);
  }
};

// Horizontal partials of one packed row over windows of radius 1..R: sums from a zero-padded
// row, maxima from a -inf-padded one (NaN propagates as in max_pool2d). k = 3, 5, 7 share loads.
template <typename acc_t>
void horizontal(const acc_t* xz, const acc_t* xn, int64_t L, int64_t lanes, int R_sum, int R_max,
                const std::array<acc_t*, 4>& sums, const std::array<acc_t*, 4>& maxes) {
  using Vec = Vectorized<acc_t>;
  vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
    if (R_sum > 0) {
      Vec s = load(xz + f, n);
      for (int r = 1; r <= R_sum; ++r) {
        s = s + load(xz + f - r * lanes, n) + load(xz + f + r * lanes, n);
        if (sums[r]) store(sums[r] + f, s, n);
      }
    }
    if (R_max > 0) {
      Vec m = load(xn + f, n);
      for (int r = 1; r <= R_max; ++r) {
        m = at::vec::maximum(m, at::vec::maximum(load(xn + f - r * lanes, n), load(xn + f + r * lanes, n)));
        if (maxes[r]) store(maxes[r] + f, m, n);
      }
    }
  });
}

// Whether an item's rows are used where they are in memory (no packed copy): its dtype is the
// accumulation type, and its rows are one channel's with unit column stride or a channels_last
// block. Such rows have column stride it.cstride (1 for one channel), packed ones it.clen.
template <typename scalar_t>
inline bool rows_in_place(const Item& it) {
  return std::is_same_v<scalar_t, at::opmath_type<scalar_t>> && (it.clen == 1 ? it.cstride == 1 : it.lstride == 1);
}
template <typename scalar_t>
inline int64_t row_column_stride(const Item& it) {
  return rows_in_place<scalar_t>(it) && it.clen > 1 ? it.cstride : it.clen;
}

// A per-column value of (N, C, W) strip tensor `src` at an item's packed positions: the tensor's
// own row for one lane, else its columns packed into `buf`.
template <typename acc_t>
const acc_t* item_columns(const acc_t* src, const Layout& g, const Item& it, Buffer<acc_t>& buf) {
  const acc_t* row = src + it.nc(g, 0) * g.W;
  if (it.clen == 1) return row;
  acc_t* packed = buf.get(it.L);
  pack_columns(row, g.W, it, g.W, packed);
  return packed;
}

// The layout of the strip sums and of the strip term: NCHW rows are never packed, so that both
// read every row in place and vectorise along W (a per-row gate value is then one broadcast).
Layout strip_layout(const at::Tensor& x, bool channels_last) { return Layout(x, channels_last, false); }

// ---------------------------------------------------------------------------------------------
// Strip sums: rows[(n,c), i] = Σ_j q · b_j and cols[chunk, (n,c), j] = Σ_{i in chunk} q · a_i with
// q = x (forward: grad, a and b absent, taken as 1) or grad · x (backward: a = σ(g_h), b = σ(g_w),
// and total[item] = Σ q · a · b). g is a strip_layout; rows are read in place.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void strip_sums(const Layout& g, const scalar_t* x, const scalar_t* grad, const at::opmath_type<scalar_t>* a,
                const at::opmath_type<scalar_t>* b, at::opmath_type<scalar_t>* rows,
                at::opmath_type<scalar_t>* cols, at::opmath_type<scalar_t>* total) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t H = g.H, W = g.W, planes = g.N * g.C;
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    Buffer<acc_t> x_buf, g_buf, a_buf, b_buf, col_buf, lane_buf;
    for (int64_t index = begin; index < end; ++index) {
      const Item it(g, index);
      const int64_t L = it.L, lanes = it.clen, nc = it.nc(g, 0);
      const bool in_place = rows_in_place<scalar_t>(it);
      const int64_t cs = row_column_stride<scalar_t>(it);
      // Packed: column j, lane l at j · lanes + l. One vector of slack, so that a row's last
      // partial vector stores whole (its lanes past the row add loads' zeros): a masked store
      // costs several times a plain one.
      acc_t* col = col_buf.get(L + Vec::size());
      std::fill(col, col + L + Vec::size(), acc_t(0));
      acc_t* lane_sum = lane_buf.get(lanes);
      acc_t* a_lane = a_buf.get(lanes);
      const acc_t* b_row = b ? item_columns(b, g, it, b_buf) : nullptr;
      Vec tot(acc_t(0));
      for (int64_t i = it.r0; i < it.r1; ++i) {
        const int64_t off = it.base + i * it.rstride;
        const acc_t* xs = reinterpret_cast<const acc_t*>(x + off);
        const acc_t* gs = grad ? reinterpret_cast<const acc_t*>(grad + off) : nullptr;
        if (!in_place) {
          acc_t* xp = x_buf.get(L);
          load_row(x + off, it, W, xp);
          xs = xp;
          if (grad) {
            acc_t* gp = g_buf.get(L);
            load_row(grad + off, it, W, gp);
            gs = gp;
          }
        }
        for (int64_t l = 0; l < lanes; ++l) a_lane[l] = a ? a[(nc + l) * H + i] : acc_t(1);
        // One vector of row i's positions at s (memory), d (packed column) and lane l: the row sum
        // takes grad·x·b, the column sums and the total grad·x·a (forward: x, x).
        auto step = [&](int64_t s, int64_t d, int64_t l, int64_t n, Vec& row_acc) {
          const Vec xv = load(xs + s, n);
          if (grad) {
            const Vec gx = xv * load(gs + s, n);
            const Vec gxa = gx * (lanes == 1 ? Vec(a_lane[0]) : load(a_lane + l, n));
            const Vec bv = load(b_row + d, n);
            store(col + d, Vec::loadu(col + d) + gxa, Vec::size());
            tot += masked(gxa * bv, n);
            row_acc += masked(gx * bv, n);
          } else {
            store(col + d, Vec::loadu(col + d) + xv, Vec::size());
            row_acc += masked(xv, n);
          }
        };
        if (lanes == 1) {
          Vec row_acc(acc_t(0));
          vec_loop<acc_t>(W, [&](int64_t f, int64_t n) { step(f, f, 0, n, row_acc); });
          rows[nc * H + i] = reduce_sum(row_acc);
        } else {
          std::fill(lane_sum, lane_sum + lanes, acc_t(0));
          for (int64_t j = 0; j < W; ++j)
            vec_loop<acc_t>(lanes, [&](int64_t l, int64_t n) {
              Vec row_acc = load(lane_sum + l, n);
              step(j * cs + l, j * lanes + l, l, n, row_acc);
              store(lane_sum + l, row_acc, n);
            });
          for (int64_t l = 0; l < lanes; ++l) rows[(nc + l) * H + i] = lane_sum[l];
        }
      }
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t j = 0; j < W; ++j) cols[(it.chunk * planes + nc + l) * W + j] = col[j * lanes + l];
      if (total) total[index] = reduce_sum(tot);
    }
  });
}

// The strip term alone, out = src · σh_i · σw_j (+ ah_i + aw_j): a fixed 'strip' layer's forward
// (src = x) and its grad x (src = grad, ah and aw the strip means' adjoints). One multiply per
// operand in the generic kernels' order, so the results are theirs; g is a strip_layout.
template <typename scalar_t>
void strip_apply(const Layout& g, const scalar_t* src, const at::opmath_type<scalar_t>* sh,
                 const at::opmath_type<scalar_t>* sw, const at::opmath_type<scalar_t>* ah,
                 const at::opmath_type<scalar_t>* aw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t H = g.H, W = g.W;
  const bool add = ah != nullptr;
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    Buffer<acc_t> in_buf, out_buf, sw_buf, aw_buf, sh_buf, ah_buf;
    for (int64_t index = begin; index < end; ++index) {
      const Item it(g, index);
      const int64_t L = it.L, lanes = it.clen, nc = it.nc(g, 0);
      const bool in_place = rows_in_place<scalar_t>(it);
      const int64_t cs = row_column_stride<scalar_t>(it);
      const acc_t* sw_row = item_columns(sw, g, it, sw_buf);
      const acc_t* aw_row = add ? item_columns(aw, g, it, aw_buf) : nullptr;
      acc_t* sh_lane = sh_buf.get(lanes);
      acc_t* ah_lane = ah_buf.get(lanes);
      for (int64_t i = it.r0; i < it.r1; ++i) {
        const int64_t off = it.base + i * it.rstride;
        const acc_t* xs = reinterpret_cast<const acc_t*>(src + off);
        acc_t* os = reinterpret_cast<acc_t*>(out + off);
        if (!in_place) {
          acc_t* xp = in_buf.get(L);
          load_row(src + off, it, W, xp);
          xs = xp;
          os = out_buf.get(L);
        }
        if (lanes == 1) {
          const Vec s(sh[nc * H + i]), t(add ? ah[nc * H + i] : acc_t(0));
          auto body = [&](int64_t f, int64_t n) {
            Vec o = load(xs + f, n) * s * load(sw_row + f, n);
            if (add) o = o + t + load(aw_row + f, n);
            store(os + f, o, n);
          };
          if (W >= Vec::size()) {
            // A row's last partial vector is done as the full vector ending at W (it rewrites a
            // few outputs with the same values): a masked store costs several times a plain one.
            int64_t f = 0;
            for (; f + Vec::size() <= W; f += Vec::size()) body(f, Vec::size());
            if (f < W) body(W - Vec::size(), Vec::size());
          } else {
            body(0, W);
          }
        } else {
          for (int64_t l = 0; l < lanes; ++l) {
            sh_lane[l] = sh[(nc + l) * H + i];
            ah_lane[l] = add ? ah[(nc + l) * H + i] : acc_t(0);
          }
          for (int64_t j = 0; j < W; ++j)
            vec_loop<acc_t>(lanes, [&](int64_t l, int64_t n) {
              const int64_t d = j * lanes + l;
              Vec o = load(xs + j * cs + l, n) * load(sh_lane + l, n) * load(sw_row + d, n);
              if (add) o = o + load(ah_lane + l, n) + load(aw_row + d, n);
              store(os + j * cs + l, o, n);
            });
        }
        if (!in_place) store_row(os, it, W, out + off);
      }
    }
  });
}

// scale · Σ over chunks, in chunk order: (chunks, P) → (P).
template <typename acc_t>
at::Tensor sum_chunks(const at::Tensor& parts, acc_t scale = acc_t(1)) {
  const int64_t chunks = parts.size(0), P = parts.numel() / std::max<int64_t>(chunks, 1);
  at::Tensor out = at::empty({P}, parts.options());
  const acc_t* p = parts.const_data_ptr<acc_t>();
  acc_t* o = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, P, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t s = p[e];
      for (int64_t c = 1; c < chunks; ++c) s += p[c * P + e];
      o[e] = s * scale;
    }
  });
  return out;
}

// The π of each local slot (0 where absent) and of 'strip'; a fixed layer weighs its op by 1.
template <typename acc_t>
struct Weights {
  std::array<acc_t, kLocalSlots> local{};
  acc_t strip = acc_t(0);

  explicit Weights(const MetaPoolArgs& a) {
    const acc_t* pi = a.pi.defined() ? a.pi.const_data_ptr<acc_t>() : nullptr;
    for (int s = 0; s < kLocalSlots; ++s)
      if (a.cand.has(s)) local[s] = pi ? pi[a.cand.local_pos[s]] : acc_t(1);
    if (a.cand.strip()) strip = pi ? pi[a.cand.strip_pos] : acc_t(1);
  }
};

// ---------------------------------------------------------------------------------------------
// Forward: out = Σ_local π_k op_k(x) + π_strip · x · sh_i · sw_j (sh, sw: σ of the gate logits).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void meta_pool_forward_kernel_impl(const MetaPoolArgs& a, const Layout& g,
                                   const at::opmath_type<scalar_t>* sh,
                                   const at::opmath_type<scalar_t>* sw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const Candidates& cand = a.cand;
  const Weights<acc_t> w(a);
  const int Ra = cand.avg_radius(), Rm = cand.max_radius(), R = std::max(Ra, Rm);
  const int64_t H = g.H, W = g.W;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const bool strip = cand.strip();

  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    Columns<acc_t> cols;
    Ring<acc_t> xr, hs[4], hm[4];
    Buffer<acc_t> xn_buf, acc_buf, sw_buf, sh_buf;
    for (int64_t index = begin; index < end; ++index) {
      const Item it(g, index);
      const int64_t L = it.L, P = R * it.clen;
      const bool direct = std::is_same_v<scalar_t, acc_t> && packed_is_contiguous(it, W);
      cols.init(it, W, R);
      xr.init(L, P, acc_t(0));
      for (int r = 1; r <= R; ++r) {
        if (cand.has(kAvg3 + r - 1)) hs[r].init(L, 0, acc_t(0));
        if (cand.has(kMax3 + r - 1)) hm[r].init(L, 0, acc_t(0));
      }
      acc_t* xn = padded_row(xn_buf, L, P, -std::numeric_limits<acc_t>::infinity());
      acc_t* acc_row = acc_buf.get(L);
      acc_t* sw_row = strip ? sw_buf.get(L) : nullptr;
      acc_t* sh_row = strip ? sh_buf.get(L) : nullptr;
      if (strip) pack_columns(sw + it.nc(g, 0) * W, W, it, W, sw_row);
      for (int64_t t = std::max<int64_t>(it.r0 - R, 0); t < std::min<int64_t>(it.r1 + R, H) + R; ++t) {
        if (t < std::min<int64_t>(it.r1 + R, H)) {  // row t arrives
          acc_t* xz = xr.row(t);
          load_row(x + it.base + t * it.rstride, it, W, xz);
          std::array<acc_t*, 4> sums{}, maxes{};
          for (int r = 1; r <= R; ++r) {
            if (hs[r].stride) sums[r] = hs[r].row(t);
            if (hm[r].stride) maxes[r] = hm[r].row(t);
          }
          if (Rm > 0) std::memcpy(xn, xz, L * sizeof(acc_t));
          horizontal(xz, xn, L, it.clen, Ra, Rm, sums, maxes);
        }
        const int64_t p = t - R;  // output row p: its whole window is in the rings
        if (p < it.r0 || p >= it.r1) continue;
        // Every operand of the row, hoisted out of the vector loop.
        Window<acc_t> avg_win[4], max_win[4];
        std::array<acc_t, 4> avg_scale{}, max_scale{};
        std::array<const acc_t*, 4> inv{};
        for (int r = 1; r <= R; ++r) {
          if (hs[r].stride) {
            avg_win[r] = Window<acc_t>(hs[r], p, r, H);
            avg_scale[r] = w.local[kAvg3 + r - 1] / static_cast<acc_t>(window_count(p, r, H));
            inv[r] = cols.inv[r];
          }
          if (hm[r].stride) {
            max_win[r] = Window<acc_t>(hm[r], p, r, H);
            max_scale[r] = w.local[kMax3 + r - 1];
          }
        }
        if (strip) spread_lanes(sh + it.nc(g, 0) * H + p, H, it, W, sh_row);
        const acc_t* xp = xr.row(p);
        const acc_t *shp = sh_row, *swp = sw_row;
        const bool skip = cand.has(kSkip);
        const acc_t w_skip = w.local[kSkip], w_strip = w.strip;
        // Straight into the output when its row is the packed row.
        scalar_t* out_row = out + it.base + p * it.rstride;
        acc_t* o_row = direct ? reinterpret_cast<acc_t*>(out_row) : acc_row;
        vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
          const Vec xv = load(xp + f, n);
          Vec o = skip ? Vec(w_skip) * xv : Vec(acc_t(0));  // never 0 · inf
          for (int r = 1; r <= R; ++r) {
            if (const int c = avg_win[r].count) {
              Vec s = load(avg_win[r].row[0] + f, n);
              for (int k = 1; k < c; ++k) s += load(avg_win[r].row[k] + f, n);
              o += Vec(avg_scale[r]) * s * load(inv[r] + f, n);
            }
            if (const int c = max_win[r].count) {
              Vec m = load(max_win[r].row[0] + f, n);
              for (int k = 1; k < c; ++k) m = at::vec::maximum(m, load(max_win[r].row[k] + f, n));
              o += Vec(max_scale[r]) * m;
            }
          }
          if (strip) o += Vec(w_strip) * xv * load(shp + f, n) * load(swp + f, n);
          store(o_row + f, o, n);
        });
        if (!direct) store_row(acc_row, it, W, out_row);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// A fixed layer of one window op (avg or max of radius R) has a kernel of its own: the op and R
// are compile-time constants, so every window is unrolled. Rows are read and written in place
// when their dtype is the accumulation type (16-bit rows and narrow NCHW maps go through one
// packed copy); columns and rows whose window leaves the map are done apart, so the interior
// loops load unconditionally. max takes the one-instruction vector max, which drops a NaN
// operand: each row is probed for NaN/inf through its centre loads (one FMA per vector), and a
// row or window that holds one is redone with the NaN-propagating max, exactly.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline Vectorized<T> fast_max(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return Vectorized<float>(_mm256_max_ps(a, b));
  if constexpr (std::is_same_v<T, double>) return Vectorized<double>(_mm256_max_pd(a, b));
#endif
  return at::vec::maximum(a, b);
}

template <typename T, bool kMax, bool kExact>
inline Vectorized<T> combine(const Vectorized<T>& a, const Vectorized<T>& b) {
  if constexpr (!kMax) return a + b;
  else if constexpr (kExact) return at::vec::maximum(a, b);
  else return fast_max(a, b);
}

// body(s, d, n) over the positions of columns [j0, j1): s in a row of column stride `cs`, d in a
// packed row (column stride `lanes`); one flat vector loop when the two coincide.
template <typename T, typename F>
inline void for_columns(int64_t j0, int64_t j1, int64_t lanes, int64_t cs, F&& body) {
  constexpr int64_t V = Vectorized<T>::size();
  if (cs == lanes) {
    int64_t f = j0 * lanes;
    const int64_t e = j1 * lanes;
    for (; f + V <= e; f += V) body(f, f, V);
    if (f < e) body(f, f, e - f);
    return;
  }
  for (int64_t j = j0; j < j1; ++j)
    vec_loop<T>(lanes, [&](int64_t l, int64_t n) { body(j * cs + l, j * lanes + l, n); });
}

// op over the whole window around p, columns `step` apart (the interior's and the padded borders').
template <typename T, bool kMax, int R, bool kExact>
inline Vectorized<T> full_window(const T* p, int64_t step, int64_t n) {
  Vectorized<T> v = load(p, n);
  for (int k = 1; k <= R; ++k)
    v = combine<T, kMax, kExact>(combine<T, kMax, kExact>(v, load(p - k * step, n)), load(p + k * step, n));
  return v;
}

// h (packed) = op over columns j - R .. j + R within the row; an avg border column's sum is scaled
// by (2R + 1) / its count, so that every sum divides by 2R + 1 in window_rows (no multiply in the
// interior here). Returns whether a centre value was NaN or infinite (a max row then needs the
// exact max): the probe is one FMA with zero per centre vector, NaN for NaN or ±inf.
template <typename T, bool kMax, int R, bool kExact>
bool window_row(const T* src, int64_t cs, int64_t W, int64_t lanes, T* h) {
  using Vec = Vectorized<T>;
  constexpr bool kProbe = kMax && !kExact;
  const Vec zero(T(0));
  // The interior's probe is its own local, captured by no other closure: one that a border's
  // closure also holds lived in memory, a store and reload per vector that doubled max's time.
  Vec inner_probe(T(0)), probe(T(0));
  const int64_t j0 = std::min<int64_t>(R, W), j1 = std::max<int64_t>(W - R, j0);
  for_columns<T>(j0, j1, lanes, cs, [&](int64_t s, int64_t d, int64_t n) {
    if constexpr (kProbe) inner_probe = at::vec::fmadd(load(src + s, n), zero, inner_probe);
    store(h + d, full_window<T, kMax, R, kExact>(src + s, cs, n), n);
  });
  if (R >= 2 && lanes == 1 && W >= Vec::size() + R) {
    // One channel per row: a border is R single columns, each a vector loop of one element. Do
    // each border as one vector over a small copy padded so that the window needs no clipping:
    // zeros for a sum (the border sums then scale by (2R + 1) / count), the edge value for a max
    // (every clipped window holds it). At R = 1 the per-column loop is the cheaper (measured).
    constexpr int64_t V = Vec::size();
    alignas(64) T tmp[V + 2 * R], left[V], right[V];
    for (int64_t i = 0; i < V; ++i) {
      left[i] = i < R ? T(2 * R + 1) / static_cast<T>(i + R + 1) : T(1);
      right[i] = i < R ? T(2 * R + 1) / static_cast<T>(2 * R - i) : T(1);
    }
    for (const int64_t pos : {int64_t(0), W - R}) {  // output columns pos .. pos + R - 1
      if (pos == 0) {
        std::fill(tmp, tmp + R, kMax ? src[0] : T(0));
        std::memcpy(tmp + R, src, (V + R) * sizeof(T));
      } else {
        std::memcpy(tmp, src + W - 2 * R, 2 * R * sizeof(T));
        std::fill(tmp + 2 * R, tmp + V + 2 * R, kMax ? src[W - 1] : T(0));
      }
      if constexpr (kProbe) probe = at::vec::fmadd(Vec::loadu(tmp + R), zero, probe);
      Vec v = full_window<T, kMax, R, kExact>(tmp + R, 1, V);
      if constexpr (!kMax) v = v * Vec::loadu(pos == 0 ? left : right);
      store(h + pos, v, R);
    }
  } else {
    auto edge = [&](int64_t j) {
      const int64_t lo = -std::min<int64_t>(R, j), hi = std::min<int64_t>(R, W - 1 - j);
      const Vec scale(T(2 * R + 1) / static_cast<T>(hi - lo + 1));
      for_columns<T>(j, j + 1, lanes, cs, [&](int64_t s, int64_t d, int64_t n) {
        Vec v = load(src + s, n);
        if constexpr (kProbe) probe = at::vec::fmadd(v, zero, probe);
        for (int64_t k = lo; k <= hi; ++k)
          if (k != 0) v = combine<T, kMax, kExact>(v, load(src + s + k * cs, n));
        if constexpr (!kMax) v = v * scale;
        store(h + d, v, n);
      });
    };
    for (int64_t j = 0; j < j0; ++j) edge(j);
    for (int64_t j = j1; j < W; ++j) edge(j);
  }
  return std::isnan(reduce_sum(inner_probe + probe));
}

// dst (column stride cs) = op over `count` packed rows (kRows of them when kRows > 0), · scale.
template <typename T, bool kMax, int kRows, bool kExact>
void window_rows(const T* const* rows, int count, T scale, int64_t W, int64_t lanes, T* dst, int64_t cs) {
  using Vec = Vectorized<T>;
  const int n_rows = kRows > 0 ? kRows : count;
  const Vec sv(scale);
  for_columns<T>(0, W, lanes, cs, [&](int64_t s, int64_t d, int64_t n) {
    Vec v = load(rows[0] + d, n);
    for (int k = 1; k < n_rows; ++k) v = combine<T, kMax, kExact>(v, load(rows[k] + d, n));
    if constexpr (!kMax) v = v * sv;
    store(dst + s, v, n);
  });
}

template <typename scalar_t, bool kMax, int R>
void local_forward_kernel_impl(const MetaPoolArgs& a, const Layout& g, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.H, W = g.W;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    Buffer<acc_t> ring_buf, in_buf, out_buf;
    for (int64_t index = begin; index < end; ++index) {
      const Item it(g, index);
      const int64_t L = it.L, lanes = it.clen;
      const bool in_place = rows_in_place<scalar_t>(it);
      const int64_t cs = row_column_stride<scalar_t>(it);
      acc_t* ring = ring_buf.get(kRing * L);
      acc_t* in_row = in_place ? nullptr : in_buf.get(L);
      acc_t* out_row = in_place ? nullptr : out_buf.get(L);
      bool nonfinite[kRing] = {};
      const int64_t t1 = std::min<int64_t>(it.r1 + R, H);
      for (int64_t t = std::max<int64_t>(it.r0 - R, 0); t < t1 + R; ++t) {
        if (t < t1) {  // row t arrives
          const scalar_t* xt = x + it.base + t * it.rstride;
          const acc_t* src = reinterpret_cast<const acc_t*>(xt);
          if (!in_place) {
            load_row(xt, it, W, in_row);
            src = in_row;
          }
          acc_t* h = ring + (t & (kRing - 1)) * L;
          const bool bad = window_row<acc_t, kMax, R, false>(src, cs, W, lanes, h);
          if (kMax && bad) window_row<acc_t, kMax, R, true>(src, cs, W, lanes, h);
          nonfinite[t & (kRing - 1)] = bad;
        }
        const int64_t p = t - R;  // output row p: its whole window has arrived
        if (p < it.r0 || p >= it.r1) continue;
        const acc_t* rows[2 * R + 1];
        int count = 0;
        bool exact = false;
        for (int64_t i = std::max<int64_t>(p - R, 0); i <= std::min<int64_t>(p + R, H - 1); ++i) {
          rows[count++] = ring + (i & (kRing - 1)) * L;
          exact |= nonfinite[i & (kRing - 1)];
        }
        const acc_t scale = kMax ? acc_t(1) : acc_t(1) / static_cast<acc_t>(count * (2 * R + 1));
        scalar_t* op = out + it.base + p * it.rstride;
        acc_t* dst = in_place ? reinterpret_cast<acc_t*>(op) : out_row;
        const int64_t dcs = in_place ? cs : lanes;
        if (kMax && exact) window_rows<acc_t, kMax, 0, true>(rows, count, scale, W, lanes, dst, dcs);
        else if (count == 2 * R + 1) window_rows<acc_t, kMax, 2 * R + 1, false>(rows, count, scale, W, lanes, dst, dcs);
        else window_rows<acc_t, kMax, 0, false>(rows, count, scale, W, lanes, dst, dcs);
        if (!in_place) store_row(out_row, it, W, op);
      }
    }
  });
}

// The fixed layer's window op, or -1 when the call is not one.
int fixed_window_slot(const MetaPoolArgs& a) {
  if (a.pi.defined() || a.cand.count != 1) return -1;
  for (int s = kAvg3; s < kLocalSlots; ++s)
    if (a.cand.has(s)) return s;
  return -1;
}

// Whether the call is a fixed 'strip' layer: strip_apply is then the whole forward, and with
// the gate GEMMs the whole backward.
bool is_fixed_strip(const MetaPoolArgs& a) { return !a.pi.defined() && a.cand.count == 1 && a.cand.strip(); }

template <typename scalar_t>
void local_forward(const MetaPoolArgs& a, const Layout& g, int slot, scalar_t* out) {
  switch (slot) {
    case kAvg3: return local_forward_kernel_impl<scalar_t, false, 1>(a, g, out);
    case kAvg5: return local_forward_kernel_impl<scalar_t, false, 2>(a, g, out);
    case kAvg7: return local_forward_kernel_impl<scalar_t, false, 3>(a, g, out);
    case kMax3: return local_forward_kernel_impl<scalar_t, true, 1>(a, g, out);
    case kMax5: return local_forward_kernel_impl<scalar_t, true, 2>(a, g, out);
    default: return local_forward_kernel_impl<scalar_t, true, 3>(a, g, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad x and the α partial sums of every local candidate.
// Three stages per step, named as in the Triton backward (meta_pool_triton.py):
//   arrive, row t: horizontal max/argmax of x (max candidates) and box sums of
//     grad / window count (avg candidates).
//   scatter, row p = t - R: each max window's vertical argmax row and value (α partial Σ g · max);
//     its gradient is added to U[i] of the argmax row i (U: the column-gathered gradient);
//     the avg adjoints (vertical box sums), skip and strip terms.
//   finish, row i = p - Rm: the horizontal half of the max gather, then grad x of row i.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void meta_pool_backward_kernel_impl(const MetaPoolArgs& a, const Layout& g, const scalar_t* grad,
                                    const at::opmath_type<scalar_t>* sh, const at::opmath_type<scalar_t>* sw,
                                    const at::opmath_type<scalar_t>* gzh, const at::opmath_type<scalar_t>* gzw,
                                    scalar_t* grad_x, at::opmath_type<scalar_t>* alpha_parts) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const Candidates& cand = a.cand;
  const Weights<acc_t> w(a);
  const int Ra = cand.avg_radius(), Rm = cand.max_radius(), R = std::max(Ra, Rm);
  const int64_t H = g.H, W = g.W;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const bool strip = cand.strip();
  const acc_t kInf = std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, g.items(), 1, [&](int64_t begin, int64_t end) {
    Columns<acc_t> cols;
    Ring<acc_t> gr, xr, gx_acc, hb[4], hmax[4], harg[4], U[4];
    Buffer<acc_t> xn_buf, gs_buf, out_buf, sw_buf, sh_buf, gzw_buf, gzh_buf;
    for (int64_t index = begin; index < end; ++index) {
      const Item it(g, index);
      const int64_t L = it.L, P = R * it.clen;
      const bool direct = std::is_same_v<scalar_t, acc_t> && packed_is_contiguous(it, W);
      cols.init(it, W, R);
      gr.init(L, 0, acc_t(0));
      xr.init(L, 0, acc_t(0));
      gx_acc.init(L, 0, acc_t(0));
      for (int r = 1; r <= R; ++r) {
        if (cand.has(kAvg3 + r - 1)) hb[r].init(L, 0, acc_t(0));
        if (cand.has(kMax3 + r - 1)) {
          hmax[r].init(L, 0, acc_t(0));
          harg[r].init(L, P, acc_t(-1));  // padding never names a column
          U[r].init(L, P, acc_t(0));
        }
      }
      acc_t* xn = padded_row(xn_buf, L, P, -kInf);
      acc_t* gs = padded_row(gs_buf, L, P, acc_t(0));
      acc_t* out_row = out_buf.get(L);
      acc_t *sw_row = nullptr, *sh_row = nullptr, *gzw_row = nullptr, *gzh_row = nullptr;
      if (strip) {
        sw_row = sw_buf.get(L); sh_row = sh_buf.get(L); gzw_row = gzw_buf.get(L); gzh_row = gzh_buf.get(L);
        pack_columns(sw + it.nc(g, 0) * W, W, it, W, sw_row);
        pack_columns(gzw + it.nc(g, 0) * W, W, it, W, gzw_row);
      }
      std::array<Vec, kLocalSlots> alpha;
      alpha.fill(Vec(acc_t(0)));

      const int64_t lag_c = R + Rm;  // stage C trails the newest row by this many rows
      const int64_t t_end = std::min<int64_t>(it.r1 + R + Rm, H);
      for (int64_t t = std::max<int64_t>(it.r0 - R - Rm, 0); t < it.r1 + lag_c; ++t) {
        // ---- arrive: row t.
        if (t < t_end) {
          const int64_t off = it.base + t * it.rstride;
          acc_t* gt = gr.row(t);
          acc_t* xt = xr.row(t);
          load_row(grad + off, it, W, gt);
          load_row(x + off, it, W, xt);
          if (Rm > 0) {
            std::memcpy(xn, xt, L * sizeof(acc_t));
            const acc_t* xp = xn;
            const acc_t* col = cols.col;
            // First maximum of each window in column order, or its last NaN (max_pool2d's
            // scan: update when v > best or v is NaN). Windows nest: the scan of radius r is
            // column j - r, then the window of radius r - 1 as one element, then column j + r,
            // so one pass gives every radius.
            const int64_t lanes = it.clen;
            vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
              const Vec c = load(col + f, n);
              Vec best(-kInf), arg = c;
              auto scan = [&](const Vec& v, const Vec& at) {
                const Vec upd = (v > best) | v.isnan();
                best = Vec::blendv(best, v, upd);
                arg = Vec::blendv(arg, at, upd);
              };
              for (int r = 1; r <= Rm; ++r) {
                const Vec inner = best, inner_arg = arg;
                best = Vec(-kInf);
                arg = load(cols.first[r] + f, n);
                scan(load(xp + f - r * lanes, n), c - Vec(static_cast<acc_t>(r)));
                if (r == 1) scan(load(xp + f, n), c);
                else scan(inner, inner_arg);
                scan(load(xp + f + r * lanes, n), c + Vec(static_cast<acc_t>(r)));
                if (hmax[r].stride) {
                  store(hmax[r].row(t) + f, best, n);
                  store(harg[r].row(t) + f, arg, n);
                }
              }
            });
          }
          for (int r = 1; r <= Ra; ++r) {
            if (!hb[r].stride) continue;
            const acc_t row_inv = acc_t(1) / static_cast<acc_t>(window_count(t, r, H));
            const acc_t* inv = cols.inv[r];
            acc_t* gsp = gs;
            vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
              store(gsp + f, load(gt + f, n) * load(inv + f, n) * Vec(row_inv), n);
            });
            acc_t* out = hb[r].row(t);
            const int64_t lanes = it.clen;
            vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
              Vec s = load(gsp + f, n);
              for (int d = 1; d <= r; ++d) s = s + load(gsp + f - d * lanes, n) + load(gsp + f + d * lanes, n);
              store(out + f, s, n);
            });
          }
        }

        // ---- scatter: row p = t - R, its windows complete.
        const int64_t p = t - R;
        if (p >= std::max<int64_t>(it.r0 - Rm, 0) && p < std::min<int64_t>(it.r1 + Rm, H)) {
          const bool own = p >= it.r0 && p < it.r1;
          const acc_t* gp = gr.row(p);
          for (int r = 1; r <= Rm; ++r) {
            if (!hmax[r].stride) continue;
            const Window<acc_t> win(hmax[r], p, r, H);
            // Rows whose U this window may feed: in the window and in this item.
            const int64_t u0 = std::max(win.first, it.r0);
            const int64_t u1 = std::min<int64_t>(win.first + win.count - 1, it.r1 - 1);
            acc_t* urows[7];
            acc_t uidx[7];
            int nu = 0;
            for (int64_t i = u0; i <= u1; ++i, ++nu) {
              urows[nu] = U[r].claim(i, L);
              uidx[nu] = static_cast<acc_t>(i);
            }
            const acc_t first_row = static_cast<acc_t>(win.first);
            Vec alpha_row(acc_t(0));
            vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
              Vec best(-kInf), row(first_row);
              for (int k = 0; k < win.count; ++k) {
                const Vec v = load(win.row[k] + f, n);
                const Vec upd = (v > best) | v.isnan();
                best = Vec::blendv(best, v, upd);
                row = Vec::blendv(row, Vec(first_row + static_cast<acc_t>(k)), upd);
              }
              const Vec gv = load(gp + f, n);
              alpha_row += masked(gv * best, n);
              for (int k = 0; k < nu; ++k)
                store(urows[k] + f, load(urows[k] + f, n) + (gv & (row == Vec(uidx[k]))), n);
            });
            if (own) alpha[kMax3 + r - 1] += alpha_row;
          }
          if (own) {
            const acc_t* xp = xr.row(p);
            acc_t* acc = gx_acc.row(p);
            if (strip) {
              spread_lanes(sh + it.nc(g, 0) * H + p, H, it, W, sh_row);
              spread_lanes(gzh + it.nc(g, 0) * H + p, H, it, W, gzh_row);
            }
            Window<acc_t> avg_win[4];
            std::array<acc_t, 4> avg_w{};
            for (int r = 1; r <= Ra; ++r) {
              if (!hb[r].stride) continue;
              avg_win[r] = Window<acc_t>(hb[r], p, r, H);
              avg_w[r] = w.local[kAvg3 + r - 1];
            }
            const bool skip = cand.has(kSkip);
            const acc_t w_skip = w.local[kSkip], w_strip = w.strip;
            const acc_t *shp = sh_row, *swp = sw_row, *gzhp = gzh_row, *gzwp = gzw_row;
            Vec a_skip(acc_t(0)), a_avg[4] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
            vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
              const Vec gv = load(gp + f, n), xv = load(xp + f, n);
              Vec o(acc_t(0));
              if (skip) {
                o = Vec(w_skip) * gv;
                a_skip += masked(gv * xv, n);
              }
              for (int r = 1; r <= Ra; ++r) {
                if (const int c = avg_win[r].count) {
                  Vec s = load(avg_win[r].row[0] + f, n);
                  for (int k = 1; k < c; ++k) s += load(avg_win[r].row[k] + f, n);
                  a_avg[r] += masked(xv * s, n);
                  o += Vec(avg_w[r]) * s;
                }
              }
              if (strip)
                o += Vec(w_strip) * gv * load(shp + f, n) * load(swp + f, n) + load(gzhp + f, n) + load(gzwp + f, n);
              store(acc + f, o, n);
            });
            alpha[kSkip] += a_skip;
            for (int r = 1; r <= Ra; ++r) alpha[kAvg3 + r - 1] += a_avg[r];
          }
        }

        // ---- finish: row i = t - R - Rm, every U it gathers from complete.
        const int64_t i = t - lag_c;
        if (i < it.r0 || i >= it.r1) continue;
        const acc_t* acc = gx_acc.row(i);
        if (Rm == 0) {
          store_row(acc, it, W, grad_x + it.base + i * it.rstride);
          continue;
        }
        const acc_t* col = cols.col;
        const acc_t *urow[4] = {}, *arow[4] = {};
        std::array<acc_t, 4> max_w{};
        for (int r = 1; r <= Rm; ++r) {
          if (!hmax[r].stride) continue;
          urow[r] = U[r].row(i);
          arow[r] = harg[r].row(i);
          max_w[r] = w.local[kMax3 + r - 1];
        }
        const int64_t lanes = it.clen;
        scalar_t* gx_row = grad_x + it.base + i * it.rstride;
        acc_t* o_row = direct ? reinterpret_cast<acc_t*>(gx_row) : out_row;
        vec_loop<acc_t>(L, [&](int64_t f, int64_t n) {
          Vec o = load(acc + f, n);
          const Vec c = load(col + f, n);
          for (int r = 1; r <= Rm; ++r) {
            if (!urow[r]) continue;
            Vec s(acc_t(0));
            for (int d = -r; d <= r; ++d)
              s += load(urow[r] + f + d * lanes, n) & (load(arow[r] + f + d * lanes, n) == c);
            o += Vec(max_w[r]) * s;
          }
          store(o_row + f, o, n);
        });
        if (!direct) store_row(out_row, it, W, gx_row);
      }
      for (int s = 0; s < kLocalSlots; ++s) alpha_parts[index * kLocalSlots + s] = reduce_sum(alpha[s]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------
// The gate GEMMs. A strip gate is a pointwise Conv1d on the strip means: one C×C matrix applied
// to N·S vectors. The products are small and done here rather than by ATen for two reasons: a
// result must not depend on the thread count (a BLAS may split the K sum across threads), and
// at::matmul picks its path by layout and requires_grad (with a frozen weight it took an
// expand + bmm path 5× slower than with a trainable one).
//
// out (M × Nc, row-major) = A · B (+ bias[m] on row m), optionally through a sigmoid;
// A[m, k] = a[m·a_m + k·a_k], B row-major (K × Nc). Each output sums over k in order, whatever
// the split: deterministic.

template <typename T>
void gemm_rows(int64_t M, int64_t K, int64_t Nc, const T* a, int64_t a_m, int64_t a_k, const T* b,
               const T* bias, bool sigmoid, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kRows = 4;  // 4 rows × 2 vectors: 8 accumulators, 2 loads + 4 broadcasts per 8 FMAs
  const int64_t blocks = (M + kRows - 1) / kRows, panels = (Nc + 2 * V - 1) / (2 * V);
  // Tasks are (column panel, row block) tiles, panel-major: a thread's contiguous range of tasks
  // reads only its panels' share of B, and a few rows still split over the columns.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(K * kRows * 2 * V, 1));
  at::parallel_for(0, panels * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % blocks, j = task / blocks * 2 * V;
      const int64_t m0 = mb * kRows, rows = std::min<int64_t>(kRows, M - m0);
      const T* arow[kRows];
      // Spare rows repeat the last.
      for (int64_t r = 0; r < kRows; ++r) arow[r] = a + std::min<int64_t>(m0 + r, M - 1) * a_m;
      const int64_t n0 = std::min<int64_t>(V, Nc - j), n1 = std::clamp<int64_t>(Nc - j - V, 0, V);
      Vec acc0[kRows], acc1[kRows];
      for (int64_t r = 0; r < kRows; ++r) acc0[r] = acc1[r] = Vec(bias ? bias[std::min<int64_t>(m0 + r, M - 1)] : T(0));
      if (n1) {
        for (int64_t k = 0; k < K; ++k) {
          const Vec v0 = load(b + k * Nc + j, V), v1 = load(b + k * Nc + j + V, n1);
          for (int64_t r = 0; r < kRows; ++r) {
            const Vec w(arow[r][k * a_k]);
            acc0[r] = at::vec::fmadd(w, v0, acc0[r]);
            acc1[r] = at::vec::fmadd(w, v1, acc1[r]);
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const Vec v0 = load(b + k * Nc + j, n0);
          for (int64_t r = 0; r < kRows; ++r) acc0[r] = at::vec::fmadd(Vec(arow[r][k * a_k]), v0, acc0[r]);
        }
      }
      const Vec one(T(1));
      for (int64_t r = 0; r < rows; ++r) {
        if (sigmoid) {
          acc0[r] = one / (one + acc0[r].neg().exp());
          acc1[r] = one / (one + acc1[r].neg().exp());
        }
        store(out + (m0 + r) * Nc + j, acc0[r], n0);
        if (n1) store(out + (m0 + r) * Nc + j + V, acc1[r], n1);
      }
    }
  });
}

// Strip tensors (N, C, S) as C rows of N·S ("channel rows": W applies to them as stored, and the
// vectors run along N·S, full even at S = 4) or as N·S rows of C ("position rows"). Batch 1 needs
// no copy for channel rows.
at::Tensor channel_rows(const at::Tensor& z) {
  return z.permute({1, 0, 2}).reshape({z.size(1), z.size(0) * z.size(2)}).contiguous();
}
at::Tensor from_channel_rows(const at::Tensor& r, int64_t N) {
  return r.view({r.size(0), N, -1}).permute({1, 0, 2}).contiguous();
}
at::Tensor position_rows(const at::Tensor& z) { return z.transpose(1, 2).contiguous().view({-1, z.size(1)}); }

// The gate σ(W z + b) of strip means z (N, C, S), W z + b being a pointwise Conv1d: one GEMM
// W · Z with Z the channel rows, bias and sigmoid fused. W is used as stored: a transposed copy
// of a 320 × 320 weight costs more than the product.
at::Tensor strip_gate_values(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t N = z.size(0), C = z.size(1);
  const at::Tensor zc = channel_rows(z);
  at::Tensor s = at::empty_like(zc);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "meta_pool_gate", [&] {
    gemm_rows<scalar_t>(C, C, zc.size(1), weight.const_data_ptr<scalar_t>(), C, 1, zc.const_data_ptr<scalar_t>(),
                        bias.const_data_ptr<scalar_t>(), true, s.mutable_data_ptr<scalar_t>());
  });
  return from_channel_rows(s, N);
}

// The gradients of one gate from dlogits (N, C, S) and its strip means z (N, C, S), each one
// GEMM: the weight's G · Z^T over K = N·S, the bias's as G's row sums, and the strip means'
// W^T G · scale (G, Z the channel rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> strip_gate_grads(const at::Tensor& dlogits, const at::Tensor& z,
                                                                const at::Tensor& weight, double scale) {
  const int64_t N = z.size(0), C = z.size(1);
  const at::Tensor gc = channel_rows(dlogits), zr = position_rows(z);
  const int64_t K = gc.size(1);
  at::Tensor dw = at::empty({C, C}, z.options()), db = at::empty({C}, z.options()), dz = at::empty_like(gc);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "meta_pool_gate_backward", [&] {
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    gemm_rows<scalar_t>(C, K, C, g, K, 1, zr.const_data_ptr<scalar_t>(), nullptr, false,
                        dw.mutable_data_ptr<scalar_t>());
    scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        scalar_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += g[c * K + k];
        dbp[c] = sum;
      }
    });
    // W^T G: A[m, k] = W[k, m].
    gemm_rows<scalar_t>(C, C, K, weight.const_data_ptr<scalar_t>(), 1, C, g, nullptr, false,
                        dz.mutable_data_ptr<scalar_t>());
  });
  return {dw.view({C, C, 1}), db, from_channel_rows(dz.mul_(scale), N)};
}

at::Tensor empty_strip(const MetaPoolArgs& a, int dim) {
  const bool s = a.cand.strip();
  return at::empty({a.x.size(0), a.x.size(1), s ? a.x.size(dim) : 0}, a.x.options().dtype(acc_type(a.x.scalar_type())));
}

// z_h, z_w: the strip means of x.
std::tuple<at::Tensor, at::Tensor> strip_means(const MetaPoolArgs& a, const Layout& g) {
  const auto acc = acc_type(a.x.scalar_type());
  at::Tensor rows = at::empty({g.N, g.C, g.H}, a.x.options().dtype(acc));
  at::Tensor cols = at::empty({g.chunks, g.N, g.C, g.W}, a.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "meta_pool_strip_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    strip_sums<scalar_t>(g, a.x.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                         rows.mutable_data_ptr<acc_t>(), cols.mutable_data_ptr<acc_t>(), nullptr);
    acc_t* r = rows.mutable_data_ptr<acc_t>();
    const acc_t inv_w = acc_t(1) / static_cast<acc_t>(g.W);
    for (int64_t k = 0; k < rows.numel(); ++k) r[k] *= inv_w;
    cols = sum_chunks<acc_t>(cols, acc_t(1) / static_cast<acc_t>(g.H)).view({g.N, g.C, g.W});
  });
  return {rows, cols};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_pool_forward_cpu(
    const at::Tensor& x_, const c10::optional<at::Tensor>& pi, const c10::optional<at::Tensor>& ghw,
    const c10::optional<at::Tensor>& ghb, const c10::optional<at::Tensor>& gww,
    const c10::optional<at::Tensor>& gwb, c10::string_view candidates) {
  const MetaPoolArgs a = prepare_meta_pool("meta_pool", x_, pi, ghw, ghb, gww, gwb, std::string(candidates));
  at::Tensor out = at::empty_like(a.x, a.x.options(), a.format());
  at::Tensor z_h = empty_strip(a, 2), z_w = empty_strip(a, 3);
  if (a.x.numel() == 0) return {out, z_h, z_w};
  const Layout g(a.x, a.channels_last), sg = strip_layout(a.x, a.channels_last);
  at::Tensor sh, sw;
  if (a.cand.strip()) {
    std::tie(z_h, z_w) = strip_means(a, sg);
    sh = strip_gate_values(z_h, a.gate_h_weight, a.gate_h_bias);
    sw = strip_gate_values(z_w, a.gate_w_weight, a.gate_w_bias);
  }
  const int slot = fixed_window_slot(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "meta_pool_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (slot >= 0) return local_forward<scalar_t>(a, g, slot, out.mutable_data_ptr<scalar_t>());
    if (is_fixed_strip(a))
      return strip_apply<scalar_t>(sg, a.x.const_data_ptr<scalar_t>(), sh.const_data_ptr<acc_t>(),
                                   sw.const_data_ptr<acc_t>(), nullptr, nullptr, out.mutable_data_ptr<scalar_t>());
    meta_pool_forward_kernel_impl<scalar_t>(a, g, sh.defined() ? sh.const_data_ptr<acc_t>() : nullptr,
                             sw.defined() ? sw.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return {out, z_h, z_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_pool_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const c10::optional<at::Tensor>& pi,
    const c10::optional<at::Tensor>& ghw, const c10::optional<at::Tensor>& ghb,
    const c10::optional<at::Tensor>& gww, const c10::optional<at::Tensor>& gwb, const at::Tensor& z_h,
    const at::Tensor& z_w, c10::string_view candidates) {
  const MetaPoolArgs a = prepare_meta_pool("meta_pool_backward", x_, pi, ghw, ghb, gww, gwb, std::string(candidates));
  TORCH_CHECK(at::isFloatingType(grad_.scalar_type()) && grad_.sizes() == a.x.sizes() && grad_.device() == a.x.device(),
              "meta_pool_backward: grad must be a floating-point tensor of x's shape ", a.x.sizes(), " on ",
              a.x.device(), ", got ", grad_.scalar_type(), " ", grad_.sizes(), " on ", grad_.device());
  const at::Tensor grad = grad_.to(a.x.scalar_type()).contiguous(a.format());
  const auto acc = acc_type(a.x.scalar_type());
  const auto acc_opts = a.x.options().dtype(acc);
  const int64_t K = a.cand.count;
  at::Tensor grad_x = at::empty_like(a.x, a.x.options(), a.format());
  at::Tensor grad_pi = at::zeros({a.pi.defined() ? K : 0}, acc_opts);
  std::array<at::Tensor, 4> gate_grads;
  const at::Tensor* gate_params[4] = {&a.gate_h_weight, &a.gate_h_bias, &a.gate_w_weight, &a.gate_w_bias};
  for (int k = 0; k < 4; ++k)
    gate_grads[k] = a.cand.strip() ? at::zeros_like(*gate_params[k]) : at::empty({0}, acc_opts);
  if (a.x.numel() == 0) {
    grad_x.zero_();
    return {grad_x, grad_pi, gate_grads[0], gate_grads[1], gate_grads[2], gate_grads[3]};
  }
  const Layout g(a.x, a.channels_last), sg = strip_layout(a.x, a.channels_last);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W;
  at::Tensor sh, sw, gzh, gzw;
  if (a.cand.strip()) {
    TORCH_CHECK(z_h.sizes() == at::IntArrayRef({N, C, H}) && z_w.sizes() == at::IntArrayRef({N, C, W}),
                "meta_pool_backward: z_h and z_w must be the forward's strip means, of shapes (N, C, H) and (N, C, W)");
    const at::Tensor zh = z_h.to(acc).contiguous(), zw = z_w.to(acc).contiguous();
    sh = strip_gate_values(zh, a.gate_h_weight, a.gate_h_bias);
    sw = strip_gate_values(zw, a.gate_w_weight, a.gate_w_bias);
    at::Tensor rows = at::empty({N, C, H}, acc_opts);
    at::Tensor cols = at::empty({sg.chunks, N, C, W}, acc_opts);
    at::Tensor totals = at::empty({sg.items()}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "meta_pool_strip_sums", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      strip_sums<scalar_t>(sg, a.x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                           sh.const_data_ptr<acc_t>(), sw.const_data_ptr<acc_t>(), rows.mutable_data_ptr<acc_t>(),
                           cols.mutable_data_ptr<acc_t>(), totals.mutable_data_ptr<acc_t>());
      cols = sum_chunks<acc_t>(cols).view({N, C, W});
      if (a.pi.defined()) grad_pi[a.cand.strip_pos] = sum_chunks<acc_t>(totals.view({-1, 1}))[0];
    });
    // rows = Σ_j grad·x·σ(g_w), cols = Σ_i grad·x·σ(g_h): the strip term's gradients by chain rule.
    const at::Tensor w_strip = a.pi.defined() ? a.pi.narrow(0, a.cand.strip_pos, 1) : at::ones({1}, acc_opts);
    const at::Tensor grad_gh = rows.mul_(sh * (1 - sh)).mul_(w_strip);
    const at::Tensor grad_gw = cols.mul_(sw * (1 - sw)).mul_(w_strip);
    std::tie(gate_grads[0], gate_grads[1], gzh) = strip_gate_grads(grad_gh, zh, a.gate_h_weight, 1.0 / W);
    std::tie(gate_grads[2], gate_grads[3], gzw) = strip_gate_grads(grad_gw, zw, a.gate_w_weight, 1.0 / H);
  }
  at::Tensor alpha_parts = at::empty({g.items(), kLocalSlots}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "meta_pool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    if (is_fixed_strip(a))
      return strip_apply<scalar_t>(sg, grad.const_data_ptr<scalar_t>(), ptr(sh), ptr(sw), ptr(gzh), ptr(gzw),
                                   grad_x.mutable_data_ptr<scalar_t>());
    meta_pool_backward_kernel_impl<scalar_t>(a, g, grad.const_data_ptr<scalar_t>(), ptr(sh), ptr(sw), ptr(gzh),
                                             ptr(gzw), grad_x.mutable_data_ptr<scalar_t>(),
                                             alpha_parts.mutable_data_ptr<acc_t>());
    if (a.pi.defined()) {
      const at::Tensor sums = sum_chunks<acc_t>(alpha_parts);
      for (int s = 0; s < kLocalSlots; ++s)
        if (a.cand.has(s)) grad_pi[a.cand.local_pos[s]] = sums[s];
    }
  });
  return {grad_x, grad_pi, gate_grads[0], gate_grads[1], gate_grads[2], gate_grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(metapool, CPU, m) {
  m.impl("meta_pool", &meta_pool_forward_cpu);
  m.impl("meta_pool_backward", &meta_pool_backward_cpu);
}

}  // namespace metapool
