// Kernel parameters as raw pointers, sizes and strides: no torch, no CuTe, so the binding (host C++) and the
// kernels (.cuh) share one description. Element types are erased to void*; the instantiation unit knows T.
#pragma once

#include <cstdint>

namespace dcnv3 {

// Sampling points per group the kernels handle: a 28-wide column block of packed logits per group holds 2P offsets
// + P mask logits + 1 center-feature-scale logit, so 3P + 1 <= 28 (3x3 kernels: P = 9, or 8 without the center).
constexpr int kMaxPoints = 9;
constexpr int kGroupCols = 28;
// The packed tensors' row length: G blocks of 28 columns, padded to whole 16-byte vectors of every dtype (8
// columns; 4 zero columns when G is odd), so each row starts 16-byte aligned.
constexpr int packed_cols(int G) { return (G * kGroupCols + 7) / 8 * 8; }  // device code too: relaxed constexpr
// Floats of one grad wpack partial (DcnParams::grad_wpack_partial): grad wpack (packed_cols(G), C) row-major, then
// grad bpack (packed_cols(G)); a multiple of 8, so every partial starts 16-byte aligned.
constexpr int64_t wpack_partial_floats(int G, int C) { return int64_t(packed_cols(G)) * (C + 1); }
// In a cluster of k CTAs each holds a slice of the partial's rows (grad wpack rows and their grad bpack entries):
// rank r rows [r S, min((r + 1) S, packed_cols(G))), S = packed_cols(G) / k rounded up to whole vectors (8), so a
// CTA's shared memory holds S x (C + 1) floats (the whole partial at k = 1).
constexpr int wpack_slice_rows(int G, int k) { return (packed_cols(G) + 8 * k - 1) / (8 * k) * 8; }
constexpr int64_t wpack_slice_floats(int G, int C, int k) { return int64_t(wpack_slice_rows(G, k)) * (C + 1); }
// The reach record's row per image (DcnParams::reach): the image's reach, one per 8x8 output tile, then the touch
// masks (uint16 per output pixel and group pair) in whole int32 words.
constexpr int64_t reach_tiles(int64_t ho, int64_t wo) { return ((ho + 7) / 8) * ((wo + 7) / 8); }
constexpr int64_t reach_row(int64_t ho, int64_t wo, int G) {
  return 1 + reach_tiles(ho, wo) + (ho * wo * ((G + 1) / 2) + 1) / 2;
}

// Packed-logit layout (per pixel, per group g, columns g*28 + j; columns from G*28 on are zero):
//   j in [0, 2P)      offset logits, j = 2p + {0: x/width, 1: y/height}   (official offset order)
//   j in [2P, 3P)     mask logits of point p = j - 2P                      (softmax over P)
//   j == 3P           center-feature-scale logit                           (sigmoid), zero weight if unused
//   j in (3P, 28)     zero padding (P = 8: 3 columns)
struct DcnParams {
  // value (N, H, W, C) channels-last contiguous, C = G * Cg.
  const void* value;
  // x1 (N, Ho, Wo, C): the projection input; the fused path needs Ho == H, Wo == W (checked by the binding).
  const void* x1;
  // wpack (packed_cols(G), C) row-major and bpack (packed_cols(G)): the packed offset/mask/cfs projection (see
  // layout above; its padding rows are zero).
  const void* wpack;
  const void* bpack;
  // Core mode: logits (N*Ho*Wo, packed_cols(G)) given directly (offset and already-normalised mask); x1/wpack unused.
  const void* logits;
  // Stored logits (the fused block in training, the binding's g_stored_logits): (N*Ho*Wo, packed_cols(G)) fp32,
  // the logits x1 . wpack^T + bpack (before the softmax and sigmoid), written by the forward (logits_out) and read
  // by the backward instead of that GEMM per chunk of its own tile and halo (logits_in): the same fp32 values, so
  // the same results. Null: not stored, recomputed.
  float* logits_out;
  const float* logits_in;
  bool apply_softmax;  // fused: softmax over the mask logits; core: mask taken as given
  bool has_cfs;        // center-feature-scale blend y = y(1-s) + value*s, s = sigmoid(logit[3P])

  // Forward output: y (N, Ho, Wo, C), the blended aggregate (input of output_proj); null: not stored (inference
  // with the output projection fused: nothing needs y again).
  void* y;
  // The output projection fused as the forward's epilogue (dcn_fwd_out): out (N, Ho, Wo, Cout) = y . wout^T + bout,
  // wout (Cout, C) row-major, bout (Cout). Unused (null) by dcn_fwd.
  const void* wout;
  const void* bout;
  void* out;
  int Cout;

