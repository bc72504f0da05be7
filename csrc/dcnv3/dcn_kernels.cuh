// The DCNv3 sampling kernels, forward and backward, each fused with the offset/mask(/cfs) projection.
//
// A CTA owns an 8x8 tile of pixels x kGroupsPerCta = 2 groups (128 threads). Its sampling work:
//   1. the packed logits of 64 pixels (2 groups x 28 columns) = x1 rows . wpack^T + bpack with the tensor-core
//      tile GEMM (K = C; rows gathered), into shared memory: offsets and masks never touch HBM;
//   2. normalised in place (softmax over the P mask logits of each pixel/group, sigmoid of the cfs logit);
//   3. each (pixel, group) pair is served by Cg / Vec lanes, each lane owning one 16-byte channel vector,
//      bilinearly sampling the 4 corners of each of the P points (channels-last: a corner is one 16-byte load
//      per lane), with fp32 accumulation, from the value window: the part of `value` the tile can touch, staged
//      in shared memory (global memory for a corner outside it).
// dcn_fwd_out: the forward, every group pair of a tile in one CTA: records the tile's reach (how far its samples
//   land from their pixels), stages the window, blends with the center feature, keeps y whole in shared memory
//   and runs the output projection as the epilogue (y is stored only for grad W_out in training). dcn_fwd: one
//   pair per CTA, y written, for the core op and where the y tile does not fit (bf16 C > 1280, fp32 C > 620).
// dcn_bwd_value: the backward, owner-computes. The CTA owns an 8x8 tile of *value* pixels and gathers every
//   grad value term that lands in it into a fixed-point accumulator in shared memory (integer adds commute
//   exactly: deterministic; two 32-bit words per element, for native shared atomics, laid out against bank
//   conflicts: AccLayout), then writes the tile once: no global atomics, no accumulator in HBM, no zeroing or
//   finalising pass. With stride 1 and same padding it first takes its own output tile whole
//   (recomputed logits, like flash-attention; grad logits through a fixed shuffle tree and the softmax/sigmoid
//   backward), then, from the forward's reach, every other output pixel that can sample the tile (a rectangle
//   per nearby output tile, less the pixels whose touch mask -- recorded by the forward -- rules the tile out;
//   logits recomputed in 64-row chunks). The price is recomputing the halo's logits.
//   In the fused block grad_y is recomputed per chunk too (grad_out rows . W_out): it never goes through HBM.
//   dcn_bwd_x1 (kAllPairs): the same for every group pair of the tile in one CTA, which keeps the own tile's grad
//   logits of all groups and ends with grad x1 = grad logits . wpack (where that tile fits).
// dcn_bwd: grad logits alone, for geometries whose output grid is not the value grid (strided core op).
#pragma once

#include <stdexcept>

#include "params.h"
#include "tile_gemm.cuh"

namespace dcnv3 {

constexpr int kGroupsPerCta = 2;
static_assert(kGroupsPerCta * kGroupCols <= kTileN, "a CTA's GEMM columns must hold its groups' logits");

template <class T>
struct DcnSmem {
  TileGemmSmem<T> gemm;
  alignas(16) float logits[kTileM * (kTileN + kAccPad)];  // (kTileM, kTileN) fp32, row pitch kTileN + kAccPad
};

__device__ __forceinline__ float* logit_row(float* logits, int pix, int gl) {
  return logits + pix * (kTileN + kAccPad) + gl * kGroupCols;
}

// Steps 1-2: fill smem logits for pixels [m0, m0+64) (or rows[0..64) when given: shared memory, < 0 for none)
// and groups [g0, g0+2), normalised.
template <class T, int kCta = kThreads>
__device__ void compute_logits(const DcnParams& p, DcnSmem<T>& sm, int m0, int g0, int M,
                               const int* rows = nullptr) {
  const int n_cols = p.G * kGroupCols;  // the live columns (the 64-column tile's last 8 are the next pair's)
  constexpr int kPairCols = kGroupsPerCta * kGroupCols;
  static_assert(kGroupCols % 4 == 0 && (kTileN + kAccPad) % 4 == 0, "a pair's logits row in whole float4s");
  if (p.logits_in != nullptr) {
    // Stored by the forward (fp32, bias added): the pair's columns as float4s, 16-byte aligned (packed_cols is a
    // multiple of 8, g0 even); the tile's other columns are never read.
    for (int idx = threadIdx.x; idx < kTileM * (kPairCols / 4); idx += kCta) {
      const int r = idx / (kPairCols / 4), c = idx % (kPairCols / 4) * 4, n = g0 * kGroupCols + c;
      const int m = rows != nullptr ? rows[r] : m0 + r;
      float4 v{0.f, 0.f, 0.f, 0.f};
      if (m >= 0 && m < M && n < n_cols)
        v = *reinterpret_cast<const float4*>(p.logits_in + int64_t(m) * packed_cols(p.G) + n);
      *reinterpret_cast<float4*>(sm.logits + r * (kTileN + kAccPad) + c) = v;
    }
  } else if (p.logits == nullptr) {
    // x1 (M, C) row-major: A(m, k) = x1[m*C + k]; wpack (packed_cols(G), C): B(n, k) = wpack[n*C + k].
    tile_gemm<T, kTileM, kTileN, false, false, 1, kCta>(sm.gemm, sm.logits, static_cast<const T*>(p.x1), p.C, 1, m0,
                                                        M, static_cast<const T*>(p.wpack), p.C, 1, g0 * kGroupCols,
                                                        n_cols, 0, p.C, rows);
    const T* bias = static_cast<const T*>(p.bpack);
    for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kCta) {
      int r = idx / kTileN, c = idx % kTileN, n = g0 * kGroupCols + c;
      if (n < n_cols) sm.logits[r * (kTileN + kAccPad) + c] += to_float(bias[n]);
    }
    if (p.logits_out != nullptr) {
      __syncthreads();  // the bias is added
      for (int idx = threadIdx.x; idx < kTileM * (kPairCols / 4); idx += kCta) {
        const int r = idx / (kPairCols / 4), c = idx % (kPairCols / 4) * 4, n = g0 * kGroupCols + c;
        const int m = rows != nullptr ? rows[r] : m0 + r;
        if (m >= 0 && m < M && n < n_cols)
          *reinterpret_cast<float4*>(p.logits_out + int64_t(m) * packed_cols(p.G) + n) =
              *reinterpret_cast<const float4*>(sm.logits + r * (kTileN + kAccPad) + c);
      }
    }
  } else {
    const T* src = static_cast<const T*>(p.logits);
    for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kCta) {
      int r = idx / kTileN, c = idx % kTileN, m = rows != nullptr ? rows[r] : m0 + r, n = g0 * kGroupCols + c;
      sm.logits[r * (kTileN + kAccPad) + c] =
          (m >= 0 && m < M && n < n_cols) ? to_float(src[int64_t(m) * packed_cols(p.G) + n]) : 0.f;
    }
  }
  __syncthreads();
  static_assert(kTileM * kGroupsPerCta <= kCta, "one thread per (pixel, group) pair normalises it");
  if (threadIdx.x < kTileM * kGroupsPerCta) {
    float* row = logit_row(sm.logits, threadIdx.x / kGroupsPerCta, threadIdx.x % kGroupsPerCta);
    if (p.apply_softmax) {
      float* ml = row + 2 * p.P;
      float mx = -INFINITY;
      for (int q = 0; q < p.P; ++q) mx = fmaxf(mx, ml[q]);
      float sum = 0.f;
      for (int q = 0; q < p.P; ++q) {
        ml[q] = __expf(ml[q] - mx);
        sum += ml[q];
      }
      float inv = 1.f / sum;
      for (int q = 0; q < p.P; ++q) ml[q] *= inv;
    }
    if (p.has_cfs) row[3 * p.P] = 1.f / (1.f + __expf(-row[3 * p.P]));
  }
  __syncthreads();
}

struct Bilinear {
  int x0, y0;
  float w[4];     // corner weights (y0,x0) (y0,x1) (y1,x0) (y1,x1)
  bool in[4];     // corner inside the image
  float lx, ly;
};

__device__ __forceinline__ Bilinear bilinear_at(float x, float y, int H, int W) {
  Bilinear b;
  float fx = floorf(x), fy = floorf(y);
  b.x0 = static_cast<int>(fx);
  b.y0 = static_cast<int>(fy);
  b.lx = x - fx;
  b.ly = y - fy;
  float hx = 1.f - b.lx, hy = 1.f - b.ly;
  b.w[0] = hy * hx;
  b.w[1] = hy * b.lx;
  b.w[2] = b.ly * hx;
  b.w[3] = b.ly * b.lx;
  bool x0in = b.x0 >= 0 && b.x0 < W, x1in = b.x0 + 1 >= 0 && b.x0 + 1 < W;
  bool y0in = b.y0 >= 0 && b.y0 < H, y1in = b.y0 + 1 >= 0 && b.y0 + 1 < H;
  b.in[0] = y0in && x0in;
  b.in[1] = y0in && x1in;
  b.in[2] = y1in && x0in;
  b.in[3] = y1in && x1in;
  return b;
}

// Sampling coordinates (pixels, unpadded image) of point q for output pixel (ho, wo).
__device__ __forceinline__ void sample_xy(const DcnParams& p, const float* row, int q, int ho, int wo, float& x,
                                          float& y) {
  x = float(wo * p.stride_w - p.pad_w + p.center_w) + (float(p.tap_x[q]) + row[2 * q]) * p.offset_scale;
  y = float(ho * p.stride_h - p.pad_h + p.center_h) + (float(p.tap_y[q]) + row[2 * q + 1]) * p.offset_scale;
}

// Spatial tiles of the owner-computes grad value: targets are 8x8 tiles of value pixels, and the reach is kept
// per 8x8 tile of output pixels.
constexpr int kTile = 8;
static_assert(kTile * kTile == kTileM, "a chunk of source pixels fills the GEMM's rows");

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0
__device__ __forceinline__ int ceil_div_any(int a, int b) { return -floor_div(-a, b); }                     // b > 0

