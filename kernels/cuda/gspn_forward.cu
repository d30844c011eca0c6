// GSPN forward kernels: the fused four-direction mix (gspn_mix_fwd, clusters of 4 CTAs) and the
// one-direction scan with given gates (gspn_scan_fwd). Notation, work split and shared memory:
// gspn_common.cuh.
//
// Per CTA (direction d, lb planes): the loaders stage x, lam_d, u_d and the three gate maps of the
// next tile; the scan lanes walk the current tile's steps, h[s] = lam * x + M_s h[prev] with M_s the
// tridiagonal of the normalised gates, and keep u_d * h (scan: h) in the CTA's fp32 plane. Then the
// planes of the 4 directions are summed through distributed shared memory and written once.
// Global traffic per CTA: each input map read once (x once per direction), the output written once.
#include "gspn_common.cuh"

template <class D, bool MIX>
__device__ void load_forward_tile(const Args& a, const Cta& c, int it, int buf, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  int s0, n;
  tile_span(c, it, c.desc, a.ts, s0, n);
  const int Q = a.lb * g.Ps;
  T* base = (T*)(c.smem + g.stage + buf * g.stage_buf);
  int arr = 0;
  load_tile<D>(a, c, (const T*)a.x, c.x_off, c.nplanes, s0, n, (T*)((unsigned char*)base + arr++ * g.stage_arr), g.Ps, Q, 0, li, nl);
  load_tile<D>(a, c, (const T*)a.lam, c.map_off, c.nplanes, s0, n, (T*)((unsigned char*)base + arr++ * g.stage_arr), g.Ps, Q, 0, li, nl);
  if (MIX) {
    load_tile<D>(a, c, (const T*)a.u, c.map_off, c.nplanes, s0, n, (T*)((unsigned char*)base + arr++ * g.stage_arr), g.Ps, Q, 0, li, nl);
  }
  for (int k = 0; k < 3; ++k) {
    load_tile<D>(a, c, (const T*)a.gate[k], c.gate_off, c.ngp, s0, n, (T*)((unsigned char*)base + arr++ * g.stage_arr), g.Ps, Q, 0, li, nl);
  }
}

template <class D, int R, bool MIX>
__device__ void forward_cta(const Args& a, int d, int group) {
  typedef typename D::T T;
  const Cta c = make_cta(a, d, group);
  const Geo& g = c.g;
  const int Q = a.lb * g.Ps;

  const Lane ln = make_lane<R>(a, c);
  const int j = ln.j, p0 = ln.p0, jg = ln.jg;
  const bool active = ln.active;
  int parity = 0;
  float* plane = (float*)(c.smem + g.plane) + (long long)j * g.L * g.Pp;
  float h[R];
#pragma unroll
  for (int r = 0; r < R; ++r) h[r] = 0.f;
  Walk walk;
  walk.start(c.desc, g.L, a.K);

  load_forward_tile<D, MIX>(a, c, 0, 0, c.tid, c.nthreads);
  __syncthreads();
  for (int it = 0; it < g.nt; ++it) {
    if (c.tid >= g.nscan) {
      if (it + 1 < g.nt) load_forward_tile<D, MIX>(a, c, it + 1, (it + 1) & 1, c.tid - g.nscan, c.nthreads - g.nscan);
    } else {
      int s0, n;
      tile_span(c, it, c.desc, a.ts, s0, n);
      const unsigned char* base = c.smem + g.stage + (it & 1) * g.stage_buf;
      const int gate0 = MIX ? 3 : 2;
      for (int k = 0; k < n; ++k) {
        const int ss = c.desc ? n - 1 - k : k;
        const int row = ss * Q + j * g.Ps + p0, grow = ss * Q + jg * g.Ps + p0;
        float xv[R], lv[R], uv[R], s0v[R], s1v[R], s2v[R], w0[R], w1[R], w2[R], left[R], right[R];
        read_row<D, R>((const T*)base + row, active, xv);
        read_row<D, R>((const T*)(base + g.stage_arr) + row, active, lv);
        if (MIX) read_row<D, R>((const T*)(base + 2 * g.stage_arr) + row, active, uv);
        lane_gates<D, R, MIX>((const T*)(base + gate0 * g.stage_arr) + grow, (const T*)(base + (gate0 + 1) * g.stage_arr) + grow,
                              (const T*)(base + (gate0 + 2) * g.stage_arr) + grow, active, p0, g.P, s0v, s1v, s2v,
                              w0, w1, w2);
        neighbours<R>(a, c, ln, h, parity, left, right);
        const bool first = walk.first(s0 + ss);
        walk.advance();
        float out[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float hn = first ? lv[r] * xv[r] : gspn_step(lv[r] * xv[r], w0[r], w1[r], w2[r], left[r], h[r], right[r]);
          h[r] = p0 + r < g.P ? hn : 0.f;
          out[r] = MIX ? uv[r] * h[r] : h[r];
        }
        if (active) write_row_f32<R>(plane + (s0 + ss) * g.Pp + p0, out);
      }
    }
    __syncthreads();
  }

  write_output<D, MIX>(a, c, (T*)a.y);
}

// Entry points. gspn_mix: grid.x = 4 * groups in clusters of 4, rank = blockIdx.x % 4 = direction.
// gspn_scan: grid.x = groups, direction 0 (left to right), gates given.
template <class D, int R>
__global__ void __cluster_dims__(4, 1, 1) gspn_mix_fwd(const __grid_constant__ Args a) { forward_cta<D, R, true>(a, blockIdx.x & 3, blockIdx.x >> 2); }
template <class D, int R>
__global__ void gspn_scan_fwd(const __grid_constant__ Args a) { forward_cta<D, R, false>(a, 0, blockIdx.x); }
