// CPU emulation of the GSPN CUDA kernels (kernels/cuda/*.cu), for the tests in this folder.
//
// The kernel sources compile unchanged as C++20; this file supplies what kernels/cuda/gspn_device.cuh
// provides on the GPU, plus the CUDA built-ins they use:
//   - a CTA is `blockDim.x` std::threads; __syncthreads is a std::barrier over them;
//   - a warp is 32 of those threads; a shuffle writes the lane's value to the warp's exchange slots,
//     waits on the warp's barrier, reads the source lane's slot and waits again. Shuffles must be
//     reached by all 32 lanes with the full mask (checked);
//   - a named barrier (bar.sync id, count) is a std::barrier of that count, one per id and CTA;
//   - a cluster of gspn_mix runs its 4 CTAs concurrently, each with its own shared memory; the cluster
//     barrier is a std::barrier over all their threads; a distributed-shared-memory read maps the
//     address to the same offset in the other CTA's shared memory (bounds checked, and only
//     after the reading thread has passed a cluster barrier);
//   - dynamic shared memory starts filled with 0xFF bytes (NaN in fp32, bf16 and fp16: a read of an
//     unwritten value reaches the outputs) and is followed by a canary (an overrun is counted; under
//     AddressSanitizer the canary is poisoned, so the overrun is reported where it happens);
//   - gload / gstore count the bytes of every global access and check its alignment;
//   - fp16 conversions through _Float16 (round to nearest even, as cvt.rn.f16.f32).
// Clusters run one after another. Built as a shared library (driven from Python by ctypes, with the
// launch plan and argument struct of cupy_backend) or, with -DEMU_MAIN, as a standalone driver that
// replays recorded launches on random inputs (the AddressSanitizer / ThreadSanitizer runs).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
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
};

struct EmuCluster {
  int size = 1;
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

static void cluster_sync() {
  if (!emu_cta->cluster || emu_cta->cluster->size == 1) emu_error("cluster barrier outside a cluster launch");
  emu_cta->cluster->bar->arrive_and_wait();
  ++emu_cluster_phase;
}

static float ld_cluster(const float* p, int rank) {
  EmuCluster* cl = emu_cta->cluster;
  const auto off = reinterpret_cast<const unsigned char*>(p) - emu_cta->smem;
  if (!cl || rank < 0 || rank >= cl->size || off < 0 || (size_t)off + 4 > emu_cta->smem_bytes || off % 4) {
    emu_error("distributed shared memory read out of bounds");
    return NAN;
  }
  // Another CTA's shared memory is only complete after a cluster barrier (every legal read in the
  // kernels follows one); this catches a missing barrier even when ThreadSanitizer's sampling does not.
  if (rank != emu_cta->rank && emu_cluster_phase == 0) {
    emu_error("distributed shared memory read before any cluster barrier");
    return NAN;
  }
  // One aligned 4-byte load (not memcpy): ThreadSanitizer then records a single access, which keeps
  // the few shadow slots it has per 8 bytes for the accesses that reveal a missing cluster barrier.
  return *reinterpret_cast<const float*>(cl->ctas[rank].smem + off);
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
  int cluster;  // CTAs per cluster; 0 for the epilogue, which does not run the plan's CTA shape
};

#define EMU_R(D, R)                                                                                 \
  {"gspn_mix_fwd<" #D ", " #R ">", gspn_mix_fwd<D, R>, 4}, {"gspn_mix_bwd<" #D ", " #R ">", gspn_mix_bwd<D, R>, 4}, \
      {"gspn_scan_fwd<" #D ", " #R ">", gspn_scan_fwd<D, R>, 1},                                    \
      {"gspn_scan_bwd<" #D ", " #R ">", gspn_scan_bwd<D, R>, 1}
// Instantiations: every dtype and R, unless a build leaves some out to compile faster
// (-DEMU_NO_BF16, -DEMU_NO_F16, -DEMU_NO_R8).
#ifdef EMU_NO_R8
#define EMU_R8(D)
#else
#define EMU_R8(D) EMU_R(D, 8),
#endif
#define EMU_DTYPE(D) EMU_R(D, 1), EMU_R(D, 2), EMU_R(D, 4), EMU_R8(D){"gspn_gate_grad<" #D ">", gspn_gate_grad<D>, 0}

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

static void run_cluster(const Entry& k, int size, int first_block, int nt, size_t smem, const Args& args) {
  EmuCluster cl;
  cl.size = size;
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
  }
  std::vector<std::thread> threads;
  threads.reserve(size * nt);
  for (int r = 0; r < size; ++r) {
    for (int t = 0; t < nt; ++t) {
      threads.emplace_back([&, r, t] {
        threadIdx = {(unsigned)t, 0, 0};
        blockIdx = {(unsigned)(first_block + r), 0, 0};
        emu_cta = &cl.ctas[r];
        emu_thread_loaded = emu_thread_stored = 0;
        emu_cluster_phase = 0;
        k.fn(args);
        emu_loaded += emu_thread_loaded;
        emu_stored += emu_thread_stored;
      });
    }
  }
  for (auto& th : threads) th.join();
  for (int r = 0; r < size; ++r) {
    EmuCta& c = cl.ctas[r];
    EMU_UNPOISON(c.smem + smem, kCanary);
    for (size_t i = 0; i < kCanary; ++i) {
      if (c.smem[smem + i] != 0xA5) {
        emu_error("a CTA wrote past the shared memory the host gave it");
        break;
      }
    }
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
  const int cluster = std::max(k->cluster, 1);
  if (block % 32 || block < 32 || block > 1024 || grid % cluster || (k->cluster && block != args->nthreads)) {
    emu_error("bad launch shape for " + std::string(name));
    return 1;
  }
  blockDim = {(unsigned)block, 1, 1};
  gridDim = {(unsigned)grid, 1, 1};
  for (int b = 0; b < grid; b += cluster) run_cluster(*k, cluster, b, block, (size_t)smem, *args);
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
}
extern "C" int emu_args_size() { return (int)sizeof(Args); }
extern "C" int emu_geo_offset() { return (int)offsetof(Args, geo); }
extern "C" int emu_geo_size() { return (int)sizeof(Geo); }

#ifdef EMU_MAIN
// ---------------------------------------------------------------------------------------------
// Standalone driver: replays recorded launches (tests/kernels/sanitize.py writes the file) on random
// inputs, outputs poisoned with NaN. Exit 0 when every launch ran without an emulation error and every
// output buffer came back finite (fully written); sanitizer findings end the process on their own.
//
// File (little endian): int32 cases; per case: int32 buffers, per buffer {int64 bytes, int32 kind
// (0 input, 1 output), int32 element bytes (4: fp32, 2: the 16-bit dtype given by int32 half: 0 bf16,
// 1 fp16)}, int32 launches, per launch {char name[64], int32 grid, block, smem, Args} with every
// pointer field holding (buffer index + 1) << 48 | byte offset, or 0.
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
      // The pointers of Args are its first 15 8-byte words (tests/kernels checks the layout).
      auto* words = reinterpret_cast<unsigned long long*>(&a);
      for (int w = 0; w < 15; ++w) {
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