// Where output pixel (ho, wo) samples from before offsets: the kernel's center tap, in value pixels.
__device__ __forceinline__ int base_x(const DcnParams& p, int wo) { return wo * p.stride_w - p.pad_w + p.center_w; }
__device__ __forceinline__ int base_y(const DcnParams& p, int ho) { return ho * p.stride_h - p.pad_h + p.center_h; }

// Largest distance (pixels, along x or y) from the sampling base (bx, by) to an in-image corner of b.
__device__ __forceinline__ int corner_reach(const Bilinear& b, int bx, int by, int reach) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (!b.in[k]) continue;
    const int dx = b.x0 + (k & 1) - bx, dy = b.y0 + (k >> 1) - by;  // bounded: the corner is in the image
    reach = max(reach, max(max(dx, -dx), max(dy, -dy)));
  }
  return reach;
}

// Record a pair's reach (every lane of the pair holds the same value; one writes): the image's largest and its
// 8x8 output tile's (atomicMax: order-independent).
__device__ __forceinline__ void record_reach(const DcnParams& p, int n, int ho, int wo, int reach) {
  const int tiles_w = ceil_div(p.Wo, kTile);
  int* image_reach = p.reach + int64_t(n) * reach_row(p.Ho, p.Wo, p.G);
  atomicMax(image_reach + 1 + (ho / kTile) * tiles_w + wo / kTile, reach);
  atomicMax(image_reach, reach);
}

// Output pixel m's touch mask for group pair `pair` (DcnParams::reach: per image, after the tiles' reach, one uint16
// per (pixel, pair)).
__device__ __forceinline__ uint16_t* touch_mask(const DcnParams& p, int m, int pair) {
  const int pixels = p.Ho * p.Wo;
  int* masks = p.reach + int64_t(m / pixels) * reach_row(p.Ho, p.Wo, p.G) + 1 + reach_tiles(p.Ho, p.Wo);
  return reinterpret_cast<uint16_t*>(masks) + int64_t(m % pixels) * ((p.G + 1) / 2) + pair;
}

// The value tiles (-1..1 tiles away from (tile_x, tile_y), the tile of the sampling base) that sample b's corners
// can reach, give or take one pixel (a corner that another kernel's rounding moved by one still counts), whether
// or not they are in the image: DcnParams::reach's touch bits. Corners of further tiles set the nearest bits.
__device__ __forceinline__ unsigned touch_bits(const Bilinear& b, int tile_x, int tile_y) {
  constexpr int kFar = 1 << 28;  // (a corner this far out only sets an edge bit; no overflow below)
  const int x0 = min(kFar, max(-kFar, b.x0)), y0 = min(kFar, max(-kFar, b.y0));
  const int x_lo = min(1, max(-1, floor_div(x0 - 1, kTile) - tile_x));
  const int x_hi = min(1, max(-1, floor_div(x0 + 2, kTile) - tile_x));
  const int y_lo = min(1, max(-1, floor_div(y0 - 1, kTile) - tile_y));
  const int y_hi = min(1, max(-1, floor_div(y0 + 2, kTile) - tile_y));
  const unsigned cols = (2u << (x_hi + 1)) - (1u << (x_lo + 1));  // bits x_lo + 1 .. x_hi + 1
  unsigned bits = 0;
  for (int dy = y_lo; dy <= y_hi; ++dy) bits |= cols << (3 * (dy + 1));
  return bits;
}

// Whether the source pixel m can scatter into the value tile at (tile_x, tile_y) by its touch mask for group pair
// `pair`: tiles beyond the 3x3 the mask covers are never ruled out.
__device__ __forceinline__ bool may_touch(const DcnParams& p, int m, int pair, int tile_x, int tile_y) {
  const int wo = m % p.Wo, ho = (m / p.Wo) % p.Ho;
  const int dx = tile_x - floor_div(base_x(p, wo), kTile), dy = tile_y - floor_div(base_y(p, ho), kTile);
  if (dx < -1 || dx > 1 || dy < -1 || dy > 1) return true;
  const unsigned mask = *touch_mask(p, m, pair);
  return (mask >> ((dy + 1) * 3 + dx + 1)) & 1u;
}

// ---------------------------------------------------------------------------------------------------------
// The value window: the part of `value` an 8x8 tile samples, for the CTA's 2 groups, staged once into shared
// memory so that the 4 corners x P points of every pair are read there instead of gathered from L2 (each a
// 32-byte sector per 16-byte lane vector). The window is the tile's sampling bases dilated by the tile's reach,
// clipped to the image, and shrunk to fit kWindowBytes; a corner outside it is read from global memory.

constexpr int kWindowBytes = 32 * 1024;

template <class T, int CG>
struct ValueWindow {
  static constexpr int kVecs = kGroupsPerCta * CG / Vec<T>::kN;  // 16-byte vectors per window pixel
  static constexpr int kPixels = kWindowBytes / (kVecs * 16);
  uint4 data[kPixels * kVecs];
  int x0, y0, w, h;  // the staged box of value pixels (w = 0: none)
};

// All threads: stage the window around output tile [tx0, tx1] x [ty0, ty1] of image n sampled within `reach`
// pixels of its bases (ends with a barrier). Every thread computes the same box.
template <class T, int CG, int kCta = kThreads>
__device__ void stage_window(const DcnParams& p, ValueWindow<T, CG>& win, int n, int g0, int tx0, int tx1,
                             int ty0, int ty1, int reach) {
  using Win = ValueWindow<T, CG>;
  const int bx0 = base_x(p, tx0), bx1 = base_x(p, tx1), by0 = base_y(p, ty0), by1 = base_y(p, ty1);
  int x0 = 0, x1 = -1, y0 = 0, y1 = -1;
  for (int r = min(reach, 64); r >= 0; --r) {
    x0 = max(0, bx0 - r), x1 = min(p.W - 1, bx1 + r), y0 = max(0, by0 - r), y1 = min(p.H - 1, by1 + r);
    if (x1 < x0 || y1 < y0 || (x1 - x0 + 1) * (y1 - y0 + 1) <= Win::kPixels) break;
  }
  const int w = x1 >= x0 && y1 >= y0 && (x1 - x0 + 1) * (y1 - y0 + 1) <= Win::kPixels ? x1 - x0 + 1 : 0;
  const int h = w > 0 ? y1 - y0 + 1 : 0;
  const T* value = static_cast<const T*>(p.value);
  for (int i = threadIdx.x; i < w * h * Win::kVecs; i += kCta) {
    const int px = i / Win::kVecs, c = g0 * CG + (i % Win::kVecs) * Vec<T>::kN;
    if (c >= p.C) continue;  // the second group of an odd G: never read
    const int64_t at = ((int64_t(n) * p.H + y0 + px / w) * p.W + x0 + px % w) * p.C + c;
    store16(win.data + i, load16(value + at));
  }
  if (threadIdx.x == 0) win.x0 = x0, win.y0 = y0, win.w = w, win.h = h;
  __syncthreads();
}

// The 16-byte channel vector (group gl of the CTA's 2, lane's vector) of value pixel (x, y): from the window when
// it holds the pixel, else from global memory.
template <class T, int CG>
__device__ __forceinline__ const T* corner_ptr(const DcnParams& p, const ValueWindow<T, CG>* win, int n, int x, int y,
                                              int ch, int win_ch) {
  if (win != nullptr && x >= win->x0 && x < win->x0 + win->w && y >= win->y0 && y < win->y0 + win->h)
    return reinterpret_cast<const T*>(win->data + ((y - win->y0) * win->w + x - win->x0) * ValueWindow<T, CG>::kVecs) +
           win_ch;
  return static_cast<const T*>(p.value) + ((int64_t(n) * p.H + y) * p.W + x) * p.C + ch;
}

// The 64 rows (output pixel indices) of the tile [tx0, tx1] x [ty0, ty1] (at most 8x8) of image n's output grid, in
// `rows`: the box's pixels row by row, then -1, so that an edge tile of at most 32 pixels leaves the tile GEMMs'
// second row block empty (tile_gemm skips it). Threads < 64 write; the caller syncs.
__device__ __forceinline__ void fill_tile_rows(const DcnParams& p, int n, int tx0, int tx1, int ty0, int ty1,
                                               int* rows) {
  if (threadIdx.x < kTileM) {
    const int w = tx1 - tx0 + 1, i = threadIdx.x;
    rows[i] = i < w * (ty1 - ty0 + 1) ? (n * p.Ho + ty0 + i / w) * p.Wo + tx0 + i % w : -1;
  }
}

// An 8x8 tile of output pixels of image n, from a flat tile index (row-major tiles of the output grid): its box
// and its rows (fill_tile_rows).
__device__ __forceinline__ void tile_rows(const DcnParams& p, int tile_index, int& n, int& tx0, int& tx1, int& ty0,
                                          int& ty1, int* rows) {
  const int tiles_w = ceil_div(p.Wo, kTile), tiles = tiles_w * ceil_div(p.Ho, kTile);
  n = tile_index / tiles;
  const int t = tile_index % tiles;
  tx0 = (t % tiles_w) * kTile, ty0 = (t / tiles_w) * kTile;
  tx1 = min(p.Wo, tx0 + kTile) - 1, ty1 = min(p.Ho, ty0 + kTile) - 1;
  fill_tile_rows(p, n, tx0, tx1, ty0, ty1, rows);
}

