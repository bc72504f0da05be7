// The projection GEMMs of the DCN block that are not fused into the sampling kernels, with their fixed-order
// reductions (split-K sums, bias-gradient row sums and per-image max|grad_out| in the same launch; max|grad_y|
// alone for the core op).
// Every reduction here has a fixed order: results are bitwise reproducible run to run.
#pragma once

#include <algorithm>

#include "params.h"
#include "tile_gemm.cuh"

namespace dcnv3 {

// The largest |x| as the bits of a non-negative float (NaN and inf become +inf: the finalisation hands NaN on).
__device__ __forceinline__ float abs_or_inf(float x) {
  const float a = fabsf(x);
  return a <= 3.402823466e38f ? a : INFINITY;
}

// K-steps in flight in the standalone GEMM's cp.async pipeline: 3 for 16-bit types (their slots fit under the
// 128x128 result tile they share memory with), 2 for fp32.
template <class T>
constexpr int kGemmStages = sizeof(T) == 2 ? 3 : 2;

// The staging slots and the fp32 result tile share shared memory (the result is written after the last stage).
template <class T, int BM, int BN>
union GemmSmem {
  TileGemmSmem<T, BM, BN, kGemmStages<T>> stage;
  float acc[BM * (BN + kAccPad)];
};

// A BM x BN output tile per CTA (64 or 128 each, by the launcher: fewer re-reads of A and B from L2 than 64x64).
// kAMN / kBMN: the operand is read transposed in place (unit stride along its rows) and staged MN-major.
// grid (ceil(M/BM), ceil(N/BN), splits), kThreads threads, sizeof(GemmSmem<T, BM, BN>) dynamic smem.
template <class T, int BM, int BN, bool kAMN, bool kBMN>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(GemmParams p) {
  GemmSmem<T, BM, BN>& sm = dynamic_smem<GemmSmem<T, BM, BN>>();
  float* acc = sm.acc;
  __shared__ bool last_split;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int k_begin = blockIdx.z * p.k_per_split;
  const int k_end = min(p.K, k_begin + p.k_per_split);
  const T* a = static_cast<const T*>(p.a);
  tile_gemm<T, BM, BN, kAMN, kBMN, kGemmStages<T>>(sm.stage, acc, a, p.a_m, p.a_k, m0, p.M, static_cast<const T*>(p.b),
                                                   p.b_n, p.b_k, n0, p.N, k_begin, k_end);
  // Row sums of A over this split's K range (a bias gradient) and/or A's per-group absmax: the tiles of the first
  // column, a row per thread.
  const int sum_row = m0 + threadIdx.x;
  const bool reads_row = (p.row_sum_out != nullptr || p.a_absmax != nullptr) && blockIdx.y == 0 &&
                         int(threadIdx.x) < BM && sum_row < p.M;
  const bool sums_row = reads_row && p.row_sum_out != nullptr;
  float row_sum = 0.f;
  if (reads_row) {
    float mx = 0.f;
    for (int k = k_begin; k < k_end; ++k) {
      const float v = to_float(a[sum_row * p.a_m + int64_t(k) * p.a_k]);
      row_sum += v;
      if (p.a_absmax == nullptr) continue;
      mx = fmaxf(mx, abs_or_inf(v));
      const int group = k / p.a_rows_per_group;
      if (k + 1 == k_end || (k + 1) / p.a_rows_per_group != group) {
        atomicMax(reinterpret_cast<int*>(p.a_absmax + int64_t(group) * p.M + sum_row), __float_as_int(mx));
        mx = 0.f;
      }
    }
  }
  // Split-K partials and their sums move as 16-byte vectors (kV values per thread) where every row is whole
  // vectors (N a multiple of kV, aligned: every projection of the block), element by element otherwise; n is
  // fastest across threads (coalesced).
  constexpr int kV = Vec<T>::kN;
  static_assert(((BN + kAccPad) * sizeof(float)) % 16 == 0 && BN % kV == 0, "result rows in whole vectors");
  const bool vec = p.N % kV == 0 && reinterpret_cast<uintptr_t>(p.out_f32) % 16 == 0;
  const int step = vec ? kV : 1;  // columns per thread per item
  if (gridDim.z > 1) {
    // Split-K: write this split's partials and count the split in; the last split of the tile to arrive sums all
    // of them in split order (into acc and row_sum) and goes on to the epilogue, the others are done.
    for (int idx = threadIdx.x; idx < BM * BN / step; idx += kThreads) {
      const int r = idx / (BN / step), c = idx % (BN / step) * step, m = m0 + r, n = n0 + c;
      if (m >= p.M || n >= p.N) continue;
      float* dst = p.out_f32 + blockIdx.z * p.out_split_stride + int64_t(m) * p.N + n;
      const float* src = acc + r * (BN + kAccPad) + c;
      if (!vec) {
        *dst = *src;
        continue;
      }
      for (int i = 0; i < kV; i += 4) store16(dst + i, load16(src + i));
    }
    if (sums_row) p.row_sum_partial[int64_t(blockIdx.z) * p.M + sum_row] = row_sum;
    __threadfence();  // this CTA's partials are visible before it counts itself
    __syncthreads();
    if (threadIdx.x == 0)
      last_split = atomicAdd(p.tile_counters + blockIdx.y * gridDim.x + blockIdx.x, 1u) == gridDim.z - 1;
    __syncthreads();
    if (!last_split) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < BM * BN / step; idx += kThreads) {
      const int r = idx / (BN / step), c = idx % (BN / step) * step, m = m0 + r, n = n0 + c;
      if (m >= p.M || n >= p.N) continue;
      const float* src = p.out_f32 + int64_t(m) * p.N + n;
      float* dst = acc + r * (BN + kAccPad) + c;  // each thread rewrites only the elements it reads
      if (!vec) {
        float v = 0.f;
        for (unsigned z = 0; z < gridDim.z; ++z) v += src[z * p.out_split_stride];
        *dst = v;
        continue;
      }
      for (int i = 0; i < kV; i += 4) {
        float v[4] = {0.f, 0.f, 0.f, 0.f}, part[4];
        for (unsigned z = 0; z < gridDim.z; ++z) {
          load_f32<4>(src + z * p.out_split_stride + i, part);
#pragma unroll
          for (int j = 0; j < 4; ++j) v[j] += part[j];
        }
        store_f32<4>(dst + i, v);
      }
    }
    if (sums_row) {
      row_sum = 0.f;
      for (unsigned z = 0; z < gridDim.z; ++z) row_sum += p.row_sum_partial[int64_t(z) * p.M + sum_row];
    }
  }
  if (sums_row) static_cast<T*>(p.row_sum_out)[sum_row] = from_float<T>(row_sum);
  // Epilogue: + bias, rounded to T.
  store_result_tile<T, BM, BN>(acc, [&](int r) { return m0 + r < p.M ? int64_t(m0 + r) : int64_t(-1); }, n0, p.N,
                               static_cast<const T*>(p.bias), static_cast<T*>(p.out));
}

