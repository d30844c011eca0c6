// GPU-only primitives of the GSPN kernels: everything that is inline PTX or a memory-space detail.
//
// This header is the whole boundary between the kernels and the hardware: the CPU emulation of the
// tests (tests/kernels/cuda_emulation.cpp) compiles the other sources unchanged and supplies its own
// version of exactly these functions. Keep it small; each PTX use is documented where it appears.
// Everything here builds for sm_80+, except the cluster primitives (sm_90+).
#pragma once

// Dynamic shared memory of the CTA (16-byte aligned; the host sizes it, cuda_plan.py).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char gspn_smem[];
  return gspn_smem;
}

// Global memory goes through these (scalar types and the 16-byte struct Vec16): plain loads and stores,
// so the compiler emits LDG/STG of the type's width. The emulation counts the bytes.
template <class V>
__device__ __forceinline__ V gload(const V* p) {
  return *p;
}
template <class V>
__device__ __forceinline__ void gstore(V* p, const V& v) {
  *p = v;
}
// A float another CTA of this launch wrote (the portable variant's direction sum): ld.global.cg reads
// L2, never a line L1 may hold from before (L1 is not coherent between SMs).
__device__ __forceinline__ float gload_cg(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

// Shared memory: every data access of the kernels goes through these two, so that the emulation can
// count the banks each warp access touches. Plain accesses of the type's width (LDS/STS).
template <class V>
__device__ __forceinline__ V sld(const V* p) {
  return *p;
}
template <class V>
__device__ __forceinline__ void sst(V* p, const V& v) {
  *p = v;
}

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  unsigned int a;
  asm("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ unsigned long long global_addr(const void* p) {
  unsigned long long a;
  asm("cvta.to.global.u64 %0, %1;" : "=l"(a) : "l"(p));
  return a;
}

// Asynchronous copies from global to shared memory (cp.async, sm_80+): issued without waiting, so a
// tile's copies of every array are in flight before its first use. 16 bytes bypass L1 (.cg); 4 bytes
// go through it (.ca, the only form for 4). A thread's copies complete in commit groups: wait_group N
// returns when at most N of its most recent groups are still pending; a __syncthreads after it makes
// every thread's completed copies visible to the CTA.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(global_addr(gmem)) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(smem)), "l"(global_addr(gmem)) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads, whole warps: the warps that hold
// one line. bar.sync also orders their shared-memory accesses around it (PTX ISA, "bar.sync").
__device__ __forceinline__ void line_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The portable variant's direction sum: the 4 CTAs of a group count themselves in with tickets in
// global memory (relaxed atomic add; the first three also publish their partial planes), the last
// waits for the others' release and then reads their planes. fence.acq_rel.gpu before the release
// orders this thread's earlier writes, and the CTA's (ordered before it by __syncthreads), before the
// count; ld.acquire.gpu orders the count before the reads that follow it (PTX ISA, memory model).
__device__ __forceinline__ int ticket_take(int* p) {
  int t;
  asm volatile("atom.relaxed.gpu.global.add.s32 %0, [%1], 1;" : "=r"(t) : "l"(global_addr(p)) : "memory");
  return t;
}
__device__ __forceinline__ void release_add(int* p) {
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.s32 [%0], 1;" ::"l"(global_addr(p)) : "memory");
}
__device__ __forceinline__ int acquire_load(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(global_addr(p)) : "memory");
  return v;
}
__device__ __forceinline__ void backoff() { asm volatile("nanosleep.u32 100;" ::: "memory"); }

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Thread-block cluster barrier (sm_90): every thread of the 4 CTAs arrives and waits. `release` on
// arrive and `acquire` on wait order each CTA's shared-memory writes before any other CTA's
// distributed-shared-memory reads after the barrier (PTX ISA, "barrier.cluster"). `.aligned`: all
// threads of a warp execute the same instance, which holds because every call site is reached by
// all threads of the CTA.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Read a float (or 16 bytes) of the shared memory of CTA `rank` of this cluster at the address that
// `p` has in this CTA (all CTAs of the kernel have the same shared-memory layout): mapa gives the same
// offset in the other CTA's shared::cluster window, ld.shared::cluster reads it.
__device__ __forceinline__ unsigned int cluster_addr(const void* p, int rank) {
  unsigned int remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  return remote;
}
__device__ __forceinline__ float ld_cluster(const float* p, int rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(cluster_addr(p, rank)) : "memory");
  return v;
}
template <class V16>
__device__ __forceinline__ V16 ld_cluster16(const V16* p, int rank) {
  V16 v;
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "r"(cluster_addr(p, rank))
               : "memory");
  return v;
}
#endif

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
