// GSPN backward kernels: the adjoint scan of gspn_scan and of the fused four-direction gspn_mix.
// Thread mapping and notation: gspn_common.cuh.
//
// With dh = dL/dh (u_d * dy for the mix, dy for the scan), the adjoint runs in reverse scan order:
//
//   a[s, p] = dh[s, p] + sum_k g_k[next, p - k + 1] * a[next, p - k + 1]     (next = step after s)
//
// and gives dx += lam * a, dlam = x * a, dg_k[s, p] = a[s, p] * h[prev(s), p + k - 1], du = dy * h.
// The scan phase keeps the three products c_k[q] = g_k * a of the last step in a double-buffered
// shared array, so a[s, q] gathers c_0[q + 1] + c_1[q] + c_2[q - 1] with one barrier per step.
// Gates are recomputed from the logits (sigmoid, normalisation), never stored by forward; h comes
// from the fp32 copy forward saved.
//
// Gate gradients: with one gate channel per channel (Cg == C, `dgacc` null) the kernel applies the
// normalisation's gradient itself and writes dL/dlogits (mix) or dL/dg (scan) in the input dtype.
// With compact gates (Cg < C) the C / Cg channels of a gate channel add dL/dg into the fp32 buffer
// `dgacc` with atomicAdd, and gspn_mix_gate_grad (mix) or a cast on the host (scan) finishes.
// The mix adds lam_d * a_d of its four directions into the fp32 buffer dx32 with atomicAdd.
//
// Per element and direction, global traffic of the mix backward: reads dy, u, x, lam, 3 logits,
// 2 x 4 bytes of saved h (current and previous step, the second mostly from cache); writes du,
// dlam, 3 logit gradients and one fp32 atomic add into dx32.
#include "gspn_common.cuh"

template <class D>
struct BwdArgs {
  typedef typename D::T T;
  const T* x;            // (N, C, H, W)
  const T* lam;          // mix (N, 4, C, H, W); scan (N, C, H, W)
  const T* u;            // mix (N, 4, C, H, W)
  const T* g0;           // mix: gate logits (N, 4, 3, Cg, H, W); scan: g_up (N, Cg, H, W)
  const T* g1;           // scan: g_mid
  const T* g2;           // scan: g_down
  const float* h;        // fp32 hidden state saved by forward, laid out like lam
  const T* dy;           // (N, C, H, W)
  float* dx32;           // mix: (N, C, H, W) fp32 accumulator, zeroed by the host, or null
  T* dx;                 // scan: (N, C, H, W), or null
  T* dlam;               // like lam, or null
  T* du;                 // mix: like u, or null
  T* dg0;                // mix: d logits (N, 4, 3, Cg, H, W); scan: d g_up. Null: no gate grads
  T* dg1;                // scan: d g_mid
  T* dg2;                // scan: d g_down
  float* dgacc;          // compact gates: fp32 accumulator of dL/dg, mix like the logits,
                         // scan (3, N, Cg, H, W); null when Cg == C
  int C, Cg, NC;
  long long HW;
  bool gates;            // any gate gradient wanted
};