// absmax (N, C) fp32 = max |x[n, r, c]| over the rows r of x (N, R, C) T (absmax must start at 0): the
// per-(image, channel) scale of the fixed-point grad_value. +inf where x holds a non-finite value, so the
// finalisation can hand NaN on (loss-scaling overflow checks must still see it). Max is order-independent:
// atomicMax on the bit pattern of non-negative floats is exact and deterministic.
// grid (ceil(C/256), row splits, N); a template so that every TU including this header shares one definition.
template <class T, int kBlock>
__global__ void __launch_bounds__(kBlock) absmax_rows_kernel(const T* x, int R, int C, int rows_per_split,
                                                             float* absmax) {
  const int c = blockIdx.x * kBlock + threadIdx.x;
  if (c >= C) return;
  const int n = blockIdx.z, r0 = blockIdx.y * rows_per_split, r1 = min(R, r0 + rows_per_split);
  const T* col = x + int64_t(n) * R * C + c;
  float m = 0.f;
  for (int r = r0; r < r1; ++r) m = fmaxf(m, abs_or_inf(to_float(col[int64_t(r) * C])));
  atomicMax(reinterpret_cast<int*>(absmax + int64_t(n) * C + c), __float_as_int(m));
}

// The fixed-order sum of per-CTA partials (grad wpack and grad bpack accumulated in the backward's persistent CTAs,
// DcnParams::grad_wpack_partial): element i of sum over s, in order, of partial[s * count + i] fp32 goes to T
// out[i] for i < split, else out_tail[i - split] (one partial holds two tensors, one after the other).
template <class T>
__global__ void __launch_bounds__(kThreads) sum_slots_kernel(const float* partial, int slots, int64_t count,
                                                             int64_t split, T* out, T* out_tail) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= count) return;
  float sum = 0.f;
  for (int s = 0; s < slots; ++s) sum += partial[s * count + i];
  (i < split ? out[i] : out_tail[i - split]) = from_float<T>(sum);
}

