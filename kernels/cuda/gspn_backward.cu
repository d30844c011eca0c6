// GSPN backward kernels: the adjoint of gspn_mix (gspn_mix_bwd, clusters of 4 CTAs) and of gspn_scan
// (gspn_scan_bwd), and the compact-gate epilogue (gspn_gate_grad). Notation: gspn_common.cuh.
//
// Nothing is saved by the forward pass: each CTA (direction d, lb planes) keeps the direction's gate
// inputs and dy resident in shared memory and makes two passes over its tiles.
//   Pass 1, reverse scan order: the adjoint b[s] = u * dy[s] + M_{next}^T b[next], i.e.
//     b[s, p] = u dy + w_0[next, p + 1] b[next, p + 1] + w_1[next, p] b[next, p] + w_2[next, p - 1] b[next, p - 1],
//     the lane carrying c_k = w_k * b of the last step; b goes to the fp32 plane.
//   Pass 2, scan order: h recomputed from x, lam and the resident gates (h carried in registers), and
//     per pixel du = dy * h, dlam = x * b, D_k = dL/dw_k = b * h[prev, p + k - 1], and the plane entry
//     overwritten by lam * b, this direction's part of dx.
// Gate gradients: one gate channel per channel (gmode 0) -> the lanes apply the normalisation's
// gradient (mix) and the loaders copy the result out; compact gates whose channels all lie in the CTA
// (gmode 1) -> the loaders add D_k over the channels of a gate channel in a fixed order, then apply
// the gradient; otherwise (gmode 2) -> D_k of every channel goes to an fp32 scratch and
// gspn_gate_grad adds them up in a fixed order. Column-direction outputs leave through the ostage
// tiles so that their global stores run along rows. dx = ((A_0 + A_1) + A_2) + A_3 through
// distributed shared memory, written once. No atomics.
#include "gspn_common.cuh"

template <class D, bool MIX>
__device__ void load_backward_tile(const Args& a, const Cta& c, int vt, int buf, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  const int Q = a.lb * g.Ps;
  const int plane = g.L * g.Ps;  // resident arrays: [lb][L][Ps]
  T* stage = (T*)(c.smem + g.stage + buf * g.stage_buf);
  int s0, n;
  if (vt < g.nt) {  // pass 1: gates and dy into the resident arrays, u staged
    tile_span(c, vt, !c.desc, a.ts, s0, n);
    for (int k = 0; k < 3; ++k) {
      load_tile<D>(a, c, (const T*)a.gate[k], c.gate_off, c.ngp, s0, n, (T*)(c.smem + g.res + k * g.res_arr), plane,
                   g.Ps, s0, li, nl);
    }
    load_tile<D>(a, c, (const T*)a.dy, c.x_off, c.nplanes, s0, n, (T*)(c.smem + g.res + 3 * g.res_arr), plane, g.Ps,
                 s0, li, nl);
    if (MIX) load_tile<D>(a, c, (const T*)a.u, c.map_off, c.nplanes, s0, n, stage, g.Ps, Q, 0, li, nl);
  } else {  // pass 2: x and lam staged
    tile_span(c, vt - g.nt, c.desc, a.ts, s0, n);
    load_tile<D>(a, c, (const T*)a.x, c.x_off, c.nplanes, s0, n, stage, g.Ps, Q, 0, li, nl);
    load_tile<D>(a, c, (const T*)a.lam, c.map_off, c.nplanes, s0, n, (T*)((unsigned char*)stage + g.stage_arr), g.Ps,
                 Q, 0, li, nl);
  }
}

// Byte offset of backward output array o (0 dlam, 1 du, 2..4 gates) in ostage buffer buf.
__device__ __forceinline__ int ostage_at(const Args& a, const Geo& g, int buf, int o) {
  const int gate_bytes = a.gmode == 0 ? g.ostage_t : g.ostage_f;
  return g.ostage + buf * g.ostage_buf + (o < 2 ? o * g.ostage_t : 2 * g.ostage_t + (o - 2) * gate_bytes);
}

