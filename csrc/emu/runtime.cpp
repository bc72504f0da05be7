// CPU emulation runtime for the csrc kernels: CTAs as fibers, warp exchanges, mma.sync, and access counters.
//
// Execution model. A launch runs its CTAs one after another on the calling thread. A CTA's blockDim threads are
// fibers (own stacks, a hand-written x86-64 context switch: ~10 ns, so barrier-heavy kernels stay fast). The
// scheduler resumes every runnable fiber in a chosen order (forward, reverse or a seeded shuffle) until it
// blocks at a __syncthreads, a warp exchange (shuffle, mma.sync) or exits; a barrier opens when every live
// thread of the CTA (warp) has reached it. Results that depend on that order reveal a missing barrier, and a
// CTA whose threads wait at different barriers is reported as a deadlock.
// A launch with thread-block clusters (sm_90) runs a cluster's CTAs together: all their threads are fibers of one
// schedule, each CTA with its own dynamic shared memory, which the others may address (distributed shared memory:
// map_shared_rank), and a cluster barrier opens when every live thread of the cluster has reached it.
//
// Counters (when enabled). The kernel TUs are compiled with -fsanitize=thread *instrumentation only* (no TSan
// runtime): every load/store calls a __tsan_* hook defined here with its address, size and call site. Accesses
// to the fiber's own stack, the launcher's stack and the index registers are local; addresses inside this
// library's writable segment are `__shared__` statics; everything else is global memory (the torch tensors).
// Global accesses are grouped per warp instruction -- (warp, call site, n-th execution by the lane) -- and each
// group counts its distinct 32-byte sectors, which is how the memory system sees a warp's request. Shared
// accesses are grouped the same way and each group counts its wavefronts: the passes the 32 banks (4-byte words,
// bank = word % 32) need to serve it, i.e. the most distinct words any one bank holds (a word read by several
// lanes is broadcast; every atomic on a bank is a pass of its own).
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "device.h"
#include "runtime.h"

namespace emu {

ThreadContext g_ctx;

void check_aligned16(const void* p, const char* what);  // below, beside load16

// ---------------------------------------------------------------------------------------------------------
// Context switch (System V x86-64): save the callee-saved registers, MXCSR and the x87 control word on the
// current stack, store its pointer, load the other one, restore, return into it.

extern "C" void emu_switch(void** save_sp, void* next_sp);
extern "C" void emu_fiber_trampoline();
extern "C" void emu_fiber_main(void* fiber);

asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch,.-emu_switch

.globl emu_fiber_trampoline
.type emu_fiber_trampoline,@function
emu_fiber_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  call emu_fiber_main
  ud2
.size emu_fiber_trampoline,.-emu_fiber_trampoline
)");

// AddressSanitizer must be told about every stack switch (PRETRAIN_DCNV3_EMU_FLAGS=-fsanitize=address builds).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr int kWarp = 32;

enum class State { Runnable, AtBarrier, AtClusterBarrier, AtWarpExchange, Done };

// A 16-byte cp.async in flight: the bytes it will land (read at issue: the kernels' sources are read-only).
struct AsyncCopy {
  void* dst;
  uint4 data;
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  State state = State::Done;
  uint3 tid{}, bid{};
  int cta = 0;       // the CTA's rank in its cluster (0 without clusters)
  unsigned seq = 0;  // warp exchanges this thread has completed (selects the staging buffer)
  std::unordered_map<uintptr_t, uint32_t> site_count;  // counters: executions per call site
  // cp.async groups of this thread: committed ones (oldest first), then the copies not yet committed.
  std::vector<std::vector<AsyncCopy>> async_groups;
  std::vector<AsyncCopy> async_open;
};

struct WarpStage {  // double-buffered: exchange k uses buffer k & 1
  uint32_t shfl[2][kWarp];
  uint32_t a[2][kWarp][4], b[2][kWarp][2];
  float c[2][kWarp][4];
  const char* rows[2][kWarp];  // ldmatrix row addresses
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<WarpStage> warps;
  std::vector<int> order;
  void* host_sp = nullptr;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
};

Scheduler g_sched;
#if EMU_ASAN
const void* g_host_stack_bottom = nullptr;  // reported by ASan when a fiber first runs
size_t g_host_stack_size = 0;
#endif

// The three switches, with ASan's fiber annotations in sanitizer builds.
void switch_to_fiber(void** host_sp, void* fiber_sp, char* stack) {
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack, kStackBytes);
  emu_switch(host_sp, fiber_sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)stack;
  emu_switch(host_sp, fiber_sp);
#endif
}

void switch_to_host(void** fiber_sp, bool finished) {
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_host_stack_bottom, g_host_stack_size);
  emu_switch(fiber_sp, g_sched.host_sp);
  __sanitizer_finish_switch_fiber(fake, &g_host_stack_bottom, &g_host_stack_size);
