// One CTA-wide tensor-core tile GEMM, the building block of every projection in the DCN block:
//   acc (BM, BN) fp32 = sum_k A(m0 + m, k) * B(n0 + n, k)
// A and B are read from global memory with arbitrary strides (so transposed operands need no copy), staged
// through shared memory and multiplied with a CuTe TiledMMA: mma.sync tensor cores (SM80 atoms, also the
// instruction these kernels use on sm_90a) for bf16/fp16, their fragments loaded with ldmatrix, FFMA for fp32
// (matching PyTorch's default of no TF32 in fp32 matmuls). The result is left in a shared-memory fp32 tile so that
// epilogues (bias, softmax, aggregation, split-K partials) index it plainly, independent of the MMA fragment layout.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "common.cuh"

namespace dcnv3 {

using namespace cute;

constexpr int kThreads = 128;  // 4 warps per CTA: every kernel of this family by default
constexpr int kWideCta = 256;  // 8 warps: the backward sampling kernels' other size (DcnParams::cta_threads)
// The kernels declare __launch_bounds__(kThreads, 1): shared memory, not registers, bounds them to 1-3 CTAs per
// SM, so ptxas may use up to 255 registers (by default it held some at 96 or 128 and spilled).
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;

// mma.sync m16n8k16 (fp32 accumulate) as a CuTe MMA operation. On the GPU it is CuTe's SM80 atom (the
// instruction itself); in the CPU emulation the warp's fragments are exchanged and multiplied per the PTX
// ISA's fragment layout (csrc/emu), which also checks CuTe's partitioning independently of CuTe.
template <class Sm80Op, bool kBf16>
struct Mma16x8x16 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];

  CUTE_HOST_DEVICE static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                                   uint32_t const& a1, uint32_t const& a2, uint32_t const& a3,
                                   uint32_t const& b0, uint32_t const& b1, float const& c0, float const& c1,
                                   float const& c2, float const& c3) {
#ifdef DCNV3_EMULATION
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    const float c[4] = {c0, c1, c2, c3};
    float d[4];
    emu::mma_m16n8k16(kBf16, d, a, b, c);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
#else
    Sm80Op::fma(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
#endif
  }
};
using MmaBf16 = Mma16x8x16<SM80_16x8x16_F32BF16BF16F32_TN, true>;
using MmaF16 = Mma16x8x16<SM80_16x8x16_F32F16F16F32_TN, false>;

// ldmatrix.x4 (four 8x8 16-bit matrices from shared memory straight into mma.sync fragment registers: one
// 16-byte row address per lane, one instruction where element-wise fragment loads take eight) as a CuTe copy
// operation; kTrans: ldmatrix.x4.trans, for an operand stored MN-major (its rows contiguous, k the strided index:
// each 16-byte row holds 8 rows of the operand at one k, and the transposed load hands out the fragments mma.sync
// takes). On the GPU it is CuTe's SM75 atom; in the emulation the warp's row addresses are exchanged and each lane
// takes its words per the PTX ISA's layout (csrc/emu), which checks CuTe's partitioning for it too.
template <class Sm75Op, bool kTrans>
struct Ldsm4x4 {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[4];

  CUTE_HOST_DEVICE static void copy(uint128_t const& smem_src, uint32_t& d0, uint32_t& d1, uint32_t& d2,
                                    uint32_t& d3) {
#ifdef DCNV3_EMULATION
    uint32_t d[4];
    if constexpr (kTrans) emu::ldmatrix_x4_trans(&smem_src, d);
    else emu::ldmatrix_x4(&smem_src, d);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
#else
    Sm75Op::copy(smem_src, d0, d1, d2, d3);
#endif
  }
};
using Ldsm4 = Ldsm4x4<SM75_U32x4_LDSM_N, false>;
using Ldsm4T = Ldsm4x4<SM75_U16x8_LDSM_T, true>;

// cp.async (sm_80+): a 16-byte global -> shared copy that skips the registers, so the next K-step's tiles load while
// this one's mma run; valid false zero-fills (src-size 0). On the GPU CuTe's SM80 copy and group fence/wait; in the
// emulation twins whose copies land only at the wait (csrc/emu), so a missing wait or barrier shows.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef DCNV3_EMULATION
  emu::cp_async16(smem_dst, gmem_src, valid);
#else
  SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*static_cast<const uint128_t*>(gmem_src),
                                                   *static_cast<uint128_t*>(smem_dst), valid);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef DCNV3_EMULATION
  emu::cp_async_commit();
