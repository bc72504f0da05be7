// Element types, conversions and vector memory helpers shared by every kernel.
#pragma once

#include <algorithm>
#include <cmath>

#ifdef DCNV3_EMULATION
#include "../emu/device.h"  // the kernels run as host C++ on CPU fibers (csrc/emu)
#else
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include <utility>

#include <cutlass/numeric_types.h>

namespace dcnv3 {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(cutlass::half_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(cutlass::bfloat16_t x) { return static_cast<float>(x); }

template <class T>
__device__ __forceinline__ T from_float(float x) {
  return T(x);  // cutlass half_t/bfloat16_t round to nearest even
}

// Elements per 16-byte vector: 8 for 16-bit types, 4 for fp32.
template <class T>
struct Vec {
  static constexpr int kN = 16 / int(sizeof(T));
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
};

// One 16-byte load / store (global or shared memory; 16-byte aligned): one LDG/STG.128 on a GPU, and one access
// of this call site in the emulation's counters.
__device__ __forceinline__ uint4 load16(const void* p) {
#ifdef DCNV3_EMULATION
  return emu::load16(p);
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

__device__ __forceinline__ void store16(void* p, uint4 v) {
#ifdef DCNV3_EMULATION
  emu::store16(p, v);
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

// 16-byte load of Vec<T>::kN elements, converted to fp32. ptr must be 16-byte aligned (binding checks the
// base pointers; channel offsets are multiples of the vector since Cg is a multiple of it).
template <class T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[Vec<T>::kN]) {
  uint4 raw = load16(ptr);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) out[i] = to_float(e[i]);
}

// Element i of a 16-byte vector of T, as fp32. Keeping a vector packed and converting where it is used holds it in
// 4 registers instead of Vec<T>::kN (8 for 16-bit types); i must be a compile-time constant after unrolling, or
// the vector goes to local memory.
template <class T>
__device__ __forceinline__ float vec_elem(const uint4& raw, int i) {
  return to_float(reinterpret_cast<const T*>(&raw)[i]);
}

// raw with its elements from `keep` on (a runtime count, 0..Vec<T>::kN) set to zero, by word masks: indexing the
// elements with a runtime bound would put the vector in local memory.
template <class T>
__device__ __forceinline__ uint4 zero_from(uint4 raw, int keep) {
  constexpr int kPerWord = 4 / int(sizeof(T)), kBits = 8 * int(sizeof(T));
  unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < kPerWord; ++e)
      if (i * kPerWord + e >= keep) w[i] &= kPerWord == 1 ? 0u : ~(((1u << kBits) - 1u) << (e * kBits));
  return uint4{w[0], w[1], w[2], w[3]};
}

template <class T>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[Vec<T>::kN]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) e[i] = from_float<T>(in[i]);
  store16(ptr, raw);
}

// Two adjacent elements (ptr aligned to two elements) in one store: 4 bytes for 16-bit types, 8 for fp32.
template <class T>
__device__ __forceinline__ void store_pair(T* ptr, float a, float b) {
  if constexpr (sizeof(T) == 2) {
    const unsigned lo = from_float<T>(a).raw(), hi = from_float<T>(b).raw();
    *reinterpret_cast<unsigned*>(ptr) = lo | (hi << 16);
  } else {
    *reinterpret_cast<float2*>(ptr) = float2{a, b};
  }
}

// N fp32 values as N / 4 16-byte loads (ptr 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_f32(const float* ptr, float (&out)[N]) {
  static_assert(N % 4 == 0, "fp32 vectors are loaded 4 at a time");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const uint4 raw = load16(ptr + i);
    const float* f = reinterpret_cast<const float*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i + j] = f[j];
  }
}

// N fp32 values as N / 4 16-byte stores (ptr 16-byte aligned).
template <int N>
__device__ __forceinline__ void store_f32(float* ptr, const float (&in)[N]) {
  static_assert(N % 4 == 0, "fp32 vectors are stored 4 at a time");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    uint4 raw;
    float* f = reinterpret_cast<float*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = in[i + j];
    store16(ptr + i, raw);
  }
}