#else
  (void)finished;
  emu_switch(fiber_sp, g_sched.host_sp);
#endif
}
OrderMode g_order = OrderMode::Forward;
uint64_t g_order_seed = 0;
uint64_t g_cta_serial = 0;

// ---------------------------------------------------------------------------------------------------------
// Counters.

bool g_counting = false;
bool g_in_kernel = false;
std::vector<LaunchCounters> g_launches;
LaunchCounters* g_cur = nullptr;
uintptr_t g_writable_lo = 0, g_writable_hi = 0;  // this library's data + bss: the __shared__ statics
uintptr_t g_host_stack_lo = 0, g_host_stack_hi = 0;
std::vector<std::pair<char*, size_t>> g_shared_statics;  // poisoned before every CTA
std::vector<uint4> g_dynamic_smem;                        // the launch's dynamic shared memory (16-byte aligned)
uintptr_t g_dynamic_lo = 0, g_dynamic_hi = 0;             //   one segment per CTA of a cluster
size_t g_dynamic_segment = 0;                             //   a segment's bytes (the request, rounded up to 16)
unsigned g_cluster = 1;                                   // CTAs per cluster of the running launch

bool is_shared(uintptr_t a) {
  return (a >= g_writable_lo && a < g_writable_hi) || (a >= g_dynamic_lo && a < g_dynamic_hi);
}

struct SiteKey {
  int warp;
  uintptr_t site;
  uint32_t occurrence;
  bool operator==(const SiteKey& o) const {
    return warp == o.warp && site == o.site && occurrence == o.occurrence;
  }
};
struct SiteHash {
  size_t operator()(const SiteKey& k) const {
    return std::hash<uintptr_t>()(k.site) ^ (size_t(k.occurrence) * 0x9E3779B97F4A7C15ull) ^ (size_t(k.warp) << 48);
  }
};
struct Request {
  int kind;  // 0 load, 1 store, 2 atomic
  std::vector<uint64_t> sectors;
};
std::unordered_map<SiteKey, Request, SiteHash> g_requests;  // per CTA
struct SharedRequest {
  int kind;            // 0 load, 1 store, 2 atomic
  bool wide = false;   // a 64-bit atomic add: a load and a compare-and-swap loop on the GPU
  std::vector<uint32_t> words;  // the 4-byte words touched, one entry per lane and word
};
std::unordered_map<SiteKey, SharedRequest, SiteHash> g_shared_requests;  // per CTA
std::unordered_set<uint64_t> g_unique[3];                    // per launch: distinct sectors by kind
std::unordered_map<uint64_t, SiteTraffic> g_sites;           // per launch: by (call site << 3 | kind)

int writable_segment(struct dl_phdr_info* info, size_t, void* data) {
  const uintptr_t self = reinterpret_cast<uintptr_t>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (!(ph.p_flags & PF_W)) continue;
    // The writable PT_LOAD of the object that contains g_ctx is ours.
    if (self >= lo && self < hi) {
      g_writable_lo = lo;
      g_writable_hi = hi;
      return 1;
    }
  }
  return 0;
}

void find_writable_segment() {
  if (g_writable_hi != 0) return;
  dl_iterate_phdr(writable_segment, reinterpret_cast<void*>(&g_ctx));
}

void find_host_stack() {
  pthread_attr_t attr;
  void* addr = nullptr;
  size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
  }
  g_host_stack_lo = reinterpret_cast<uintptr_t>(addr);
  g_host_stack_hi = g_host_stack_lo + size;
}

// A launch's traffic at one call site, for one kind of access (0-2: global load, store, atomic; 3-5: shared).
SiteTraffic& site_traffic(uintptr_t site, int kind) { return g_sites[(uint64_t(site) << 3) | uint64_t(kind)]; }

void flush_requests() {
  for (auto& [key, req] : g_requests) {
    std::sort(req.sectors.begin(), req.sectors.end());
    const uint64_t n = std::unique(req.sectors.begin(), req.sectors.end()) - req.sectors.begin();
    SiteTraffic& site = site_traffic(key.site, req.kind);
    site.requests += 1;
    site.sectors += n;
    switch (req.kind) {
      case 0: g_cur->load_sectors += n; g_cur->load_requests += 1; break;
      case 1: g_cur->store_sectors += n; g_cur->store_requests += 1; break;
      default: g_cur->atomic_sectors += n; g_cur->atomic_requests += 1; break;
    }
  }
  g_requests.clear();
  uint32_t per_bank[32];
  for (auto& [key, req] : g_shared_requests) {
    std::sort(req.words.begin(), req.words.end());
    if (req.kind != 2) req.words.erase(std::unique(req.words.begin(), req.words.end()), req.words.end());
    std::fill(per_bank, per_bank + 32, 0u);
    uint32_t passes = 1;
    for (uint32_t w : req.words) passes = std::max(passes, ++per_bank[w % 32]);
    const uint64_t requests = req.wide ? 2 : 1, wavefronts = requests * passes;
    SiteTraffic& site = site_traffic(key.site, 3 + req.kind);
    site.requests += requests;
    site.sectors += wavefronts;
    g_cur->shared_requests += requests;
    g_cur->shared_wavefronts += wavefronts;
    if (req.kind == 2) {
      g_cur->shared_atomic_requests += requests;
      g_cur->shared_atomic_wavefronts += wavefronts;
    }
  }
  g_shared_requests.clear();
}

