// CPU emulation of the GSPN CUDA kernels (kernels/cuda/*.cu), for the tests in this folder.
//
// The kernel sources compile unchanged as C++20; this file supplies what kernels/cuda/gspn_device.cuh
// provides on the GPU, plus the CUDA built-ins they use:
//   - a CTA is `blockDim.x` std::threads; __syncthreads is a std::barrier over them;
//   - a warp is 32 of those threads; a shuffle writes the lane's value to the warp's exchange slots,
//     waits on the warp's barrier, reads the source lane's slot and waits again. Shuffles must be
//     reached by all 32 lanes with the full mask (checked);
//   - a named barrier (bar.sync id, count) is a std::barrier of that count, one per id and CTA;
//   - the 4 CTAs of a gspn_mix group run concurrently, each with its own shared memory: as a cluster
//     (the cluster barrier is a std::barrier over all their threads; a distributed-shared-memory read
//     maps the address to the same offset in the other CTA's shared memory, bounds checked, and only
//     after the reading thread has passed a cluster barrier), or, for the portable kernels, as 4
//     independent CTAs that meet only through global memory (tickets: std::atomic_ref), which may also
//     be run one after another in either order (emu_set_order);
//   - cp.async copies are deferred: the bytes move when the issuing thread's cp.async.wait_group
//     retires their commit group (a read before that sees the 0xFF fill; a copy never waited for is an
//     error);
//   - dynamic shared memory starts filled with 0xFF bytes (NaN in fp32, bf16 and fp16: a read of an
//     unwritten value reaches the outputs) and is followed by a canary (an overrun is counted; under
//     AddressSanitizer the canary is poisoned, so the overrun is reported where it happens);
//   - gload / gstore count the bytes of every global access and check its alignment;
//   - with emu_bank_counting(1), every shared-memory access (sld, sst, cp.async destinations,
//     distributed-shared-memory reads) is logged, and after each group the accesses of a warp at one
//     program point (the n-th execution of a call site by each lane) are grouped into one warp access
//     whose bank conflict is counted as the hardware serves it: 32 banks of 4 bytes, lanes in phases of
//     128 bytes (32 lanes for accesses up to 4 bytes, 16 for 8, 8 for 16), a phase taking as many
//     wavefronts as the most distinct 4-byte words any bank holds (the same word is a broadcast);
//   - fp16 conversions through _Float16 (round to nearest even, as cvt.rn.f16.f32).
// Groups run one after another. Built as a shared library (driven from Python by ctypes, with the
// launch plan and argument struct of cupy_backend) or, with -DEMU_MAIN, as a standalone driver that
// replays recorded launches on random inputs (the AddressSanitizer / ThreadSanitizer runs).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n)
#define EMU_UNPOISON(p, n)
#endif

#define GSPN_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __align__(n) alignas(n)
#define __grid_constant__
#define __cluster_dims__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// ---------------------------------------------------------------------------------------------
// Errors and byte counts

static std::mutex emu_mutex;
static long emu_errors = 0;
static std::string emu_first_error;
static std::atomic<long long> emu_loaded{0}, emu_stored{0};

static void emu_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(emu_mutex);
  if (emu_errors++ == 0) emu_first_error = what;
}

// ---------------------------------------------------------------------------------------------
// Execution contexts

struct EmuWarp {
  std::barrier<> bar{32};
  float slot[32];
};

struct EmuCluster;

// One logged shared-memory access (bank counting): call site, its execution count in this thread,
// byte offset in the shared memory it touches, width.
struct EmuAccess {
  uint32_t site, occ, off, size;
};

struct EmuCta {
  int rank = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<EmuWarp>> warps;
  EmuCluster* cluster = nullptr;
  std::unique_ptr<std::mutex> named_mutex = std::make_unique<std::mutex>();
  std::unique_ptr<std::barrier<>> named[16];  // bar.sync id, created by the first thread to arrive
  int named_count[16] = {};
  std::vector<std::vector<EmuAccess>> log;    // per thread, when counting banks
};

struct EmuCluster {
  int size = 1;
  bool is_cluster = false;  // a thread-block cluster (else independent CTAs run side by side)
  std::unique_ptr<std::barrier<>> bar;
  std::vector<EmuCta> ctas;
};

