// Instantiation unit: projection GEMM and fixed-order reductions, element type cutlass::half_t.
#include <algorithm>

#include "../gemm.cuh"
#include "../launch.h"

namespace dcnv3 {

void gemm_f16(const GemmParams& p, int splits, cudaStream_t stream) { launch_gemm<cutlass::half_t>(p, splits, stream); }

void absmax_rows_f16(const void* x, int N, int R, int C, float* absmax, cudaStream_t stream) {
  launch_absmax_rows<cutlass::half_t>(x, N, R, C, absmax, stream);
}

void sum_slots_f16(const float* partial, int slots, int64_t count, int64_t split, void* out, void* out_tail,
                    cudaStream_t stream) {
  launch_sum_slots<cutlass::half_t>(partial, slots, count, split, out, out_tail, stream);
}

}  // namespace dcnv3
