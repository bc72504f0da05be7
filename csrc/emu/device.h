// CUDA device API for the CPU emulation of the csrc kernels (DCNV3_EMULATION builds only).
//
// The kernels compile unmodified as host C++: a CTA runs as blockDim fibers on one OS thread (runtime.cpp), so
// __syncthreads is a barrier among them, warp shuffles and mma.sync exchange through a per-warp staging area
// among the warp's 32 fibers, and atomics are plain read-modify-writes (one CTA runs at a time). `__shared__`
// variables become function statics: shared by the fibers of the CTA, reused by the next CTA (like a real SM,
// nothing is zeroed between CTAs). Types (dim3, uint4, float4, __half, ...) come from the CUDA toolkit's
// host-compilable headers.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

// Index registers of the running fiber; one object so the access counters can exclude it by address.
struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern ThreadContext g_ctx;

// The largest dynamic shared memory a CTA may ask for (sm_90's 227 KiB opt-in limit).
constexpr size_t kMaxSharedBytes = 227 * 1024;
// The most CTAs a cluster may hold (sm_90's portable limit).
constexpr unsigned kMaxClusterCtas = 8;
// cluster > 1: thread-block clusters of that many grid.x-consecutive CTAs, run together (sm_90 clusters: their
// CTAs are co-resident and may read each other's shared memory). Kernels launched in clusters keep their shared
// memory dynamic: `__shared__` statics are one copy here, which a cluster's CTAs would share.
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body,
            unsigned cluster = 1);
// The running CTA's dynamic shared memory (`extern __shared__` on a GPU), filled with 0xFF before each CTA.
void* dynamic_smem();
void syncthreads();
// %cluster_ctarank, %cluster_nctarank, barrier.cluster.arrive.release + wait.acquire, and mapa (a generic address in
// the running CTA's dynamic shared memory -> the same offset in CTA `rank` of the cluster).
unsigned cluster_rank();
unsigned cluster_size();
void cluster_sync();
void* map_shared_rank(void* p, unsigned rank);
uint32_t shfl_xor(uint32_t bits, int lane_mask, int width);
// __ballot_sync over the full warp: bit i set where lane i's predicate is true.
uint32_t ballot(bool predicate);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: each lane passes its PTX fragments, like the instruction.
void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c);
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: each lane passes the 16-byte row it addresses (lanes 8i..8i+7: the
// rows of matrix i) and gets d[i] = the two elements of matrix i at row lane / 4, columns 2 (lane % 4) + {0, 1}.
void ldmatrix_x4(const void* row, uint32_t* d);
// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: the same rows, transposed: d[i] = the elements of matrix i at
// column lane / 4, rows 2 (lane % 4) + {0, 1} (a fragment of an operand stored MN-major).
void ldmatrix_x4_trans(const void* row, uint32_t* d);
// One 16-byte access (LDG/STG/LDS/STS.128 on a GPU), counted as one access of the calling site: a plain uint4
// copy may compile to four 4-byte host accesses, which the counters would take for four warp requests.
uint4 load16(const void* p);
void store16(void* p, uint4 v);
// cp.async.cg.shared.global (16 bytes; valid false: src-size 0, zero-fill), cp.async.commit_group and
// cp.async.wait_group n: a thread's copies land when it waits for their group (the destination reads as 0xFF bytes
// before), and a thread that exits with copies in flight is an error.
void cp_async16(void* smem_dst, const void* gmem_src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
unsigned long long atomic_add_u64(unsigned long long* addr, unsigned long long v);
unsigned atomic_add_u32(unsigned* addr, unsigned v);
// `if (pred) atomicAdd(addr, v)`, where the lane passes through the warp's request even when pred is false (it
// takes no part in it): the counters group a warp's accesses by each lane's n-th pass through a call site, which a
// skipped call would shift against its neighbours'.
void atomic_add_u32_if(bool pred, unsigned* addr, unsigned v);
int atomic_max_i32(int* addr, int v);

}  // namespace emu

#define threadIdx (::emu::g_ctx.thread_idx)
#define blockIdx (::emu::g_ctx.block_idx)
#define blockDim (::emu::g_ctx.block_dim)
#define gridDim (::emu::g_ctx.grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  (void)mask;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = ::emu::shfl_xor(bits, lane_mask, width);
  std::memcpy(&v, &bits, 4);
  return v;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {  // the full warp (mask 0xffffffff), as shfl
  (void)mask;
  return ::emu::ballot(predicate != 0);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  (void)mask;
  return static_cast<int>(::emu::shfl_xor(static_cast<uint32_t>(v), lane_mask, width));
}

inline unsigned long long atomicAdd(unsigned long long* addr, unsigned long long v) {
  return ::emu::atomic_add_u64(addr, v);
}
inline unsigned atomicAdd(unsigned* addr, unsigned v) { return ::emu::atomic_add_u32(addr, v); }
inline int atomicMax(int* addr, int v) { return ::emu::atomic_max_i32(addr, v); }
// One CTA runs at a time, in program order: every write is visible to the next reader.
inline void __threadfence() {}

// Intrinsics with their device semantics (round-to-nearest conversions; __expf's accuracy is not emulated).
inline long long __float2ll_rn(float x) { return std::llrint(static_cast<double>(x)); }
inline float __expf(float x) { return std::exp(x); }
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