thread_local dim3 threadIdx, blockIdx;
thread_local EmuCta* emu_cta = nullptr;
thread_local long long emu_thread_loaded = 0, emu_thread_stored = 0;
thread_local int emu_cluster_phase = 0;  // cluster barriers this thread has passed
static dim3 blockDim, gridDim;

static void __syncthreads() { emu_cta->bar->arrive_and_wait(); }

static float emu_shuffle(unsigned mask, float v, int src_of_lane(int, int, int), int delta, int width) {
  if (mask != 0xffffffffu) emu_error("shuffle with a partial mask");
  if (width < 1 || width > 32 || (width & (width - 1))) emu_error("shuffle width not a power of two <= 32");
  const int lane = threadIdx.x & 31;
  EmuWarp& w = *emu_cta->warps[threadIdx.x >> 5];
  w.slot[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.slot[src_of_lane(lane, delta, width)];
  w.bar.arrive_and_wait();
  return r;
}
static int emu_src_up(int lane, int delta, int width) { return lane % width >= delta ? lane - delta : lane; }
static int emu_src_down(int lane, int delta, int width) { return lane % width + delta < width ? lane + delta : lane; }
static float __shfl_up_sync(unsigned mask, float v, unsigned delta, int width) {
  return emu_shuffle(mask, v, emu_src_up, (int)delta, width);
}
static float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width) {
  return emu_shuffle(mask, v, emu_src_down, (int)delta, width);
}

static unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
using std::max;
using std::min;

// ---------------------------------------------------------------------------------------------
// Bank counting: sites and the log

static std::atomic<bool> emu_banks_on{false};
static std::mutex emu_site_mutex;
static std::map<std::pair<std::string, int>, uint32_t> emu_site_ids;
static std::vector<std::string> emu_site_names;
thread_local std::unordered_map<uint64_t, uint32_t> emu_site_cache;  // (line, column) -> site id
thread_local std::unordered_map<uint32_t, uint32_t> emu_occ;         // site -> executions so far

static uint32_t emu_site(const std::source_location& loc) {
  const uint64_t key = ((uint64_t)loc.line() << 20) ^ loc.column() ^ ((uint64_t)(uintptr_t)loc.file_name() << 32);
  auto hit = emu_site_cache.find(key);
  if (hit != emu_site_cache.end()) return hit->second;
  std::string file = loc.file_name();
  file = file.substr(file.find_last_of('/') + 1);
  std::lock_guard<std::mutex> lock(emu_site_mutex);
  auto [it, fresh] = emu_site_ids.try_emplace({file, (int)loc.line()}, (uint32_t)emu_site_names.size());
  if (fresh) emu_site_names.push_back(file + ":" + std::to_string(loc.line()));
  emu_site_cache[key] = it->second;
  return it->second;
}

static void emu_log(const EmuCta* owner, const void* p, size_t size, const std::source_location& loc) {
  const auto off = reinterpret_cast<const unsigned char*>(p) - owner->smem;
  if (off < 0 || (size_t)off + size > owner->smem_bytes) {
    emu_error("shared-memory access outside the CTA's shared memory");
    return;
  }
  if (!emu_banks_on.load(std::memory_order_relaxed)) return;
  const uint32_t site = emu_site(loc);
  emu_cta->log[threadIdx.x].push_back({site, emu_occ[site]++, (uint32_t)off, (uint32_t)size});
}

// Bank statistics over every counted warp access since the last reset.
struct EmuBankStats {
  long long accesses = 0, wavefronts = 0, phases = 0, worst = 0;
  long long by_degree[6] = {};  // 1, 2, 3-4, 5-8, 9-16, 17-32
  std::map<uint32_t, std::pair<long long, long long>> sites;  // site -> (worst degree, accesses)
};
static EmuBankStats emu_banks;