// The warp request the running thread's next pass through `site` belongs to: (its warp, the site, how many times
// the thread passed it before). Every pass counts, accesses or not (see atomic_add_u32_if).
SiteKey next_request(uintptr_t site) {
  Fiber& f = g_sched.fibers[g_sched.current];
  return SiteKey{g_sched.current / kWarp, site, f.site_count[site]++};
}

// Which CTA of the cluster owns dynamic shared memory address a (-1: not dynamic shared memory).
int smem_owner(uintptr_t a) {
  if (a < g_dynamic_lo || a >= g_dynamic_hi || g_dynamic_segment == 0) return -1;
  return int((a - g_dynamic_lo) / g_dynamic_segment);
}

// A shared access of `size` bytes at a into the warp request of its call site: its words, numbered from the start
// of the CTA's dynamic shared memory (the banks a GPU would use; statics: from their segment, an approximation).
// An access to another CTA's shared memory (distributed shared memory, in a cluster) also counts as remote.
void record_shared(uintptr_t a, size_t size, int kind, uintptr_t site, bool wide = false) {
  SharedRequest& req = g_shared_requests[next_request(site)];
  req.kind = kind;
  req.wide = req.wide || wide;
  const int owner = smem_owner(a);
  const uintptr_t base = owner >= 0 ? g_dynamic_lo + owner * g_dynamic_segment : g_writable_lo;
  if (owner >= 0 && owner != g_sched.fibers[g_sched.current].cta) {
    g_cur->dsmem_requests += 1;
    g_cur->dsmem_bytes += size;
  }
  for (uintptr_t w = (a - base) >> 2; w <= (a - base + size - 1) >> 2; ++w) req.words.push_back(uint32_t(w));
}

void record_global(uintptr_t addr, size_t size, int kind, uintptr_t site) {
  Request& req = g_requests[next_request(site)];
  req.kind = kind;
  for (uint64_t s = addr >> 5; s <= (addr + size - 1) >> 5; ++s) {
    req.sectors.push_back(s);
    // A perfect cache reads from DRAM only what this launch did not write first (split-K partials, say).
    if (kind != 0 || !g_unique[1].count(s)) g_unique[kind].insert(s);
  }
  if (kind == 0) g_cur->load_bytes += size;
  else if (kind == 1) g_cur->store_bytes += size;
}

inline void on_access(void* p, size_t size, bool write, uintptr_t site) {
  if (!g_counting || !g_in_kernel || g_sched.current < 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const Fiber& f = g_sched.fibers[g_sched.current];
  const uintptr_t stack_lo = reinterpret_cast<uintptr_t>(f.stack);
  if (a >= stack_lo && a < stack_lo + kStackBytes) return;  // the thread's own registers/local memory
  if (a >= g_host_stack_lo && a < g_host_stack_hi) return;  // kernel arguments, captured by the launcher
  const uintptr_t ctx = reinterpret_cast<uintptr_t>(&g_ctx);
  if (a >= ctx && a < ctx + sizeof(g_ctx)) return;           // threadIdx & co. are registers on a GPU
  if (is_shared(a)) {
    (write ? g_cur->shared_store_bytes : g_cur->shared_load_bytes) += size;
    (write ? g_cur->shared_stores : g_cur->shared_loads) += 1;
    record_shared(a, size, write ? 1 : 0, site);
    return;
  }
  record_global(a, size, write ? 1 : 0, site);
}

// ---------------------------------------------------------------------------------------------------------
// Scheduling.

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("dcnv3 emulation: " + msg); }

void yield_to_scheduler() {
  Fiber& f = g_sched.fibers[g_sched.current];
  switch_to_host(&f.sp, false);
}

void prepare_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("cannot allocate a fiber stack");
    f.stack = static_cast<char*>(mem);
  }