#ifndef DCNV3_EMULATION
// Opts `kernel` in to `smem_bytes` of dynamic shared memory where that exceeds the 48 KiB default.
inline void opt_in_dynamic_smem(const void* kernel, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
}

// A launch configuration in thread-block clusters of `cluster` grid.x-consecutive CTAs (`attribute`: its storage).
inline cudaLaunchConfig_t cluster_launch_config(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                                                unsigned cluster, cudaLaunchAttribute& attribute) {
  attribute = cudaLaunchAttribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}
#endif

// Every kernel launch goes through here, so that the CPU emulation (csrc/emu) runs the same kernels: there a
// launch is a loop over the grid, each CTA's threads run as fibers. `name` labels the emulation's counters.
// `smem_bytes` of dynamic shared memory (see dynamic_smem) may exceed the 48 KiB default: the kernel is opted in.
// launch_cluster_kernel, cluster > 1: thread-block clusters of that many grid.x-consecutive CTAs (sm_90; the
// caller checked the device), whose CTAs are co-resident and address each other's shared memory (cluster_map_shared).
template <class... Params, class... Args>
void launch_cluster_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                           cudaStream_t stream, unsigned cluster, Args&&... args) {
#ifdef DCNV3_EMULATION
  (void)stream;
  emu::launch(name, grid, block, smem_bytes, [&] { kernel(args...); }, cluster);
#else
  (void)name;
  opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
  if (cluster <= 1) {
    kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(grid, block, smem_bytes, stream, cluster, attribute);
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
#endif
}

template <class... Params, class... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  launch_cluster_kernel(name, kernel, grid, block, smem_bytes, stream, 1u, std::forward<Args>(args)...);
}

// Thread-block clusters (sm_90): the CTA's rank in its cluster, the cluster barrier (release/acquire: shared and
// global writes before it are visible to every thread of the cluster after it; all threads of every CTA call it),
// and a pointer into the running CTA's dynamic shared memory mapped to the same place in CTA `rank`'s (distributed
// shared memory, read with ordinary loads). Below sm_90 no cluster is launched: rank 0 of one.
__device__ __forceinline__ unsigned cluster_rank() {
#ifdef DCNV3_EMULATION
  return emu::cluster_rank();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
#else
  return 0;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#ifdef DCNV3_EMULATION
  emu::cluster_sync();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __syncthreads();
#endif
}

template <class T>
__device__ __forceinline__ T* cluster_map_shared(T* p, unsigned rank) {
#ifdef DCNV3_EMULATION
  return static_cast<T*>(emu::map_shared_rank(const_cast<void*>(static_cast<const void*>(p)), rank));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t mapped;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(mapped) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<T*>(mapped);
#else
  (void)rank;
  return p;
#endif
}

template <class... Params, class... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
  launch_kernel(name, kernel, grid, block, size_t{0}, stream, std::forward<Args>(args)...);
}

// The CTA's dynamic shared memory as an S (a kernel's layout struct): for layouts over the 48 KiB a static
// __shared__ may hold. 16-byte aligned.
template <class S>
__device__ __forceinline__ S& dynamic_smem() {
#ifdef DCNV3_EMULATION
  return *reinterpret_cast<S*>(emu::dynamic_smem());
#else
  extern __shared__ uint4 dcnv3_dynamic_smem[];
  return *reinterpret_cast<S*>(dcnv3_dynamic_smem);
#endif
}

// Deterministic scatter-add: grad_value is accumulated in fixed point, where addition is associative, so the
// result does not depend on the order in which threads or blocks arrive. One scale per (image, channel): a term
// scattered into grad_value[n, :, :, c] comes from grad_y[n, :, :, c] times softmax and bilinear weights <= 1,
// so it is bounded by m = max|grad_y[n, :, :, c]|, and the scale 2^(E - ceil(log2 m)) maps it into [-2^E, 2^E]
// (E: fixed_point_bits). Each term carries at most m * 2^-(E+1) absolute rounding error; a large gradient in one
// channel or image costs no precision elsewhere.
//
// An element is two 32-bit words, hi * 2^kFixedLowBits + lo: a term q adds q >> 22 (signed) to hi and its low
// 22 bits to lo, each with a native 32-bit shared-memory atomic (sm_90 has no 64-bit shared atomic add: nvcc
// turns one into a compare-and-swap loop). lo takes at most kTileM * (kMaxPoints + 1) terms, one source chunk's,
// before carry_low_words moves its high bits into hi; hi is exact while the element's true sum stays under 2^52,
// which fixed_point_bits guarantees for any input.
constexpr int kFixedLowBits = 22;
constexpr unsigned kFixedLowMask = (1u << kFixedLowBits) - 1;