// out (rows of a 64-pixel tile, row pitch N) = a . B^T (+ bias): the fused epilogues (out = y . wout^T + bout in
// the forward, grad x1 = grad logits . wpack in the backward). a is the tile in shared memory (64 x K, row pitch
// a_pitch), B(n, k) = b[n*b_n + k*b_k] (N x K) is streamed from L2, 64 output columns per step through sm's staging
// and logits tiles (the fp32 result). rows (shared memory): the tile's output rows, < 0 for pixels outside the
// image, which are computed from whatever their a rows hold and not stored. kBMN: b has unit stride along n (read
// transposed, staged MN-major). All threads, after a is complete.
template <class T, bool kBMN, int kCta = kThreads>
__device__ void project_tile(DcnSmem<T>& sm, const int* rows, const T* a, int a_pitch, int K, const T* b, int64_t b_n,
                             int64_t b_k, int N, const T* bias, T* out) {
  for (int n0 = 0; n0 < N; n0 += kTileN) {
    tile_gemm<T, kTileM, kTileN, false, kBMN, 1, kCta>(sm.gemm, sm.logits, a, a_pitch, 1, 0, kTileM, b, b_n, b_k, n0,
                                                       N, 0, K, nullptr, nullptr, rows);
    store_result_tile<T, kTileM, kTileN, kCta>(sm.logits, [&](int r) { return int64_t(rows[r]); }, n0, N, bias, out);
    __syncthreads();  // the next step's result overwrites this one
  }
}

template <class T, int CG>
struct DcnFwdSmem {
  DcnSmem<T> dcn;
  ValueWindow<T, CG> window;
  int rows[kTileM];
  int reach;       // the group pair's
  int tile_reach;  // the largest over the pairs so far (thread 0's; in shared memory: held in a register across
                   // the pairs, with the tile's origin, it made ptxas spill)
};

// With the output projection fused (dcn_fwd_out), the tile's y (kTileM, C) in the activations' dtype follows
// DcnFwdSmem in dynamic shared memory, row pitch C + kSmemPad (bank spread for the GEMM's staging reads).
template <class T>
__host__ __device__ constexpr size_t y_tile_bytes(int C) {
  return size_t(kTileM) * (C + kSmemPad) * sizeof(T);
}
template <class T, int CG>
__host__ __device__ constexpr size_t fwd_smem_bytes(bool fuse_out, int C) {
  return sizeof(DcnFwdSmem<T, CG>) + (fuse_out ? y_tile_bytes<T>(C) : 0);
}

// The forward of an 8x8 tile of output pixels, per group pair: logits, then the pair's reach (sizing the value
// window; the tile's largest over its pairs is recorded for the backward), the window, and the aggregation.
// dcn_fwd: one group pair per CTA, grid (N * ceil(Ho/8) * ceil(Wo/8), ceil(G/2)); y is written.
// dcn_fwd_out (kFuseOut): every group pair of the tile in one CTA, grid (N * ceil(Ho/8) * ceil(Wo/8)): y is kept
//   whole in shared memory and the output projection runs as the epilogue (y tile . wout^T + bout, 64 columns
//   at a time, wout streamed from L2), so y is not read back from HBM; it is stored only when p.y is set (for
//   grad wout in training). The price is x1 and wout read from L2 per tile, as the separate GEMM's tiles do.
// kThreads threads, fwd_smem_bytes<T, CG>(kFuseOut, C) dynamic smem.
template <class T, int CG, bool kFuseOut>
__global__ void __launch_bounds__(kThreads, 1) dcn_fwd_kernel(DcnParams p) {
  constexpr int kVec = Vec<T>::kN;
  constexpr int kLanes = CG / kVec;  // lanes per (pixel, group) pair
  static_assert(CG % kVec == 0, "channels per group must be a multiple of the 16-byte vector");
  static_assert(32 % kLanes == 0, "the lanes of a pair must sit in one warp");
  static_assert(kTileM * kGroupsPerCta == kThreads, "one thread per (pixel, group) pair finds its reach");
  DcnFwdSmem<T, CG>& sm = dynamic_smem<DcnFwdSmem<T, CG>>();
  T* y_tile = reinterpret_cast<T*>(&sm + 1);  // kFuseOut only
  const int y_pitch = p.C + kSmemPad;

  const int M = p.N * p.Ho * p.Wo;
  int n, tx0, tx1, ty0, ty1;
  tile_rows(p, blockIdx.x, n, tx0, tx1, ty0, ty1, sm.rows);
  const int g_first = kFuseOut ? 0 : blockIdx.y * kGroupsPerCta;
  const int g_last = kFuseOut ? p.G : g_first + 1;
  if (threadIdx.x == 0) sm.tile_reach = 0;
  for (int g0 = g_first; g0 < g_last; g0 += kGroupsPerCta) {
    if (threadIdx.x == 0) sm.reach = 0;
    __syncthreads();  // rows; the previous pair is done with logits and window
    compute_logits<T>(p, sm.dcn, 0, g0, M, sm.rows);

    {  // The pair's reach: the largest over its (pixel, group) pairs (one thread each); and each pixel's touch mask
      // for the pair (its two groups' threads are neighbouring lanes).
      const int pix = threadIdx.x / kGroupsPerCta, gl = threadIdx.x % kGroupsPerCta;
      const int m = sm.rows[pix];
      int touch = 0;
      if (m >= 0 && g0 + gl < p.G) {
        const int wo = m % p.Wo, ho = (m / p.Wo) % p.Ho;
        const int bx = base_x(p, wo), by = base_y(p, ho);
        const float* row = logit_row(sm.dcn.logits, pix, gl);
        int reach = 0;
        for (int q = 0; q < p.P; ++q) {
          float x, y;
          sample_xy(p, row, q, ho, wo, x, y);
          const Bilinear b = bilinear_at(x, y, p.H, p.W);
          reach = corner_reach(b, bx, by, reach);
          touch |= int(touch_bits(b, floor_div(bx, kTile), floor_div(by, kTile)));
        }
        atomicMax(&sm.reach, reach);
      }
      static_assert(kGroupsPerCta == 2, "a pair's touch mask: the OR of two neighbouring lanes");
      touch |= __shfl_xor_sync(0xffffffffu, touch, 1);
      if (m >= 0 && gl == 0) *touch_mask(p, m, g0 / 2) = uint16_t(touch);
    }
    __syncthreads();
    const int pair_reach = sm.reach;
    if (threadIdx.x == 0) {
      sm.tile_reach = max(sm.tile_reach, pair_reach);
      if (g0 + kGroupsPerCta >= g_last) record_reach(p, n, ty0, tx0, sm.tile_reach);  // after the last pair's
    }
    stage_window<T, CG>(p, sm.window, n, g0, tx0, tx1, ty0, ty1, pair_reach);

    for (int item = threadIdx.x; item < kTileM * kGroupsPerCta * kLanes; item += kThreads) {
      const int pair = item / kLanes, lane = item % kLanes;
      const int pix = pair / kGroupsPerCta, gl = pair % kGroupsPerCta;
      const int m = sm.rows[pix], g = g0 + gl;
      if (m < 0 || g >= p.G) continue;  // no collective operations below: early exit is safe here
      const int wo = m % p.Wo, ho = (m / p.Wo) % p.Ho;
      const int ch = g * CG + lane * kVec, win_ch = gl * CG + lane * kVec;
      const float* row = logit_row(sm.dcn.logits, pix, gl);

      float acc[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[v] = 0.f;
      for (int q = 0; q < p.P; ++q) {
        float x, y;
        sample_xy(p, row, q, ho, wo, x, y);
        const float mk = row[2 * p.P + q];
        Bilinear b = bilinear_at(x, y, p.H, p.W);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!b.in[k]) continue;
          float vals[kVec];
          load_vec<T>(corner_ptr<T, CG>(p, &sm.window, n, b.x0 + (k & 1), b.y0 + (k >> 1), ch, win_ch), vals);
          const float wk = mk * b.w[k];
#pragma unroll
          for (int v = 0; v < kVec; ++v) acc[v] = fmaf(wk, vals[v], acc[v]);
        }
      }
      if (p.has_cfs) {
        const float s = row[3 * p.P];
        float vc[kVec];
        load_vec<T>(corner_ptr<T, CG>(p, &sm.window, n, wo, ho, ch, win_ch), vc);
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] = acc[v] * (1.f - s) + vc[v] * s;
      }
      if (p.y != nullptr) store_vec<T>(static_cast<T*>(p.y) + int64_t(m) * p.C + ch, acc);
      if (kFuseOut) store_vec<T>(y_tile + pix * y_pitch + ch, acc);
    }
  }
  if (!kFuseOut) return;

  // The epilogue: out rows of the tile = y tile . wout^T + bout (wout (Cout, C) row-major).
  __syncthreads();  // the y tile is complete
  project_tile<T, false>(sm.dcn, sm.rows, y_tile, y_pitch, p.C, static_cast<const T*>(p.wout), p.C, 1, p.Cout,
                  static_cast<const T*>(p.bout), static_cast<T*>(p.out));
}

// Sum over the kLanes consecutive lanes serving one pair; every lane gets the total (fixed xor tree).
template <int kLanes>
__device__ __forceinline__ float lane_sum(float v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The CTA's grad value accumulator: (target pixel, channel of the CTA's groups) elements, each a hi and a lo word
// (fixed_point_add) in two arrays of the same layout, laid out so that a warp's 32 atomics of one instruction fall
// in 32 banks when its pixels' targets are consecutive (neighbouring pixels sampling alike). Source terms: lane l of
// a pair adds channels l, l + kLanes, ...: a row interleaves the two groups in blocks of kLanes channels, and the
// row pitch is 2 kLanes (mod 32), so the warp's pixels take consecutive bank ranges. Own-tile terms: lane l adds
// its kVec consecutive channels, which puts the lanes of a pair kVec channels apart: the position within a block
// is xor-ed with the owning lane's index, which moves them to distinct banks (and only permutes a source block).
template <class T, int CG>
struct AccLayout {
  static constexpr int kLanes = CG / Vec<T>::kN;
  static constexpr int kBlock = kGroupsPerCta * kLanes;  // one channel of each lane of both groups
  static constexpr int kRow = kGroupsPerCta * CG + kBlock % 32;
  static constexpr int kElems = kTile * kTile * kRow;
  static constexpr int kBlocksPerVec = Vec<T>::kN > kLanes ? Vec<T>::kN / kLanes : 1;
  static_assert((kLanes & (kLanes - 1)) == 0, "lanes per pair are a power of 2");
  __host__ __device__ static constexpr int at(int pix, int gl, int c) {
    const int block = c / kLanes;
    return pix * kRow + block * kBlock + gl * kLanes + ((c % kLanes) ^ ((block / kBlocksPerVec) % kLanes));
  }
};
static_assert(uint64_t(kTileM) * (kMaxPoints + 1) * kFixedLowMask + kFixedLowMask < (1ull << 32),
              "a lo word takes a source chunk's terms (<= P + 1 per source pixel) between carries");

