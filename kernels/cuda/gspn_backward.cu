// GSPN backward kernels: the adjoint of gspn_mix (gspn_mix_bwd, clusters of 4 CTAs, sm_90;
// gspn_mix_bwd_portable, sm_80+) and of gspn_scan (gspn_scan_bwd), and the compact-gate epilogue
// (gspn_gate_grad). Notation: gspn_common.cuh.
//
// Nothing is saved by the forward pass: each CTA (direction d, lb planes) keeps the direction's gate
// inputs and dy resident in shared memory and makes two passes over its tiles (virtual tiles 0..2nt-1,
// one pipeline: the loaders keep S - 1 tiles of copies in flight across the two passes; in pass 1 the
// copies into the resident arrays, which need no staging buffer, run up to D tiles further ahead).
//   Pass 1, reverse scan order: the adjoint b[s] = u * dy[s] + M_{next}^T b[next], i.e.
//     b[s, p] = u dy + w_0[next, p + 1] b[next, p + 1] + w_1[next, p] b[next, p] + w_2[next, p - 1] b[next, p - 1],
//     the lane carrying c_k = w_k * b of the last step; b goes to the fp32 plane. Gates and dy are
//     copied into the resident arrays, u staged.
//   Pass 2, scan order: h recomputed from x, lam (staged) and the resident gates (h carried in
//     registers), and per pixel du = dy * h, dlam = x * b, D_k = dL/dw_k = b * h[prev, p + k - 1], and the
//     plane entry overwritten by lam * b, this direction's part of dx.
// Gate gradients: one gate channel per channel (gmode 0) -> the lanes apply the normalisation's
// gradient (mix) and the loaders copy the result out; compact gates whose channels all lie in the CTA
// (gmode 1) -> the loaders add D_k over the channels of a gate channel in a fixed order, then apply
// the gradient; otherwise (gmode 2) -> D_k of every channel goes to an fp32 scratch and
// gspn_gate_grad adds them up in a fixed order. Outputs leave through the ostage tiles, so that their
// global stores run along rows. dx = ((A_0 + A_1) + A_2) + A_3, written once. No float atomics.
#include "gspn_common.cuh"

// The last pass-1 tile whose resident arrays (gates, dy) pipeline slot j loads: j + min(D, j), at most the
// last tile. Slot j loads the tiles after resident_last(j - 1) up to this one: tile j itself at the latest,
// and a lookahead growing by one tile per slot up to D (so the first tile waits for one tile's copies).
__device__ __forceinline__ int resident_last(const Geo& g, int j) {
  return j < 0 ? -1 : min(g.nt - 1, j + min(g.D, j));
}

template <class D, bool MIX, bool COL>
__device__ void load_backward_tile(const Args& a, const Cta& c, int vt, int buf, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  unsigned char* stage = c.smem + g.stage + buf * g.stage_buf;
  int s0, n;
  if (vt < g.nt) {  // pass 1: gates and dy into the resident arrays (rows = steps), up to D tiles early; u staged
    for (int r = resident_last(g, vt - 1) + 1; r <= resident_last(g, vt); ++r) {
      tile_span(c, r, !c.desc, a.ts, s0, n);
      for (int k = 0; k < 3; ++k) {
        stage_tile<D, COL>(a, c, (const T*)a.gate[k], c.gate_off, c.ngp, s0, n, c.smem + g.res + k * g.res_arr, s0,
                           li, nl);
      }
      stage_tile<D, COL>(a, c, (const T*)a.dy, c.x_off, c.nplanes, s0, n, c.smem + g.res + 3 * g.res_arr, s0, li, nl);
    }
    tile_span(c, vt, !c.desc, a.ts, s0, n);
    if (MIX) stage_tile<D, COL>(a, c, (const T*)a.u, c.map_off, c.nplanes, s0, n, stage, 0, li, nl);
  } else {  // pass 2: x and lam staged
    tile_span(c, vt - g.nt, c.desc, a.ts, s0, n);
    stage_tile<D, COL>(a, c, (const T*)a.x, c.x_off, c.nplanes, s0, n, stage, 0, li, nl);
    stage_tile<D, COL>(a, c, (const T*)a.lam, c.map_off, c.nplanes, s0, n, stage + g.stage_arr, 0, li, nl);
  }
}