// The loaders' half of pass 2: tile vt's outputs from ostage buffer buf to global memory.
template <class D, bool MIX>
__device__ void write_backward_tile(const Args& a, const Cta& c, int vt, int buf, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  const int Q = a.lb * g.Ps;
  int s0, n;
  tile_span(c, vt - g.nt, c.desc, a.ts, s0, n);
  const T* dlam = (const T*)(c.smem + ostage_at(a, g, buf, 0));
  const T* du = (const T*)(c.smem + ostage_at(a, g, buf, 1));
  void* maps[2] = {a.dlam, MIX ? a.du : nullptr};
  store_tile<D, false, 2>(a, c, maps, c.map_off, c.nplanes, s0, n, li, nl, [&](int j, int p, int ss, float* v) {
    const int at = ss * Q + j * g.Ps + p;
    v[0] = D::load(dlam[at]);
    v[1] = MIX ? D::load(du[at]) : 0.f;
  });
  if (!a.dgate[0]) return;
  void* gates[3] = {a.dgate[0], a.dgate[1], a.dgate[2]};
  if (a.gmode == 0) {  // final per-channel gate gradients, rounded by the lanes
    const T* o0 = (const T*)(c.smem + ostage_at(a, g, buf, 2));
    const T* o1 = (const T*)(c.smem + ostage_at(a, g, buf, 3));
    const T* o2 = (const T*)(c.smem + ostage_at(a, g, buf, 4));
    store_tile<D, false, 3>(a, c, gates, c.gate_off, c.ngp, s0, n, li, nl, [&](int j, int p, int ss, float* v) {
      const int at = ss * Q + j * g.Ps + p;
      v[0] = D::load(o0[at]);
      v[1] = D::load(o1[at]);
      v[2] = D::load(o2[at]);
    });
    return;
  }
  const float* D0 = (const float*)(c.smem + ostage_at(a, g, buf, 2));
  const float* D1 = (const float*)(c.smem + ostage_at(a, g, buf, 3));
  const float* D2 = (const float*)(c.smem + ostage_at(a, g, buf, 4));
  if (a.gmode == 2) {  // per channel to the scratch; gspn_gate_grad sums them
    void* scr[3] = {a.scratch, a.scratch + a.scr_k, a.scratch + 2 * a.scr_k};
    store_tile<D, true, 3>(a, c, scr, c.scr_off, c.nplanes, s0, n, li, nl, [&](int j, int p, int ss, float* v) {
      const int at = ss * Q + j * g.Ps + p;
      v[0] = D0[at];
      v[1] = D1[at];
      v[2] = D2[at];
    });
    return;
  }
  // gmode 1: gate slot j serves planes j * kk .. j * kk + kk - 1 of this CTA; add them in order.
  const T* r0 = (const T*)(c.smem + g.res);
  const T* r1 = (const T*)(c.smem + g.res + g.res_arr);
  const T* r2 = (const T*)(c.smem + g.res + 2 * g.res_arr);
  store_tile<D, false, 3>(a, c, gates, c.gate_off, c.ngp, s0, n, li, nl, [&](int j, int p, int ss, float* v) {
    float S0 = 0.f, S1 = 0.f, S2 = 0.f;
    for (int t = 0; t < a.kk; ++t) {
      const int at = ss * Q + (j * a.kk + t) * g.Ps + p;
      S0 += D0[at];
      S1 += D1[at];
      S2 += D2[at];
    }
    if (!MIX) {
      v[0] = S0;
      v[1] = S1;
      v[2] = S2;
      return;
    }
    const int rat = (j * g.L + s0 + ss) * g.Ps + p;
    float w0, w1, w2, q0, q1, q2;
    gspn_gates<float, true>(D::load(r0[rat]), D::load(r1[rat]), D::load(r2[rat]), p > 0, p < g.P - 1, true, w0, w1,
                            w2, q0, q1, q2);
    gspn_logit_grads(q0, q1, q2, w0, w1, w2, S0, S1, S2, v[0], v[1], v[2]);
  });
}

