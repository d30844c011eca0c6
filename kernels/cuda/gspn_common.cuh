// GSPN line-scan kernels: definitions shared by gspn_forward.cu and gspn_backward.cu.
//
// The op (DESIGN.md section 3; GSPN, arXiv 2501.12381, eq. 1-3). For one direction, with a
// "line" of P positions p and a scan of L steps s:
//
//   h[s, p] = lam[s, p] * x[s, p] + sum_k g_k[s, p] * h[prev(s), p + k - 1]      k = 0, 1, 2
//
// where prev(s) is the step before s in scan order, h of a missing step (scan start, chunk
// start) or of a position outside 0..P-1 is 0, and the gates come from logits a_k through the
// Stability-Context normalisation g_k = sigmoid(a_k) / sum over existing k' of sigmoid(a_k')
// ("up", k = 0, does not exist at p = 0; "down", k = 2, does not exist at p = P - 1).
//
// Directions, in the image frame of NCHW maps (H rows i, W columns j, j contiguous):
//   d = 0  left->right   line = column j, position p = i (P = H), step s = j (L = W), increasing
//   d = 1  right->left   same lines, decreasing s
//   d = 2  top->bottom   line = row i,    position p = j (P = W), step s = i (L = H), increasing
//   d = 3  bottom->top   same lines, decreasing s
// so pixel (p, s) of a plane is p * W + s for d < 2 ("column lines") and s * W + p for d >= 2
// ("row lines"). Chunks cut the step axis into [0, K), [K, 2K), ... for both scan orders.
//
// Thread mapping. One block owns `lb` whole planes (n, c) of one direction, i.e.
// Q = lb * P positions (lb = threads / P, at least 1), and walks the step axis in tiles of
// `ts` steps, in scan order (reverse scan order in backward). Per tile:
//   A. load: every input of the tile (Q x ts values per tensor) is read with consecutive
//      threads on consecutive addresses -- along s for column lines (each position's ts steps
//      are one contiguous run of a row), along p for row lines -- and staged in fp32 in
//      shared memory (gates already passed through sigmoid / normalisation);
//   B. scan: thread q owns position q (q, q + threads, ... when P > threads) and steps through
//      the tile in scan order; the previous step's hidden state of the Q positions lives in a
//      double-buffered shared array, so one __syncthreads per step;
//   C. store: results leave shared memory with the same coalesced pattern as A.
// This is the "tile of consecutive w per step" answer to the NCHW coalescing problem of
// horizontal scans: a thread per (n, c, i) reading x[n, c, i, w] step by step would touch one
// 32-byte sector per element. Column-line tiles are stored [q][ss] with an odd row stride
// (ts | 1) so the scan phase, where neighbouring threads read neighbouring q, is free of bank
// conflicts; row-line tiles are stored [ss][q]. A per-position table (n, c, gate channel, p), built
// once per block, keeps integer divisions out of the per-element loops. Host code (cupy_backend.py)
// picks ts as the largest tile that fits the shared-memory budget.
//
// Shared memory per block, in 4-byte words: forward 4 staged arrays (lam * x then h, three gates)
// of Q x cs plus 2 Q (previous h, double-buffered) plus 4 Q (table); backward 5 staged arrays
// (dh then the adjoint, three gate sigmoids, previous-step h) plus 6 Q (carried g_k * a) plus 4 Q.
#pragma once

// ---------------------------------------------------------------------------------------------
// Storage types. Tensors arrive as float, IEEE half or bfloat16 and all arithmetic is fp32.
// Half and bfloat16 travel as raw 16-bit words with explicit round-to-nearest-even conversions,
// so the sources include no CUDA header and NVRTC compiles them as they are.
struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T make(float f) { return f; }
};

struct BF16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T v) { return __uint_as_float(((unsigned int)v) << 16); }
  static __device__ __forceinline__ T make(float f) {
    unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (T)0x7fc0u;  // NaN stays a quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);                          // round to nearest, ties to even
    return (T)(b >> 16);
  }
};

#ifndef GSPN_EMULATION
struct F16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ T make(float f) {
    T v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
  }
};
#endif

__device__ __forceinline__ float sigmoidf(float a) { return 1.f / (1.f + expf(-a)); }

// Stability-Context normalisation: existing neighbours' weights sum to 1, missing ones are 0.
__device__ __forceinline__ void normalise_gates(float s0, float s1, float s2, bool has_up, bool has_down,
                                                float& g0, float& g1, float& g2) {
  const float inv = 1.f / (s1 + (has_up ? s0 : 0.f) + (has_down ? s2 : 0.f));
  g0 = has_up ? s0 * inv : 0.f;
  g1 = s1 * inv;
  g2 = has_down ? s2 * inv : 0.f;
}

