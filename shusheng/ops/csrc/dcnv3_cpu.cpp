// DCNv3 core operator: fused CPU kernels (forward and backward).
//
// Semantics: ../../../../shared/specs/internimage.md section 6, identical to shusheng.ops.dcnv3_reference.
//   input  (N, H_in, W_in, G*gc)      channels [group][gc]
//   offset (N, H_out, W_out, G*P*2)   [group][point][(dx, dy)]
//   mask   (N, H_out, W_out, G*P)     [group][point]
// Points are column-major over the kernel (outer loop over the horizontal tap i), the centre tap is dropped
// with remove_center. Sampling position of point (i, j) for output (ho, wo):
//   x = wo*stride_w - pad_w + c_w + (i*dil_w - c_w + dx) * offset_scale,  c_w = dil_w*(K_w-1)/2
//   y = ho*stride_h - pad_h + c_h + (j*dil_h - c_h + dy) * offset_scale,  c_h = dil_h*(K_h-1)/2
// Bilinear interpolation of the four neighbours with zeros outside; the whole sample is 0 when
// y <= -1 || x <= -1 || y >= H_in || x >= W_in.
//
// Forward is parallel over output pixels: the sampling geometry of all G*P points of a pixel is computed in
// one vectorised pass, then each group's gc channels are accumulated in registers (opmath: float for
// bfloat16). Backward is parallel over (image, block of groups) tasks: a task owns the channel slices of its
// groups in grad_input (so the bilinear scatter needs no atomics) and its grad_offset/grad_mask entries, which
// are computed in the same pass over grad_output; their channel sums are reduced for many points at once.
// float16 runs the float32 kernels on float32 copies (same results; scalar float16 conversions are slow).
// Built by shusheng/ops/dcnv3_cpu.py with -O3 -march=native -fopenmp.

// Narrow ATen headers instead of <ATen/ATen.h> / <torch/extension.h>: the first-use compile is much shorter.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t N, H_in, W_in, H_out, W_out, C;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t G, gc, P;
  double offset_scale;
  bool remove_center;
};