#if EMU_ASAN
  // A finished fiber never returns from its frames, so their redzones stay poisoned: clear them before the stack
  // is reused (at -O1 the next fiber's initial frame landed on one).
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  // Initial frame popped by emu_switch: [mxcsr|fpu cw] r15 r14 r13 r12 rbx rbp ret.
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes) - 2;
  uint64_t* sp = top - 8;
  uint32_t ctl[2] = {0x1F80u, 0x037Fu};
  std::memcpy(&sp[0], ctl, 8);
  sp[1] = sp[2] = sp[3] = 0;                           // r15 r14 r13
  sp[4] = reinterpret_cast<uint64_t>(&f);             // r12: the fiber, handed to emu_fiber_main
  sp[5] = sp[6] = 0;                                   // rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  f.sp = sp;
  f.state = State::Runnable;
  f.seq = 0;
  f.site_count.clear();
  f.async_groups.clear();
  f.async_open.clear();
}

void set_order(int n) {
  auto& order = g_sched.order;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  if (g_order == OrderMode::Reverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_order == OrderMode::Shuffle) {
    std::mt19937_64 rng(g_order_seed * 0x9E3779B97F4A7C15ull + g_cta_serial);
    std::shuffle(order.begin(), order.end(), rng);
  }
}

std::string describe_states(const dim3& block) {
  std::string s;
  int shown = 0;
  for (size_t i = 0; i < g_sched.fibers.size() && shown < 8; ++i) {
    const State st = g_sched.fibers[i].state;
    if (st == State::Done) continue;
    s += " thread " + std::to_string(i) +
         (st == State::AtBarrier          ? " at __syncthreads;"
          : st == State::AtClusterBarrier ? " at the cluster barrier;"
                                          : " at a warp exchange;");
    ++shown;
  }
  (void)block;
  return s;
}

// Runs one CTA, or the CTAs of one cluster together (ctas: their block indices, in rank order).
void run_cta(const dim3& block, const std::vector<uint3>& ctas) {
  const int per_cta = int(block.x * block.y * block.z), n = per_cta * int(ctas.size());
  auto& fibers = g_sched.fibers;
  if (int(fibers.size()) < n) fibers.resize(n);
  g_sched.warps.resize((n + kWarp - 1) / kWarp);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    const int t = i % per_cta;
    f.tid = uint3{unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (block.x * block.y))};
    f.cta = i / per_cta;
    f.bid = ctas[f.cta];
    prepare_fiber(f);
  }
  set_order(n);
  ++g_cta_serial;
  for (auto& [ptr, size] : g_shared_statics) std::memset(ptr, 0xFF, size);
  if (g_dynamic_hi != g_dynamic_lo) std::memset(g_dynamic_smem.data(), 0xFF, g_dynamic_hi - g_dynamic_lo);
  // One pass over CTA c's runnable threads (in the thread order), then its barriers open where every live thread
  // arrived (exited threads count as arrived): __syncthreads, and each warp's exchanges. Whether anything happened.
  auto step = [&](int c) {
    bool ran = false, opened = false;
    for (int i : g_sched.order) {
      Fiber& f = fibers[i];
      if (f.cta != c || f.state != State::Runnable) continue;
      g_sched.current = i;
      g_ctx.thread_idx = f.tid;
      g_ctx.block_idx = f.bid;
      switch_to_fiber(&g_sched.host_sp, f.sp, f.stack);
      g_sched.current = -1;
      if (!g_sched.error.empty()) {
        std::string err;
        std::swap(err, g_sched.error);
        fail(err);
      }
      ran = true;
    }
    const int lo_c = c * per_cta, hi_c = lo_c + per_cta;
    int live_c = 0, at_barrier = 0;
    for (int i = lo_c; i < hi_c; ++i) {
      live_c += fibers[i].state != State::Done;
      at_barrier += fibers[i].state == State::AtBarrier;
    }
    if (live_c > 0 && at_barrier == live_c) {
      for (int i = lo_c; i < hi_c; ++i) fibers[i].state = State::Runnable;
      opened = true;
    }
    for (int lo = lo_c; lo < hi_c; lo += kWarp) {
      const int hi = std::min(hi_c, lo + kWarp);
      int waiting = 0, done = 0;
      for (int i = lo; i < hi; ++i) {
        waiting += fibers[i].state == State::AtWarpExchange;
        done += fibers[i].state == State::Done;
      }
      if (waiting == 0) continue;
      if (waiting + done == hi - lo) {
        if (done != 0) fail("a warp exchange (shuffle/mma.sync) with exited lanes in warp " + std::to_string(lo / kWarp));
        for (int i = lo; i < hi; ++i) fibers[i].state = State::Runnable;
        opened = true;
      }
    }
    return ran || opened;
  };
  // A cluster's CTAs in the thread order's sense (rank order, reversed, or shuffled), each run as far as it can go
  // (to the cluster barrier, or its end) before the next: the most skew a cluster can have on a GPU, so a CTA that
  // reads another's shared memory before a cluster barrier published it finds poison or stale data.
  std::vector<int> cta_order(ctas.size());
  std::iota(cta_order.begin(), cta_order.end(), 0);
  if (g_order == OrderMode::Reverse) std::reverse(cta_order.begin(), cta_order.end());
  if (g_order == OrderMode::Shuffle) {
    std::mt19937_64 rng(g_order_seed * 0x9E3779B97F4A7C15ull + g_cta_serial * 31);
    std::shuffle(cta_order.begin(), cta_order.end(), rng);
  }
  for (;;) {
    bool progress = false;
    for (int c : cta_order)
      while (step(c)) progress = true;
    int live = 0, at_cluster_barrier = 0;
    for (int i = 0; i < n; ++i) {
      live += fibers[i].state != State::Done;
      at_cluster_barrier += fibers[i].state == State::AtClusterBarrier;
    }
    if (live == 0) break;
    if (at_cluster_barrier == live) {  // the cluster barrier opens
      for (int i = 0; i < n; ++i)
        if (fibers[i].state == State::AtClusterBarrier) fibers[i].state = State::Runnable;
      continue;
    }
    if (!progress) fail("deadlock: threads wait at different barriers:" + describe_states(block));
  }
}