// The scan lanes' work on virtual tile vt: pass 1 (vt < nt) the adjoint, pass 2 the recomputation and
// the per-pixel gradients. c0..c2 (pass 1) and h (pass 2) carry over from tile to tile.
template <class D, int R, bool MIX>
__device__ __forceinline__ void scan_backward_tile(const Args& a, const Cta& c, int vt, const Lane& ln, Walk& walk,
                                                   int& parity, float* c0, float* c1, float* c2, float* h) {
  typedef typename D::T T;
  const Geo& g = c.g;
  const int Q = a.lb * g.Ps;
  const int j = ln.j, p0 = ln.p0;
  const bool active = ln.active;
  float* A = (float*)(c.smem + g.plane) + (long long)j * g.L * g.Pp;
  const T* res_g[3] = {(const T*)(c.smem + g.res), (const T*)(c.smem + g.res + g.res_arr),
                       (const T*)(c.smem + g.res + 2 * g.res_arr)};
  const T* res_dy = (const T*)(c.smem + g.res + 3 * g.res_arr);
  const int gate_row0 = ln.jg * g.L * g.Ps + p0, map_row0 = j * g.L * g.Ps + p0;
  const bool pass1 = vt < g.nt;
  if (vt == g.nt) walk.start(c.desc, g.L, a.K);
  int s0, n;
  tile_span(c, pass1 ? vt : vt - g.nt, pass1 ? !c.desc : c.desc, a.ts, s0, n);
  const bool down = pass1 ? !c.desc : c.desc;  // this pass walks toward decreasing s
  const unsigned char* stage = c.smem + g.stage + (vt & 1) * g.stage_buf;
  for (int k = 0; k < n; ++k) {
    const int ss = down ? n - 1 - k : k;
    const int s = s0 + ss;
    const bool first = walk.first(s);
    walk.advance();
    float s0v[R], s1v[R], s2v[R], w0[R], w1[R], w2[R], dyv[R], av[R];
    lane_gates<D, R, MIX, true>(res_g[0] + gate_row0 + s * g.Ps, res_g[1] + gate_row0 + s * g.Ps,
                          res_g[2] + gate_row0 + s * g.Ps, active, p0, g.P, s0v, s1v, s2v, w0, w1, w2);
    read_row<D, R>(res_dy + map_row0 + s * g.Ps, active, dyv);
    if (pass1) {
      float uv[R];
      if (MIX) {
        read_row<D, R>((const T*)stage + ss * Q + j * g.Ps + p0, active, uv);
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) uv[r] = 1.f;
      }
      // c_0 of position p + 1 and c_2 of position p - 1, moved as neighbours() moves h.
      float below[R], above[R], up, dn;
      exchange(a, c, ln, c0[0], c2[R - 1], parity, up, dn);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        below[r] = r < R - 1 ? c0[r + 1] : dn;
        above[r] = r > 0 ? c2[r - 1] : up;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float adj = first ? uv[r] * dyv[r] : gspn_adjoint(uv[r] * dyv[r], below[r], c1[r], above[r]);
        av[r] = p0 + r < g.P ? adj : 0.f;
        c0[r] = w0[r] * av[r];
        c1[r] = w1[r] * av[r];
        c2[r] = w2[r] * av[r];
      }
      if (active) write_row_f32<R>(A + s * g.Pp + p0, av);
      continue;
    }
    // Pass 2.
    float xv[R], lv[R], left[R], right[R];
    read_row<D, R>((const T*)stage + ss * Q + j * g.Ps + p0, active, xv);
    read_row<D, R>((const T*)(stage + g.stage_arr) + ss * Q + j * g.Ps + p0, active, lv);
    if (active) {
      read_row_f32<R>(A + s * g.Pp + p0, av);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) av[r] = 0.f;
    }
    neighbours<R>(a, c, ln, h, parity, left, right);
    float dl[R], du[R], ax[R], D0[R], D1[R], D2[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float lf = first ? 0.f : left[r], md = first ? 0.f : h[r], rt = first ? 0.f : right[r];
      const float hn = gspn_step(lv[r] * xv[r], w0[r], w1[r], w2[r], lf, md, rt);
      h[r] = p0 + r < g.P ? hn : 0.f;
      dl[r] = xv[r] * av[r];
      du[r] = dyv[r] * h[r];
      ax[r] = lv[r] * av[r];
      D0[r] = av[r] * lf;
      D1[r] = av[r] * md;
      D2[r] = av[r] * rt;
    }
    if (!active) continue;
    write_row_f32<R>(A + s * g.Pp + p0, ax);
    const int at = ss * Q + j * g.Ps + p0;
    const int buf = vt & 1;
    write_row<D, R>((T*)(c.smem + ostage_at(a, g, buf, 0)) + at, dl);
    if (MIX) write_row<D, R>((T*)(c.smem + ostage_at(a, g, buf, 1)) + at, du);
    if (a.gmode == 0) {
      if (MIX) {
#pragma unroll
        for (int r = 0; r < R; ++r) gspn_logit_grads(s0v[r], s1v[r], s2v[r], w0[r], w1[r], w2[r], D0[r], D1[r], D2[r], D0[r], D1[r], D2[r]);
      }
      write_row<D, R>((T*)(c.smem + ostage_at(a, g, buf, 2)) + at, D0);
      write_row<D, R>((T*)(c.smem + ostage_at(a, g, buf, 3)) + at, D1);
      write_row<D, R>((T*)(c.smem + ostage_at(a, g, buf, 4)) + at, D2);
    } else {
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 2)) + at, D0);
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 3)) + at, D1);
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 4)) + at, D2);
    }
  }
}

