// Instantiation unit: projection GEMM and fixed-order reductions, element type float.
#include <algorithm>

#include "../gemm.cuh"
#include "../launch.h"

namespace dcnv3 {

void gemm_f32(const GemmParams& p, int splits, cudaStream_t stream) { launch_gemm<float>(p, splits, stream); }

void split_reduce_f32(const ReduceParams& p, cudaStream_t stream) { launch_split_reduce<float>(p, stream); }

void colsum_partial_f32(const void* x, int M, int N, int splits, float* partial, cudaStream_t stream) {
  launch_colsum_partial<float>(x, M, N, splits, partial, stream);
}

void fixed_point_finalize_f32(const unsigned long long* acc, int64_t count, const float* absmax, void* out,
                             cudaStream_t stream) {
  launch_fixed_point_finalize<float>(acc, count, absmax, out, stream);
}

void absmax_f32(const float* x, int64_t count, float* out, cudaStream_t stream) {
  int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
  absmax_kernel<<<std::max(blocks, 1), 256, 0, stream>>>(x, count, out);
}

}  // namespace dcnv3