Geometry make_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                       int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                       int64_t group_channels, double offset_scale, bool remove_center) {
  TORCH_CHECK(input.dim() == 4 && offset.dim() == 4 && mask.dim() == 4,
              "dcnv3 cpu: input, offset and mask must be 4-D channels-last tensors");
  TORCH_CHECK(input.device().is_cpu() && offset.device().is_cpu() && mask.device().is_cpu(),
              "dcnv3 cpu: tensors must be on the CPU");
  TORCH_CHECK(input.scalar_type() == offset.scalar_type() && input.scalar_type() == mask.scalar_type(),
              "dcnv3 cpu: input, offset and mask must share one dtype");
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && stride_h >= 1 && stride_w >= 1 && dilation_h >= 1 &&
                  dilation_w >= 1 && group >= 1 && group_channels >= 1 && pad_h >= 0 && pad_w >= 0,
              "dcnv3 cpu: invalid geometry");
  TORCH_CHECK(!remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1),
              "dcnv3 cpu: remove_center needs an odd kernel");
  Geometry g;
  g.N = input.size(0);
  g.H_in = input.size(1);
  g.W_in = input.size(2);
  g.C = input.size(3);
  g.H_out = offset.size(1);
  g.W_out = offset.size(2);
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  g.G = group;
  g.gc = group_channels;
  g.P = kernel_h * kernel_w - (remove_center ? 1 : 0);
  g.offset_scale = offset_scale;
  g.remove_center = remove_center;
  TORCH_CHECK(g.C == group * group_channels, "dcnv3 cpu: input has ", g.C, " channels, expected group * ",
              "group_channels = ", group * group_channels);
  const int64_t H_out = (g.H_in + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h + 1;
  const int64_t W_out = (g.W_in + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK(g.H_out == H_out && g.W_out == W_out && offset.size(0) == g.N &&
                  offset.size(3) == group * g.P * 2,
              "dcnv3 cpu: offset has shape ", offset.sizes(), ", expected (", g.N, ", ", H_out, ", ", W_out,
              ", ", group * g.P * 2, ")");
  TORCH_CHECK(mask.size(0) == g.N && mask.size(1) == H_out && mask.size(2) == W_out &&
                  mask.size(3) == group * g.P,
              "dcnv3 cpu: mask has shape ", mask.sizes(), ", expected (", g.N, ", ", H_out, ", ", W_out, ", ",
              group * g.P, ")");
  return g;
}

// Smallest amount of work, in (sampling point, channel) pairs, worth a parallel region per thread: below it
// the wake-up of the thread pool costs more than it saves.
constexpr int64_t kMinParallelWork = 32768;

// Fixed (dx, dy) displacement of every point relative to the kernel centre, in point order, repeated for
// `repeat` groups (entry g*P + p); not scaled: the caller adds the learned offset and multiplies the sum by
// offset_scale.
template <typename acc_t>
void kernel_displacements(const Geometry& g, int64_t repeat, std::vector<acc_t>& kx, std::vector<acc_t>& ky) {
  const int64_t c_w = g.dilation_w * (g.kernel_w - 1) / 2;
  const int64_t c_h = g.dilation_h * (g.kernel_h - 1) / 2;
  kx.clear();
  ky.clear();
  for (int64_t r = 0; r < repeat; ++r) {
    for (int64_t i = 0; i < g.kernel_w; ++i) {
      for (int64_t j = 0; j < g.kernel_h; ++j) {
        if (g.remove_center && i == g.kernel_w / 2 && j == g.kernel_h / 2) continue;
        kx.push_back(static_cast<acc_t>(i * g.dilation_w - c_w));
        ky.push_back(static_cast<acc_t>(j * g.dilation_h - c_h));
      }
    }
  }
}

// Sampling geometry of a run of points of one output pixel, computed branch-free so the loop vectorises.
// For point q: corner mask flags[q] (bit 0: (y0, x0), 1: (y0, x0+1), 2: (y0+1, x0), 3: (y0+1, x0+1) inside the
// image; 0 when the whole sample is zero), cell[q] = y0*W + x0 (meaningful only when flags[q] != 0), the
// bilinear weights w0..w3 of the four corners (0 for corners outside) and the fractional parts lx, ly.
// FORWARD: the weights are multiplied by the mask and lx, ly are not needed (not written).
template <typename acc_t>
struct PointTable {
  std::vector<acc_t> w0, w1, w2, w3, lx, ly;
  std::vector<int32_t> cell, flags;
  explicit PointTable(int64_t n) : w0(n), w1(n), w2(n), w3(n), lx(n), ly(n), cell(n), flags(n) {}
};

template <typename scalar_t, typename acc_t, bool FORWARD>
void sample_points_impl(int64_t count, const acc_t* __restrict__ kx, const acc_t* __restrict__ ky, acc_t base_x,
                        acc_t base_y, acc_t s, const scalar_t* __restrict__ offset,
                        const scalar_t* __restrict__ mask,
                        int64_t H, int64_t W, acc_t* __restrict__ w0, acc_t* __restrict__ w1,
                        acc_t* __restrict__ w2, acc_t* __restrict__ w3, acc_t* __restrict__ lxs,
                        acc_t* __restrict__ lys, int32_t* __restrict__ cell, int32_t* __restrict__ flags) {
  const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
  const acc_t Hm1 = static_cast<acc_t>(H - 1), Wm1 = static_cast<acc_t>(W - 1);
  const int32_t W32 = static_cast<int32_t>(W);
  // Written with selects on floating-point values only (no && or bool arithmetic), which GCC if-converts and
  // vectorises (with -fno-trapping-math).
  for (int64_t q = 0; q < count; ++q) {
    const acc_t x = base_x + (kx[q] + static_cast<acc_t>(offset[2 * q])) * s;
    const acc_t y = base_y + (ky[q] + static_cast<acc_t>(offset[2 * q + 1])) * s;
    // False for NaN too; positions outside are replaced by 0 so that the conversions below stay in range.
    const bool inside = (y > acc_t(-1)) & (x > acc_t(-1)) & (y < Hf) & (x < Wf);
    const acc_t xs = inside ? x : acc_t(0);
    const acc_t ys = inside ? y : acc_t(0);
    const acc_t xf = std::floor(xs);
    const acc_t yf = std::floor(ys);
    const acc_t lx = xs - xf, ly = ys - yf;
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const acc_t in = inside ? acc_t(1) : acc_t(0);
    const acc_t fy0 = yf >= acc_t(0) ? in : acc_t(0);
    const acc_t fy1 = yf < Hm1 ? in : acc_t(0);
    const acc_t fx0 = xf >= acc_t(0) ? acc_t(1) : acc_t(0);
    const acc_t fx1 = xf < Wm1 ? acc_t(1) : acc_t(0);
    const acc_t m = FORWARD ? static_cast<acc_t>(mask[q]) : acc_t(1);
    w0[q] = fy0 * fx0 * (hy * hx * m);
    w1[q] = fy0 * fx1 * (hy * lx * m);
    w2[q] = fy1 * fx0 * (ly * hx * m);
    w3[q] = fy1 * fx1 * (ly * lx * m);
    if constexpr (!FORWARD) {
      lxs[q] = lx;
      lys[q] = ly;
    }
    cell[q] = static_cast<int32_t>(yf) * W32 + static_cast<int32_t>(xf);
    const acc_t fl =
        fy0 * fx0 + acc_t(2) * fy0 * fx1 + acc_t(4) * fy1 * fx0 + acc_t(8) * fy1 * fx1 + acc_t(16) * in;
    flags[q] = static_cast<int32_t>(fl);
  }
}

template <typename scalar_t, typename acc_t, bool FORWARD>
inline void sample_points(int64_t count, const acc_t* kx, const acc_t* ky, acc_t base_x, acc_t base_y, acc_t s,
                          const scalar_t* offset, const scalar_t* mask, int64_t H, int64_t W,
                          PointTable<acc_t>& t) {
  sample_points_impl<scalar_t, acc_t, FORWARD>(count, kx, ky, base_x, base_y, s, offset, mask, H, W, t.w0.data(),
                                                 t.w1.data(), t.w2.data(), t.w3.data(), t.lx.data(), t.ly.data(),
                                                 t.cell.data(), t.flags.data());
}

// Pointers to the four corner rows of point q (relative to `base`, the group's channel slice of the image);
// corners outside the image get `outside[k]` instead.
template <typename T, typename U>
inline void corner_rows(int32_t flags, int32_t cell, T* base, int64_t C, int64_t WC, U* const (&outside)[4],
                        U* (&rows)[4]) {
  const int64_t o0 = static_cast<int64_t>(cell) * C, o1 = o0 + C, o2 = o0 + WC, o3 = o0 + WC + C;
  if ((flags & 15) == 15) {
    rows[0] = base + o0;
    rows[1] = base + o1;
    rows[2] = base + o2;
    rows[3] = base + o3;
  } else {
    rows[0] = (flags & 1) ? base + o0 : outside[0];
    rows[1] = (flags & 2) ? base + o1 : outside[1];
    rows[2] = (flags & 4) ? base + o2 : outside[2];
    rows[3] = (flags & 8) ? base + o3 : outside[3];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// Channels of a group are accumulated in chunks of at most kChunk (four 512-bit registers).
template <typename acc_t>
constexpr int kChunk = 256 / static_cast<int>(sizeof(acc_t));

// acc[0:W] += sum_k w_k * v_k[0:W] (W = width when known at compile time, else 0).
template <typename scalar_t, typename acc_t, int W>
inline void accumulate_corners(acc_t* __restrict__ acc, const scalar_t* __restrict__ v0,
                               const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                               const scalar_t* __restrict__ v3, acc_t w0, acc_t w1, acc_t w2, acc_t w3,
                               int64_t width_rt) {
  if constexpr (W > 0) {
    for (int c = 0; c < W; ++c) {
      acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
                w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
    }
  } else {
    for (int64_t c = 0; c < width_rt; ++c) {
      acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
                w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
    }
  }
}

// Channels [0, W) of one (pixel, group) (W = width when known at compile time, else 0 and width <= kChunk):
// the sum over the group's points q in [q_begin, q_end) of the mask-weighted bilinear sample. The accumulator
// is a local array the compiler keeps in registers.
template <typename scalar_t, typename acc_t, int W>
inline void forward_channels(const PointTable<acc_t>& t, int64_t q_begin, int64_t q_end, const scalar_t* in_g,
                             int64_t C, int64_t WC, const scalar_t* zeros, int64_t width_rt, scalar_t* out_g) {
  constexpr int LOCAL = W > 0 ? W : kChunk<acc_t>;
  const int64_t width = W > 0 ? W : width_rt;
  const scalar_t* const outside[4] = {zeros, zeros, zeros, zeros};
  acc_t acc[LOCAL];
  for (int c = 0; c < LOCAL; ++c) acc[c] = acc_t(0);
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int32_t f = t.flags[q];
    if (f == 0) continue;
    const scalar_t* rows[4];
    corner_rows(f, t.cell[q], in_g, C, WC, outside, rows);
    accumulate_corners<scalar_t, acc_t, W>(acc, rows[0], rows[1], rows[2], rows[3], t.w0[q], t.w1[q], t.w2[q],
                                           t.w3[q], width);
  }
  for (int64_t c = 0; c < width; ++c) out_g[c] = static_cast<scalar_t>(acc[c]);
}

// Output channels of one (pixel, group): compile-time width GC, or runtime gc in chunks of kChunk channels.
template <typename scalar_t, typename acc_t, int GC>
inline void forward_group(const PointTable<acc_t>& t, int64_t q_begin, int64_t q_end, const scalar_t* in_g,
                          int64_t C, int64_t WC, const scalar_t* zeros, int64_t gc, scalar_t* out_g) {
  if constexpr (GC > 0) {
    forward_channels<scalar_t, acc_t, GC>(t, q_begin, q_end, in_g, C, WC, zeros, GC, out_g);
  } else {
    constexpr int CH = kChunk<acc_t>;
    int64_t c0 = 0;
    for (; c0 + CH <= gc; c0 += CH) {
      forward_channels<scalar_t, acc_t, CH>(t, q_begin, q_end, in_g + c0, C, WC, zeros + c0, CH, out_g + c0);
    }
    if (c0 < gc) {
      forward_channels<scalar_t, acc_t, 0>(t, q_begin, q_end, in_g + c0, C, WC, zeros + c0, gc - c0, out_g + c0);
    }
  }
}

template <typename scalar_t, int GC>
void forward_impl(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                  scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t gc = GC > 0 ? GC : g.gc;
  const int64_t C = g.C, P = g.P, G = g.G, GP = g.G * g.P;
  const int64_t WC = g.W_in * C;
  std::vector<acc_t> kx, ky;
  kernel_displacements(g, G, kx, ky);
  const acc_t s = static_cast<acc_t>(g.offset_scale);
  const int64_t c_w = g.dilation_w * (g.kernel_w - 1) / 2;
  const int64_t c_h = g.dilation_h * (g.kernel_h - 1) / 2;
  const int64_t HWo = g.H_out * g.W_out;
  const int64_t total = g.N * HWo;
  // Go parallel only with at least kMinParallelWork (point, channel) pairs per thread (~10 us).
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, GP * gc));

  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    PointTable<acc_t> t(GP);
    const std::vector<scalar_t> zeros(gc, scalar_t(0));  // the input row of corners outside the image
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / HWo;
      const int64_t rem = pix - n * HWo;
      const int64_t ho = rem / g.W_out;
      const int64_t wo = rem - ho * g.W_out;
      const acc_t base_x = static_cast<acc_t>(wo * g.stride_w - g.pad_w + c_w);
      const acc_t base_y = static_cast<acc_t>(ho * g.stride_h - g.pad_h + c_h);
      sample_points<scalar_t, acc_t, true>(GP, kx.data(), ky.data(), base_x, base_y, s, offset + pix * GP * 2,
                                           mask + pix * GP, g.H_in, g.W_in, t);
      const scalar_t* in_n = input + n * g.H_in * g.W_in * C;
      scalar_t* out_pix = output + pix * C;
      for (int64_t grp = 0; grp < G; ++grp) {
        forward_group<scalar_t, acc_t, GC>(t, grp * P, (grp + 1) * P, in_n + grp * gc, C, WC, zeros.data(), gc,
                                           out_pix + grp * gc);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// Sum of a[0:N] by pairwise halving (vectorises, unlike an in-order reduction).
template <typename acc_t, int N>
inline acc_t tree_sum(const acc_t* a) {
  if constexpr (N == 1) {
    return a[0];
  } else {
    constexpr int half = N / 2;
    acc_t b[N - half];
    for (int i = 0; i < half; ++i) b[i] = a[i] + a[i + (N - half)];
    if constexpr (N - half > half) b[half] = a[half];
    return tree_sum<acc_t, N - half>(b);
  }
}

template <typename acc_t>
inline acc_t tree_sum_rt(acc_t* a, int64_t n) {
  while (n > 1) {
    const int64_t half = n / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) a[i] += a[i + (n - half)];
    n -= half;
  }
  return n == 1 ? a[0] : acc_t(0);
}

// One sampling point of one (pixel, group) in the backward pass, for any gc (used when gc is not a multiple of
// the vector width; see backward_point_lanes for the fast path). v0..v3 are the corner rows of the input (the
// zero row for corners outside the image), gi0..gi3 the matching rows of grad_input (private sink rows for
// corners outside). Scatters a_k * grad_out into gi_k and returns in sums[0..2] the channel sums of
// grad_out * sample, grad_out * d(sample)/dx and grad_out * d(sample)/dy (floor-based derivative, as the CUDA
// kernel and grid_sample). scratch holds 3 * gc values.
template <typename scalar_t, typename acc_t>
inline void backward_point(const acc_t* __restrict__ go, const scalar_t* __restrict__ v0,
                           const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                           const scalar_t* __restrict__ v3, acc_t* __restrict__ gi0, acc_t* __restrict__ gi1,
                           acc_t* __restrict__ gi2, acc_t* __restrict__ gi3, acc_t m, acc_t lx, acc_t ly,
                           acc_t* __restrict__ scratch, int64_t gc, acc_t (&sums)[3]) {
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const acc_t w0 = hy * hx, w1 = hy * lx, w2 = ly * hx, w3 = ly * lx;
  const acc_t a0 = w0 * m, a1 = w1 * m, a2 = w2 * m, a3 = w3 * m;
  acc_t* __restrict__ tm = scratch;
  acc_t* __restrict__ tx = scratch + gc;
  acc_t* __restrict__ ty = scratch + 2 * gc;
#pragma omp simd
  for (int64_t c = 0; c < gc; ++c) {
    const acc_t gv = go[c];
    const acc_t f0 = static_cast<acc_t>(v0[c]);
    const acc_t f1 = static_cast<acc_t>(v1[c]);
    const acc_t f2 = static_cast<acc_t>(v2[c]);
    const acc_t f3 = static_cast<acc_t>(v3[c]);
    tm[c] = gv * (w0 * f0 + w1 * f1 + w2 * f2 + w3 * f3);
    tx[c] = gv * (hy * (f1 - f0) + ly * (f3 - f2));
    ty[c] = gv * (hx * (f2 - f0) + lx * (f3 - f1));
    gi0[c] += a0 * gv;
    gi1[c] += a1 * gv;
    gi2[c] += a2 * gv;
    gi3[c] += a3 * gv;
  }
  sums[0] = tree_sum_rt(tm, gc);
  sums[1] = tree_sum_rt(tx, gc);
  sums[2] = tree_sum_rt(ty, gc);
}

// Batched variant of backward_point for gc a multiple of L (the lanes of one 256-bit vector of acc_t; GC is gc
// when known at compile time, else 0): the three per-channel terms are folded to L lanes each and stored in
// lanes[0:3L]; reduce_rows later sums many such rows at once, which is several times cheaper than a horizontal
// sum per row.
template <typename acc_t>
constexpr int kLanes = 32 / static_cast<int>(sizeof(acc_t));

template <typename scalar_t, typename acc_t, int GC>
inline void backward_point_lanes(const acc_t* __restrict__ go, const scalar_t* __restrict__ v0,
                                 const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                                 const scalar_t* __restrict__ v3, acc_t* __restrict__ gi0, acc_t* __restrict__ gi1,
                                 acc_t* __restrict__ gi2, acc_t* __restrict__ gi3, acc_t m, acc_t lx, acc_t ly,
                                 acc_t* __restrict__ lanes, int64_t gc_rt) {
  constexpr int L = kLanes<acc_t>;
  static_assert(GC % L == 0, "backward_point_lanes needs gc to be a multiple of the vector width");
  const int64_t gc = GC > 0 ? GC : gc_rt;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const acc_t w0 = hy * hx, w1 = hy * lx, w2 = ly * hx, w3 = ly * lx;
  const acc_t a0 = w0 * m, a1 = w1 * m, a2 = w2 * m, a3 = w3 * m;
  acc_t tm[L] = {}, tx[L] = {}, ty[L] = {};
  for (int64_t c0 = 0; c0 < gc; c0 += L) {
    for (int i = 0; i < L; ++i) {
      const int64_t c = c0 + i;
      const acc_t gv = go[c];
      const acc_t f0 = static_cast<acc_t>(v0[c]);
      const acc_t f1 = static_cast<acc_t>(v1[c]);
      const acc_t f2 = static_cast<acc_t>(v2[c]);
      const acc_t f3 = static_cast<acc_t>(v3[c]);
      tm[i] += gv * (w0 * f0 + w1 * f1 + w2 * f2 + w3 * f3);
      tx[i] += gv * (hy * (f1 - f0) + ly * (f3 - f2));
      ty[i] += gv * (hx * (f2 - f0) + lx * (f3 - f1));
      gi0[c] += a0 * gv;
      gi1[c] += a1 * gv;
      gi2[c] += a2 * gv;
      gi3[c] += a3 * gv;
    }
  }
  for (int i = 0; i < L; ++i) {
    lanes[i] = tm[i];
    lanes[L + i] = tx[i];
    lanes[2 * L + i] = ty[i];
  }
}

// sums[r] = sum of rows[r*L : (r+1)*L] for r < nrows; nrows must be a multiple of L.
inline void reduce_rows(const float* __restrict__ rows, int64_t nrows, float* __restrict__ sums) {
  for (int64_t r = 0; r < nrows; r += 8) {
    const float* b = rows + r * 8;
#if defined(__AVX2__)
    // Transpose-and-add of 8 rows of 8 lanes: 8 sums in one vector.
    const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(b), _mm256_loadu_ps(b + 8));
    const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(b + 16), _mm256_loadu_ps(b + 24));
    const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(b + 32), _mm256_loadu_ps(b + 40));
    const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(b + 48), _mm256_loadu_ps(b + 56));
    const __m256 u0 = _mm256_hadd_ps(t0, t1);
    const __m256 u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(sums + r, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                             _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
    for (int k = 0; k < 8; ++k) sums[r + k] = tree_sum<float, 8>(b + 8 * k);
#endif
  }
}