template <class D, int R, bool MIX>
__device__ void backward_cta(const Args& a, int d, int group) {
  typedef typename D::T T;
  const Cta c = make_cta(a, d, group);
  const Geo& g = c.g;
  const int nvt = 2 * g.nt;  // virtual tiles: pass 1 then pass 2

  const Lane ln = make_lane<R>(a, c);
  // Lane state: pass 1 carries c_k = w_k * b of the last step, pass 2 the hidden state.
  float c0[R], c1[R], c2[R], h[R];
#pragma unroll
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = c2[r] = h[r] = 0.f;
  Walk walk;
  walk.start(!c.desc, g.L, a.K);
  int parity = 0;

  load_backward_tile<D, MIX>(a, c, 0, 0, c.tid, c.nthreads);
  __syncthreads();
  for (int vt = 0; vt < nvt; ++vt) {
    if (c.tid >= g.nscan) {
      const int li = c.tid - g.nscan, nl = c.nthreads - g.nscan;
      if (vt + 1 < nvt) load_backward_tile<D, MIX>(a, c, vt + 1, (vt + 1) & 1, li, nl);
      if (vt - 1 >= g.nt) write_backward_tile<D, MIX>(a, c, vt - 1, (vt - 1) & 1, li, nl);
    } else {
      scan_backward_tile<D, R, MIX>(a, c, vt, ln, walk, parity, c0, c1, c2, h);
    }
    __syncthreads();
  }
  write_backward_tile<D, MIX>(a, c, nvt - 1, (nvt - 1) & 1, c.tid, c.nthreads);

  if (a.dx) write_output<D, MIX>(a, c, (T*)a.dx);  // uniform over the cluster
}

// Entry points, as the forward ones (gspn_forward.cu).
template <class D, int R>
__global__ void __cluster_dims__(4, 1, 1) gspn_mix_bwd(const __grid_constant__ Args a) { backward_cta<D, R, true>(a, blockIdx.x & 3, blockIdx.x >> 2); }
template <class D, int R>
__global__ void gspn_scan_bwd(const __grid_constant__ Args a) { backward_cta<D, R, false>(a, 0, blockIdx.x); }

// Compact-gate epilogue (gmode 2): for every (n, d, gate channel cg, pixel), the fp32 D_k of its kk
// channels added in channel order, then (mix) the normalisation's gradient with the logits; written
// in T. One thread per element, grid-stride loop; a.dirs: 4 (mix) or 1 (scan).
template <class D>
__global__ void gspn_gate_grad(const __grid_constant__ Args a) {
  typedef typename D::T T;
  const bool mix = a.dirs == 4;
  const int dirs = a.dirs;
  const long long total = (long long)a.N * dirs * a.Cg * a.HW;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long px = e % a.HW;
    const long long rest = e / a.HW;
    const int cg = (int)(rest % a.Cg);
    const int nd = (int)(rest / a.Cg);
    const int n = nd / dirs, d = nd - n * dirs;
    float S[3] = {0.f, 0.f, 0.f};
    for (int t = 0; t < a.kk; ++t) {
      const long long at = n * a.scr_n + d * a.scr_d + (long long)(cg * a.kk + t) * a.HW + px;
#pragma unroll
      for (int k = 0; k < 3; ++k) S[k] += gload(a.scratch + k * a.scr_k + at);
    }
    const long long go = n * a.gate_n + d * a.gate_d + cg * a.HW + px;
    float out[3] = {S[0], S[1], S[2]};
    if (mix) {
      const int i = (int)(px / a.W), jj = (int)(px - (long long)i * a.W);
      const int p = d < 2 ? i : jj, P = d < 2 ? a.H : a.W;
      float w0, w1, w2, q0, q1, q2;
      gspn_gates<float, true>(D::load(gload((const T*)a.gate[0] + go)), D::load(gload((const T*)a.gate[1] + go)),
                              D::load(gload((const T*)a.gate[2] + go)), p > 0, p < P - 1, true, w0, w1, w2, q0, q1,
                              q2);
      gspn_logit_grads(q0, q1, q2, w0, w1, w2, S[0], S[1], S[2], out[0], out[1], out[2]);
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) gstore((T*)a.dgate[k] + go, D::make(out[k]));
  }
}