// All threads, after a barrier that ends a chunk's adds and before one that starts the next: move each lo word's
// bits from kFixedLowBits on into its hi word, so lo can take another chunk.
template <class T, int CG, int kCta = kThreads>
__device__ void carry_low_words(unsigned* hi, unsigned* lo) {
  for (int i = threadIdx.x; i < AccLayout<T, CG>::kElems; i += kCta) {
    const unsigned l = lo[i];
    if (l > kFixedLowMask) {
      hi[i] += l >> kFixedLowBits;
      lo[i] = l & kFixedLowMask;
    }
  }
}

// Where a pair's own grad value terms go: the fixed-point accumulator of the CTA's target box (shared memory,
// AccLayout) and its per-channel scales; only terms landing in the box are added (the others belong to the CTAs
// that own their boxes).
template <class T, int CG>
struct ScatterBox {
  unsigned* hi;
  unsigned* lo;
  const float* scale;
  int tx0, tx1, ty0, ty1;

  // If live: add w * (g[v] * f) at value pixel (x, y), channel c0 + step * v of group gl, with fixed-point scale
  // scale_v[v], for v < N; nothing when the pixel is outside the box. On the GPU a lane branches once around its
  // 2 N atomics, which run unconditionally (shared_atomic_add_if); the emulation passes every lane through them,
  // as a masked warp instruction would. f scales g where it is used instead of in a second array of live
  // registers (f = 1: g as is).
  template <int N>
  __device__ __forceinline__ void add(bool live, int x, int y, int gl, int c0, int step, float w,
                                      const float (&g)[N], float f, const float* scale_v) const {
    const bool inside = live && x >= tx0 && x <= tx1 && y >= ty0 && y <= ty1;
    if (!kEmulation && !inside) return;
    const int pix = inside ? (y - ty0) * kTile + (x - tx0) : 0;
#pragma unroll
    for (int v = 0; v < N; ++v) {
      const int at = AccLayout<T, CG>::at(pix, gl, c0 + step * v);
      fixed_point_add(inside, hi + at, lo + at, w * (g[v] * f), scale_v[v]);
    }
  }
};

// Backward of one (pixel, group) pair, served by kLanes consecutive lanes, each owning one 16-byte channel
// vector, given the pair's grad_y (gy_row: its first channel, in global or shared memory): recompute the samples,
// reduce the per-point dot products across the lanes (fixed shuffle tree), apply the softmax/sigmoid backward and
// write the pair's kGroupCols grad logits (to global memory, or to `gl_row` in shared memory for a coalesced store
// later); with `box`, also add its grad value terms. Whole warps must call it
// (shuffles): an invalid pair runs with zeros and writes nothing.
template <class T, int CG>
__device__ __forceinline__ void pair_backward(const DcnParams& p, const float* row, const T* gy_row, int m, int g,
                                              int gl, int lane, bool valid, const ScatterBox<T, CG>* box,
                                              const ValueWindow<T, CG>* win, T* gl_row = nullptr) {
  constexpr int kVec = Vec<T>::kN;
  constexpr int kLanes = CG / kVec;
  const int mm = valid ? m : 0, gg = valid ? g : 0;
  const int wo = mm % p.Wo, ho = (mm / p.Wo) % p.Ho, n = mm / (p.Wo * p.Ho);
  const int ch = gg * CG + lane * kVec;
  const float s = p.has_cfs ? row[3 * p.P] : 0.f;
  const float oms = 1.f - s;  // grad_y * oms reaches the core aggregate through the cfs blend

  float gy[kVec], ycore[kVec];
  if (valid) {
    load_vec<T>(gy_row + lane * kVec, gy);
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) gy[v] = 0.f;
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) ycore[v] = 0.f;
  const int acc_ch = gl * CG + lane * kVec;  // this lane's first channel of the CTA's groups (window, scales)
  float scale[kVec];                         // the fixed-point scales of its channels, when it scatters
#pragma unroll
  for (int v = 0; v < kVec; ++v) scale[v] = box != nullptr ? box->scale[acc_ch + v] : 0.f;

  // The pair's grad logits row (lane-uniform values after the reductions): the offsets' columns are final per
  // point and stored as they are found (one lane per point, both in one store), which keeps 2 P fewer values live
  // through the point loop; the mask columns wait for the softmax backward.
  const int ld = packed_cols(p.G);
  T* out = gl_row != nullptr ? gl_row : static_cast<T*>(p.grad_logits) + int64_t(mm) * ld + gg * kGroupCols;
  float g_mask[kMaxPoints];
#pragma unroll
  for (int q = 0; q < kMaxPoints; ++q) {
    g_mask[q] = 0.f;
    if (q >= p.P) continue;
    float x, y;
    sample_xy(p, row, q, ho, wo, x, y);
    const float mk = row[2 * p.P + q];
    Bilinear b = bilinear_at(x, y, p.H, p.W);
    uint4 corner[4];  // packed (converted where used: 4 registers a corner instead of kVec)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      corner[k] = uint4{0, 0, 0, 0};
      if (valid && b.in[k])
        corner[k] = load16(corner_ptr<T, CG>(p, win, n, b.x0 + (k & 1), b.y0 + (k >> 1), ch, acc_ch));
    }
    const float hx = 1.f - b.lx, hy = 1.f - b.ly;
    float dm = 0.f, dx = 0.f, dy = 0.f;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const float c0 = vec_elem<T>(corner[0], v), c1 = vec_elem<T>(corner[1], v);
      const float c2 = vec_elem<T>(corner[2], v), c3 = vec_elem<T>(corner[3], v);
      const float sample = b.w[0] * c0 + b.w[1] * c1 + b.w[2] * c2 + b.w[3] * c3;
      ycore[v] = fmaf(mk, sample, ycore[v]);
      const float gyc = gy[v] * oms;
      dm = fmaf(gyc, sample, dm);
      dx = fmaf(gyc, hy * (c1 - c0) + b.ly * (c3 - c2), dx);
      dy = fmaf(gyc, hx * (c2 - c0) + b.lx * (c3 - c1), dy);
    }
    g_mask[q] = lane_sum<kLanes>(dm);
    const float g_x = lane_sum<kLanes>(dx) * mk * p.offset_scale;
    const float g_y = lane_sum<kLanes>(dy) * mk * p.offset_scale;
    if (valid && lane == q % kLanes) store_pair<T>(out + 2 * q, g_x, g_y);
    if (box != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        box->add(valid && b.in[k], b.x0 + (k & 1), b.y0 + (k >> 1), gl, lane * kVec, 1, mk * b.w[k], gy, oms, scale);
    }
  }

  float g_s = 0.f;
  if (p.has_cfs) {
    float vc[kVec];
    if (valid) {
      load_vec<T>(corner_ptr<T, CG>(p, win, n, wo, ho, ch, acc_ch), vc);
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) vc[v] = 0.f;
    }
    float d = 0.f;
#pragma unroll
    for (int v = 0; v < kVec; ++v) d = fmaf(gy[v], vc[v] - ycore[v], d);
    g_s = lane_sum<kLanes>(d) * s * (1.f - s);  // through the sigmoid
    // The blend's own grad value term lands on the pair's pixel (output grid == input grid with cfs).
    if (box != nullptr) box->add(valid, wo, ho, gl, lane * kVec, 1, s, gy, 1.f, scale);
  }

  // Softmax backward over the mask: dl_q = m_q (dm_q - sum_r m_r dm_r).
  float dot = 0.f;
  if (p.apply_softmax) {
#pragma unroll
    for (int q = 0; q < kMaxPoints; ++q)
      if (q < p.P) dot = fmaf(row[2 * p.P + q], g_mask[q], dot);
  }
  if (valid) {
    // The mask and cfs columns, and (stored directly, the last group) the row's zero padding, shared by the lanes.
    constexpr int kMaxRowCols = packed_cols(1);  // a group's columns + the most row padding (odd G: 4)
    const int cols = gl_row == nullptr && gg == p.G - 1 ? ld - gg * kGroupCols : kGroupCols;
#pragma unroll
    for (int j0 = 0; j0 < kMaxRowCols; j0 += kLanes) {
      const int j = j0 + lane;
      if (j >= cols) break;
      if (j < 2 * p.P) continue;  // the offsets' columns, stored in the point loop
      float v = 0.f;
#pragma unroll
      for (int q = 0; q < kMaxPoints; ++q) {
        if (q >= p.P) continue;
        if (j == 2 * p.P + q) v = p.apply_softmax ? row[2 * p.P + q] * (g_mask[q] - dot) : g_mask[q];
      }
      if (p.has_cfs && j == 3 * p.P) v = g_s;
      out[j] = from_float<T>(v);
    }
  }
}

template <int CG, class T, int kCta = kThreads>
constexpr void check_pair_lanes() {
  constexpr int kLanes = CG / Vec<T>::kN;
  static_assert(CG % Vec<T>::kN == 0, "channels per group must be a multiple of the 16-byte vector");
  static_assert(32 % kLanes == 0, "the lanes of a pair must sit in one warp (shuffle reduction)");
  static_assert((kTileM * kGroupsPerCta * kLanes) % kCta == 0,
                "every thread runs the same trip count (shuffles need the whole warp)");
}