#else
  cp_async_fence();
#endif
}

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_groups() {
#ifdef DCNV3_EMULATION
  emu::cp_async_wait(kPending);
#else
  cp_async_wait<kPending>();
#endif
}

}  // namespace dcnv3

// The wrappers have exactly the SM80/SM75 atoms' types and fragment layouts.
template <>
struct cute::MMA_Traits<dcnv3::MmaBf16> : cute::MMA_Traits<cute::SM80_16x8x16_F32BF16BF16F32_TN> {};
template <>
struct cute::MMA_Traits<dcnv3::MmaF16> : cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN> {};
template <class Sm75Op, bool kTrans>
struct cute::Copy_Traits<dcnv3::Ldsm4x4<Sm75Op, kTrans>> : cute::Copy_Traits<Sm75Op> {};

namespace dcnv3 {

// The CTA's warps over the tile, by CTA size: 2x2 warps of 16x8x16 atoms, permuted to a 32x32x16 tile (each warp
// owns a 16x16 piece per atom step), or 4x2 warps over a 64x32x16 tile (kWideCta).
template <int kCta>
struct WarpGrid;
template <>
struct WarpGrid<kThreads> {
  using Warps = Layout<Shape<_2, _2, _1>>;
  using Permutation = Tile<_32, _32, _16>;
  using FmaThreads = Layout<Shape<_16, _8, _1>>;  // fp32: each thread a 4x8 sub-tile of a 64x64 output
  static constexpr int kTileMultiple = 32;
};
template <>
struct WarpGrid<kWideCta> {
  using Warps = Layout<Shape<_4, _2, _1>>;
  using Permutation = Tile<_64, _32, _16>;
  using FmaThreads = Layout<Shape<_16, _16, _1>>;  // fp32: each thread a 4x4 sub-tile of a 64x64 output
  static constexpr int kTileMultiple = 64;
};

template <class T, int kCta = kThreads>
struct MmaTraits;

template <int kCta>
struct MmaTraits<cutlass::bfloat16_t, kCta> {
  using TiledMma = decltype(make_tiled_mma(MMA_Atom<MmaBf16>{}, typename WarpGrid<kCta>::Warps{},
                                           typename WarpGrid<kCta>::Permutation{}));
};
template <int kCta>
struct MmaTraits<cutlass::half_t, kCta> {
  using TiledMma = decltype(make_tiled_mma(MMA_Atom<MmaF16>{}, typename WarpGrid<kCta>::Warps{},
                                           typename WarpGrid<kCta>::Permutation{}));
};
template <int kCta>
struct MmaTraits<float, kCta> {
  using TiledMma = decltype(make_tiled_mma(MMA_Atom<UniversalFMA<float, float, float, float>>{},
                                           typename WarpGrid<kCta>::FmaThreads{}));
};

// +8 elements per smem row breaks the power-of-two row pitch (bank conflicts of the fragment loads).
constexpr int kSmemPad = 8;
constexpr int kAccPad = 4;

// A staged operand tile in shared memory, ROWS x kTileK, in one of two layouts:
//   K-major (kMN false): each row's kTileK elements contiguous, pitch kTileK + kSmemPad (an operand whose k has
//     unit stride in global memory: activations, k-contiguous weights);
//   MN-major (kMN true): each k's ROWS elements contiguous, pitch ROWS + kSmemPad (an operand read transposed in
//     place, its unit stride along the rows: both weight-gradient operands, W_out and wpack read as B^T). Staged as
//     it lies, a 16-byte global load is one 16-byte shared store (K-major it took kV scalar stores), and the mma
//     fragments come through ldmatrix.trans.
template <int ROWS, bool kMN>
using OperandLayout = std::conditional_t<kMN, Layout<Shape<Int<ROWS>, Int<kTileK>>, Stride<_1, Int<ROWS + kSmemPad>>>,
                                         Layout<Shape<Int<ROWS>, Int<kTileK>>, Stride<Int<kTileK + kSmemPad>, _1>>>;

// kStages slots per operand (the K-steps in flight, see tile_gemm), each sized for the larger (K-major) layout, so
// the union with a result tile and callers' byte counts do not depend on which layout a launch stages.
template <class T, int BM = kTileM, int BN = kTileN, int kStages = 1>
struct TileGemmSmem {
  static constexpr int kSlotA = BM * (kTileK + kSmemPad), kSlotB = BN * (kTileK + kSmemPad);
  static_assert(kSlotA >= kTileK * (BM + kSmemPad) && kSlotB >= kTileK * (BN + kSmemPad), "either layout fits");
  alignas(16) T a[kStages * kSlotA];
  alignas(16) T b[kStages * kSlotB];
};

// Stage rows [r0, r0 + ROWS) x cols [k0, k0 + kTileK) of a strided matrix X(r, k) = x[r*s_r + k*s_k] into
// smem (ROWS, kTileK) K-major, zero-filling outside (rows, K): 16 bytes per load where k has unit stride and runs
// in whole aligned vectors (every projection of the block: C and G*28 padded are multiples of 8); element by
// element otherwise, the thread order following whichever index has unit stride so the global reads coalesce
// (operands with unit stride along their rows are staged MN-major instead: stage_tile_mn). With `row_map` (ROWS
// entries in shared memory), tile row r is matrix row row_map[r] instead of r0 + r (a gather; < 0: zeros). k0 is a
// multiple of kTileK. kAsync: the vectors go by cp.async (the caller commits and waits); element paths store
// synchronously either way.
template <class T, int ROWS, bool kAsync = false, int kCta = kThreads>
__device__ __forceinline__ void stage_tile(T* smem, const T* x, int64_t s_r, int64_t s_k, int r0, int rows,
                                           int k0, int K, const int* row_map = nullptr) {
  constexpr int kPitch = kTileK + kSmemPad;
  constexpr int kV = Vec<T>::kN;  // elements per 16-byte vector
  static_assert(kTileK % kV == 0 && ROWS % kV == 0 && (kPitch * sizeof(T)) % 16 == 0, "whole vectors per row");
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (s_k == 1 && aligned && K % kV == 0 && s_r % kV == 0) {
    // A row's kTileK elements as kTileK / kV vectors (a vector is wholly inside K or wholly outside).
    constexpr int kRowVecs = kTileK / kV;
    for (int idx = threadIdx.x; idx < ROWS * kRowVecs; idx += kCta) {
      const int r = idx / kRowVecs, k = (idx % kRowVecs) * kV;
      const int gr = row_map != nullptr ? row_map[r] : r0 + r, gk = k0 + k;
      const bool in = gr >= 0 && gr < rows && gk < K;
      if constexpr (kAsync) cp_async16(smem + r * kPitch + k, in ? x + gr * s_r + gk : x, in);
      else store16(smem + r * kPitch + k, in ? load16(x + gr * s_r + gk) : uint4{0, 0, 0, 0});
    }
  } else if (s_k == 1) {
    for (int idx = threadIdx.x; idx < ROWS * kTileK; idx += kCta) {
      int r = idx / kTileK, k = idx % kTileK;
      int gr = row_map != nullptr ? row_map[r] : r0 + r, gk = k0 + k;
      smem[r * kPitch + k] = (gr >= 0 && gr < rows && gk < K) ? x[gr * s_r + gk] : T(0.0f);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * kTileK; idx += kCta) {
      int r = idx % ROWS, k = idx / ROWS;
      int gr = row_map != nullptr ? row_map[r] : r0 + r, gk = k0 + k;
      smem[r * kPitch + k] = (gr >= 0 && gr < rows && gk < K) ? x[gr * s_r + int64_t(gk) * s_k] : T(0.0f);
    }
  }
}

// stage_tile for an MN-major tile (OperandLayout<ROWS, true>): smem[k * (ROWS + kSmemPad) + r] = X(r0 + r, k0 + k).
// With the rows' unit stride (s_r == 1) a 16-byte load of kV rows at one k is one 16-byte store; element by
// element otherwise (any strides). No row gather (gathered operands are activations, K-major), but with `k_map`
// (K entries in shared memory) k is gathered: X(r, k) = x[r*s_r + k_map[k]*s_k], zeros where k_map[k] < 0 (grad
// wpack's x1 rows, the K of that GEMM being a tile's pixels).
template <class T, int ROWS, bool kAsync = false, int kCta = kThreads>
__device__ __forceinline__ void stage_tile_mn(T* smem, const T* x, int64_t s_r, int64_t s_k, int r0, int rows, int k0,
                                              int K, const int* k_map = nullptr) {
  constexpr int kPitch = ROWS + kSmemPad;
  constexpr int kV = Vec<T>::kN;
  static_assert(ROWS % kV == 0 && (kPitch * sizeof(T)) % 16 == 0, "whole vectors per k");
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (s_r == 1 && aligned && rows % kV == 0 && r0 % kV == 0 && s_k % kV == 0) {
    constexpr int kColVecs = ROWS / kV;
    for (int idx = threadIdx.x; idx < kColVecs * kTileK; idx += kCta) {
      const int r = (idx % kColVecs) * kV, k = idx / kColVecs, gr = r0 + r, gk = k0 + k;
      const int mk = gk >= K ? -1 : k_map != nullptr ? k_map[gk] : gk;
      const bool in = gr < rows && mk >= 0;
      if constexpr (kAsync) cp_async16(smem + k * kPitch + r, in ? x + gr + int64_t(mk) * s_k : x, in);
      else store16(smem + k * kPitch + r, in ? load16(x + gr + int64_t(mk) * s_k) : uint4{0, 0, 0, 0});
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * kTileK; idx += kCta) {
      const int r = idx % ROWS, k = idx / ROWS, gr = r0 + r, gk = k0 + k;
      const int mk = gk >= K ? -1 : k_map != nullptr ? k_map[gk] : gk;
      smem[k * kPitch + r] = (gr < rows && mk >= 0) ? x[gr * s_r + int64_t(mk) * s_k] : T(0.0f);
    }
  }
}

// acc_smem (BM, BN + kAccPad) fp32 <- A(m0.., k_begin..k_end) . B(n0.., k_begin..k_end)^T, or A's rows gathered
// through a_rows (BM entries in shared memory, see stage_tile; K-major A only), or B's k gathered through b_k_map
// (k_end entries in shared memory, see stage_tile_mn; MN-major B only); live_rows (BM entries in shared memory, < 0:
// a row whose result is not used) lets it skip row blocks, as a_rows does (below). kAMN / kBMN: the operand is
// staged MN-major (OperandLayout), for operands whose unit stride runs along their rows. kStages > 1: a cp.async
// pipeline, K-steps kt+1 .. kt+kStages-1 loading while kt's mma run (the standalone GEMMs, whose shared memory is
// free; the fused kernels' is not, they stage one K-step at a time). All kCta threads must call it; it ends with
// a __syncthreads so acc_smem is readable by everyone. acc_smem may alias sm: it is written after the last stage.
template <class T, int BM = kTileM, int BN = kTileN, bool kAMN = false, bool kBMN = false, int kStages = 1,
          int kCta = kThreads>
__device__ void tile_gemm(TileGemmSmem<T, BM, BN, kStages>& sm, float* acc_smem, const T* a, int64_t a_m,
                          int64_t a_k, int m0, int M, const T* b, int64_t b_n, int64_t b_k, int n0, int N, int k_begin,
                          int k_end, const int* a_rows = nullptr, const int* b_k_map = nullptr,
                          const int* live_rows = nullptr) {
  using TiledMma = typename MmaTraits<T, kCta>::TiledMma;
  using Smem = TileGemmSmem<T, BM, BN, kStages>;
  static_assert(size(TiledMma{}) == kCta, "the tiled MMA must use exactly the CTA's threads");
  static_assert(BM % WarpGrid<kCta>::kTileMultiple == 0 && BN % 32 == 0 && kTileK % 16 == 0,
                "tile must cover whole MMA steps");
  constexpr bool kAsync = kStages > 1;

  // Slot s of sA: (BM, kTileK), of sB: (BN, kTileK), each K-major or MN-major.
  auto slot_a = [&](int s) { return make_tensor(make_smem_ptr(sm.a + s * Smem::kSlotA), OperandLayout<BM, kAMN>{}); };
  auto slot_b = [&](int s) { return make_tensor(make_smem_ptr(sm.b + s * Smem::kSlotB), OperandLayout<BN, kBMN>{}); };
  // sC: (BM, BN) fp32 -> row pitch BN+pad, n contiguous.
  Tensor sC = make_tensor(make_smem_ptr(acc_smem), Layout<Shape<Int<BM>, Int<BN>>, Stride<Int<BN + kAccPad>, _1>>{});

  TiledMma mma;
  auto thr = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr.partition_fragment_A(slot_a(0));  // registers: (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr.partition_fragment_B(slot_b(0));  // (MMA, MMA_N, MMA_K)
  Tensor tCsC = thr.partition_C(sC);                  // (MMA, MMA_M, MMA_N)
  Tensor acc = thr.partition_fragment_C(sC);          // fp32 accumulators
  clear(acc);

  // The tiled MMA's row blocks: block m is rows [m * kBlockRows, (m + 1) * kBlockRows), every warp along M holding a
  // 16-row slice of each, so a block none of whose rows is live (live_rows, else a_rows, < 0: a result row nobody
  // stores) is skipped by every warp alike: its fragment loads and mma are not issued and its accumulators stay 0
  // (a gathered row staged as zeros would have left them so). A halo chunk's rows are compacted to the front, so a
  // chunk of at most 32 pixels costs half a tile's tensor-core work. 16-bit types (mma.sync) only, and only the
  // fused kernels' one-stage form: the standalone GEMMs (kStages > 1) pass no rows and keep cute::gemm's order.
  constexpr int kBlockRows = WarpGrid<kCta>::kTileMultiple;
  constexpr bool kSkipBlocks = sizeof(T) == 2 && !kAMN && kStages == 1 && BM / kBlockRows > 1;
  static_assert(!kSkipBlocks || (kBlockRows == 32 && size<1>(decltype(tCrA){}) == BM / kBlockRows),
                "one warp-wide vote per row block");
  unsigned live_blocks = ~0u;
  if constexpr (kSkipBlocks) {
    const int* live = live_rows != nullptr ? live_rows : a_rows;
    if (live != nullptr) {
      live_blocks = 0;
      for (int blk = 0; blk < BM / kBlockRows; ++blk)
        if (__ballot_sync(0xffffffffu, live[blk * kBlockRows + int(threadIdx.x) % 32] >= 0) != 0)
          live_blocks |= 1u << blk;
    }
  }

  // K-step at k0 into slot s (kAsync: cp.async where the operand runs in vectors, uncommitted).
  auto stage = [&](int s, int k0) {
    if constexpr (kAMN) stage_tile_mn<T, BM, kAsync, kCta>(sm.a + s * Smem::kSlotA, a, a_m, a_k, m0, M, k0, k_end);
    else stage_tile<T, BM, kAsync, kCta>(sm.a + s * Smem::kSlotA, a, a_m, a_k, m0, M, k0, k_end, a_rows);
    if constexpr (kBMN)
      stage_tile_mn<T, BN, kAsync, kCta>(sm.b + s * Smem::kSlotB, b, b_n, b_k, n0, N, k0, k_end, b_k_map);
    else stage_tile<T, BN, kAsync, kCta>(sm.b + s * Smem::kSlotB, b, b_n, b_k, n0, N, k0, k_end);
  };
  // The mma of the K-step in slot s. 16-bit types: the fragments come through ldmatrix (.trans for MN-major; each
  // 8x8 matrix row is 16 contiguous, 16-byte aligned bytes of a smem row; the +8 pad keeps a matrix's 8 rows on
  // distinct banks).
  auto multiply = [&](int s) {
    Tensor sA = slot_a(s);
    Tensor sB = slot_b(s);
    if constexpr (sizeof(T) == 2) {
      auto s2r_a = make_tiled_copy_A(Copy_Atom<std::conditional_t<kAMN, Ldsm4T, Ldsm4>, T>{}, mma);
      auto s2r_b = make_tiled_copy_B(Copy_Atom<std::conditional_t<kBMN, Ldsm4T, Ldsm4>, T>{}, mma);
      auto thr_a = s2r_a.get_slice(threadIdx.x);
      auto thr_b = s2r_b.get_slice(threadIdx.x);
      copy(s2r_b, thr_b.partition_S(sB), thr_b.retile_D(tCrB));
      if constexpr (kSkipBlocks) {
        Tensor src = thr_a.partition_S(sA);  // (CPY, CPY_M, CPY_K): one ldmatrix.x4 per 16x16 A fragment
        Tensor dst = thr_a.retile_D(tCrA);
        static_assert(size<1>(decltype(src){}) == size<1>(decltype(tCrA){}), "a copy's M index is the MMA's");
        CUTE_UNROLL
        for (int m = 0; m < size<1>(tCrA); ++m)
          if ((live_blocks >> m) & 1u) copy(s2r_a, src(_, m, _), dst(_, m, _));
      } else {
        copy(s2r_a, thr_a.partition_S(sA), thr_a.retile_D(tCrA));
      }
    } else {
      Tensor tCsA = thr.partition_A(sA);
      Tensor tCsB = thr.partition_B(sB);
      CUTE_UNROLL
      for (int i = 0; i < size(tCrA); ++i) tCrA(i) = tCsA(i);
      CUTE_UNROLL
      for (int i = 0; i < size(tCrB); ++i) tCrB(i) = tCsB(i);
    }
    if constexpr (kSkipBlocks) {
      // Every (m, n) accumulates its k-steps in order, as cute::gemm does: the same bits.
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tCrA); ++k)
        CUTE_UNROLL
        for (int m = 0; m < size<1>(tCrA); ++m)
          if ((live_blocks >> m) & 1u)
            CUTE_UNROLL
            for (int n = 0; n < size<1>(tCrB); ++n) cute::gemm(mma, tCrA(_, m, k), tCrB(_, n, k), acc(_, m, n));
    } else {
      cute::gemm(mma, tCrA, tCrB, acc);
    }
  };

  if constexpr (kStages == 1) {
    for (int k0 = k_begin; k0 < k_end; k0 += kTileK) {
      stage(0, k0);
      __syncthreads();
      multiply(0);
      __syncthreads();
    }
  } else {
    // One cp.async group per K-step (empty past the end, so the wait count stays uniform): at step kt, groups
    // 0..kt must have landed, kStages - 2 may still fly. The barrier after the wait publishes every thread's copies
    // and tells that all are done with step kt-1's slot, which step kt + kStages - 1 refills.
    const int steps = (k_end - k_begin + kTileK - 1) / kTileK;
    for (int kt = 0; kt < kStages - 1; ++kt) {
      if (kt < steps) stage(kt, k_begin + kt * kTileK);
      cp_async_commit();
    }
    for (int kt = 0; kt < steps; ++kt) {
      cp_async_wait_groups<kStages - 2>();
      __syncthreads();
      const int next = kt + kStages - 1;
      if (next < steps) stage(next % kStages, k_begin + next * kTileK);
      cp_async_commit();
      multiply(kt % kStages);
    }
    cp_async_wait_groups<0>();
    __syncthreads();  // acc_smem may alias the slots
  }
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) tCsC(i) = acc(i);
  __syncthreads();
}