// Gradient of the normalisation: with D_k = dL/dg_k, g_k = s_k / S and s_k = sigmoid(a_k),
// dL/da_k = s_k (1 - s_k) (D_k - sum_k' D_k' g_k') / S = g_k (1 - s_k) (D_k - dot) for an existing
// neighbour k, and 0 for a missing one.
__device__ __forceinline__ void gate_logit_grads(float s0, float s1, float s2, bool has_up, bool has_down,
                                                 float D0, float D1, float D2,
                                                 float& da0, float& da1, float& da2) {
  float g0, g1, g2;
  normalise_gates(s0, s1, s2, has_up, has_down, g0, g1, g2);
  const float dot = D0 * g0 + D1 * g1 + D2 * g2;
  da0 = g0 * (1.f - s0) * (D0 - dot);
  da1 = g1 * (1.f - s1) * (D1 - dot);
  da2 = g2 * (1.f - s2) * (D2 - dot);
}

// ---------------------------------------------------------------------------------------------
// Geometry of one block's work: direction, line/step axes, chunks and the shared-memory tile.
struct Lines {
  int d;        // direction 0..3
  bool col;     // d < 2: lines are columns, the scan walks along W
  bool rev;     // d odd: the scan walks toward decreasing step index
  int P, L;     // positions per line, steps per scan
  int K;        // steps per chunk (L for a global scan)
  int W;        // row stride of the maps
  int lb, Q;    // planes per block, positions per block (lb * P)
  int ts, cs;   // steps per tile, row stride of a column-line tile (odd)
  int tile;     // floats per staged tile array

  __device__ __forceinline__ long long pix(int p, int s) const {
    return col ? (long long)p * W + s : (long long)s * W + p;
  }
  // Shared-memory index of (position q, step ss within the tile).
  __device__ __forceinline__ int sidx(int q, int ss) const { return col ? q * cs + ss : ss * Q + q; }
  // Flat element e of a tile holding n steps -> (q, ss); consecutive e are consecutive in memory.
  __device__ __forceinline__ void split(int e, int n, int& q, int& ss) const {
    if (col) {
      q = e / n;
      ss = e - q * n;
    } else {
      ss = e / Q;
      q = e - ss * Q;
    }
  }
  // The step before / after s in scan order inside the same chunk, or -1.
  __device__ __forceinline__ int prev(int s) const {
    const int t = rev ? s + 1 : s - 1;
    return (t >= 0 && t < L && t / K == s / K) ? t : -1;
  }
  __device__ __forceinline__ int next(int s) const {
    const int t = rev ? s - 1 : s + 1;
    return (t >= 0 && t < L && t / K == s / K) ? t : -1;
  }
};

__device__ __forceinline__ Lines make_lines(int d, int H, int W, int chunk, int lb_col, int ts_col,
                                            int lb_row, int ts_row) {
  Lines g;
  g.d = d;
  g.col = d < 2;
  g.rev = (d & 1) != 0;
  g.P = g.col ? H : W;
  g.L = g.col ? W : H;
  g.K = chunk > 0 ? chunk : g.L;
  g.W = W;
  g.lb = g.col ? lb_col : lb_row;
  g.Q = g.lb * g.P;
  g.ts = g.col ? ts_col : ts_row;
  g.cs = g.col ? (g.ts | 1) : g.ts;
  g.tile = g.Q * g.cs;
  return g;
}

// Per-position table of a block, built once (integer divisions stay out of the per-element loops):
// [0, Q) batch index n (-1 past the last plane), [Q, 2Q) channel c, [2Q, 3Q) gate channel, [3Q, 4Q)
// position p along the line. Lives in shared memory after the staged arrays.
__device__ __forceinline__ void fill_table(const Lines& g, int plane0, int NC, int C, int Cg, int* tab) {
  for (int q = threadIdx.x; q < g.Q; q += blockDim.x) {
    const int plane = plane0 + q / g.P;
    int n = -1, c = 0;
    if (plane < NC) {
      n = plane / C;
      c = plane - n * C;
    }
    tab[q] = n;
    tab[g.Q + q] = c;
    tab[2 * g.Q + q] = c / (C / Cg);
    tab[3 * g.Q + q] = q % g.P;
  }
  __syncthreads();
}

// Indices of one staged element: plane (n, c), its gate channel, and the global offsets.
struct Site {
  int n, c, cg, p, s;
  long long ox;  // (N, C, H, W) maps: x, y, dy, dx
  long long od;  // (N, 4, C, H, W) maps of the mix (lam, u, h); == ox for the one-direction scan
  long long og;  // gate (n, d, 0, cg) of the mix (N, 4, 3, Cg, H, W); (n, cg) of the scan (N, Cg, H, W)
};

template <bool MIX>
__device__ __forceinline__ Site make_site(const Lines& g, const int* tab, int q, int s, int C, int Cg,
                                          long long HW) {
  Site t;
  t.n = tab[q];
  t.c = tab[g.Q + q];
  t.cg = tab[2 * g.Q + q];
  t.p = tab[3 * g.Q + q];
  t.s = s;
  const long long px = g.pix(t.p, s);
  t.ox = ((long long)t.n * C + t.c) * HW + px;
  if (MIX) {
    t.od = (((long long)t.n * 4 + g.d) * C + t.c) * HW + px;
    t.og = (((long long)t.n * 4 + g.d) * 3 * Cg + t.cg) * HW + px;
  } else {
    t.od = t.ox;
    t.og = ((long long)t.n * Cg + t.cg) * HW + px;
  }
  return t;
}
