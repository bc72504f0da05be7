// Host-side entry points of the kernels, one set per element type, defined in inst/*.cu. Plain C++ (no CuTe,
// no torch) so the binding can call them; the binding owns validation and memory.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "params.h"

namespace dcnv3 {

#define DCNV3_DECLARE_LAUNCHERS(SUFFIX)                                                                         \
  void dcn_fwd_##SUFFIX(int channels_per_group, const DcnParams& p, cudaStream_t stream);                       \
  /* Whether the forward can fuse the output projection (p.out) for C channels: its y tile fits on chip. */    \
  bool dcn_fwd_out_fits_##SUFFIX(int channels_per_group, int C);                                              \
  void dcn_bwd_##SUFFIX(int channels_per_group, const DcnParams& p, cudaStream_t stream);                       \
  /* Whether the backward can fuse grad x1 (p.grad_x1) for G groups: its grad logits tile fits on chip. */     \
  bool dcn_bwd_x1_fits_##SUFFIX(int channels_per_group, int G);                                               \
  /* Whether grad wpack can also accumulate in the backward (p.grad_wpack_partial) for G groups, C channels, */ \
  /* in clusters of `cluster` CTAs (1: none). */                                                                \
  bool dcn_bwd_wpack_fits_##SUFFIX(int channels_per_group, int G, int C, int cluster);                          \
  /* How many such clusters (cluster > 1, `threads` per CTA) the device holds at once; 0: none fits. */           \
  int dcn_bwd_wpack_clusters_##SUFFIX(int channels_per_group, int G, int C, int cluster, int threads);          \
  void gemm_##SUFFIX(const GemmParams& p, int splits, cudaStream_t stream);                                     \
  /* absmax (N, C) = max over rows of |x| for x (N, R, C); absmax must be zero-filled first. */                 \
  void absmax_rows_##SUFFIX(const void* x, int N, int R, int C, float* absmax, cudaStream_t stream);           \
  /* The sum of partial (slots, count) fp32 over the slots, in slot order, into T out (split) and out_tail. */   \
  void sum_slots_##SUFFIX(const float* partial, int slots, int64_t count, int64_t split, void* out, void* out_tail, \
                          cudaStream_t stream);

DCNV3_DECLARE_LAUNCHERS(f32)
DCNV3_DECLARE_LAUNCHERS(f16)
DCNV3_DECLARE_LAUNCHERS(bf16)
#undef DCNV3_DECLARE_LAUNCHERS

// Channels per group with compiled kernels (every dtype).
inline bool supported_channels_per_group(int cg) { return cg == 16 || cg == 32; }

}  // namespace dcnv3