// The epilogue of a tile GEMM: out[row_of(r) * N + n0 + c] = T(acc[r][c] + bias[n0 + c]) for the BM x BN fp32
// result tile acc (row pitch BN + kAccPad), skipping rows with row_of(r) < 0 and columns from N on. A thread stores
// 16-byte vectors of a row (kV columns, read as float4s from the tile, the bias as one vector) where every row is
// whole aligned vectors (N a multiple of kV: every projection of the block), else single elements; n is fastest
// across threads (coalesced). All threads; no barrier.
template <class T, int BM, int BN, int kCta = kThreads, class RowOf = void>
__device__ __forceinline__ void store_result_tile(const float* acc, RowOf row_of, int n0, int N, const T* bias,
                                                  T* out) {
  constexpr int kV = Vec<T>::kN, kRowVecs = BN / kV, kPitch = BN + kAccPad;
  static_assert((kPitch * sizeof(float)) % 16 == 0 && BN % kV == 0 && kV % 4 == 0, "result rows in whole float4s");
  const bool vec = N % kV == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                   (bias == nullptr || reinterpret_cast<uintptr_t>(bias) % 16 == 0);
  if (vec) {
    for (int idx = threadIdx.x; idx < BM * kRowVecs; idx += kCta) {
      const int r = idx / kRowVecs, c = (idx % kRowVecs) * kV, col = n0 + c;
      const int64_t m = row_of(r);
      if (m < 0 || col >= N) continue;  // a vector is wholly inside N or wholly outside
      float v[kV], bv[kV];
      load_f32<kV>(acc + r * kPitch + c, v);
      if (bias != nullptr) {
        load_vec<T>(bias + col, bv);
#pragma unroll
        for (int i = 0; i < kV; ++i) v[i] += bv[i];
      }
      store_vec<T>(out + m * N + col, v);
    }
  } else {
    for (int idx = threadIdx.x; idx < BM * BN; idx += kCta) {
      const int r = idx / BN, c = idx % BN, col = n0 + c;
      const int64_t m = row_of(r);
      if (m < 0 || col >= N) continue;
      float v = acc[r * kPitch + c];
      if (bias != nullptr) v += to_float(bias[col]);
      out[m * N + col] = from_float<T>(v);
    }
  }
}

}  // namespace dcnv3