// Byte offset of backward output array o (0 dlam, 1 du, 2..4 gates) in ostage buffer buf.
__device__ __forceinline__ int ostage_at(const Args& a, const Geo& g, int buf, int o) {
  const int gate_bytes = a.gmode == 0 ? g.ostage_t : g.ostage_f;
  return g.ostage + buf * g.ostage_buf + (o < 2 ? o * g.ostage_t : 2 * g.ostage_t + (o - 2) * gate_bytes);
}

// gmode 1: the gate gradients of n = N elements of gate slot j: the fp32 D_k of its kk planes added in
// order, then (mix) the normalisation's gradient with the resident logits.
template <class D, bool MIX, bool COL, int N>
__device__ __forceinline__ void summed_gate_grads(const Args& a, const Geo& g, const unsigned char* const* o,
                                                  int j, int p, int ss, int s0, float* v) {
  constexpr int VM = 16 / sizeof(typename D::T);
  float S[3][N], part[N];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
#pragma unroll
    for (int e = 0; e < N; ++e) S[k][e] = 0.f;
    for (int t = 0; t < a.kk; ++t) {
      f_run<D, COL, N>(o[k], g, ss, (j * a.kk + t) * g.Ps + p, part);
#pragma unroll
      for (int e = 0; e < N; ++e) S[k][e] += part[e];
    }
  }
  if constexpr (!MIX) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
#pragma unroll
      for (int k = 0; k < 3; ++k) v[k * VM + e] = S[k][e];
    }
  } else {
    const unsigned char* res = dyn_smem() + g.res;
    float z[3][N];
#pragma unroll
    for (int k = 0; k < 3; ++k) t_run<D, COL, N>(res + k * g.res_arr, g, s0 + ss, j * g.Ps + p, z[k]);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int pos = COL ? p : p + e;
      float w0, w1, w2, q0, q1, q2;
      gspn_gates<float, true>(z[0][e], z[1][e], z[2][e], pos > 0, pos < g.P - 1, true, w0, w1, w2, q0, q1, q2);
      gspn_logit_grads(q0, q1, q2, w0, w1, w2, S[0][e], S[1][e], S[2][e], v[e], v[VM + e], v[2 * VM + e]);
    }
  }
}

// The loaders' half of pass 2: tile vt's outputs from ostage buffer buf to global memory.
template <class D, bool MIX, bool COL>
__device__ void write_backward_tile(const Args& a, const Cta& c, int vt, int buf, int li, int nl) {
  constexpr int VM = 16 / sizeof(typename D::T);
  const Geo& g = c.g;
  int s0, n;
  tile_span(c, vt - g.nt, c.desc, a.ts, s0, n);
  const unsigned char* dlam = c.smem + ostage_at(a, g, buf, 0);
  const unsigned char* du = c.smem + ostage_at(a, g, buf, 1);
  void* maps[2] = {a.dlam, MIX ? a.du : nullptr};
  store_tile<D, false, 2>(a, c, maps, c.map_off, c.nplanes, s0, n, li, nl, [&](int j, int p, int ss, int m, float* v) {
    runs<D, COL, false>(dlam, g, ss, j * g.Ps + p, m, v);
    if (MIX) runs<D, COL, false>(du, g, ss, j * g.Ps + p, m, v + VM);
  });
  if (!a.dgate[0]) return;
  void* gates[3] = {a.dgate[0], a.dgate[1], a.dgate[2]};
  const unsigned char* o[3] = {c.smem + ostage_at(a, g, buf, 2), c.smem + ostage_at(a, g, buf, 3),
                               c.smem + ostage_at(a, g, buf, 4)};
  if (a.gmode == 0) {  // final per-channel gate gradients, rounded by the lanes
    store_tile<D, false, 3>(a, c, gates, c.gate_off, c.ngp, s0, n, li, nl, [&](int j, int p, int ss, int m, float* v) {
#pragma unroll
      for (int k = 0; k < 3; ++k) runs<D, COL, false>(o[k], g, ss, j * g.Ps + p, m, v + k * VM);
    });
    return;
  }
  if (a.gmode == 2) {  // per channel to the scratch; gspn_gate_grad sums them
    void* scr[3] = {a.scratch, a.scratch + a.scr_k, a.scratch + 2 * a.scr_k};
    store_tile<D, true, 3>(a, c, scr, c.scr_off, c.nplanes, s0, n, li, nl, [&](int j, int p, int ss, int m, float* v) {
#pragma unroll
      for (int k = 0; k < 3; ++k) runs<D, COL, true>(o[k], g, ss, j * g.Ps + p, m, v + k * VM);
    });
    return;
  }
  // gmode 1: gate slot j serves planes j * kk .. j * kk + kk - 1 of this CTA
  store_tile<D, false, 3>(a, c, gates, c.gate_off, c.ngp, s0, n, li, nl, [&](int j, int p, int ss, int m, float* v) {
    if (m == 1) {
      summed_gate_grads<D, MIX, COL, 1>(a, g, o, j, p, ss, s0, v);
    } else {
      summed_gate_grads<D, MIX, COL, VM>(a, g, o, j, p, ss, s0, v);
    }
  });
}

