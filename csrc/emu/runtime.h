// Host-side control of the CPU emulation (thread order, access counters); used by the binding's emu_* functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace emu {

// Order in which a CTA's threads are resumed between barriers, and a launch's CTAs are run. Correct kernels give
// bit-identical results in every order; a result that changes reveals a missing __syncthreads (a race) or a
// result that depends on which CTA finishes first.
enum class OrderMode { Forward, Reverse, Shuffle };
void set_order(OrderMode mode, uint64_t seed);

// Global-memory traffic of one call site (a load, store or atomic in the kernel code) in a launch. `offset`: the
// site's return address minus the library's load address; in a build with line tables (-g1) addr2line maps
// offset - 1 to the source line and its inline chain (pretrain.ops.emulation.source_lines).
struct SiteTraffic {
  uint64_t offset = 0;
  int kind = 0;  // global: 0 load, 1 store, 2 atomic; shared: 3 load, 4 store, 5 atomic
  uint64_t requests = 0, sectors = 0;  // shared: sectors are wavefronts (bank passes)
};

// Per kernel launch. Sectors are 32-byte; a request is one warp-wide memory instruction.
struct LaunchCounters {
  std::string name;
  std::vector<unsigned> grid;
  unsigned block = 0;
  uint64_t load_bytes = 0, store_bytes = 0;          // bytes the threads asked for
  uint64_t load_sectors = 0, store_sectors = 0;      // distinct sectors per warp request, summed (L2 traffic)
  uint64_t load_requests = 0, store_requests = 0;
  // Distinct sectors of the launch (DRAM floor: a perfect cache; a sector loaded after this launch stored it
  // counts once, as a store).
  uint64_t unique_load_sectors = 0, unique_store_sectors = 0;
  uint64_t atomics = 0, atomic_sectors = 0, atomic_requests = 0, unique_atomic_sectors = 0;
  uint64_t shared_load_bytes = 0, shared_store_bytes = 0;
  uint64_t shared_loads = 0;                         // shared-memory loads per thread (any width; an ldmatrix lane: 1)
  uint64_t shared_stores = 0;                        // shared-memory stores per thread (any width)
  uint64_t shared_atomics = 0;                       // atomics on shared memory (not in `atomics`)
  uint64_t shared_requests = 0, shared_wavefronts = 0;  // warp-wide shared accesses and their bank passes
  uint64_t shared_atomic_requests = 0, shared_atomic_wavefronts = 0;  // the atomics among them
  uint64_t mma = 0;                                  // warp-wide mma.sync instructions
  uint64_t dsmem_requests = 0, dsmem_bytes = 0;      // shared accesses to another CTA of the cluster (in the above)
  std::vector<SiteTraffic> sites;                    // the requests and sectors above, per call site and kind
};
// The library's `__shared__` statics as (offset from the load base, size): each CTA starts with them filled
// with 0xFF bytes (NaN in fp32/fp16/bf16), as uninitialised as a real SM's shared memory, so a read before a write
// shows up instead of finding the previous CTA's data.
void set_shared_statics(const std::vector<std::pair<uint64_t, uint64_t>>& offset_size);

// The last launch's dynamic shared memory as its last CTA left it.
std::string last_dynamic_smem();

void start_counting();
std::vector<LaunchCounters> stop_counting();

}  // namespace emu