  // Backward inputs/outputs.
  const void* grad_y;            // (N*Ho*Wo, C) T: gradient w.r.t. y
  // Or, with wout (Cout, C) set, grad_y is recomputed on chip per tile as grad_out (N*Ho*Wo, Cout) T . wout, the
  // output projection's input gradient (like the logits: it never goes through HBM).
  const void* grad_out;
  // (N, C): an upper bound of max |grad_y[n, :, :, c]| (the max itself, or from grad_out's per-image maxima and
  // |wout|), the fixed-point scale of grad value; +inf where grad_y is not finite.
  const float* grad_y_absmax;
  void* grad_logits;             // (N*Ho*Wo, packed_cols(G)) T: gradient w.r.t. packed logits (pre-softmax)
  void* grad_value;              // (N, H, W, C) T
  // When set (the fused block): grad x1 (N, H, W, C) T = grad logits . wpack, the backward's epilogue.
  void* grad_x1;
  // When set (with grad_x1, where bwd_wpack_fits): grad wpack and grad bpack accumulate on chip instead of going
  // through stored grad logits. wpack_slots persistent CTAs (wpack_cluster = 1) or clusters of wpack_cluster CTAs
  // each take every wpack_slots-th tile (a cluster: wpack_cluster consecutive tiles per round), add its grad
  // logits^T . x1 rows and the grad logits' column sums into an fp32 partial in shared memory (in a cluster, each
  // CTA the rows of its slice, wpack_slice_rows, from every tile of the round, reading the others' grad logits
  // through distributed shared memory), and leave it in grad_wpack_partial (wpack_slots, wpack_partial_floats(G,
  // C)), which sum_slots adds in slot order. grad_logits may then be null (not stored).
  float* grad_wpack_partial;
  int wpack_slots;
  int wpack_cluster;
  // (N, reach_row(Ho, Wo, G)) int32, zeroed by the caller, filled by the forward, read by dcn_bwd_value: per image,
  // [0] the largest and [1 + t] per 8x8 output tile t (row-major) the largest distance, in pixels along x or y,
  // from an output pixel's sampling base to an in-image bilinear corner it scatters to; then the touch masks, one
  // uint16 per (output pixel, group pair) (pixel-major): bit (dy + 1) * 3 + dx + 1 is set where a bilinear corner
  // of the pair's samples, give or take one pixel, lies in the 8x8 value tile dy, dx (each -1..1) tiles from the
  // one holding the pixel's sampling base (further tiles are never ruled out).
  int* reach;
  // Whether dcn_bwd_value's one-launch form (stride 1, same padding) skips the halo source pixels whose touch mask
  // rules its tile out (the same results; 0: every pixel of the reach's rectangles, the binding's set_halo_masks).
  int halo_masks;
  // The grad value accumulator's fixed-point exponent (fixed_point_bits below), set by launch_dcn_bwd.
  int fixed_point_bits;
  // Threads per CTA of the one-launch backward (stride 1, same padding): 128 (0: the default) or 256, 8 warps for
  // more latency hiding at one CTA per SM (the same results; the binding's set_backward_threads).
  int cta_threads;

  int N, H, W, C, G, Ho, Wo;
  int P;
  int stride_h, stride_w, pad_h, pad_w, center_h, center_w;
  float offset_scale;
  int tap_x[16];  // i*d_w - c_w of point p (width tap, official width-major order)
  int tap_y[16];  // j*d_h - c_h
};

// C (M, N) = A (M, K) . B (N, K)^T with arbitrary element strides (so transposed operands need no copy).
// Split-K: blockIdx.z covers K range [z*k_per_split, (z+1)*k_per_split).
struct GemmParams {
  const void* a;
  int64_t a_m, a_k;  // A(m, k) = a[m*a_m + k*a_k]
  const void* b;
  int64_t b_n, b_k;  // B(n, k) = b[n*b_n + k*b_k]
  int M, N, K;
  int k_per_split;
  void* out;         // T output (M, N) row-major, + bias (N) when bias is non-null
  const void* bias;
  // More than one split, in one launch: every split writes its fp32 partial (out_f32 (splits, M, N), split
  // stride out_split_stride) and counts itself in tile_counters (one per output tile, zeroed); the last to
  // arrive sums the partials in split order (deterministic) and writes `out`.
  float* out_f32;
  int64_t out_split_stride;
  unsigned* tile_counters;
  // When row_sum_out is set: also the row sums of A (a bias gradient, T (M)), by the tiles of the first column;
  // with splits, per split into row_sum_partial (splits, M) first, summed in split order.
  float* row_sum_partial;
  void* row_sum_out;
  // When set: a_absmax (K / a_rows_per_group, M) |= max |A(m, k)| over each group of K (an image's pixels), by the
  // tiles of the first column while they read A's rows (the same loop as row_sum_out). atomicMax on the bits of
  // non-negative floats: exact and order-independent; +inf for a non-finite value. Zeroed first.
  float* a_absmax;
  int a_rows_per_group;
};

}  // namespace dcnv3
