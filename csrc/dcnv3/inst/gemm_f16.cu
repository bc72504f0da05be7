// Instantiation unit: projection GEMM and fixed-order reductions, element type cutlass::half_t.
#include <algorithm>

#include "../gemm.cuh"
#include "../launch.h"

namespace dcnv3 {

void gemm_f16(const GemmParams& p, int splits, cudaStream_t stream) { launch_gemm<cutlass::half_t>(p, splits, stream); }

void split_reduce_f16(const ReduceParams& p, cudaStream_t stream) { launch_split_reduce<cutlass::half_t>(p, stream); }

void colsum_partial_f16(const void* x, int M, int N, int splits, float* partial, cudaStream_t stream) {
  launch_colsum_partial<cutlass::half_t>(x, M, N, splits, partial, stream);
}


}  // namespace dcnv3