// E for an output grid of Ho x Wo pixels with P points: an element takes at most Ho * Wo * (P + cfs) terms (one
// per point and output pixel: a sample's 4 corners are 4 pixels), so |sum| <= terms * 2^E <= 2^52. Masks given
// by the caller (no softmax) may exceed 1: 8 bits of headroom keep |mask| <= 256 exact. At most 40 (an ample
// fraction of an fp32 ulp of m); 37 at InternImage's stage 1 of a 224-pixel image.
inline int fixed_point_bits(int Ho, int Wo, int P, bool has_cfs, bool apply_softmax) {
  const double terms = std::max(1.0, double(Ho) * Wo * (P + (has_cfs ? 1 : 0)));
  int bits = 52 - static_cast<int>(std::ceil(std::log2(terms))) - (apply_softmax ? 0 : 8);
  return std::min(40, bits);
}

__device__ __forceinline__ float fixed_point_scale(const float* absmax, int bits) {
  float m = fminf(fmaxf(*absmax, 1e-30f), 1e30f);  // +inf (non-finite grad_y) still gives a usable scale
  int e = bits - static_cast<int>(ceilf(log2f(m)));
  e = max(min(e, 126), -126);
  return ldexpf(1.0f, e);
}

// Whether the kernels run in the CPU emulation (csrc/emu), for the few places where a warp's masked instruction is
// written differently there (ScatterBox::add).
#ifdef DCNV3_EMULATION
constexpr bool kEmulation = true;
#else
constexpr bool kEmulation = false;
#endif

// atomicAdd(addr, v) on a 32-bit word of shared memory, for the lanes where pred holds (addr must be valid for all).
// On the GPU it is unconditional, adding 0 where pred fails: nvcc compiles any conditional atomic, predicated PTX
// included, to a branch around it with its own convergence barrier (BSSY, BRA, BSYNC: 8 of a scatter term's 17
// instructions), so callers branch once around a group of atomics instead (ScatterBox::add). The emulation's twin
// keeps every lane in the warp's request (see emu::atomic_add_u32_if), so its bank-pass counts group the lanes of
// one warp instruction.
__device__ __forceinline__ void shared_atomic_add_if(bool pred, unsigned* addr, unsigned v) {
#ifdef DCNV3_EMULATION
  emu::atomic_add_u32_if(pred, addr, v);
#else
  atomicAdd(addr, pred ? v : 0u);  // result unused: ATOMS.ADD RZ
#endif
}

// Adds v (a term, when live) to the element (hi, lo) in shared memory: both words, a zero part included (a
// conditional atomic costs more than adding 0).
__device__ __forceinline__ void fixed_point_add(bool live, unsigned* hi, unsigned* lo, float v, float scale) {
  const long long q = __float2ll_rn(v * scale);  // v * 2^e is exact; only the fixed-point rounding remains
  shared_atomic_add_if(live, hi, static_cast<unsigned>(static_cast<int>(q >> kFixedLowBits)));
  shared_atomic_add_if(live, lo, static_cast<unsigned>(q) & kFixedLowMask);
}

// The accumulated element as one signed integer (exact: hi is the sum's bits from 22 on, lo any remainder).
__device__ __forceinline__ long long fixed_point_value(unsigned hi, unsigned lo) {
  return static_cast<long long>(static_cast<int>(hi)) * (1ll << kFixedLowBits) + static_cast<long long>(lo);
}

}  // namespace dcnv3