inline void reduce_rows(const double* __restrict__ rows, int64_t nrows, double* __restrict__ sums) {
  for (int64_t r = 0; r < nrows; r += 4) {
    const double* b = rows + r * 4;
#if defined(__AVX2__)
    const __m256d t0 = _mm256_hadd_pd(_mm256_loadu_pd(b), _mm256_loadu_pd(b + 4));
    const __m256d t1 = _mm256_hadd_pd(_mm256_loadu_pd(b + 8), _mm256_loadu_pd(b + 12));
    _mm256_storeu_pd(sums + r, _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20),
                                             _mm256_permute2f128_pd(t0, t1, 0x31)));
#else
    for (int k = 0; k < 4; ++k) sums[r + k] = tree_sum<double, 4>(b + 4 * k);
#endif
  }
}

// grad_mask = sum_c grad_out * sample; grad_offset = s * m * sum_c grad_out * d(sample)/d(x|y).
template <typename scalar_t, typename acc_t>
inline void sums_to_grads(acc_t sum_sample, acc_t sum_dx, acc_t sum_dy, acc_t s_times_m, scalar_t* grad_mask,
                          scalar_t* grad_offset) {
  *grad_mask = static_cast<scalar_t>(sum_sample);
  grad_offset[0] = static_cast<scalar_t>(s_times_m * sum_dx);
  grad_offset[1] = static_cast<scalar_t>(s_times_m * sum_dy);
}

