// Instantiation unit: DCN backward sampling kernel, element type cutlass::bfloat16_t (compiled per arch by the build).
#include <stdexcept>

#include "../dcn_kernels.cuh"
#include "../launch.h"

namespace dcnv3 {

void dcn_bwd_bf16(int channels_per_group, const DcnParams& p, cudaStream_t stream) {
  switch (channels_per_group) {
    case 16: launch_dcn_bwd<cutlass::bfloat16_t, 16>(p, stream); break;
    case 32: launch_dcn_bwd<cutlass::bfloat16_t, 32>(p, stream); break;
    default: throw std::invalid_argument("dcnv3: no backward kernel for this channels-per-group");
  }
}

bool dcn_bwd_x1_fits_bf16(int channels_per_group, int G) {
  return channels_per_group == 16 ? bwd_x1_fits<cutlass::bfloat16_t, 16>(G) : bwd_x1_fits<cutlass::bfloat16_t, 32>(G);
}

bool dcn_bwd_wpack_fits_bf16(int channels_per_group, int G, int C, int cluster) {
  return channels_per_group == 16 ? bwd_wpack_fits<cutlass::bfloat16_t, 16>(G, C, cluster)
                                  : bwd_wpack_fits<cutlass::bfloat16_t, 32>(G, C, cluster);
}

int dcn_bwd_wpack_clusters_bf16(int channels_per_group, int G, int C, int cluster, int threads) {
  return channels_per_group == 16 ? bwd_wpack_clusters<cutlass::bfloat16_t, 16>(G, C, cluster, threads)
                                  : bwd_wpack_clusters<cutlass::bfloat16_t, 32>(G, C, cluster, threads);
}

}  // namespace dcnv3