static void emu_count_warp(std::vector<const EmuAccess*>& lanes, const std::vector<int>& lane_of) {
  // lanes: the accesses of one warp access; lane_of[i]: the lane of lanes[i]
  const uint32_t size = lanes[0]->size;
  const int per_phase = size <= 4 ? 32 : (size == 8 ? 16 : 8);
  long long worst = 0;
  for (int phase = 0; phase < 32 / per_phase; ++phase) {
    std::vector<std::vector<uint32_t>> words(32);
    bool any = false;
    for (size_t i = 0; i < lanes.size(); ++i) {
      if (lane_of[i] / per_phase != phase) continue;
      any = true;
      for (uint32_t w = lanes[i]->off / 4; w <= (lanes[i]->off + lanes[i]->size - 1) / 4; ++w) {
        auto& bank = words[w % 32];
        if (std::find(bank.begin(), bank.end(), w) == bank.end()) bank.push_back(w);
      }
    }
    if (!any) continue;
    long long deg = 1;
    for (auto& bank : words) deg = std::max<long long>(deg, (long long)bank.size());
    emu_banks.wavefronts += deg;
    emu_banks.phases += 1;
    worst = std::max(worst, deg);
  }
  emu_banks.accesses += 1;
  emu_banks.worst = std::max(emu_banks.worst, worst);
  const int bucket = worst <= 1 ? 0 : worst <= 2 ? 1 : worst <= 4 ? 2 : worst <= 8 ? 3 : worst <= 16 ? 4 : 5;
  emu_banks.by_degree[bucket] += 1;
  auto& site = emu_banks.sites[lanes[0]->site];
  site.first = std::max(site.first, worst);
  site.second += 1;
}

static void emu_count_cta(EmuCta& c, int nthreads) {
  for (int w0 = 0; w0 < nthreads; w0 += 32) {
    std::map<std::pair<uint32_t, uint32_t>, std::pair<std::vector<const EmuAccess*>, std::vector<int>>> groups;
    for (int lane = 0; lane < 32; ++lane) {
      for (const EmuAccess& acc : c.log[w0 + lane]) {
        auto& g = groups[{acc.site, acc.occ}];
        g.first.push_back(&acc);
        g.second.push_back(lane);
      }
    }
    for (auto& [key, g] : groups) emu_count_warp(g.first, g.second);
  }
  for (auto& v : c.log) v.clear();
}

// ---------------------------------------------------------------------------------------------
// The primitives of gspn_device.cuh

static unsigned char* dyn_smem() { return emu_cta->smem; }

template <class V>
static V gload(const V* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V)) emu_error("misaligned global load of " + std::to_string(sizeof(V)) + " bytes");
  emu_thread_loaded += sizeof(V);
  return *p;
}
template <class V>
static void gstore(V* p, const V& v) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V)) emu_error("misaligned global store of " + std::to_string(sizeof(V)) + " bytes");
  emu_thread_stored += sizeof(V);
  *p = v;
}
static float gload_cg(const float* p) { return gload(p); }

template <class V>
static V sld(const V* p, const std::source_location loc = std::source_location::current()) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V)) emu_error("misaligned shared-memory load of " + std::to_string(sizeof(V)) + " bytes");
  emu_log(emu_cta, p, sizeof(V), loc);
  return *p;
}
template <class V>
static void sst(V* p, const V& v, const std::source_location loc = std::source_location::current()) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V)) emu_error("misaligned shared-memory store of " + std::to_string(sizeof(V)) + " bytes");
  emu_log(emu_cta, p, sizeof(V), loc);
  *p = v;
}

// cp.async: deferred copies, retired by commit group.
struct EmuCopy {
  void* dst;
  const void* src;
  int bytes;
};
thread_local std::vector<EmuCopy> emu_pending;      // issued, not yet retired, in issue order
thread_local std::vector<size_t> emu_group_ends;    // committed groups: end index into emu_pending