WarpStage& my_warp_stage(int& lane, unsigned& buf) {
  Fiber& f = g_sched.fibers[g_sched.current];
  lane = g_sched.current % kWarp;
  buf = f.seq & 1u;
  return g_sched.warps[g_sched.current / kWarp];
}

void warp_exchange_wait() {
  Fiber& f = g_sched.fibers[g_sched.current];
  f.state = State::AtWarpExchange;
  yield_to_scheduler();
  ++f.seq;
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 0x400u), int(exp) - 25);
  return sign ? -v : v;
}

}  // namespace

extern "C" void emu_fiber_main(void* fiber) {
  Fiber* f = static_cast<Fiber*>(fiber);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_host_stack_bottom, &g_host_stack_size);
#endif
  try {
    (*g_sched.body)();
    if (!f->async_groups.empty() || !f->async_open.empty())
      fail("a thread exited with cp.async copies it never waited for (cp.async.wait_group)");
  } catch (const std::exception& e) {
    g_sched.error = e.what();
  } catch (...) {
    g_sched.error = "unknown exception in a kernel thread";
  }
  f->state = State::Done;
  switch_to_host(&f->sp, true);
  std::abort();  // a finished fiber is never resumed
}

// ---------------------------------------------------------------------------------------------------------
// Device API.

void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body,
            unsigned cluster) {
  if (g_in_kernel) fail("nested kernel launch");
  if (dynamic_smem_bytes > kMaxSharedBytes)
    fail(std::string(name) + ": " + std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory (at most " +
         std::to_string(kMaxSharedBytes) + ")");
  if (cluster < 1 || cluster > kMaxClusterCtas || grid.x % cluster != 0)
    fail(std::string(name) + ": a cluster of " + std::to_string(cluster) + " CTAs (1 to " +
         std::to_string(kMaxClusterCtas) + ", dividing grid.x = " + std::to_string(grid.x) + ")");
  if (cluster > 1 && (block.x * block.y * block.z) % kWarp != 0)
    fail(std::string(name) + ": a cluster launch needs whole warps per CTA");
  g_cluster = cluster;
  g_dynamic_segment = (dynamic_smem_bytes + sizeof(uint4) - 1) / sizeof(uint4) * sizeof(uint4);
  g_dynamic_smem.assign(cluster * g_dynamic_segment / sizeof(uint4), uint4{});
  g_dynamic_lo = reinterpret_cast<uintptr_t>(g_dynamic_smem.data());
  g_dynamic_hi = g_dynamic_lo + cluster * g_dynamic_segment;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0) return;
  if (block.x * block.y * block.z > 1024) fail(std::string(name) + ": more than 1024 threads per block");
  find_writable_segment();
  find_host_stack();
  if (g_counting) {
    g_launches.push_back(LaunchCounters{});
    g_cur = &g_launches.back();
    g_cur->name = name;
    g_cur->grid = {grid.x, grid.y, grid.z};
    g_cur->block = block.x * block.y * block.z;
    for (auto& u : g_unique) u.clear();
    g_sites.clear();
  }
  g_sched.body = &body;
  g_ctx.grid_dim = grid;
  g_ctx.block_dim = block;
  g_in_kernel = true;
  try {
    // CTAs (clusters) run one at a time, in the thread order's sense too: forward, reversed, or shuffled (so a
    // result that depends on which CTA finishes first, e.g. which split of a split-K reduction arrives last, shows).
    // A cluster is grid.x-consecutive CTAs, its rank the position among them.
    std::vector<uint3> firsts;
    firsts.reserve(size_t(grid.x / cluster) * grid.y * grid.z);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; x += cluster) firsts.push_back(uint3{x, y, z});
    if (g_order == OrderMode::Reverse) std::reverse(firsts.begin(), firsts.end());
    if (g_order == OrderMode::Shuffle) {
      std::mt19937_64 rng(g_order_seed * 0x9E3779B97F4A7C15ull + firsts.size());
      std::shuffle(firsts.begin(), firsts.end(), rng);
    }
    std::vector<uint3> ctas(cluster);
    for (const uint3& first : firsts) {
      for (unsigned r = 0; r < cluster; ++r) ctas[r] = uint3{first.x + r, first.y, first.z};
      g_ctx.block_idx = first;
      run_cta(block, ctas);
      if (g_counting) flush_requests();
    }
  } catch (...) {
    g_in_kernel = false;
    g_requests.clear();
    g_shared_requests.clear();
    throw;
  }
  g_in_kernel = false;
  if (g_counting) {
    g_cur->unique_load_sectors = g_unique[0].size();
    g_cur->unique_store_sectors = g_unique[1].size();
    g_cur->unique_atomic_sectors = g_unique[2].size();
    for (const auto& [key, traffic] : g_sites) {
      SiteTraffic t = traffic;
      const uintptr_t site = uintptr_t(key >> 3);
      Dl_info info{};
      t.offset = dladdr(reinterpret_cast<void*>(site), &info) != 0 ? site - uintptr_t(info.dli_fbase) : site;
      t.kind = int(key & 7);
      g_cur->sites.push_back(t);
    }
    std::sort(g_cur->sites.begin(), g_cur->sites.end(),
              [](const SiteTraffic& a, const SiteTraffic& b) { return a.sectors > b.sectors; });
    g_cur = nullptr;
  }
}

