// GPU-only primitives of the GSPN kernels: everything that is inline PTX or a memory-space detail.
//
// This header is the whole boundary between the kernels and the hardware: the CPU emulation of the
// tests (tests/kernels/cuda_emulation.cpp) compiles the other sources unchanged and supplies its own
// version of exactly these functions. Keep it small; each PTX use is documented where it appears.
#pragma once

// Dynamic shared memory of the CTA (16-byte aligned; the host sizes it, cupy_backend._plan).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char gspn_smem[];
  return gspn_smem;
}

// Global memory goes through these two (scalar types and the 16-byte struct Vec16): plain loads
// and stores, so the compiler emits LDG/STG of the type's width. The emulation counts the bytes.
template <class V>
__device__ __forceinline__ V gload(const V* p) {
  return *p;
}
template <class V>
__device__ __forceinline__ void gstore(V* p, const V& v) {
  *p = v;
}

// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads, whole warps: the warps that hold
// one line. bar.sync also orders their shared-memory accesses around it (PTX ISA, "bar.sync").
__device__ __forceinline__ void line_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Thread-block cluster barrier (sm_90): every thread of the 4 CTAs arrives and waits. `release` on
// arrive and `acquire` on wait order each CTA's shared-memory writes before any other CTA's
// distributed-shared-memory reads after the barrier (PTX ISA, "barrier.cluster"). `.aligned`: all
// threads of a warp execute the same instance, which holds because every call site is reached by
// all threads of the CTA.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Read a float of the shared memory of CTA `rank` of this cluster at the address that `p` has in
// this CTA (all CTAs of the kernel have the same shared-memory layout). cvta gives p's offset in the
// shared::cta window, mapa the same offset in the other CTA's window, ld.shared::cluster reads it.
__device__ __forceinline__ float ld_cluster(const float* p, int rank) {
  unsigned int local, remote;
  float v;
  asm volatile("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}" : "=r"(local) : "l"(p));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

// IEEE half <-> float, round to nearest even (cvt.rn), without the CUDA half header.
__device__ __forceinline__ float half_to_float(unsigned short v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}
__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short v;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
  return v;
}