static void emu_cp_async(void* dst, const void* src, int bytes, const std::source_location& loc) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes) {
    emu_error("misaligned cp.async of " + std::to_string(bytes) + " bytes");
    return;
  }
  emu_log(emu_cta, dst, bytes, loc);
  emu_thread_loaded += bytes;
  emu_pending.push_back({dst, src, bytes});
}
static void cp_async16(void* dst, const void* src, const std::source_location loc = std::source_location::current()) {
  emu_cp_async(dst, src, 16, loc);
}
static void cp_async4(void* dst, const void* src, const std::source_location loc = std::source_location::current()) {
  emu_cp_async(dst, src, 4, loc);
}
static void cp_async_commit() { emu_group_ends.push_back(emu_pending.size()); }
template <int N>
static void cp_async_wait() {
  const int groups = (int)emu_group_ends.size();
  if (groups <= N) return;
  const size_t done = emu_group_ends[groups - N - 1];
  for (size_t i = 0; i < done; ++i) std::memcpy(emu_pending[i].dst, emu_pending[i].src, emu_pending[i].bytes);
  emu_pending.erase(emu_pending.begin(), emu_pending.begin() + done);
  emu_group_ends.erase(emu_group_ends.begin(), emu_group_ends.begin() + (groups - N));
  for (auto& end : emu_group_ends) end -= done;
}

static void line_sync(int id, int threads) {
  if (id < 1 || id > 15 || threads % 32 || threads < 32 || threads > (int)blockDim.x) {
    emu_error("bad named barrier " + std::to_string(id) + " over " + std::to_string(threads) + " threads");
    return;
  }
  std::barrier<>* b;
  {
    std::lock_guard<std::mutex> lock(*emu_cta->named_mutex);
    if (!emu_cta->named[id]) {
      emu_cta->named[id] = std::make_unique<std::barrier<>>(threads);
      emu_cta->named_count[id] = threads;
    } else if (emu_cta->named_count[id] != threads) {
      emu_error("named barrier " + std::to_string(id) + " used with two thread counts");
    }
    b = emu_cta->named[id].get();
  }
  b->arrive_and_wait();
}

// Tickets of the portable direction sum.
static int ticket_take(int* p) { return std::atomic_ref<int>(*p).fetch_add(1, std::memory_order_relaxed); }
static void release_add(int* p) { std::atomic_ref<int>(*p).fetch_add(1, std::memory_order_release); }
static int acquire_load(const int* p) { return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire); }
static void backoff() { std::this_thread::yield(); }

static void cluster_sync() {
  if (!emu_cta->cluster || !emu_cta->cluster->is_cluster) {
    emu_error("cluster barrier outside a cluster launch");
    return;
  }
  emu_cta->cluster->bar->arrive_and_wait();
  ++emu_cluster_phase;
}

static const unsigned char* emu_remote(const void* p, int rank, size_t bytes, const std::source_location& loc) {
  EmuCluster* cl = emu_cta->cluster;
  const auto off = reinterpret_cast<const unsigned char*>(p) - emu_cta->smem;
  if (!cl || !cl->is_cluster || rank < 0 || rank >= cl->size || off < 0 || (size_t)off + bytes > emu_cta->smem_bytes ||
      off % bytes) {
    emu_error("distributed shared memory read out of bounds or outside a cluster");
    return nullptr;
  }
  // Another CTA's shared memory is only complete after a cluster barrier (every legal read in the
  // kernels follows one); this catches a missing barrier even when ThreadSanitizer's sampling does not.
  if (rank != emu_cta->rank && emu_cluster_phase == 0) {
    emu_error("distributed shared memory read before any cluster barrier");
    return nullptr;
  }
  const unsigned char* q = cl->ctas[rank].smem + off;
  emu_log(&cl->ctas[rank], q, bytes, loc);
  return q;
}
static float ld_cluster(const float* p, int rank, const std::source_location loc = std::source_location::current()) {
  const unsigned char* q = emu_remote(p, rank, 4, loc);
  // One aligned 4-byte load (not memcpy): ThreadSanitizer then records a single access, which keeps
  // the few shadow slots it has per 8 bytes for the accesses that reveal a missing cluster barrier.
  return q ? *reinterpret_cast<const float*>(q) : NAN;
}
template <class V16>
static V16 ld_cluster16(const V16* p, int rank, const std::source_location loc = std::source_location::current()) {
  const unsigned char* q = emu_remote(p, rank, 16, loc);
  V16 v;
  if (q) {
    v = *reinterpret_cast<const V16*>(q);
  } else {
    std::memset(&v, 0xFF, sizeof v);
  }
  return v;
}