// The scan lanes' work on virtual tile vt: pass 1 (vt < nt) the adjoint, pass 2 the recomputation and
// the per-pixel gradients. c0..c2 (pass 1) and h (pass 2) carry over from tile to tile.
template <class D, int R, bool MIX, bool COL>
__device__ __forceinline__ void scan_backward_tile(const Args& a, const Cta& c, int vt, const Lane& ln, Walk& walk,
                                                   int& parity, float* c0, float* c1, float* c2, float* h) {
  const Geo& g = c.g;
  const bool active = ln.active;
  const int p0 = ln.p0, q0 = ln.q0;
  float* A = (float*)(c.smem + g.plane) + (long long)ln.j * g.L * g.Pp;
  const unsigned char* res = c.smem + g.res;
  const bool pass1 = vt < g.nt;
  if (vt == g.nt) walk.start(c.desc, g.L, a.K);
  int s0, n;
  tile_span(c, pass1 ? vt : vt - g.nt, pass1 ? !c.desc : c.desc, a.ts, s0, n);
  const bool down = pass1 ? !c.desc : c.desc;  // this pass walks toward decreasing s
  const unsigned char* stage = c.smem + g.stage + (vt % a.S) * g.stage_buf;
  for (int k = 0; k < n; ++k) {
    const int ss = down ? n - 1 - k : k;
    const int s = s0 + ss;
    const bool first = walk.first(s);
    walk.advance();
    float s0v[R], s1v[R], s2v[R], w0[R], w1[R], w2[R], dyv[R], av[R];  // pass 2: s0v..s2v = 1 - sigmoids
    if (pass1) {
      lane_gates<D, R, MIX, COL>(res, res + g.res_arr, res + 2 * g.res_arr, g, s, ln.qg, active, p0, s0v, s1v, s2v,
                                 w0, w1, w2);
    } else {
      lane_gates<D, R, MIX, COL, true>(res, res + g.res_arr, res + 2 * g.res_arr, g, s, ln.qg, active, p0, s0v, s1v,
                                       s2v, w0, w1, w2);
    }
    read_lane<D, R, COL>(res + 3 * g.res_arr, g, s, q0, active, dyv);
    if (pass1) {
      float uv[R];
      if (MIX) {
        read_lane<D, R, COL>(stage, g, ss, q0, active, uv);
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
    read_lane<D, R, COL>(stage, g, ss, q0, active, xv);
    read_lane<D, R, COL>(stage + g.stage_arr, g, ss, q0, active, lv);
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
    const int buf = vt & 1;
    write_lane<D, R, COL>(c.smem + ostage_at(a, g, buf, 0), g, ss, q0, dl);
    if (MIX) write_lane<D, R, COL>(c.smem + ostage_at(a, g, buf, 1), g, ss, q0, du);
    if (a.gmode == 0) {
      if (MIX) {
#pragma unroll
        for (int r = 0; r < R; ++r) gspn_logit_grads(s0v[r], s1v[r], s2v[r], w0[r], w1[r], w2[r], D0[r], D1[r], D2[r], D0[r], D1[r], D2[r]);
      }
      write_lane<D, R, COL>(c.smem + ostage_at(a, g, buf, 2), g, ss, q0, D0);
      write_lane<D, R, COL>(c.smem + ostage_at(a, g, buf, 3), g, ss, q0, D1);
      write_lane<D, R, COL>(c.smem + ostage_at(a, g, buf, 4), g, ss, q0, D2);
    } else {
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 2) + foff<COL>(g, ss, q0)), D0);
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 3) + foff<COL>(g, ss, q0)), D1);
      write_row_f32<R>((float*)(c.smem + ostage_at(a, g, buf, 4) + foff<COL>(g, ss, q0)), D2);
    }
  }
}

