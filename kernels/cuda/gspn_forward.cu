// GSPN forward kernels: the one-direction scan (gspn_scan) and the fused four-direction mix
// (gspn_mix). Thread mapping and notation: gspn_common.cuh.
//
// gspn_mix_fwd: grid (blocks, 4 directions). Each block scans its planes in its direction with
// lam and the normalised gates applied in the kernel, then adds u_d * h_d into the fp32
// accumulator y32 with atomicAdd (four directions meet there; the host zeroes it first and casts
// it to the input dtype afterwards). With `hsave` it also stores the fp32 hidden state of every
// direction, (N, 4, C, H, W), for the backward pass.
// gspn_scan_fwd: grid (blocks, 1), direction 0 with normalised gates given, writes h.
//
// Per element and direction, global traffic of the mix forward: reads x, lam, u and 3 gate
// logits (3 / k with compact gates), one fp32 atomic add into y32, and 4 bytes of h when saved.
#include "gspn_common.cuh"

template <class D>
struct FwdArgs {
  typedef typename D::T T;
  const T* x;       // (N, C, H, W)
  const T* lam;     // mix (N, 4, C, H, W); scan (N, C, H, W)
  const T* u;       // mix (N, 4, C, H, W); scan: unused
  const T* g0;      // mix: gate logits (N, 4, 3, Cg, H, W); scan: g_up (N, Cg, H, W)
  const T* g1;      // scan: g_mid
  const T* g2;      // scan: g_down
  float* y32;       // mix: (N, C, H, W) fp32 accumulator, zeroed by the host
  T* out;           // scan: h (N, C, H, W), may be null when hsave is given
  float* hsave;     // fp32 h for backward, or null: mix (N, 4, C, H, W), scan (N, C, H, W)
  int C, Cg, NC;
  long long HW;
};

template <class D, bool MIX>
__device__ void scan_forward(const FwdArgs<D>& a, const Lines& g, int plane0) {
  extern __shared__ float smem[];
  float* V = smem;              // lam * x, then h
  float* G0 = V + g.tile;       // normalised gates
  float* G1 = G0 + g.tile;
  float* G2 = G1 + g.tile;
  float* hp = G2 + g.tile;      // [2][Q] hidden state of the previous step
  int* tab = (int*)(hp + 2 * g.Q);  // [4][Q] position table (fill_table)
  fill_table(g, plane0, a.NC, a.C, a.Cg, tab);
  const long long kstride = (long long)a.Cg * a.HW;
  const int tiles = (g.L + g.ts - 1) / g.ts;
  int cur = 0;

  for (int it = 0; it < tiles; ++it) {
    const int t = g.rev ? tiles - 1 - it : it;
    const int s0 = t * g.ts;
    const int n = min(g.ts, g.L - s0);

    // A. stage lam * x and the gates of the tile.
    for (int e = threadIdx.x; e < g.Q * n; e += blockDim.x) {
      int q, ss;
      g.split(e, n, q, ss);
      if (tab[q] < 0) continue;
      const Site st = make_site<MIX>(g, tab, q, s0 + ss, a.C, a.Cg, a.HW);
      const int i = g.sidx(q, ss);
      V[i] = D::load(a.x[st.ox]) * D::load(a.lam[st.od]);
      float w0, w1, w2;
      if (MIX) {
        normalise_gates(sigmoidf(D::load(a.g0[st.og])), sigmoidf(D::load(a.g0[st.og + kstride])),
                        sigmoidf(D::load(a.g0[st.og + 2 * kstride])), st.p > 0, st.p < g.P - 1, w0, w1, w2);
      } else {
        w0 = D::load(a.g0[st.og]);
        w1 = D::load(a.g1[st.og]);
        w2 = D::load(a.g2[st.og]);
      }
      G0[i] = w0;
      G1[i] = w1;
      G2[i] = w2;
    }
    __syncthreads();

    // B. scan the tile's steps in scan order; one barrier per step.
    for (int k = 0; k < n; ++k) {
      const int ss = g.rev ? n - 1 - k : k;
      const bool restart = g.prev(s0 + ss) < 0;
      const float* hc = hp + cur * g.Q;
      float* hn = hp + (cur ^ 1) * g.Q;
      for (int q = threadIdx.x; q < g.Q; q += blockDim.x) {
        if (tab[q] < 0) continue;
        const int p = tab[3 * g.Q + q];
        const int i = g.sidx(q, ss);
        float h = V[i];
        if (!restart) {
          h += G1[i] * hc[q];
          if (p > 0) h += G0[i] * hc[q - 1];
          if (p < g.P - 1) h += G2[i] * hc[q + 1];
        }
        V[i] = h;
        hn[q] = h;
      }
      __syncthreads();
      cur ^= 1;
    }

    // C. write the tile's results.
    for (int e = threadIdx.x; e < g.Q * n; e += blockDim.x) {
      int q, ss;
      g.split(e, n, q, ss);
      if (tab[q] < 0) continue;
      const Site st = make_site<MIX>(g, tab, q, s0 + ss, a.C, a.Cg, a.HW);
      const float h = V[g.sidx(q, ss)];
      if (MIX) {
        atomicAdd(a.y32 + st.ox, D::load(a.u[st.od]) * h);
      } else if (a.out) {
        a.out[st.ox] = D::make(h);
      }
      if (a.hsave) a.hsave[st.od] = h;
    }
    __syncthreads();
  }
}

template <class D>
__global__ void gspn_mix_fwd(const typename D::T* __restrict__ x, const typename D::T* __restrict__ gate_logits,
                             const typename D::T* __restrict__ lam, const typename D::T* __restrict__ u,
                             float* __restrict__ y32, float* __restrict__ hsave,
                             int N, int C, int Cg, int H, int W, int chunk,
                             int lb_col, int ts_col, int lb_row, int ts_row) {
  const Lines g = make_lines(blockIdx.y, H, W, chunk, lb_col, ts_col, lb_row, ts_row);
  const int plane0 = blockIdx.x * g.lb;
  if (plane0 >= N * C) return;  // whole block: the column and row grids differ in size
  FwdArgs<D> a;
  a.x = x;
  a.lam = lam;
  a.u = u;
  a.g0 = gate_logits;
  a.g1 = nullptr;
  a.g2 = nullptr;
  a.y32 = y32;
  a.out = nullptr;
  a.hsave = hsave;
  a.C = C;
  a.Cg = Cg;
  a.NC = N * C;
  a.HW = (long long)H * W;
  scan_forward<D, true>(a, g, plane0);
}

template <class D>
__global__ void gspn_scan_fwd(const typename D::T* __restrict__ x, const typename D::T* __restrict__ lam,
                              const typename D::T* __restrict__ g_up, const typename D::T* __restrict__ g_mid,
                              const typename D::T* __restrict__ g_down, typename D::T* __restrict__ out,
                              float* __restrict__ hsave,
                              int N, int C, int Cg, int H, int W, int chunk, int lb_col, int ts_col) {
  const Lines g = make_lines(0, H, W, chunk, lb_col, ts_col, 1, 1);
  const int plane0 = blockIdx.x * g.lb;
  if (plane0 >= N * C) return;
  FwdArgs<D> a;
  a.x = x;
  a.lam = lam;
  a.u = nullptr;
  a.g0 = g_up;
  a.g1 = g_mid;
  a.g2 = g_down;
  a.y32 = nullptr;
  a.out = out;
  a.hsave = hsave;
  a.C = C;
  a.Cg = Cg;
  a.NC = N * C;
  a.HW = (long long)H * W;
  scan_forward<D, false>(a, g, plane0);
}