template <class D, bool MIX>
__device__ void scan_backward(const BwdArgs<D>& a, const Lines& g, int plane0) {
  extern __shared__ float smem[];
  float* A = smem;              // dh, then the adjoint a
  float* S0 = A + g.tile;       // mix: sigmoid of the logits; scan: the gates
  float* S1 = S0 + g.tile;
  float* S2 = S1 + g.tile;
  float* HP = S2 + g.tile;      // h at the previous step (0 at a scan or chunk start)
  float* cb = HP + g.tile;      // [2][3][Q] products g_k * a of the last step
  int* tab = (int*)(cb + 6 * g.Q);  // [4][Q] position table (fill_table)
  fill_table(g, plane0, a.NC, a.C, a.Cg, tab);
  const long long kstride = (long long)a.Cg * a.HW;
  const int tiles = (g.L + g.ts - 1) / g.ts;
  int cur = 0;

  for (int it = 0; it < tiles; ++it) {
    const int t = g.rev ? it : tiles - 1 - it;  // reverse scan order
    const int s0 = t * g.ts;
    const int n = min(g.ts, g.L - s0);

    // A. stage dh, the gates and the previous step's h; write du = dy * h on the way.
    for (int e = threadIdx.x; e < g.Q * n; e += blockDim.x) {
      int q, ss;
      g.split(e, n, q, ss);
      if (tab[q] < 0) continue;
      const Site st = make_site<MIX>(g, tab, q, s0 + ss, a.C, a.Cg, a.HW);
      const int i = g.sidx(q, ss);
      const float dyv = D::load(a.dy[st.ox]);
      if (MIX) {
        A[i] = dyv * D::load(a.u[st.od]);
        if (a.du) a.du[st.od] = D::make(dyv * a.h[st.od]);
        S0[i] = sigmoidf(D::load(a.g0[st.og]));
        S1[i] = sigmoidf(D::load(a.g0[st.og + kstride]));
        S2[i] = sigmoidf(D::load(a.g0[st.og + 2 * kstride]));
      } else {
        A[i] = dyv;
        S0[i] = D::load(a.g0[st.og]);
        S1[i] = D::load(a.g1[st.og]);
        S2[i] = D::load(a.g2[st.og]);
      }
      if (a.gates) {
        const int sp = g.prev(st.s);
        HP[i] = sp < 0 ? 0.f : a.h[st.od - g.pix(st.p, st.s) + g.pix(st.p, sp)];
      }
    }
    __syncthreads();

    // B. adjoint scan over the tile's steps in reverse scan order; one barrier per step.
    for (int k = 0; k < n; ++k) {
      const int ss = g.rev ? k : n - 1 - k;
      const bool has_next = g.next(s0 + ss) >= 0;
      const float* cc = cb + cur * 3 * g.Q;
      float* cn = cb + (cur ^ 1) * 3 * g.Q;
      for (int q = threadIdx.x; q < g.Q; q += blockDim.x) {
        if (tab[q] < 0) continue;
        const int p = tab[3 * g.Q + q];
        const int i = g.sidx(q, ss);
        float adj = A[i];
        if (has_next) {
          adj += cc[g.Q + q];                              // mid of the same position
          if (p < g.P - 1) adj += cc[q + 1];               // "up" of the position below
          if (p > 0) adj += cc[2 * g.Q + q - 1];           // "down" of the position above
        }
        float w0, w1, w2;
        if (MIX) {
          normalise_gates(S0[i], S1[i], S2[i], p > 0, p < g.P - 1, w0, w1, w2);
        } else {
          w0 = S0[i];
          w1 = S1[i];
          w2 = S2[i];
        }
        A[i] = adj;
        cn[q] = w0 * adj;
        cn[g.Q + q] = w1 * adj;
        cn[2 * g.Q + q] = w2 * adj;
      }
      __syncthreads();
      cur ^= 1;
    }

    // C. gradients of x, lam and the gates.
    for (int e = threadIdx.x; e < g.Q * n; e += blockDim.x) {
      int q, ss;
      g.split(e, n, q, ss);
      if (tab[q] < 0) continue;
      const Site st = make_site<MIX>(g, tab, q, s0 + ss, a.C, a.Cg, a.HW);
      const int p = st.p;
      const int i = g.sidx(q, ss);
      const float adj = A[i];
      if (a.dlam) a.dlam[st.od] = D::make(D::load(a.x[st.ox]) * adj);
      if (MIX) {
        if (a.dx32) atomicAdd(a.dx32 + st.ox, D::load(a.lam[st.od]) * adj);
      } else if (a.dx) {
        a.dx[st.ox] = D::make(D::load(a.lam[st.od]) * adj);
      }
      if (!a.gates) continue;
      const float D0 = p > 0 ? adj * HP[g.sidx(q - 1, ss)] : 0.f;
      const float D1 = adj * HP[i];
      const float D2 = p < g.P - 1 ? adj * HP[g.sidx(q + 1, ss)] : 0.f;
      if (a.dgacc) {
        const long long ks = MIX ? kstride : (long long)(a.NC / a.C) * kstride;  // scan: (3, N, Cg, H, W)
        atomicAdd(a.dgacc + st.og, D0);
        atomicAdd(a.dgacc + st.og + ks, D1);
        atomicAdd(a.dgacc + st.og + 2 * ks, D2);
      } else if (MIX) {
        float d0, d1, d2;
        gate_logit_grads(S0[i], S1[i], S2[i], p > 0, p < g.P - 1, D0, D1, D2, d0, d1, d2);
        a.dg0[st.og] = D::make(d0);
        a.dg0[st.og + kstride] = D::make(d1);
        a.dg0[st.og + 2 * kstride] = D::make(d2);
      } else {
        a.dg0[st.og] = D::make(D0);
        a.dg1[st.og] = D::make(D1);
        a.dg2[st.og] = D::make(D2);
      }
    }
    __syncthreads();
  }
}

