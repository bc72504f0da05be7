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


void absmax_rows_f32(const float* x, int N, int R, int C, float* absmax, cudaStream_t stream) {
  launch_absmax_rows(x, N, R, C, absmax, stream);
}

}  // namespace dcnv3