template <class T>
void launch_sum_slots(const float* partial, int slots, int64_t count, int64_t split, void* out, void* out_tail,
                      cudaStream_t stream) {
  launch_kernel("sum_slots", sum_slots_kernel<T>, dim3(unsigned((count + kThreads - 1) / kThreads)), dim3(kThreads),
                stream, partial, slots, count, split, static_cast<T*>(out), static_cast<T*>(out_tail));
}

// An operand is staged MN-major when its unit stride runs along its rows (a transposed weight or a weight
// gradient's operand): one 16-byte shared store per 16-byte load, fragments through ldmatrix.trans.
template <class T, int BM, int BN>
void launch_gemm_tiles(const GemmParams& p, int splits, cudaStream_t stream) {
  dim3 grid((p.M + BM - 1) / BM, (p.N + BN - 1) / BN, splits);
  const bool a_mn = p.a_k != 1 && p.a_m == 1, b_mn = p.b_k != 1 && p.b_n == 1;
  auto kernel = a_mn ? (b_mn ? gemm_kernel<T, BM, BN, true, true> : gemm_kernel<T, BM, BN, true, false>)
                     : (b_mn ? gemm_kernel<T, BM, BN, false, true> : gemm_kernel<T, BM, BN, false, false>);
  launch_kernel("gemm", kernel, grid, dim3(kThreads), sizeof(GemmSmem<T, BM, BN>), stream, p);
}

// 128-wide tiles where the matrix is wider than 64 (a 64-wide matrix would waste half of one).
template <class T>
void launch_gemm(const GemmParams& p, int splits, cudaStream_t stream) {
  if (p.M > 64 && p.N > 64) launch_gemm_tiles<T, 128, 128>(p, splits, stream);
  else if (p.M > 64) launch_gemm_tiles<T, 128, 64>(p, splits, stream);
  else if (p.N > 64) launch_gemm_tiles<T, 64, 128>(p, splits, stream);
  else launch_gemm_tiles<T, 64, 64>(p, splits, stream);
}

// absmax (N, C) of x (N, R, C); about 4 row splits per SM-sized wave keep it bandwidth-bound for small N*C.
template <class T>
void launch_absmax_rows(const void* x, int N, int R, int C, float* absmax, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int col_blocks = (C + kBlock - 1) / kBlock;
  const int splits = std::max(1, std::min((R + 63) / 64, 1024 / std::max(1, N * col_blocks)));
  const int rows = (R + splits - 1) / splits;
  launch_kernel("absmax_rows", absmax_rows_kernel<T, kBlock>, dim3(col_blocks, (R + rows - 1) / rows, N),
                dim3(kBlock), stream, static_cast<const T*>(x), R, C, rows, absmax);
}

}  // namespace dcnv3
