// The projection GEMMs of the DCN block that are not fused into the sampling kernels, and the fixed-order
// reductions around them (split-K sums, bias-gradient column sums, max|grad|).
// Every reduction here has a fixed order: results are bitwise reproducible run to run.
#pragma once

#include <algorithm>

#include "params.h"
#include "tile_gemm.cuh"

namespace dcnv3 {

// grid (ceil(M/64), ceil(N/64), splits), kThreads threads.
template <class T>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p) {
  __shared__ TileGemmSmem<T> sm;
  __shared__ float acc[kTileM * (kTileN + kAccPad)];
  const int m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  const int k_begin = blockIdx.z * p.k_per_split;
  const int k_end = min(p.K, k_begin + p.k_per_split);
  tile_gemm<T>(sm, acc, static_cast<const T*>(p.a), p.a_m, p.a_k, m0, p.M, static_cast<const T*>(p.b), p.b_n,
               p.b_k, n0, p.N, k_begin, k_end);
  // Epilogue: rows of the tile, n fastest across threads (coalesced stores).
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    int r = idx / kTileN, c = idx % kTileN;
    int m = m0 + r, n = n0 + c;
    if (m >= p.M || n >= p.N) continue;
    float v = acc[r * (kTileN + kAccPad) + c];
    if (p.out_f32 != nullptr) {
      p.out_f32[blockIdx.z * p.out_split_stride + int64_t(m) * p.N + n] = v;
    } else {
      if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
      static_cast<T*>(p.out)[int64_t(m) * p.N + n] = from_float<T>(v);
    }
  }
}

// out (M, N) T = sum over splits s = 0, 1, ... in order of partial[s] (+ bias).
template <class T>
__global__ void __launch_bounds__(256) split_reduce_kernel(ReduceParams p) {
  const int64_t total = int64_t(p.M) * p.N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += p.partial[s * total + i];
    if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[i % p.N]);
    static_cast<T*>(p.out)[i] = from_float<T>(v);
  }
}

// Column sums of x (M, N) T, pass 1: partial (splits, N) fp32, split s sums rows [s*rows, (s+1)*rows).
// grid (ceil(N/256), splits).
template <class T>
__global__ void __launch_bounds__(256) colsum_partial_kernel(const T* x, int M, int N, int rows_per_split,
                                                             float* partial) {
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  int r0 = blockIdx.y * rows_per_split, r1 = min(M, r0 + rows_per_split);
  float v = 0.f;
  for (int r = r0; r < r1; ++r) v += to_float(x[int64_t(r) * N + n]);
  partial[int64_t(blockIdx.y) * N + n] = v;
}

// absmax (N, C) fp32 = max |x[n, r, c]| over the rows r of x (N, R, C) fp32 (absmax must start at 0): the
// per-(image, channel) scale of the fixed-point grad_value. +inf where x holds a non-finite value, so the
// finalisation can hand NaN on (loss-scaling overflow checks must still see it). Max is order-independent:
// atomicMax on the bit pattern of non-negative floats is exact and deterministic.
// grid (ceil(C/256), row splits, N); a template so that every TU including this header shares one definition.
template <int kBlock>
__global__ void __launch_bounds__(kBlock) absmax_rows_kernel(const float* x, int R, int C, int rows_per_split,
                                                             float* absmax) {
  const int c = blockIdx.x * kBlock + threadIdx.x;
  if (c >= C) return;
  const int n = blockIdx.z, r0 = blockIdx.y * rows_per_split, r1 = min(R, r0 + rows_per_split);
  const float* col = x + int64_t(n) * R * C + c;
  float m = 0.f;
  for (int r = r0; r < r1; ++r) {
    const float a = fabsf(col[int64_t(r) * C]);
    m = (a <= 3.402823466e38f) ? fmaxf(m, a) : INFINITY;  // NaN and inf both become +inf
  }
  atomicMax(reinterpret_cast<int*>(absmax + int64_t(n) * C + c), __float_as_int(m));
}

template <class T>
void launch_gemm(const GemmParams& p, int splits, cudaStream_t stream) {
  dim3 grid((p.M + kTileM - 1) / kTileM, (p.N + kTileN - 1) / kTileN, splits);
  launch_kernel("gemm", gemm_kernel<T>, grid, dim3(kThreads), stream, p);
}

template <class T>
void launch_split_reduce(const ReduceParams& p, cudaStream_t stream) {
  int64_t total = int64_t(p.M) * p.N;
  int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65536));
  launch_kernel("split_reduce", split_reduce_kernel<T>, dim3(blocks), dim3(256), stream, p);
}

template <class T>
void launch_colsum_partial(const void* x, int M, int N, int splits, float* partial, cudaStream_t stream) {
  int rows = (M + splits - 1) / splits;
  dim3 grid((N + 255) / 256, splits);
  launch_kernel("colsum_partial", colsum_partial_kernel<T>, grid, dim3(256), stream, static_cast<const T*>(x), M, N,
                rows, partial);
}

// absmax (N, C) of x (N, R, C); about 4 row splits per SM-sized wave keep it bandwidth-bound for small N*C.
inline void launch_absmax_rows(const float* x, int N, int R, int C, float* absmax, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int col_blocks = (C + kBlock - 1) / kBlock;
  const int splits = std::max(1, std::min((R + 63) / 64, 1024 / std::max(1, N * col_blocks)));
  const int rows = (R + splits - 1) / splits;
  launch_kernel("absmax_rows", absmax_rows_kernel<kBlock>, dim3(col_blocks, (R + rows - 1) / rows, N), dim3(kBlock),
                stream, x, R, C, rows, absmax);
}

}  // namespace dcnv3
