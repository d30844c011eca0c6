// GSPN forward kernels: the fused four-direction mix (gspn_mix_fwd, clusters of 4 CTAs, sm_90;
// gspn_mix_fwd_portable, the same CTAs without a cluster, sm_80+) and the one-direction scan with given
// gates (gspn_scan_fwd). Notation, work split and shared memory: gspn_common.cuh.
//
// Per CTA (direction d, lb planes): the loaders keep the copies of x, lam_d, u_d and the three gate
// maps S - 1 tiles ahead; the scan lanes walk the current tile's steps, h[s] = lam * x + M_s h[prev]
// with M_s the tridiagonal of the normalised gates, and keep u_d * h (scan: h) in the CTA's fp32 plane.
// Then the planes of the 4 directions are summed in a fixed order and written once.
// Global traffic per CTA: each input map read once (x once per direction), the output written once
// (portable: plus the fp32 partial planes of the direction sum, through L2).
#include "gspn_common.cuh"

template <class D, bool MIX, bool COL>
__device__ void load_forward_tile(const Args& a, const Cta& c, int it, int buf, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  int s0, n;
  tile_span(c, it, c.desc, a.ts, s0, n);
  unsigned char* base = c.smem + g.stage + buf * g.stage_buf;
  int arr = 0;
  stage_tile<D, COL>(a, c, (const T*)a.x, c.x_off, c.nplanes, s0, n, base + arr++ * g.stage_arr, 0, li, nl);
  stage_tile<D, COL>(a, c, (const T*)a.lam, c.map_off, c.nplanes, s0, n, base + arr++ * g.stage_arr, 0, li, nl);
  if (MIX) stage_tile<D, COL>(a, c, (const T*)a.u, c.map_off, c.nplanes, s0, n, base + arr++ * g.stage_arr, 0, li, nl);
  for (int k = 0; k < 3; ++k) {
    stage_tile<D, COL>(a, c, (const T*)a.gate[k], c.gate_off, c.ngp, s0, n, base + arr++ * g.stage_arr, 0, li, nl);
  }
}

// One line kind's scan: the pipeline of tiles and the lanes' steps; the plane is complete on return.
template <class D, int R, bool MIX, bool COL>
__device__ void forward_kind(const Args& a, const Cta& c) {
  const Geo& g = c.g;
  const Lane ln = make_lane<R>(a, c);
  const bool active = ln.active;
  int parity = 0;
  float* plane = (float*)(c.smem + g.plane) + (long long)ln.j * g.L * g.Pp;
  float h[R];
#pragma unroll
  for (int r = 0; r < R; ++r) h[r] = 0.f;
  Walk walk;
  walk.start(c.desc, g.L, a.K);
  const bool loader = c.tid >= g.nscan;
  const int li = c.tid - g.nscan, nl = c.nthreads - g.nscan;

  if (loader) {
    for (int t = 0; t < a.S - 1; ++t) {
      if (t < g.nt) load_forward_tile<D, MIX, COL>(a, c, t, t, li, nl);
      cp_async_commit();
    }
  }
  for (int it = 0; it < g.nt; ++it) {
    if (loader) wait_oldest_tile(a.S);
    __syncthreads();  // tile it is staged and visible; the buffer of tile it - 1 is free
    if (loader) {
      const int next = it + a.S - 1;
      if (next < g.nt) load_forward_tile<D, MIX, COL>(a, c, next, next % a.S, li, nl);
      cp_async_commit();
      continue;
    }
    int s0, n;
    tile_span(c, it, c.desc, a.ts, s0, n);
    const unsigned char* base = c.smem + g.stage + (it % a.S) * g.stage_buf;
    const int gate0 = MIX ? 3 : 2;
    for (int k = 0; k < n; ++k) {
      const int ss = c.desc ? n - 1 - k : k;
      float xv[R], lv[R], uv[R], s0v[R], s1v[R], s2v[R], w0[R], w1[R], w2[R], left[R], right[R];
      read_lane<D, R, COL>(base, g, ss, ln.q0, active, xv);
      read_lane<D, R, COL>(base + g.stage_arr, g, ss, ln.q0, active, lv);
      if (MIX) read_lane<D, R, COL>(base + 2 * g.stage_arr, g, ss, ln.q0, active, uv);
      lane_gates<D, R, MIX, COL>(base + gate0 * g.stage_arr, base + (gate0 + 1) * g.stage_arr,
                                 base + (gate0 + 2) * g.stage_arr, g, ss, ln.qg, active, ln.p0, s0v, s1v, s2v, w0, w1,
                                 w2);
      neighbours<R>(a, c, ln, h, parity, left, right);
      const bool first = walk.first(s0 + ss);
      walk.advance();
      float out[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float hn = first ? lv[r] * xv[r] : gspn_step(lv[r] * xv[r], w0[r], w1[r], w2[r], left[r], h[r], right[r]);
        h[r] = ln.p0 + r < g.P ? hn : 0.f;
        out[r] = MIX ? uv[r] * h[r] : h[r];
      }
      if (active) write_row_f32<R>(plane + (s0 + ss) * g.Pp + ln.p0, out);
    }
  }
  __syncthreads();  // the plane is complete
}

template <class D, int R, bool MIX, int VARIANT>
__device__ void forward_cta(const Args& a, int d, int group) {
  typedef typename D::T T;
  const Cta c = make_cta(a, d, group);
  if (c.col) {
    forward_kind<D, R, MIX, true>(a, c);
  } else {
    forward_kind<D, R, MIX, false>(a, c);
  }
  write_output<D, VARIANT>(a, c, group, (T*)a.y);
}

// Entry points. gspn_mix: grid.x = 4 * groups, direction = blockIdx.x % 4 (the cluster rank); gspn_scan:
// grid.x = groups, direction 0 (left to right), gates given.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <class D, int R>
__global__ void __cluster_dims__(4, 1, 1) gspn_mix_fwd(const __grid_constant__ Args a) {
  forward_cta<D, R, true, CLUSTER>(a, blockIdx.x & 3, blockIdx.x >> 2);
}
#endif
template <class D, int R>
__global__ void gspn_mix_fwd_portable(const __grid_constant__ Args a) {
  forward_cta<D, R, true, PORTABLE>(a, blockIdx.x & 3, blockIdx.x >> 2);
}
template <class D, int R>
__global__ void gspn_scan_fwd(const __grid_constant__ Args a) { forward_cta<D, R, false, SINGLE>(a, 0, blockIdx.x); }
