// Instantiation unit: projection GEMM and fixed-order reductions, element type float.
#include <algorithm>

#include "../gemm.cuh"
#include "../launch.h"

namespace dcnv3 {

void gemm_f32(const GemmParams& p, int splits, cudaStream_t stream) { launch_gemm<float>(p, splits, stream); }

void absmax_rows_f32(const void* x, int N, int R, int C, float* absmax, cudaStream_t stream) {
  launch_absmax_rows<float>(x, N, R, C, absmax, stream);
}

void sum_slots_f32(const float* partial, int slots, int64_t count, int64_t split, void* out, void* out_tail,
                    cudaStream_t stream) {
  launch_sum_slots<float>(partial, slots, count, split, out, out_tail, stream);
}

}  // namespace dcnv3