template <class D, int R, bool MIX, bool COL>
__device__ void backward_kind(const Args& a, const Cta& c) {
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
  const bool loader = c.tid >= g.nscan;
  const int li = c.tid - g.nscan, nl = c.nthreads - g.nscan;

  if (loader) {
    for (int t = 0; t < a.S - 1; ++t) {
      if (t < nvt) load_backward_tile<D, MIX, COL>(a, c, t, t, li, nl);
      cp_async_commit();
    }
  }
  for (int vt = 0; vt < nvt; ++vt) {
    if (loader) wait_oldest_tile(a.S);
    __syncthreads();  // tile vt is staged and visible; tile vt - 1 is done (its buffer free, its outputs in ostage)
    if (loader) {
      const int next = vt + a.S - 1;
      if (next < nvt) load_backward_tile<D, MIX, COL>(a, c, next, next % a.S, li, nl);
      cp_async_commit();
      if (vt - 1 >= g.nt) write_backward_tile<D, MIX, COL>(a, c, vt - 1, (vt - 1) & 1, li, nl);
    } else {
      scan_backward_tile<D, R, MIX, COL>(a, c, vt, ln, walk, parity, c0, c1, c2, h);
    }
  }
  __syncthreads();
  write_backward_tile<D, MIX, COL>(a, c, nvt - 1, (nvt - 1) & 1, c.tid, c.nthreads);
  __syncthreads();  // the plane is complete (and the ostage reads done)
}

template <class D, int R, bool MIX, int VARIANT>
__device__ void backward_cta(const Args& a, int d, int group) {
  typedef typename D::T T;
  const Cta c = make_cta(a, d, group);
  if (c.col) {
    backward_kind<D, R, MIX, true>(a, c);
  } else {
    backward_kind<D, R, MIX, false>(a, c);
  }
  if (a.dx) write_output<D, VARIANT>(a, c, group, (T*)a.dx);  // uniform over the group
}

// Entry points, as the forward ones (gspn_forward.cu). Each is held to the registers per thread the planner
// assumes (cuda_plan.ASSUMED_REGS["bwd"]): ptxas's own choice drifts by a few registers with unrelated code
// changes, and 128 lets two CTAs of up to 8 warps share an SM. The compile test checks that none spills.
template <int R>
__device__ constexpr int backward_regs() { return R <= 2 ? 128 : (R == 4 ? 136 : 176); }
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1204
#define GSPN_MAXNREG(n) __maxnreg__(n)
#else  // __maxnreg__ came with CUDA 12.4: older compilers build the kernels uncapped
#define GSPN_MAXNREG(n)
#endif

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <class D, int R>
__global__ void __cluster_dims__(4, 1, 1) GSPN_MAXNREG(backward_regs<R>())
    gspn_mix_bwd(const __grid_constant__ Args a) {
  backward_cta<D, R, true, CLUSTER>(a, blockIdx.x & 3, blockIdx.x >> 2);
}
#endif
template <class D, int R>
__global__ void GSPN_MAXNREG(backward_regs<R>()) gspn_mix_bwd_portable(const __grid_constant__ Args a) {
  backward_cta<D, R, true, PORTABLE>(a, blockIdx.x & 3, blockIdx.x >> 2);
}
template <class D, int R>
__global__ void GSPN_MAXNREG(backward_regs<R>()) gspn_scan_bwd(const __grid_constant__ Args a) {
  backward_cta<D, R, false, SINGLE>(a, 0, blockIdx.x);
}

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