// grad_input_acc is float for half/bfloat16 (cast back by the caller) and the output tensor itself otherwise;
// it must be zero-initialised. grad_offset and grad_mask are fully written here.
//
// Work is split into tasks (image n, block of consecutive groups): a task owns the channel slices of its groups
// in grad_input, so the bilinear scatter needs no atomics, and its own grad_offset/grad_mask entries. Blocks are
// as large as the thread count allows (all groups of an image when N is large), so that a task reads the
// offsets, mask and grad_output of a pixel as one contiguous run.
template <typename scalar_t, int GC>
void backward_impl(const Geometry& g, const scalar_t* grad_output, const scalar_t* input, const scalar_t* offset,
                   const scalar_t* mask, at::opmath_type<scalar_t>* grad_input_acc, scalar_t* grad_offset,
                   scalar_t* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t gc = GC > 0 ? GC : g.gc;
  const int64_t C = g.C, P = g.P, G = g.G;
  const int64_t WC = g.W_in * C;
  const acc_t s = static_cast<acc_t>(g.offset_scale);
  const int64_t c_w = g.dilation_w * (g.kernel_w - 1) / 2;
  const int64_t c_h = g.dilation_h * (g.kernel_h - 1) / 2;
  const int64_t HWo = g.H_out * g.W_out;
  const int64_t HWi = g.H_in * g.W_in;

  // Two tasks per thread when the batch alone does not provide them.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks_wanted = std::min<int64_t>(G, (2 * threads + g.N - 1) / g.N);
  const int64_t block = (G + blocks_wanted - 1) / blocks_wanted;  // groups per task
  const int64_t blocks = (G + block - 1) / block;
  const int64_t BP = block * P;  // points per (pixel, task)

  std::vector<acc_t> kx, ky;
  kernel_displacements(g, block, kx, ky);

  constexpr int L = kLanes<acc_t>;
  const bool batched = gc % L == 0;
  // Rows of lane-folded terms (3 per point), padded with zero rows to a multiple of L for reduce_rows.
  const int64_t n_rows = (3 * BP + L - 1) / L * L;

  const int64_t tasks = g.N * blocks;
  const int64_t work_per_task = HWo * block * P * gc;  // (point, channel) pairs
  const int64_t task_grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_task));

  at::parallel_for(0, tasks, task_grain, [&](int64_t begin, int64_t end) {
    PointTable<acc_t> t(BP);
    std::vector<acc_t> rows(batched ? n_rows * L : 0, acc_t(0));
    std::vector<acc_t> sums(batched ? n_rows : 0, acc_t(0));
    // go: grad_out of the current (pixel, group) in acc_t; terms: scratch of backward_point; sink: grad_input
    // rows for corners outside the image; zeros: the input row of such corners.
    std::vector<acc_t> buffers(8 * gc, acc_t(0));
    acc_t* go = buffers.data();
    acc_t* terms = go + gc;
    acc_t* sink = terms + 3 * gc;
    acc_t* const sinks[4] = {sink, sink + gc, sink + 2 * gc, sink + 3 * gc};
    const std::vector<scalar_t> zeros(gc, scalar_t(0));
    const scalar_t* const outside[4] = {zeros.data(), zeros.data(), zeros.data(), zeros.data()};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t g0 = (task - n * blocks) * block;
      const int64_t g1 = std::min(G, g0 + block);
      const int64_t count = (g1 - g0) * P;
      for (int64_t rem = 0; rem < HWo; ++rem) {
        const int64_t pix = n * HWo + rem;
        const int64_t ho = rem / g.W_out;
        const int64_t wo = rem - ho * g.W_out;
        const int64_t q0 = (pix * G + g0) * P;  // first (group, point) entry of this task in offset/mask
        const acc_t base_x = static_cast<acc_t>(wo * g.stride_w - g.pad_w + c_w);
        const acc_t base_y = static_cast<acc_t>(ho * g.stride_h - g.pad_h + c_h);
        sample_points<scalar_t, acc_t, false>(count, kx.data(), ky.data(), base_x, base_y, s, offset + q0 * 2,
                                              nullptr, g.H_in, g.W_in, t);
        const scalar_t* mask_t = mask + q0;
        scalar_t* goff_t = grad_offset + q0 * 2;
        scalar_t* gmask_t = grad_mask + q0;
        for (int64_t grp = g0; grp < g1; ++grp) {
          const scalar_t* in_g = input + n * HWi * C + grp * gc;
          acc_t* gi_g = grad_input_acc + n * HWi * C + grp * gc;
          const scalar_t* go_src = grad_output + pix * C + grp * gc;
          const acc_t* go_acc;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            go_acc = go_src;  // already in the accumulation type
          } else {
            for (int64_t c = 0; c < gc; ++c) go[c] = static_cast<acc_t>(go_src[c]);
            go_acc = go;
          }
          for (int64_t q = (grp - g0) * P; q < (grp - g0 + 1) * P; ++q) {
            const int32_t f = t.flags[q];
            if (f == 0) {
              if (batched) {
                acc_t* lanes = rows.data() + 3 * q * L;
                for (int i = 0; i < 3 * L; ++i) lanes[i] = acc_t(0);
              }
              continue;
            }
            const acc_t m = static_cast<acc_t>(mask_t[q]);
            const scalar_t* v[4];
            acc_t* gi[4];
            corner_rows(f, t.cell[q], in_g, C, WC, outside, v);
            corner_rows(f, t.cell[q], gi_g, C, WC, sinks, gi);
            if (batched) {
              // Lane-folded terms into `rows`; all channel sums of the task are reduced at once below.
              backward_point_lanes<scalar_t, acc_t, GC>(go_acc, v[0], v[1], v[2], v[3], gi[0], gi[1], gi[2], gi[3],
                                                        m, t.lx[q], t.ly[q], rows.data() + 3 * q * L, gc);
            } else {
              acc_t psums[3];
              backward_point<scalar_t, acc_t>(go_acc, v[0], v[1], v[2], v[3], gi[0], gi[1], gi[2], gi[3], m,
                                              t.lx[q], t.ly[q], terms, gc, psums);
              sums_to_grads(psums[0], psums[1], psums[2], s * m, gmask_t + q, goff_t + 2 * q);
            }
          }
        }
        if (batched) {
          reduce_rows(rows.data(), n_rows, sums.data());
          for (int64_t q = 0; q < count; ++q) {
            const acc_t sm = s * static_cast<acc_t>(mask_t[q]);
            sums_to_grads(sums[3 * q], sums[3 * q + 1], sums[3 * q + 2], sm, gmask_t + q, goff_t + 2 * q);
          }
        }
        // Points whose sample is entirely outside the image have zero gradients.
        for (int64_t q = 0; q < count; ++q) {
          if (t.flags[q] == 0) {
            gmask_t[q] = scalar_t(0);
            goff_t[2 * q] = scalar_t(0);
            goff_t[2 * q + 1] = scalar_t(0);
          }
        }
      }
    }
  });
}