void syncthreads() {
  if (g_sched.current < 0) fail("__syncthreads outside a kernel");
  g_sched.fibers[g_sched.current].state = State::AtBarrier;
  yield_to_scheduler();
}

uint32_t shfl_xor(uint32_t bits, int lane_mask, int width) {
  if (width != kWarp) fail("__shfl_xor_sync: only width 32 is emulated");
  int lane;
  unsigned buf;
  WarpStage& w = my_warp_stage(lane, buf);
  w.shfl[buf][lane] = bits;
  warp_exchange_wait();
  return w.shfl[buf][(lane ^ lane_mask) & (kWarp - 1)];
}

uint32_t ballot(bool predicate) {
  int lane;
  unsigned buf;
  WarpStage& w = my_warp_stage(lane, buf);
  w.shfl[buf][lane] = predicate ? 1u : 0u;
  warp_exchange_wait();
  uint32_t bits = 0;
  for (int i = 0; i < kWarp; ++i) bits |= (w.shfl[buf][i] != 0u ? 1u : 0u) << i;
  return bits;
}

void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  int lane;
  unsigned buf;
  WarpStage& w = my_warp_stage(lane, buf);
  std::memcpy(w.a[buf][lane], a, sizeof(w.a[buf][lane]));
  std::memcpy(w.b[buf][lane], b, sizeof(w.b[buf][lane]));
  std::memcpy(w.c[buf][lane], c, sizeof(w.c[buf][lane]));
  warp_exchange_wait();
  if (lane == 0 && g_counting && g_cur) g_cur->mma += 1;
  // PTX ISA fragment layouts of m16n8k16 (.row.col, 16-bit A/B, f32 C/D): group = lane / 4, tig = lane % 4.
  //   A (16x16): a_i, i = 0..7 (two per register): row = group + 8 * ((i / 2) % 2), col = 2 tig + i % 2 + 8 (i / 4)
  //   B (16x8):  b_i, i = 0..3:                   row (k) = 2 tig + i % 2 + 8 (i / 2), col (n) = group
  //   C/D (16x8): c_i, i = 0..3:                  row = group + 8 (i / 2), col = 2 tig + i % 2
  auto a_at = [&](int row, int k) {
    const int g = row % 8, hi = row / 8, kk = k % 8, khi = k / 8;
    const int i = 4 * khi + 2 * hi + (kk % 2);
    const uint32_t reg = w.a[buf][g * 4 + kk / 2][i / 2];
    return half_bits_to_float(uint16_t(reg >> (16 * (i % 2))), bf16);
  };
  auto b_at = [&](int k, int n) {
    const int kk = k % 8, khi = k / 8;
    const int i = 2 * khi + (kk % 2);
    const uint32_t reg = w.b[buf][n * 4 + kk / 2][i / 2];
    return half_bits_to_float(uint16_t(reg >> (16 * (i % 2))), bf16);
  };
  const int group = lane / 4, tig = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i / 2), col = 2 * tig + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(a_at(row, k), b_at(k, col), acc);  // exact products
    d[i] = acc;
  }
}