static float half_to_float(unsigned short v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return (float)h;
}
static unsigned short float_to_half(float f) {
  const _Float16 h = (_Float16)f;
  unsigned short v;
  std::memcpy(&v, &h, 2);
  return v;
}

#include "gspn_forward.cu"
#include "gspn_backward.cu"

// ---------------------------------------------------------------------------------------------
// Launch

typedef void (*KernelFn)(Args);
struct Entry {
  const char* name;
  KernelFn fn;
  int group;     // CTAs run together: 4 (gspn_mix), 1 (gspn_scan); 0 for the epilogue (not the plan's CTA shape)
  bool cluster;  // the group is a thread-block cluster
};

#define EMU_R(D, R)                                                                                      \
  {"gspn_mix_fwd<" #D ", " #R ">", gspn_mix_fwd<D, R>, 4, true},                                         \
      {"gspn_mix_bwd<" #D ", " #R ">", gspn_mix_bwd<D, R>, 4, true},                                     \
      {"gspn_mix_fwd_portable<" #D ", " #R ">", gspn_mix_fwd_portable<D, R>, 4, false},                  \
      {"gspn_mix_bwd_portable<" #D ", " #R ">", gspn_mix_bwd_portable<D, R>, 4, false},                  \
      {"gspn_scan_fwd<" #D ", " #R ">", gspn_scan_fwd<D, R>, 1, false},                                  \
      {"gspn_scan_bwd<" #D ", " #R ">", gspn_scan_bwd<D, R>, 1, false}
// Instantiations: every dtype and R, unless a build leaves some out to compile faster
// (-DEMU_NO_BF16, -DEMU_NO_F16, -DEMU_NO_R8).
#ifdef EMU_NO_R8
#define EMU_R8(D)
#else
#define EMU_R8(D) EMU_R(D, 8),
#endif
#define EMU_DTYPE(D) EMU_R(D, 1), EMU_R(D, 2), EMU_R(D, 4), EMU_R8(D){"gspn_gate_grad<" #D ">", gspn_gate_grad<D>, 0, false}

static const Entry emu_entries[] = {
#ifndef EMU_NO_BF16
    EMU_DTYPE(BF16),
#endif
#ifndef EMU_NO_F16
    EMU_DTYPE(F16),
#endif
    EMU_DTYPE(F32),
};

constexpr size_t kCanary = 256;
static int emu_order = 0;  // CTAs of a non-cluster group: 0 concurrently, 1 one after another, 2 in reverse

static void run_group(const Entry& k, int size, int first_block, int nt, size_t smem, const Args& args) {
  EmuCluster cl;
  cl.size = size;
  cl.is_cluster = k.cluster;
  cl.bar = std::make_unique<std::barrier<>>(size * nt);
  cl.ctas.resize(size);
  std::vector<std::unique_ptr<unsigned char[]>> memory;
  for (int r = 0; r < size; ++r) {
    EmuCta& c = cl.ctas[r];
    c.rank = r;
    memory.emplace_back(new unsigned char[smem + kCanary + 16]);
    // 16-byte aligned start, like the GPU's dynamic shared memory.
    const uintptr_t raw = reinterpret_cast<uintptr_t>(memory.back().get());
    c.smem = reinterpret_cast<unsigned char*>((raw + 15) & ~uintptr_t(15));
    c.smem_bytes = smem;
    std::memset(c.smem, 0xFF, smem);
    std::memset(c.smem + smem, 0xA5, kCanary);
    EMU_POISON(c.smem + smem, kCanary);
    c.bar = std::make_unique<std::barrier<>>(nt);
    for (int w = 0; w < nt / 32; ++w) c.warps.emplace_back(new EmuWarp);
    c.cluster = &cl;
    c.log.resize(nt);
  }
  auto body = [&](int r, int t) {
    threadIdx = {(unsigned)t, 0, 0};
    blockIdx = {(unsigned)(first_block + r), 0, 0};
    emu_cta = &cl.ctas[r];
    emu_thread_loaded = emu_thread_stored = 0;
    emu_cluster_phase = 0;
    emu_occ.clear();
    emu_pending.clear();
    emu_group_ends.clear();
    k.fn(args);
    if (!emu_pending.empty()) emu_error("cp.async copies never waited for");
    emu_loaded += emu_thread_loaded;
    emu_stored += emu_thread_stored;
  };
  auto run = [&](int lo, int hi) {  // CTAs [lo, hi) concurrently
    std::vector<std::thread> threads;
    threads.reserve((hi - lo) * nt);
    for (int r = lo; r < hi; ++r) {
      for (int t = 0; t < nt; ++t) threads.emplace_back(body, r, t);
    }
    for (auto& th : threads) th.join();
  };
  if (k.cluster || emu_order == 0) {
    run(0, size);
  } else {
    for (int i = 0; i < size; ++i) {
      const int r = emu_order == 1 ? i : size - 1 - i;
      run(r, r + 1);
    }
  }
  for (int r = 0; r < size; ++r) {
    EmuCta& c = cl.ctas[r];
    EMU_UNPOISON(c.smem + smem, kCanary);
    for (size_t i = 0; i < kCanary; ++i) {
      if (c.smem[smem + i] != 0xA5) {
        emu_error("a CTA wrote past the shared memory the host gave it");
        break;
      }
    }
    if (emu_banks_on) emu_count_cta(c, nt);
  }
}

extern "C" int emu_launch(const char* name, int grid, int block, int smem, const Args* args) {
  const Entry* k = nullptr;
  for (const Entry& e : emu_entries) {
    if (std::strcmp(e.name, name) == 0) k = &e;
  }
  if (!k) {
    emu_error(std::string("no emulated kernel named ") + name);
    return 1;
  }
  const int size = std::max(k->group, 1);
  if (block % 32 || block < 32 || block > 1024 || grid % size || (k->group && block != args->nthreads)) {
    emu_error("bad launch shape for " + std::string(name));
    return 1;
  }
  blockDim = {(unsigned)block, 1, 1};
  gridDim = {(unsigned)grid, 1, 1};
  for (int b = 0; b < grid; b += size) run_group(*k, size, b, block, (size_t)smem, *args);
  return 0;
}

extern "C" long emu_error_count() { return emu_errors; }
extern "C" const char* emu_error_text() { return emu_first_error.c_str(); }
extern "C" void emu_bytes(long long* loaded, long long* stored) {
  *loaded = emu_loaded;
  *stored = emu_stored;
}
extern "C" void emu_reset() {
  emu_loaded = 0;
  emu_stored = 0;
  emu_errors = 0;
  emu_first_error.clear();
  emu_banks = EmuBankStats();
}
extern "C" void emu_set_order(int order) { emu_order = order; }
extern "C" void emu_bank_counting(int on) { emu_banks_on = on != 0; }
// [accesses, wavefronts, phases, worst degree, then warp accesses of degree 1, 2, 3-4, 5-8, 9-16, 17-32]
extern "C" void emu_bank_stats(long long* out) {
  out[0] = emu_banks.accesses;
  out[1] = emu_banks.wavefronts;
  out[2] = emu_banks.phases;
  out[3] = emu_banks.worst;
  for (int i = 0; i < 6; ++i) out[4 + i] = emu_banks.by_degree[i];
}
// One line per call site: "file:line worst-degree accesses".
extern "C" int emu_bank_sites(char* buf, int len) {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(emu_site_mutex);
    for (auto& [site, v] : emu_banks.sites) {
      text += emu_site_names[site] + " " + std::to_string(v.first) + " " + std::to_string(v.second) + "\n";
    }
  }
  std::snprintf(buf, len, "%s", text.c_str());
  return (int)text.size();
}
extern "C" int emu_args_size() { return (int)sizeof(Args); }
extern "C" int emu_geo_offset() { return (int)offsetof(Args, geo); }
extern "C" int emu_geo_size() { return (int)sizeof(Geo); }

#ifdef EMU_MAIN
// ---------------------------------------------------------------------------------------------
// Standalone driver: replays recorded launches (tests/kernels/emulation.py writes the file) on random
// inputs, outputs poisoned with NaN. Exit 0 when every launch ran without an emulation error and every
// output buffer came back finite (fully written); sanitizer findings end the process on their own.
//
// File (little endian): int32 cases; per case: int32 buffers, per buffer {int64 bytes, int32 kind
// (0 input, 1 output, 2 zeroed scratch), int32 element bytes (4: fp32, 2: the 16-bit dtype given by
// int32 half: 0 bf16, 1 fp16)}, int32 launches, per launch {char name[64], int32 grid, block, smem, Args}
// with every pointer field holding (buffer index + 1) << 48 | byte offset, or 0.
#include <random>

static bool read_all(FILE* f, void* p, size_t n) { return std::fread(p, 1, n, f) == n; }

static float emu_finite_check(const unsigned char* p, long long bytes, int elem, int half) {
  long long bad = 0;
  for (long long i = 0; i < bytes / elem; ++i) {
    float v;
    if (elem == 4) {
      std::memcpy(&v, p + 4 * i, 4);
    } else {
      unsigned short h;
      std::memcpy(&h, p + 2 * i, 2);
      v = half ? half_to_float(h) : __uint_as_float(((unsigned)h) << 16);
    }
    bad += !std::isfinite(v);
  }
  return (float)bad;
}

constexpr int kPointers = 17;  // the pointers of Args are its first 17 8-byte words (tests/kernels checks the layout)

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASES\n", argv[0]);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  int cases = 0;
  if (!read_all(f, &cases, 4)) return 2;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(-1.5f, 1.5f);
  int failed = 0;
  for (int c = 0; c < cases; ++c) {
    int nbuf = 0;
    read_all(f, &nbuf, 4);
    std::vector<std::vector<unsigned char>> bufs(nbuf);
    std::vector<int> kinds(nbuf), elems(nbuf), halfs(nbuf);
    for (int b = 0; b < nbuf; ++b) {
      long long bytes;
      read_all(f, &bytes, 8);
      read_all(f, &kinds[b], 4);
      read_all(f, &elems[b], 4);
      read_all(f, &halfs[b], 4);
      bufs[b].resize(bytes);
      for (long long i = 0; i < bytes / elems[b]; ++i) {
        if (kinds[b] == 1) {
          std::memset(&bufs[b][elems[b] * i], 0xFF, elems[b]);
        } else if (kinds[b] == 2) {
          std::memset(&bufs[b][elems[b] * i], 0, elems[b]);
        } else if (elems[b] == 4) {
          const float v = 0.5f + 0.5f * uni(rng);
          std::memcpy(&bufs[b][4 * i], &v, 4);
        } else {
          const float v = 0.5f + 0.5f * uni(rng);
          const unsigned short h = halfs[b] ? float_to_half(v) : BF16::make(v);
          std::memcpy(&bufs[b][2 * i], &h, 2);
        }
      }
    }
    int nl = 0;
    read_all(f, &nl, 4);
    for (int l = 0; l < nl; ++l) {
      char name[64];
      int grid, block, smem;
      Args a;
      read_all(f, name, 64);
      read_all(f, &grid, 4);
      read_all(f, &block, 4);
      read_all(f, &smem, 4);
      read_all(f, &a, sizeof(Args));
      auto* words = reinterpret_cast<unsigned long long*>(&a);
      for (int w = 0; w < kPointers; ++w) {
        if (!words[w]) continue;
        const int b = (int)(words[w] >> 48) - 1;
        words[w] = reinterpret_cast<unsigned long long>(bufs.at(b).data() + (words[w] & ((1ull << 48) - 1)));
      }
      emu_launch(name, grid, block, smem, &a);
    }
    for (int b = 0; b < nbuf; ++b) {
      if (kinds[b] != 1) continue;
      const float bad = emu_finite_check(bufs[b].data(), (long long)bufs[b].size(), elems[b], halfs[b]);
      if (bad > 0) {
        std::fprintf(stderr, "case %d: output buffer %d has %.0f non-finite (unwritten) values\n", c, b, bad);
        failed = 1;
      }
    }
  }
  if (emu_errors) {
    std::fprintf(stderr, "emulation errors: %ld (first: %s)\n", emu_errors, emu_first_error.c_str());
    failed = 1;
  }
  std::printf("replayed %d cases\n", cases);
  return failed;
}
#endif