// Dispatch on the group width so the InternImage widths (16 for T/S/B/L/XL, 32 for H/G) get fully unrolled
// channel loops; other widths use the runtime-width loops.
template <typename F>
void with_gc(int64_t gc, F&& f) {
  switch (gc) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

at::Tensor dcnv3_forward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                         int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                         int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                         int64_t group_channels, double offset_scale, bool remove_center) {
  const Geometry g = make_geometry(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                   dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  if (input_.scalar_type() == at::kHalf) {
    // float16 runs the float32 kernel on float32 copies: scalar float16 conversions do not vectorise, and the
    // kernel accumulates in float32 anyway, so the result is the same. (bfloat16 converts with a shift and runs
    // natively.)
    return dcnv3_forward(input_.to(at::kFloat), offset_.to(at::kFloat), mask_.to(at::kFloat), kernel_h, kernel_w,
                         stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                         offset_scale, remove_center)
        .to(at::kHalf);
  }
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor output = at::empty({g.N, g.H_out, g.W_out, g.C}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, input.scalar_type(), "dcnv3_forward_cpu", [&] {
    with_gc(g.gc, [&](auto gc_const) {
      forward_impl<scalar_t, decltype(gc_const)::value>(g, input.const_data_ptr<scalar_t>(),
                                                        offset.const_data_ptr<scalar_t>(),
                                                        mask.const_data_ptr<scalar_t>(),
                                                        output.mutable_data_ptr<scalar_t>());
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  const Geometry g = make_geometry(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                   dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  TORCH_CHECK(grad_output_.dim() == 4 && grad_output_.size(0) == g.N && grad_output_.size(1) == g.H_out &&
                  grad_output_.size(2) == g.W_out && grad_output_.size(3) == g.C,
              "dcnv3 cpu: grad_output has shape ", grad_output_.sizes(), ", expected (", g.N, ", ", g.H_out,
              ", ", g.W_out, ", ", g.C, ")");
  if (input_.scalar_type() == at::kHalf) {
    // As in the forward: the float32 kernel on float32 copies gives the same gradients, faster.
    auto grads = dcnv3_backward(grad_output_.to(at::kFloat), input_.to(at::kFloat), offset_.to(at::kFloat),
                                mask_.to(at::kFloat), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
    return std::make_tuple(std::get<0>(grads).to(at::kHalf), std::get<1>(grads).to(at::kHalf),
                           std::get<2>(grads).to(at::kHalf));
  }
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const bool low_precision = input.scalar_type() == at::ScalarType::BFloat16;
  at::Tensor grad_input_acc =
      at::zeros(input.sizes(), input.options().dtype(low_precision ? at::kFloat : input.scalar_type()));
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  if (grad_output.numel() > 0 && offset.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, input.scalar_type(), "dcnv3_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_gc(g.gc, [&](auto gc_const) {
        backward_impl<scalar_t, decltype(gc_const)::value>(
            g, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
            offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
            grad_input_acc.mutable_data_ptr<acc_t>(), grad_offset.mutable_data_ptr<scalar_t>(),
            grad_mask.mutable_data_ptr<scalar_t>());
      });
    });
  } else {
    grad_offset.zero_();
    grad_mask.zero_();
  }
  at::Tensor grad_input = low_precision ? grad_input_acc.to(input.scalar_type()) : grad_input_acc;
  return std::make_tuple(grad_input, grad_offset, grad_mask);
}

}  // namespace

TORCH_LIBRARY(shusheng_cpu, m) {
  m.def(
      "dcnv3_forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, "
      "float offset_scale, bool remove_center) -> Tensor");
  m.def(
      "dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shusheng_cpu, CPU, m) {
  m.impl("dcnv3_forward", &dcnv3_forward);
  m.impl("dcnv3_backward", &dcnv3_backward);
}