// The warp's 16-byte row addresses, exchanged: lanes 8i..8i+7 hold the rows of matrix i (checked like a GPU
// would; shared memory only, so the access site does not matter to the counters).
const char* const* ldmatrix_rows(const void* row, int& lane) {
  check_aligned16(row, "ldmatrix (row address)");
  if (g_in_kernel && !is_shared(reinterpret_cast<uintptr_t>(row))) fail("ldmatrix: a row outside shared memory");
  on_access(const_cast<void*>(row), 16, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  unsigned buf;
  WarpStage& w = my_warp_stage(lane, buf);
  w.rows[buf][lane] = static_cast<const char*>(row);
  warp_exchange_wait();
  return w.rows[buf];
}

void ldmatrix_x4(const void* row, uint32_t* d) {
  int lane;
  const char* const* rows = ldmatrix_rows(row, lane);
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], rows[8 * i + lane / 4] + 4 * (lane % 4), 4);
}

void ldmatrix_x4_trans(const void* row, uint32_t* d) {
  int lane;
  const char* const* rows = ldmatrix_rows(row, lane);
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;  // column lane / 4 of rows 2 (lane % 4) and 2 (lane % 4) + 1: the transposed fragment
    std::memcpy(&lo, rows[8 * i + 2 * (lane % 4)] + 2 * (lane / 4), 2);
    std::memcpy(&hi, rows[8 * i + 2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
    d[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

void* dynamic_smem() {
  if (!g_in_kernel) fail("dynamic shared memory outside a kernel");
  const int cta = g_sched.current >= 0 ? g_sched.fibers[g_sched.current].cta : 0;
  return reinterpret_cast<char*>(g_dynamic_smem.data()) + cta * g_dynamic_segment;
}

unsigned cluster_rank() {
  if (g_sched.current < 0) fail("cluster rank outside a kernel thread");
  return unsigned(g_sched.fibers[g_sched.current].cta);
}

unsigned cluster_size() { return g_cluster; }

void cluster_sync() {
  if (g_sched.current < 0) fail("cluster barrier outside a kernel thread");
  g_sched.fibers[g_sched.current].state = State::AtClusterBarrier;
  yield_to_scheduler();
}

void* map_shared_rank(void* p, unsigned rank) {
  if (g_sched.current < 0) fail("mapa outside a kernel thread");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int own = g_sched.fibers[g_sched.current].cta;
  if (smem_owner(a) != own) fail("mapa: an address outside the CTA's dynamic shared memory");
  if (rank >= g_cluster) fail("mapa: rank " + std::to_string(rank) + " of a cluster of " + std::to_string(g_cluster));
  return reinterpret_cast<void*>(a + (int64_t(rank) - own) * int64_t(g_dynamic_segment));
}

// Counts an atomic of `size` bytes at addr from call site `site`, when counting: on shared memory an SM-local
// read-modify-write (no L2 traffic; a pass of the banks per access; `wide`: two requests), else a global one.
void count_atomic(void* addr, size_t size, uintptr_t site, bool wide = false) {
  if (!g_counting || !g_cur || !g_in_kernel) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (is_shared(a)) {
    g_cur->shared_atomics += 1;
    g_cur->shared_load_bytes += size;
    g_cur->shared_store_bytes += size;
    record_shared(a, size, 2, site, wide);
  } else {
    g_cur->atomics += 1;
    record_global(a, size, 2, site);
  }
}

#define EMU_CALL_SITE reinterpret_cast<uintptr_t>(__builtin_return_address(0))

// sm_90 has no 64-bit shared-memory atomic add: nvcc emits a load and an ATOMS.CAST.SPIN.64 compare-and-swap
// loop (cuobjdump -sass), counted as two requests (a lower bound: a lost race spins again).
unsigned long long atomic_add_u64(unsigned long long* addr, unsigned long long v) {
  count_atomic(addr, 8, EMU_CALL_SITE, /*wide=*/true);
  const unsigned long long old = *addr;
  *addr = old + v;
  return old;
}

unsigned atomic_add_u32(unsigned* addr, unsigned v) {
  count_atomic(addr, 4, EMU_CALL_SITE);
  const unsigned old = *addr;
  *addr = old + v;
  return old;
}

void atomic_add_u32_if(bool pred, unsigned* addr, unsigned v) {
  if (!pred) {  // the lane passes the site without an access
    if (g_counting && g_cur && g_in_kernel && g_sched.current >= 0) next_request(EMU_CALL_SITE);
    return;
  }
  count_atomic(addr, 4, EMU_CALL_SITE);
  *addr += v;
}

int atomic_max_i32(int* addr, int v) {
  count_atomic(addr, 4, EMU_CALL_SITE);
  const int old = *addr;
  *addr = std::max(old, v);
  return old;
}

#undef EMU_CALL_SITE

// ---------------------------------------------------------------------------------------------------------
// Control (bound into Python by the binding).

void set_order(OrderMode mode, uint64_t seed) {
  g_order = mode;
  g_order_seed = seed;
}

std::string last_dynamic_smem() {
  return std::string(reinterpret_cast<const char*>(g_dynamic_smem.data()), g_dynamic_hi - g_dynamic_lo);
}

void set_shared_statics(const std::vector<std::pair<uint64_t, uint64_t>>& offset_size) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&g_ctx), &info) == 0) fail("cannot find the emulation library's load base");
  g_shared_statics.clear();
  for (const auto& [offset, size] : offset_size)
    g_shared_statics.emplace_back(static_cast<char*>(info.dli_fbase) + offset, size);
}