// grad logits only (geometries where output and value grids differ; grad value is dcn_bwd_value's).
// grid (ceil(M/64), ceil(G/2)), kThreads threads.
template <class T, int CG>
__global__ void __launch_bounds__(kThreads, 1) dcn_bwd_kernel(DcnParams p) {
  constexpr int kLanes = CG / Vec<T>::kN;
  check_pair_lanes<CG, T>();
  __shared__ DcnSmem<T> sm;
  const int M = p.N * p.Ho * p.Wo;
  const int m0 = blockIdx.x * kTileM, g0 = blockIdx.y * kGroupsPerCta;
  compute_logits<T>(p, sm, m0, g0, M);
  for (int item = threadIdx.x; item < kTileM * kGroupsPerCta * kLanes; item += kThreads) {
    const int pair = item / kLanes, lane = item % kLanes;
    const int pix = pair / kGroupsPerCta, gl = pair % kGroupsPerCta;
    const int m = m0 + pix, g = g0 + gl;
    const bool valid = m < M && g < p.G;
    const T* gy_row = valid ? static_cast<const T*>(p.grad_y) + int64_t(m) * p.C + g * CG : nullptr;
    pair_backward<T, CG>(p, logit_row(sm.logits, pix, gl), gy_row, m, g, gl, lane, valid, nullptr, nullptr);
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad value, owner-computes (see the top of this file).

struct SourceRect {
  int ho0, wo0, w;  // output pixels [ho0, ho0 + h) x [wo0, wo0 + w), h = (end - start) / w
  int end;          // running count of source pixels up to and including this rectangle
};
constexpr int kMaxRects = 32;  // rectangles per batch; more are taken in further batches

// Which source rectangles are next for the target box, and where the scan over output tiles stands.
struct RectBatch {
  SourceRect rects[kMaxRects];
  SourceRect candidate[kThreads];  // one output tile per thread per round (end = its pixel count, 0: none)
  int n_rects, next_tile;
  int cursor, chunk_rows;  // fill_chunk_rows: the next source pixel (slot) of the batch, the chunk's row count
};

// Warp 0, all lanes: the rows of the next chunk of source pixels from slot `cursor` of the batch (rows[i] < 0 past
// chunk_rows), and where the next chunk starts (batch.cursor; batch.chunk_rows = 0: the batch is done). With a group
// pair (pair >= 0), pixels whose touch mask rules out the value tile (tile_x, tile_y) are skipped; the rest keep
// their order. Every thread reads the result after a barrier.
__device__ inline void fill_chunk_rows(const DcnParams& p, RectBatch& batch, int* rows, int n, int cursor,
                                       int n_sources, int pair, int tile_x, int tile_y) {
  const int lane = int(threadIdx.x) % 32;
  int filled = 0;
  while (filled < kTileM && cursor < n_sources) {
    const int slot = cursor + lane;
    int m = -1;
    for (int i = 0, start = 0; i < batch.n_rects && m < 0 && slot < n_sources; start = batch.rects[i].end, ++i) {
      if (slot >= batch.rects[i].end) continue;
      const SourceRect& r = batch.rects[i];
      const int local = slot - start;
      m = (n * p.Ho + r.ho0 + local / r.w) * p.Wo + r.wo0 + local % r.w;
    }
    const bool keep = m >= 0 && (pair < 0 || may_touch(p, m, pair, tile_x, tile_y));
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    const int rank = __popc(kept & ((1u << lane) - 1u)), room = kTileM - filled;
    if (keep && rank < room) rows[filled + rank] = m;
    if (__popc(kept) > room) {  // the chunk is full: the next starts at the first kept pixel it had no room for
      cursor += __ffs(__ballot_sync(0xffffffffu, keep && rank == room)) - 1;
      filled = kTileM;
    } else {
      filled += __popc(kept);
      cursor += 32;
    }
  }
  for (int i = filled + lane; i < kTileM; i += 32) rows[i] = -1;
  if (lane == 0) {
    batch.cursor = cursor;
    batch.chunk_rows = filled;
  }
}

template <class T, int CG, bool kAllPairs = false>
struct DcnValueSmem {
  DcnSmem<T> dcn;
  ValueWindow<T, CG> window;  // for the own tile's value reads
  // The pair's grad logits of the own tile, stored coalesced at the end of the pair; unused (one vector) with
  // kAllPairs, whose own tile keeps all groups' in the tile after this struct (7 KiB in bf16, which let grad wpack
  // accumulate on chip at InternImage-T stage 2).
  alignas(16) T grad_logits[kAllPairs ? 16 / sizeof(T) : kTileM * kGroupsPerCta * kGroupCols];
  alignas(16) T grad_y[kTileM * kGroupsPerCta * CG];           // the chunk's (load_grad_y)
  unsigned acc_hi[AccLayout<T, CG>::kElems];                   // the target box's fixed-point accumulator:
  unsigned acc_lo[AccLayout<T, CG>::kElems];                   //   hi and lo words (AccLayout)
  float scale[kGroupsPerCta * CG];                             // fixed-point scale per channel of the image
  int rows[kTileM];                                            // the chunk's source pixels (-1: none)
  RectBatch batch;
};

// All threads (ends with a barrier; batch.next_tile = 0 and a barrier before the first call): the next batch of
// source rectangles for the target box [tx0, tx1] x [ty0, ty1] of image n, in output-tile order; n_rects = 0
// when there are no more. A source output pixel can scatter into the box only if its sampling base lies within
// its tile's reach of the box; the reach gets a margin of 1 pixel, so a bilinear corner that another kernel's
// rounding moved by one still counts. Each thread sizes one output tile's rectangle per round (the reach loads
// in parallel), thread 0 keeps the non-empty ones in order. With skip_own, the output tile at the box's own
// position is left out (the caller takes it whole).
__device__ inline void collect_source_rects(const DcnParams& p, RectBatch& batch, int n, int tx0, int tx1, int ty0,
                                            int ty1, bool skip_own) {
  const int tiles_w = ceil_div(p.Wo, kTile), tiles_h = ceil_div(p.Ho, kTile);
  const int* reach = p.reach + int64_t(n) * reach_row(p.Ho, p.Wo, p.G);
  const int bx0 = base_x(p, 0), by0 = base_y(p, 0);
  // Output tiles that can hold such a pixel at all, by the image's largest reach.
  const int rmax = reach[0] + 1;
  const int oy0 = max(0, floor_div(ceil_div_any(ty0 - rmax - by0, p.stride_h), kTile));
  const int oy1 = min(tiles_h - 1, floor_div(floor_div(ty1 + rmax - by0, p.stride_h), kTile));
  const int ox0 = max(0, floor_div(ceil_div_any(tx0 - rmax - bx0, p.stride_w), kTile));
  const int ox1 = min(tiles_w - 1, floor_div(floor_div(tx1 + rmax - bx0, p.stride_w), kTile));
  const int span_w = max(0, ox1 - ox0 + 1), span = span_w * max(0, oy1 - oy0 + 1);
  for (;;) {
    const int base = batch.next_tile, t = base + int(threadIdx.x);
    SourceRect c{0, 0, 1, 0};
    if (t < span && threadIdx.x < kThreads) {
      const int oty = oy0 + t / span_w, otx = ox0 + t % span_w;
      const int r = reach[1 + oty * tiles_w + otx] + 1;
      const int ho_lo = max(oty * kTile, ceil_div_any(ty0 - r - by0, p.stride_h));
      const int ho_hi = min(min(p.Ho, (oty + 1) * kTile) - 1, floor_div(ty1 + r - by0, p.stride_h));
      const int wo_lo = max(otx * kTile, ceil_div_any(tx0 - r - bx0, p.stride_w));
      const int wo_hi = min(min(p.Wo, (otx + 1) * kTile) - 1, floor_div(tx1 + r - bx0, p.stride_w));
      const bool own = skip_own && oty * kTile == ty0 && otx * kTile == tx0;
      if (!own && ho_lo <= ho_hi && wo_lo <= wo_hi)
        c = SourceRect{ho_lo, wo_lo, wo_hi - wo_lo + 1, (ho_hi - ho_lo + 1) * (wo_hi - wo_lo + 1)};
    }
    if (threadIdx.x < kThreads) batch.candidate[threadIdx.x] = c;  // (a wide CTA's other warps only sync)
    __syncthreads();
    if (threadIdx.x == 0) {
      int count = 0, total = 0, i = 0;
      for (; i < kThreads && base + i < span && count < kMaxRects; ++i) {
        if (batch.candidate[i].end == 0) continue;
        total += batch.candidate[i].end;
        batch.rects[count] = batch.candidate[i];
        batch.rects[count++].end = total;
      }
      batch.n_rects = count;
      batch.next_tile = min(span, base + i);
    }
    __syncthreads();
    if (batch.n_rects > 0 || batch.next_tile >= span) return;
  }
}

// Columns [col0, col0 + cols) of the own tile's grad logits into the (M, packed_cols(G)) tensor, from shared memory
// (src: 64 rows of pitch src_pitch, holding those columns), as 16-byte vectors; rows < 0 (outside the image) are
// skipped. Where the columns end at the last group's, the row's zero padding (odd G) is written too: src holds
// whatever there, zeros are stored.
template <class T, int kCta = kThreads>
__device__ void store_grad_logits(const DcnParams& p, const int* rows, const T* src, int src_pitch, int col0,
                                  int cols) {
  constexpr int kV = Vec<T>::kN;
  const int ld = packed_cols(p.G), span = col0 + cols == p.G * kGroupCols ? ld - col0 : cols;
  const int row_vecs = (span + kV - 1) / kV;
  for (int i = threadIdx.x; i < kTileM * row_vecs; i += kCta) {
    const int pix = i / row_vecs, col = (i % row_vecs) * kV, m = rows[pix];
    if (m < 0) continue;
    uint4 v = load16(src + pix * src_pitch + col);
    if (col + kV > cols) v = zero_from<T>(v, cols - col);
    store16(static_cast<T*>(p.grad_logits) + int64_t(m) * ld + col0 + col, v);
  }
}

// The grad_y of a chunk of 64 output pixels (rows: shared memory, < 0 for none) for the CTA's 2 groups, in T, into
// gy (kTileM x the 2 groups' channels, shared). With p.wout: recomputed as grad_out rows . wout (the tile GEMM,
// K = Cout, through sm's staging and logits tiles, so before compute_logits), rounded to T as a stored grad_y
// would be; else copied from p.grad_y. All threads; ends with a barrier.
template <class T, int CG, int kCta = kThreads>
__device__ void load_grad_y(const DcnParams& p, DcnSmem<T>& sm, T* gy, int g0, int M, const int* rows) {
  constexpr int kChans = kGroupsPerCta * CG;
  static_assert(kChans <= kTileN, "the 2 groups' channels fit one GEMM tile");
  const int c0 = g0 * CG;
  if (p.wout != nullptr) {
    // A(m, k) = grad_out[m*Cout + k], rows gathered; B(n, k) = wout[k*C + n]: wout read transposed in place.
    tile_gemm<T, kTileM, kTileN, false, true, 1, kCta>(sm.gemm, sm.logits, static_cast<const T*>(p.grad_out), p.Cout,
                                                       1, 0, M, static_cast<const T*>(p.wout), 1, p.C, c0,
                                                       min(p.C, c0 + kChans), 0, p.Cout, rows);
    for (int i = threadIdx.x; i < kTileM * kChans; i += kCta)
      gy[i] = from_float<T>(sm.logits[(i / kChans) * (kTileN + kAccPad) + i % kChans]);
  } else {
    constexpr int kRowVecs = kChans / Vec<T>::kN;
    for (int i = threadIdx.x; i < kTileM * kRowVecs; i += kCta) {
      const int r = i / kRowVecs, c = (i % kRowVecs) * Vec<T>::kN, m = rows[r];
      uint4 v{0, 0, 0, 0};
      if (m >= 0 && c0 + c < p.C) v = load16(static_cast<const T*>(p.grad_y) + int64_t(m) * p.C + c0 + c);
      store16(gy + r * kChans + c, v);
    }
  }
  __syncthreads();
}

// The grad logits tile of kAllPairs: (kTileM, packed_cols(G)) in T after DcnValueSmem, row pitch + kSmemPad.
template <class T>
__host__ __device__ constexpr size_t grad_logits_tile_bytes(int G) {
  return size_t(kTileM) * (packed_cols(G) + kSmemPad) * sizeof(T);
}
template <class T, int CG>
__host__ __device__ constexpr size_t bwd_smem_bytes(bool all_pairs, int G) {
  return all_pairs ? sizeof(DcnValueSmem<T, CG, true>) + grad_logits_tile_bytes<T>(G) : sizeof(DcnValueSmem<T, CG>);
}
// In a cluster of k > 1, the columns of another CTA's grad logits tile that this CTA's slice needs, copied into its
// own shared memory (64 x (wpack_slice_rows + 8) elements), and that tile's rows (64 ints).
template <class T>
__host__ __device__ constexpr size_t wpack_remote_tile_bytes(int G, int k) {
  return k > 1 ? size_t(kTileM) * (wpack_slice_rows(G, k) + kSmemPad) * sizeof(T) + kTileM * sizeof(int) : 0;
}
// What in-kernel grad wpack adds to that backward's shared memory: the CTA's fp32 slice of the partial (all of it
// at k = 1), and in a cluster the copy of another CTA's tile.
template <class T>
__host__ __device__ constexpr size_t wpack_smem_bytes(int G, int C, int k) {
  return size_t(wpack_slice_floats(G, C, k)) * sizeof(float) + wpack_remote_tile_bytes<T>(G, k);
}
// An edge tile's grad logits rows outside the image (rows < 0) hold whatever an earlier tile left: zeroed before
// grad wpack reads the tile. All threads; ends with a barrier.
template <class T, int kCta = kThreads>
__device__ void zero_rows_outside(const int* rows, T* gl_tile, int gl_pitch, int n_cols) {
  constexpr int kV = Vec<T>::kN;
  const int row_vecs = n_cols / kV;
  for (int i = threadIdx.x; i < kTileM * row_vecs; i += kCta) {
    const int pix = i / row_vecs;
    if (rows[pix] < 0) store16(gl_tile + pix * gl_pitch + (i % row_vecs) * kV, uint4{0, 0, 0, 0});
  }
  __syncthreads();
}

// A tile's share of grad wpack and grad bpack rows [j0, j1), added into the CTA's fp32 partials in shared memory:
// wpart (j1 - j0, C) += grad logits^T . x1 rows (the tile GEMM with K = the tile's 64 pixels: A is the grad logits
// tile read transposed in place, B the x1 rows gathered along k, both MN-major), bpart (j1 - j0) += the grad logits'
// column sums, each in a fixed order. rows: the tile's, < 0 outside the image (zero_rows_outside ran). gl_tile and
// rows may be another CTA's of the cluster (distributed shared memory). All threads, after the grad logits tile is
// complete; ends with a barrier.
template <class T, int kCta = kThreads>
__device__ void accumulate_wpack_grad(const DcnParams& p, DcnSmem<T>& sm, const int* rows, const T* gl_tile,
                                      int gl_pitch, int j0, int j1, float* wpart, float* bpart) {
  for (int j = j0 + int(threadIdx.x); j < j1; j += kCta) {
    float sum = 0.f;
    for (int pix = 0; pix < kTileM; ++pix) sum += to_float(gl_tile[pix * gl_pitch + j]);
    bpart[j - j0] += sum;
  }
  const T* x1 = static_cast<const T*>(p.x1);
  for (int m0 = j0; m0 < j1; m0 += kTileM) {
    for (int c0 = 0; c0 < p.C; c0 += kTileN) {
      // A(j, pix) = gl_tile[pix * gl_pitch + j]; B(c, pix) = x1[rows[pix] * C + c].
      tile_gemm<T, kTileM, kTileN, true, true, 1, kCta>(sm.gemm, sm.logits, gl_tile, 1, gl_pitch, m0, j1, x1, 1, p.C,
                                                        c0, p.C, 0, kTileM, nullptr, rows);
      for (int i = threadIdx.x; i < kTileM * kTileN; i += kCta) {
        const int r = i / kTileN, c = i % kTileN;
        if (m0 + r < j1 && c0 + c < p.C) wpart[(m0 + r - j0) * p.C + c0 + c] += sm.logits[r * (kTileN + kAccPad) + c];
      }
      __syncthreads();  // the next step's result overwrites this one
    }
  }
}

// grid (N * ceil(H/8) * ceil(W/8), ceil(G/2)) (kAllPairs: (N * ceil(H/8) * ceil(W/8))), kCta threads (kThreads, or
// kWideCta with kOwnTile: the same work in 8 warps, every loop over items strided by kCta),
// bwd_smem_bytes<T, CG>(kAllPairs, G) dynamic smem.
// kOwnTile (output grid == value grid, sampling base == the pixel: stride 1, "same" padding): the CTA's own 8x8
// tile of output pixels is taken first and whole, with its full backward (grad logits too: pair_backward), so
// no separate grad-logits kernel runs; its terms are added as they are computed.
// kAllPairs (with kOwnTile, the fused block: p.grad_x1 set): the CTA takes every group pair of its tile in turn,
// keeps the own tile's grad logits of all groups in shared memory, and ends with grad x1 = grad logits . wpack for
// its 64 pixels (64 columns per step, wpack streamed from L2): grad logits are stored for grad wpack but not read
// back for grad x1. With p.grad_wpack_partial, grad wpack accumulates here too (accumulate_wpack_grad) and grad
// logits are not stored: the grid is then p.wpack_slots persistent CTAs, each taking every wpack_slots-th tile, or
// (p.wpack_cluster = k > 1, sm_90) wpack_slots clusters of k CTAs, each round taking k consecutive tiles, one per
// CTA, after which every CTA adds its slice of the partial's rows from all k tiles' grad logits (read from the
// other CTAs' shared memory between two cluster barriers). A fixed assignment: the partials, and so the sums, do
// not depend on scheduling.
template <class T, int CG, bool kOwnTile, bool kAllPairs, int kCta = kThreads>
__global__ void __launch_bounds__(kCta, 1) dcn_bwd_value_kernel(DcnParams p) {
  static_assert(kOwnTile || !kAllPairs, "grad x1 comes from the own tile's grad logits");
  check_pair_lanes<CG, T, kCta>();
  constexpr int kVec = Vec<T>::kN;
  constexpr int kLanes = CG / kVec;  // lanes per (source pixel, group) pair, each kVec channels
  constexpr int kChans = kGroupsPerCta * CG;
  DcnValueSmem<T, CG, kAllPairs>& sm = dynamic_smem<DcnValueSmem<T, CG, kAllPairs>>();
  T* gl_tile = reinterpret_cast<T*>(&sm + 1);  // kAllPairs only
  const int n_cols = packed_cols(p.G), gl_pitch = n_cols + kSmemPad;
  // kAllPairs with p.grad_wpack_partial: the CTA's slice of grad wpack and grad bpack's partial (rows [j0, j1)
  // of wpack_partial_floats: all of it without a cluster), after the grad logits tile.
  const bool acc_wpack = kAllPairs && p.grad_wpack_partial != nullptr;
  const int cluster = acc_wpack ? max(1, p.wpack_cluster) : 1;
  const int rank = cluster > 1 ? int(cluster_rank()) : 0;
  const int slice_rows = wpack_slice_rows(p.G, cluster);
  const int j0 = min(rank * slice_rows, n_cols), j1 = min(j0 + slice_rows, n_cols);
  const int partial_floats = int(wpack_slice_floats(p.G, p.C, cluster));
  float* wpart = reinterpret_cast<float*>(reinterpret_cast<char*>(gl_tile) + grad_logits_tile_bytes<T>(p.G));
  float* bpart = wpart + slice_rows * p.C;
  // In a cluster: the copy of another CTA's tile, its columns [j0, j1) (pitch slice_rows + 8), then its rows.
  const int remote_pitch = slice_rows + kSmemPad;
  T* remote_gl = reinterpret_cast<T*>(wpart + partial_floats);
  int* remote_rows = reinterpret_cast<int*>(remote_gl + kTileM * remote_pitch);
  if (kAllPairs) {  // the tile's padding columns (odd G), which grad x1's K runs over, are zeros
    const int live = p.G * kGroupCols, pad = n_cols - live;
    for (int i = threadIdx.x; i < kTileM * pad; i += kCta) gl_tile[(i / pad) * gl_pitch + live + i % pad] = T(0.f);
  }
  if (acc_wpack)
    for (int i = threadIdx.x; i < partial_floats; i += kCta) wpart[i] = 0.f;

  const int M = p.N * p.Ho * p.Wo;
  const int tiles_w = ceil_div(p.W, kTile), tiles = tiles_w * ceil_div(p.H, kTile);
  // One tile per CTA, or (persistent, acc_wpack) every gridDim.x-th tile in turn; in clusters, rounds of one tile
  // per CTA (first: the cluster's first CTA's tile, the same for all of them, so they take the same rounds; a CTA
  // past the last tile only joins the round's grad wpack).
  const int total = p.N * tiles;
  for (int first = int(blockIdx.x) - rank; first < total; first += gridDim.x) {
    const bool has_tile = first + rank < total;
    const int task = has_tile ? first + rank : first;
    const int n = task / tiles, tile = task % tiles;
    const int tx0 = (tile % tiles_w) * kTile, ty0 = (tile / tiles_w) * kTile;
    const int tx1 = min(p.W, tx0 + kTile) - 1, ty1 = min(p.H, ty0 + kTile) - 1;
    const int g_first = kAllPairs ? 0 : blockIdx.y * kGroupsPerCta;
    const int g_last = !has_tile ? g_first : kAllPairs ? p.G : g_first + 1;
    const ScatterBox<T, CG> box{sm.acc_hi, sm.acc_lo, sm.scale, tx0, tx1, ty0, ty1};

    for (int g0 = g_first; g0 < g_last; g0 += kGroupsPerCta) {
      for (int i = threadIdx.x; i < AccLayout<T, CG>::kElems; i += kCta) sm.acc_hi[i] = sm.acc_lo[i] = 0;
      for (int i = threadIdx.x; i < kChans; i += kCta)
        sm.scale[i] = g0 * CG + i < p.C
                          ? fixed_point_scale(p.grad_y_absmax + int64_t(n) * p.C + g0 * CG + i, p.fixed_point_bits)
                          : 0.f;
      if (threadIdx.x == 0) sm.batch.next_tile = 0;
      if (kOwnTile) {
        fill_tile_rows(p, n, tx0, tx1, ty0, ty1, sm.rows);  // the own output tile: same box on the same grid
        __syncthreads();  // rows, and the accumulator's zeros and scales
        const int own_reach = p.reach[int64_t(n) * reach_row(p.Ho, p.Wo, p.G) + 1 + tile] + 1;  // the forward's, + 1
        stage_window<T, CG, kCta>(p, sm.window, n, g0, tx0, tx1, ty0, ty1, own_reach);
        load_grad_y<T, CG, kCta>(p, sm.dcn, sm.grad_y, g0, M, sm.rows);
        compute_logits<T, kCta>(p, sm.dcn, 0, g0, M, sm.rows);
        for (int item = threadIdx.x; item < kTileM * kGroupsPerCta * kLanes; item += kCta) {
          const int pair = item / kLanes, lane = item % kLanes;
          const int pix = pair / kGroupsPerCta, gl = pair % kGroupsPerCta;
          const int m = sm.rows[pix], g = g0 + gl;
          T* gl_row = kAllPairs ? gl_tile + pix * gl_pitch + g * kGroupCols : sm.grad_logits + pair * kGroupCols;
          pair_backward<T, CG>(p, logit_row(sm.dcn.logits, pix, gl), sm.grad_y + pix * kChans + gl * CG, m, g, gl, lane,
                               m >= 0 && g < p.G, &box, &sm.window, gl_row);
        }
        __syncthreads();  // the source chunks overwrite rows and logits; grad logits are complete
        carry_low_words<T, CG, kCta>(sm.acc_hi, sm.acc_lo);  // (the source chunk's rows barrier comes before its adds)
        if (!kAllPairs)
          store_grad_logits<T, kCta>(p, sm.rows, sm.grad_logits, kGroupsPerCta * kGroupCols, g0 * kGroupCols,
                               min(kGroupsPerCta, p.G - g0) * kGroupCols);
      }
      __syncthreads();  // batch.next_tile
      for (;;) {
        collect_source_rects(p, sm.batch, n, tx0, tx1, ty0, ty1, kOwnTile);
        const int n_rects = sm.batch.n_rects;
        if (n_rects == 0) break;
        const int n_sources = sm.batch.rects[n_rects - 1].end;
        // With the touch masks (one launch: the value tile is also an output tile), a chunk takes the next 64 of the
        // batch's source pixels that may scatter into the tile, skipping those whose samples all land elsewhere.
        const bool masked = kOwnTile && p.halo_masks;
        for (int cursor = 0;;) {
          if (threadIdx.x < 32) fill_chunk_rows(p, sm.batch, sm.rows, n, cursor, n_sources, masked ? g0 / 2 : -1,
                                                tx0 / kTile, ty0 / kTile);
          __syncthreads();
          if (sm.batch.chunk_rows == 0) break;
          cursor = sm.batch.cursor;
          load_grad_y<T, CG, kCta>(p, sm.dcn, sm.grad_y, g0, M, sm.rows);
          compute_logits<T, kCta>(p, sm.dcn, 0, g0, M, sm.rows);

          for (int item = threadIdx.x; item < kTileM * kGroupsPerCta * kLanes; item += kCta) {
            const int pair = item / kLanes, lane = item % kLanes;
            const int pix = pair / kGroupsPerCta, gl = pair % kGroupsPerCta;
            const int m = sm.rows[pix], g = g0 + gl;
            if (m < 0 || g >= p.G) continue;  // no collective operations below
            const int wo = m % p.Wo, ho = (m / p.Wo) % p.Ho;
            const float* row = logit_row(sm.dcn.logits, pix, gl);
            const float s = p.has_cfs ? row[3 * p.P] : 0.f;
            // Lane l owns channels l, l + kLanes, ...: in each shared atomic the pair's lanes hit consecutive words.
            float gy[kVec], scale[kVec];
  #pragma unroll
            for (int v = 0; v < kVec; ++v) {
              gy[v] = to_float(sm.grad_y[pix * kChans + gl * CG + lane + kLanes * v]);
              scale[v] = sm.scale[gl * CG + lane + kLanes * v];
            }
            for (int q = 0; q < p.P; ++q) {
              float x, y;
              sample_xy(p, row, q, ho, wo, x, y);
              const float mk = row[2 * p.P + q];
              Bilinear b = bilinear_at(x, y, p.H, p.W);
  #pragma unroll
              for (int k = 0; k < 4; ++k)
                box.add(b.in[k], b.x0 + (k & 1), b.y0 + (k >> 1), gl, lane, kLanes, mk * b.w[k], gy, 1.f - s, scale);
            }
            // The center-feature-scale blend's term lands on the source pixel itself (output grid == input grid).
            if (p.has_cfs) box.add(true, wo, ho, gl, lane, kLanes, s, gy, 1.f, scale);
          }
          __syncthreads();  // the next chunk overwrites rows and logits
          carry_low_words<T, CG, kCta>(sm.acc_hi, sm.acc_lo);  // (its rows barrier comes before its adds)
        }
      }
      __syncthreads();  // the last carries

      // The tile is complete: grad value = accumulator / its (image, channel) scale, NaN where grad_y was not finite;
      // a thread converts kVec channels of a pixel and stores them as one 16-byte vector (a vector lies wholly in one
      // group: Cg is a multiple of it).
      T* grad_value = static_cast<T*>(p.grad_value);
      constexpr int kPixVecs = kChans / kVec;
      for (int i = threadIdx.x; i < kTile * kTile * kPixVecs; i += kCta) {
        const int pix = i / kPixVecs, cl = (i % kPixVecs) * kVec, c = g0 * CG + cl;
        const int x = tx0 + pix % kTile, y = ty0 + pix / kTile;
        if (x > tx1 || y > ty1 || c >= p.C) continue;
        float absmax[kVec], v[kVec];
        load_f32<kVec>(p.grad_y_absmax + int64_t(n) * p.C + c, absmax);
  #pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int at = AccLayout<T, CG>::at(pix, (cl + j) / CG, (cl + j) % CG);
          const float q =
              static_cast<float>(static_cast<double>(fixed_point_value(sm.acc_hi[at], sm.acc_lo[at])) / sm.scale[cl + j]);
          v[j] = isfinite(absmax[j]) ? q : NAN;
        }
        store_vec<T>(grad_value + ((int64_t(n) * p.H + y) * p.W + x) * p.C + c, v);
      }
      __syncthreads();  // the next pair zeroes the accumulator
    }
    if (!kAllPairs) continue;

    // The own tile's grad logits, all groups: stored (16-byte vectors, for grad wpack) unless grad wpack accumulates
    // here, and grad x1 = grad logits . wpack (K = packed_cols(G), B(n, k) = wpack[k*C + n]: read transposed in place),
    // 64 columns per step.
    if (has_tile) {
      fill_tile_rows(p, n, tx0, tx1, ty0, ty1, sm.rows);
      __syncthreads();
      if (p.grad_logits != nullptr) store_grad_logits<T, kCta>(p, sm.rows, gl_tile, gl_pitch, 0, p.G * kGroupCols);
      project_tile<T, true, kCta>(sm.dcn, sm.rows, gl_tile, gl_pitch, n_cols, static_cast<const T*>(p.wpack), 1, p.C,
                                  p.C, nullptr, static_cast<T*>(p.grad_x1));
      if (acc_wpack && (tx1 - tx0 + 1 < kTile || ty1 - ty0 + 1 < kTile))
        zero_rows_outside<T, kCta>(sm.rows, gl_tile, gl_pitch, n_cols);
    }
    if (!acc_wpack) continue;
    // grad wpack: the CTA's rows [j0, j1) from the round's tiles (one CTA: its own tile, all rows), the others' grad
    // logits columns and rows copied from their shared memory between two cluster barriers (once per tile, as
    // 16-byte vectors: the tile GEMMs then stage from local shared memory, not across the cluster). One call site
    // of the GEMM (the fp32 kernel spilled with two).
    if (cluster > 1) cluster_sync();  // every CTA's grad logits tile and rows are complete and visible
    for (int r = 0; r < cluster; ++r) {
      if (first + r >= total) continue;
      const int* rows = sm.rows;
      const T* gl = gl_tile;
      int pitch = gl_pitch, col0 = j0, col1 = j1;
      if (r != rank) {
        const T* their_gl = cluster_map_shared(gl_tile, r);
        const int* their_rows = cluster_map_shared(sm.rows, r);
        constexpr int kV = Vec<T>::kN;
        const int row_vecs = (j1 - j0) / kV;
        for (int i = threadIdx.x; i < kTileM * row_vecs; i += kCta) {
          const int pix = i / row_vecs, col = (i % row_vecs) * kV;
          store16(remote_gl + pix * remote_pitch + col, load16(their_gl + pix * gl_pitch + j0 + col));
        }
        for (int i = threadIdx.x; i < kTileM; i += kCta) remote_rows[i] = their_rows[i];
        __syncthreads();
        rows = remote_rows, gl = remote_gl, pitch = remote_pitch, col0 = 0, col1 = j1 - j0;
      }
      accumulate_wpack_grad<T, kCta>(p, sm.dcn, rows, gl, pitch, col0, col1, wpart, bpart);
    }
    if (cluster > 1) cluster_sync();  // all have read them: the next round may overwrite them (no CTA exits early)
  }
  if (!acc_wpack) return;
  // The CTA's slice of its slot's partial (slot: the cluster), rows [j0, j1) of grad wpack, then of grad bpack
  // (16-byte vectors: j0 and j1 are multiples of 8).
  __syncthreads();
  float* out = p.grad_wpack_partial + int64_t(blockIdx.x / cluster) * wpack_partial_floats(p.G, p.C);
  const int w_floats = (j1 - j0) * p.C;
  for (int i = threadIdx.x * 4; i < w_floats; i += kCta * 4) store16(out + int64_t(j0) * p.C + i, load16(wpart + i));
  for (int i = threadIdx.x * 4; i < j1 - j0; i += kCta * 4)
    store16(out + int64_t(n_cols) * p.C + j0 + i, load16(bpart + i));
}

// The largest dynamic shared memory a CTA may opt in to (sm_90: 227 KiB; the emulation enforces the same).
constexpr size_t kMaxDynamicSmem = 227 * 1024;

// Whether dcn_fwd_out's y tile fits for C channels (bf16/fp16 up to C = 1280, fp32 up to 640).
template <class T, int CG>
bool fwd_out_fits(int C) {
  return fwd_smem_bytes<T, CG>(true, C) <= kMaxDynamicSmem;
}

// p.out set: the output projection fused (the caller checked fwd_out_fits); else y only.
template <class T, int CG>
void launch_dcn_fwd(const DcnParams& p, cudaStream_t stream) {
  const int tiles = p.N * ((p.Ho + kTile - 1) / kTile) * ((p.Wo + kTile - 1) / kTile);
  if (p.out != nullptr) {
    launch_kernel("dcn_fwd_out", dcn_fwd_kernel<T, CG, true>, dim3(tiles), dim3(kThreads),
                  fwd_smem_bytes<T, CG>(true, p.C), stream, p);
    return;
  }
  launch_kernel("dcn_fwd", dcn_fwd_kernel<T, CG, false>, dim3(tiles, (p.G + kGroupsPerCta - 1) / kGroupsPerCta),
                dim3(kThreads), fwd_smem_bytes<T, CG>(false, p.C), stream, p);
}

// Whether the backward can fuse grad x1 (p.grad_x1) for G groups: its grad logits tile fits on chip (at 32 channels
// per group: bf16/fp16 up to 34 groups, fp32 up to 13).
template <class T, int CG>
bool bwd_x1_fits(int G) {
  return bwd_smem_bytes<T, CG>(true, G) <= kMaxDynamicSmem;
}

// Whether, with grad x1 fused, grad wpack can also accumulate in the backward (p.grad_wpack_partial) in clusters of
// k CTAs (1: none): a CTA's slice of the fp32 partial, wpack_slice_rows(G, k) x (C + 1), fits beside the grad logits
// tile (16-bit types, k = 1: up to C = 128 at 16 channels per group, InternImage-T stages 1-2, with 1.2 KiB to spare
// at C = 128; up to 160 at 32; fp32: 96 and 128. k = 8: InternImage-T stage 3 and -H stage 1 too).
template <class T, int CG>
bool bwd_wpack_fits(int G, int C, int k) {
  return bwd_smem_bytes<T, CG>(true, G) + wpack_smem_bytes<T>(G, C, k) <= kMaxDynamicSmem;
}

// How many clusters of k > 1 CTAs of that backward (`threads` per CTA, its shared memory for G, C) the device holds
// at once (cudaOccupancyMaxActiveClusters): 8 CTAs of up to 227 KiB need 8 free SMs of one GPC; 0 where none fits
// (a launch would fail). The emulation has no such limit: an H100/H200's 132 SMs over k, as its SM count.
template <class T, int CG>
int bwd_wpack_clusters(int G, int C, int k, int threads) {
  const size_t smem = bwd_smem_bytes<T, CG>(true, G) + wpack_smem_bytes<T>(G, C, k);
#ifdef DCNV3_EMULATION
  (void)smem;
  (void)threads;
  return 132 / k;
#else
  auto kernel = threads == kWideCta ? dcn_bwd_value_kernel<T, CG, true, true, kWideCta>
                                    : dcn_bwd_value_kernel<T, CG, true, true>;
  opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(dim3(k), dim3(threads), smem, nullptr, k, attribute);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: "none" is the answer, not an error of the next launch
    return 0;
  }
  return clusters;
#endif
}

