// Instantiation unit: DCN forward sampling kernel, element type cutlass::half_t (compiled per arch by the build).
#include <stdexcept>

#include "../dcn_kernels.cuh"
#include "../launch.h"

namespace dcnv3 {

void dcn_fwd_f16(int channels_per_group, const DcnParams& p, cudaStream_t stream) {
  switch (channels_per_group) {
    case 16: launch_dcn_fwd<cutlass::half_t, 16>(p, stream); break;
    case 32: launch_dcn_fwd<cutlass::half_t, 32>(p, stream); break;
    default: throw std::invalid_argument("dcnv3: no forward kernel for this channels-per-group");
  }
}

bool dcn_fwd_out_fits_f16(int channels_per_group, int C) {
  return channels_per_group == 16 ? fwd_out_fits<cutlass::half_t, 16>(C) : fwd_out_fits<cutlass::half_t, 32>(C);
}

}  // namespace dcnv3
