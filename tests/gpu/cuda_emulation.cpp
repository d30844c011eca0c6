// CPU emulation of the GSPN CUDA kernels (kernels/cuda/*.cu), for test_cuda_emulation.py.
//
// The kernel sources compile unchanged as C++20: a block runs as `blockDim.x` std::threads that
// share one `smem` array, __syncthreads is a std::barrier, atomicAdd a std::atomic_ref. Blocks run
// one after another. This checks the kernels' indexing, tiling, chunking and barrier placement on a
// machine without a GPU (not fp16, whose conversions are PTX, and not performance or memory model).
// Before each block the dynamic shared memory the host asked for is filled with NaN (a read of an
// unwritten value reaches the outputs) and the floats after it with a canary (an overrun is counted).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define GSPN_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* emu_barrier = nullptr;
static void __syncthreads() { emu_barrier->arrive_and_wait(); }
static float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
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

constexpr int kSmemFloats = 1 << 22;
constexpr int kCanary = 1024;
float smem[kSmemFloats + kCanary];

#include "gspn_forward.cu"
#include "gspn_backward.cu"

static long emu_errors = 0;

extern "C" long emu_error_count() { return emu_errors; }

static void run_grid(int gx, int gy, int nt, int smem_bytes, const std::function<void()>& body) {
  const int used = smem_bytes / 4;
  if (used > kSmemFloats) {
    ++emu_errors;
    return;
  }
  blockDim = {(unsigned)nt, 1, 1};
  gridDim = {(unsigned)gx, (unsigned)gy, 1};
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      std::fill(smem, smem + used, NAN);
      std::fill(smem + used, smem + used + kCanary, 12345.f);
      std::barrier<> bar(nt);
      emu_barrier = &bar;
      std::vector<std::thread> threads;
      threads.reserve(nt);
      for (int t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
          threadIdx = {(unsigned)t, 0, 0};
          blockIdx = {(unsigned)bx, (unsigned)by, 0};
          body();
        });
      }
      for (auto& th : threads) th.join();
      for (int i = used; i < used + kCanary; ++i) {
        if (smem[i] != 12345.f) {
          ++emu_errors;
          break;
        }
      }
    }
  }
}

#define EMU_KERNELS(D)                                                                                       \
  extern "C" void mix_fwd_##D(int gx, int gy, int nt, int sm, const void* x, const void* gl, const void* lam, \
                              const void* u, void* y32, void* h, int N, int C, int Cg, int H, int W, int chunk,  \
                              int lbc, int tsc, int lbr, int tsr) {                                         \
    using T = D::T;                                                                                          \
    run_grid(gx, gy, nt, sm, [&] {                                                                           \
      gspn_mix_fwd<D>((const T*)x, (const T*)gl, (const T*)lam, (const T*)u, (float*)y32, (float*)h, N, C,   \
                      Cg, H, W, chunk, lbc, tsc, lbr, tsr);                                                  \
    });                                                                                                      \
  }                                                                                                          \
  extern "C" void scan_fwd_##D(int gx, int gy, int nt, int sm, const void* x, const void* lam,               \
                               const void* gu, const void* gm, const void* gd, void* out, void* h, int N,    \
                               int C, int Cg, int H, int W, int chunk, int lbc, int tsc) {                   \
    using T = D::T;                                                                                          \
    run_grid(gx, gy, nt, sm, [&] {                                                                           \
      gspn_scan_fwd<D>((const T*)x, (const T*)lam, (const T*)gu, (const T*)gm, (const T*)gd, (T*)out,         \
                       (float*)h, N, C, Cg, H, W, chunk, lbc, tsc);                                          \
    });                                                                                                      \
  }                                                                                                          \
  extern "C" void mix_bwd_##D(int gx, int gy, int nt, int sm, const void* x, const void* gl, const void* lam, \
                              const void* u, const void* h, const void* dy, void* dx32, void* dgl,           \
                              void* dgacc, void* dlam, void* du, int N, int C, int Cg, int H, int W,         \
                              int chunk, int lbc, int tsc, int lbr, int tsr) {                               \
    using T = D::T;                                                                                          \
    run_grid(gx, gy, nt, sm, [&] {                                                                           \
      gspn_mix_bwd<D>((const T*)x, (const T*)gl, (const T*)lam, (const T*)u, (const float*)h, (const T*)dy,  \
                      (float*)dx32, (T*)dgl, (float*)dgacc, (T*)dlam, (T*)du, N, C, Cg, H, W, chunk, lbc,    \
                      tsc, lbr, tsr);                                                                        \
    });                                                                                                      \
  }                                                                                                          \
  extern "C" void scan_bwd_##D(int gx, int gy, int nt, int sm, const void* x, const void* lam,               \
                               const void* gu, const void* gm, const void* gd, const void* h, const void* dy,\
                               void* dx, void* dlam, void* dgu, void* dgm, void* dgd, void* dgacc, int N,    \
                               int C, int Cg, int H, int W, int chunk, int lbc, int tsc) {                   \
    using T = D::T;                                                                                          \
    run_grid(gx, gy, nt, sm, [&] {                                                                           \
      gspn_scan_bwd<D>((const T*)x, (const T*)lam, (const T*)gu, (const T*)gm, (const T*)gd, (const float*)h, \
                       (const T*)dy, (T*)dx, (T*)dlam, (T*)dgu, (T*)dgm, (T*)dgd, (float*)dgacc, N, C, Cg,   \
                       H, W, chunk, lbc, tsc);                                                               \
    });                                                                                                      \
  }                                                                                                          \
  extern "C" void mix_gate_grad_##D(int gx, int gy, int nt, int sm, const void* gl, const void* dgacc,       \
                                    void* dgl, int N, int Cg, int H, int W) {                                \
    using T = D::T;                                                                                          \
    run_grid(gx, gy, nt, sm, [&] {                                                                           \
      gspn_mix_gate_grad<D>((const T*)gl, (const float*)dgacc, (T*)dgl, N, Cg, H, W);                       \
    });                                                                                                      \
  }

EMU_KERNELS(F32)
EMU_KERNELS(BF16)