// The backward, given the forward's reach (p.reach): one launch when the output grid is the value grid with the
// sampling base on the pixel itself (with grad x1 as its epilogue when p.grad_x1 is set: the caller checked
// bwd_x1_fits; 8 warps per CTA when p.cta_threads asks, else 4); else grad logits, then grad value.
template <class T, int CG>
void launch_dcn_bwd(const DcnParams& p, cudaStream_t stream) {
  const int groups = (p.G + kGroupsPerCta - 1) / kGroupsPerCta;
  const int tiles = p.N * ((p.H + kTile - 1) / kTile) * ((p.W + kTile - 1) / kTile);
  const bool own_tile = p.Ho == p.H && p.Wo == p.W && p.stride_h == 1 && p.stride_w == 1 &&
                        p.pad_h == p.center_h && p.pad_w == p.center_w;
  DcnParams q = p;
  q.fixed_point_bits = fixed_point_bits(p.Ho, p.Wo, p.P, p.has_cfs, p.apply_softmax);
  const bool wide = p.cta_threads == kWideCta;
  const dim3 cta(wide ? kWideCta : kThreads);
  if (own_tile && p.grad_x1 != nullptr) {
    const bool acc_wpack = p.grad_wpack_partial != nullptr;
    const int cluster = acc_wpack ? std::max(1, p.wpack_cluster) : 1;
    if (acc_wpack && (p.wpack_slots < 1 || p.wpack_slots > tiles))
      throw std::invalid_argument("dcnv3: grad wpack's slots must be between 1 and the number of tiles");
    if (cluster > 8) throw std::invalid_argument("dcnv3: grad wpack's clusters hold at most 8 CTAs");
    launch_cluster_kernel(
        "dcn_bwd_x1", wide ? dcn_bwd_value_kernel<T, CG, true, true, kWideCta> : dcn_bwd_value_kernel<T, CG, true, true>,
        dim3(acc_wpack ? p.wpack_slots * cluster : tiles), cta,
        bwd_smem_bytes<T, CG>(true, p.G) + (acc_wpack ? wpack_smem_bytes<T>(p.G, p.C, cluster) : 0),
        stream, unsigned(cluster), q);
    return;
  }
  if (p.grad_wpack_partial != nullptr)
    throw std::invalid_argument("dcnv3: grad wpack accumulates only in the one-launch backward with grad x1");
  if (own_tile) {
    launch_kernel("dcn_bwd_value",
                  wide ? dcn_bwd_value_kernel<T, CG, true, false, kWideCta> : dcn_bwd_value_kernel<T, CG, true, false>,
                  dim3(tiles, groups), cta, bwd_smem_bytes<T, CG>(false, p.G), stream, q);
    return;
  }
  if (p.wout != nullptr || p.grad_x1 != nullptr)
    throw std::invalid_argument("dcnv3: grad_y from grad_out and grad x1 need the one-launch geometry");
  const int M = p.N * p.Ho * p.Wo;
  launch_kernel("dcn_bwd", dcn_bwd_kernel<T, CG>, dim3((M + kTileM - 1) / kTileM, groups), dim3(kThreads), stream,
                p);
  launch_kernel("dcn_bwd_value", dcn_bwd_value_kernel<T, CG, false, false>, dim3(tiles, groups), dim3(kThreads),
                bwd_smem_bytes<T, CG>(false, p.G), stream, q);
}

}  // namespace dcnv3