template <class D>
__global__ void gspn_mix_bwd(const typename D::T* __restrict__ x, const typename D::T* __restrict__ gate_logits,
                             const typename D::T* __restrict__ lam, const typename D::T* __restrict__ u,
                             const float* __restrict__ h, const typename D::T* __restrict__ dy,
                             float* __restrict__ dx32, typename D::T* __restrict__ dgate_logits,
                             float* __restrict__ dgacc, typename D::T* __restrict__ dlam,
                             typename D::T* __restrict__ du,
                             int N, int C, int Cg, int H, int W, int chunk,
                             int lb_col, int ts_col, int lb_row, int ts_row) {
  const Lines g = make_lines(blockIdx.y, H, W, chunk, lb_col, ts_col, lb_row, ts_row);
  const int plane0 = blockIdx.x * g.lb;
  if (plane0 >= N * C) return;  // whole block: the column and row grids differ in size
  BwdArgs<D> a;
  a.x = x;
  a.lam = lam;
  a.u = u;
  a.g0 = gate_logits;
  a.g1 = nullptr;
  a.g2 = nullptr;
  a.h = h;
  a.dy = dy;
  a.dx32 = dx32;
  a.dx = nullptr;
  a.dlam = dlam;
  a.du = du;
  a.dg0 = dgate_logits;
  a.dg1 = nullptr;
  a.dg2 = nullptr;
  a.dgacc = dgacc;
  a.C = C;
  a.Cg = Cg;
  a.NC = N * C;
  a.HW = (long long)H * W;
  a.gates = dgate_logits != nullptr || dgacc != nullptr;
  scan_backward<D, true>(a, g, plane0);
}

template <class D>
__global__ void gspn_scan_bwd(const typename D::T* __restrict__ x, const typename D::T* __restrict__ lam,
                              const typename D::T* __restrict__ g_up, const typename D::T* __restrict__ g_mid,
                              const typename D::T* __restrict__ g_down, const float* __restrict__ h,
                              const typename D::T* __restrict__ dy, typename D::T* __restrict__ dx,
                              typename D::T* __restrict__ dlam, typename D::T* __restrict__ dg_up,
                              typename D::T* __restrict__ dg_mid, typename D::T* __restrict__ dg_down,
                              float* __restrict__ dgacc,
                              int N, int C, int Cg, int H, int W, int chunk, int lb_col, int ts_col) {
  const Lines g = make_lines(0, H, W, chunk, lb_col, ts_col, 1, 1);
  const int plane0 = blockIdx.x * g.lb;
  if (plane0 >= N * C) return;
  BwdArgs<D> a;
  a.x = x;
  a.lam = lam;
  a.u = nullptr;
  a.g0 = g_up;
  a.g1 = g_mid;
  a.g2 = g_down;
  a.h = h;
  a.dy = dy;
  a.dx32 = nullptr;
  a.dx = dx;
  a.dlam = dlam;
  a.du = nullptr;
  a.dg0 = dg_up;
  a.dg1 = dg_mid;
  a.dg2 = dg_down;
  a.dgacc = dgacc;
  a.C = C;
  a.Cg = Cg;
  a.NC = N * C;
  a.HW = (long long)H * W;
  a.gates = dg_up != nullptr || dgacc != nullptr;
  scan_backward<D, false>(a, g, plane0);
}

// Compact-gate epilogue of the mix backward: dL/dg summed over each gate channel's C / Cg channels
// (fp32, like the logits) -> dL/dlogits through the normalisation's gradient. One thread per
// (n, d, cg, pixel), grid-stride loop.
template <class D>
__global__ void gspn_mix_gate_grad(const typename D::T* __restrict__ gate_logits, const float* __restrict__ dgacc,
                                   typename D::T* __restrict__ dgate_logits, int N, int Cg, int H, int W) {
  const long long HW = (long long)H * W;
  const long long CgHW = (long long)Cg * HW;
  const long long total = (long long)N * 4 * CgHW;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long nd = idx / CgHW;
    const long long rest = idx - nd * CgHW;
    const int d = (int)(nd % 4);
    const long long px = rest % HW;
    const int p = d < 2 ? (int)(px / W) : (int)(px % W);
    const int P = d < 2 ? H : W;
    const long long o = nd * 3 * CgHW + rest;
    float d0, d1, d2;
    gate_logit_grads(sigmoidf(D::load(gate_logits[o])), sigmoidf(D::load(gate_logits[o + CgHW])),
                     sigmoidf(D::load(gate_logits[o + 2 * CgHW])), p > 0, p < P - 1,
                     dgacc[o], dgacc[o + CgHW], dgacc[o + 2 * CgHW], d0, d1, d2);
    dgate_logits[o] = D::make(d0);
    dgate_logits[o + CgHW] = D::make(d1);
    dgate_logits[o + 2 * CgHW] = D::make(d2);
  }
}