void start_counting() {
  g_launches.clear();
  g_counting = true;
}

std::vector<LaunchCounters> stop_counting() {
  g_counting = false;
  std::vector<LaunchCounters> out;
  out.swap(g_launches);
  return out;
}

}  // namespace emu

namespace emu {

// Not instrumented (this file is compiled without -fsanitize=thread): the access is recorded once, at the caller.
// A GPU faults on a 16-byte access that is not 16-byte aligned (cudaErrorMisalignedAddress, which ends the
// process's CUDA context); here it is an error naming the access.
void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    char at[32];
    std::snprintf(at, sizeof at, "%p", p);
    fail(std::string(what) + ": a 16-byte access at " + at + ", not 16-byte aligned (a GPU faults: misaligned address)");
  }
}

uint4 load16(const void* p) {
  check_aligned16(p, "load16");
  on_access(const_cast<void*>(p), 16, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}

void store16(void* p, uint4 v) {
  check_aligned16(p, "store16");
  on_access(p, 16, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  std::memcpy(p, &v, 16);
}

// cp.async: the copy lands only when the thread waits for its group. Until then the destination holds 0xFF bytes
// (NaN), so a read that comes before the wait (or before the barrier that publishes other threads' copies) sees
// garbage instead of the data, as it may on a GPU.
void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const uintptr_t site = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  check_aligned16(smem_dst, "cp.async (shared destination)");
  if (valid) check_aligned16(gmem_src, "cp.async (global source)");
  if (g_in_kernel && !is_shared(reinterpret_cast<uintptr_t>(smem_dst)))
    fail("cp.async: a destination outside shared memory");
  if (g_sched.current < 0) fail("cp.async outside a kernel thread");
  AsyncCopy c{smem_dst, uint4{0, 0, 0, 0}};
  if (valid) {  // src-size 0 reads nothing and zero-fills
    on_access(const_cast<void*>(gmem_src), 16, false, site);
    std::memcpy(&c.data, gmem_src, 16);
  }
  on_access(smem_dst, 16, true, site);
  std::memset(smem_dst, 0xFF, 16);
  g_sched.fibers[g_sched.current].async_open.push_back(c);
}

void cp_async_commit() {
  if (g_sched.current < 0) fail("cp.async.commit_group outside a kernel thread");
  Fiber& f = g_sched.fibers[g_sched.current];
  f.async_groups.push_back(std::move(f.async_open));
  f.async_open.clear();
}

void cp_async_wait(int pending) {
  if (g_sched.current < 0) fail("cp.async.wait_group outside a kernel thread");
  Fiber& f = g_sched.fibers[g_sched.current];
  while (f.async_groups.size() > static_cast<size_t>(pending)) {  // all but the `pending` most recent groups land
    for (const AsyncCopy& c : f.async_groups.front()) std::memcpy(c.dst, &c.data, 16);
    f.async_groups.erase(f.async_groups.begin());
  }
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// ThreadSanitizer instrumentation entry points (compiled-in by -fsanitize=thread in the kernel TUs; no TSan
// runtime is linked): each memory access of the kernels lands here.

#define EMU_HOOK(KIND, WRITE, N)                                                                    \
  extern "C" void __tsan_##KIND##N(void* p) {                                                      \
    emu::on_access(p, N, WRITE, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));          \
  }
#define EMU_HOOKS(N)                   \
  EMU_HOOK(read, false, N)             \
  EMU_HOOK(write, true, N)             \
  EMU_HOOK(unaligned_read, false, N)   \
  EMU_HOOK(unaligned_write, true, N)   \
  EMU_HOOK(volatile_read, false, N)    \
  EMU_HOOK(volatile_write, true, N)
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)

extern "C" {
void __tsan_read_range(void* p, unsigned long n) {
  emu::on_access(p, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
void __tsan_write_range(void* p, unsigned long n) {
  emu::on_access(p, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
