// GSPN line-scan kernels: definitions shared by gspn_forward.cu and gspn_backward.cu.
//
// The op (DESIGN.md section 3; GSPN, arXiv 2501.12381, eq. 1-3). For one direction, a "line" of P
// positions p is scanned over L steps s:
//
//   h[s, p] = lam[s, p] * x[s, p] + sum_k w_k[s, p] * h[prev(s), p + k - 1]        k = 0, 1, 2
//
// h of a missing step (scan start, chunk start) or of a position outside 0..P-1 is 0. gspn_mix takes
// gate logits z_k and normalises them (Stability-Context Condition): w_k = sigmoid(z_k) / sum over
// the neighbours k' that exist of sigmoid(z_k') ("up", k = 0, is missing at p = 0; "down", k = 2, at
// p = P - 1). gspn_scan takes the gates as given.
// In these comments w are gates, z logits and b adjoints; in code `a` is always the launch Args, `g` the
// geometry (Geo) and `c` the CTA's view of both.
//
// Directions in the image frame of NCHW maps (H rows i, W columns j, j contiguous):
//   d = 0 left->right  line = column j, p = i (P = H), s = j (L = W), ascending s   "column lines"
//   d = 1 right->left  same lines, descending s
//   d = 2 top->bottom  line = row i, p = j (P = W), s = i (L = H), ascending s      "row lines"
//   d = 3 bottom->top  same lines, descending s
// so pixel (p, s) is p * W + s for column lines and s * W + p for row lines. A chunk K cuts the step
// axis into blocks [0, K), [K, 2K), ... in image coordinates for both orders.
//
// Work split. A CTA owns `lb` consecutive planes (plane = n * C + c) and one direction; gspn_mix
// launches clusters of 4 CTAs, rank d scanning direction d of the same planes (gspn_scan: one CTA,
// d = 0). Threads below `nscan` are scan lanes: a line is held by G lanes of one warp (or by W whole
// warps, for long lines on few planes), R consecutive positions per lane in registers; neighbours
// across lanes come by warp shuffles, across the W warps of a line through shared memory and the line's
// named barrier, once per step. The other threads are loaders: while the lanes scan tile t (ts steps) from
// shared memory, the loaders stage tile t + 1 (and, backward, write tile t - 1's results), one
// __syncthreads per tile. Each map is read from global memory once per CTA with 16-byte vectors when
// W and the pointers allow it. Results are summed over directions on chip: each CTA keeps its fp32
// plane of u_d * h_d (backward: lam_d * b_d) in shared memory, and after a cluster barrier the 4 CTAs
// each add up one quarter of the rows through distributed shared memory in the fixed order
// ((d0 + d1) + d2) + d3 and write them once. No atomics: results are bitwise reproducible.
//
// Shared memory (byte offsets from the host plan, cupy_backend._plan; "row" = one step of lb planes,
// a plane's positions at stride Ps):
//   tab     [4][lb] long long  per-plane global offsets (maps, gates, x-like, gate scratch)
//   stage   [2][arrays][ts][lb * Ps] T   staged input tiles (double buffered)
//   plane   [lb][L][Pp] float   forward u * h; backward the adjoint, then lam * adjoint
//   res     [4][lb][L][Ps] T    backward: the gate inputs and dy of the whole plane, resident
//   ostage  [2][5][ts][lb * Ps] backward outputs of a tile (dlam, du in T; gates in T, or fp32 sums)
//   xchg    [2][lb][W][2] float  values crossing between the warps of a line (when W > 1)
#pragma once

#ifndef GSPN_EMULATION
#include "gspn_device.cuh"
#endif
#include "gspn_line.cuh"  // gates, one step, its adjoint: shared with the CPU kernel

// ---------------------------------------------------------------------------------------------
// Storage types: all arithmetic is fp32. bf16 and fp16 travel as raw 16-bit words with explicit
// round-to-nearest-even conversions, so NVRTC needs no CUDA header.
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

struct F16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T v) { return half_to_float(v); }
  static __device__ __forceinline__ T make(float f) { return float_to_half(f); }
};

// 16 bytes moved as one vector (LDG.128 / STG.128 / LDS.128).
struct __align__(16) Vec16 {
  unsigned int w[4];
};

// Element e of a 4-byte word holding 4 / sizeof(T) elements (little endian, as on the GPU and x86).
template <class T>
__device__ __forceinline__ T word_elem(unsigned int w, int e) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w);
  } else {
    return (T)(e ? (w >> 16) : (w & 0xffffu));
  }
}
template <class T>
__device__ __forceinline__ unsigned int elem_bits(T v) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v);
  } else {
    return (unsigned int)v;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch arguments: one struct, filled by cupy_backend._args (a ctypes mirror of this layout: only
// 8-byte pointers / long longs, then 4-byte ints, so host and device agree on every offset).
struct Geo {      // the plan of one line kind: [0] column lines (d = 0, 1), [1] row lines (d = 2, 3)
  int P, L, G;    // positions per line, steps per scan, lanes of a warp on one line (power of two <= 32)
  int nt;         // tiles per pass, ceil(L / ts)
  int Ps;         // staged row length of one plane (elements), a multiple of R and of the vector width
  int Pp;         // row length of the fp32 planes (floats), a multiple of R (odd when R = 1)
  int nscan;      // scan threads (whole warps); the others load
  int stage, stage_arr, stage_buf;      // byte offset of the staging buffers, bytes per array, per buffer
  int plane;                            // byte offset of the fp32 planes
  int res, res_arr;                     // byte offset of the resident arrays (backward), bytes per array
  int ostage, ostage_t, ostage_f, ostage_buf;  // backward outputs: offset, bytes per T / fp32 array, per buffer
  int W;          // warps per line (1, 2 or 4; G = 32 when W > 1)
  int xchg;       // byte offset of the exchange slots between the warps of a line
};

struct Args {
  const void* x;      // (N, C, H, W)
  const void* lam;    // mix (N, 4, C, H, W); scan (N, C, H, W)
  const void* u;      // mix (N, 4, C, H, W); scan: null
  const void* gate[3];  // gate k: mix, logits + k * Cg * H * W of (N, 4, 3, Cg, H, W); scan: g_up, g_mid, g_down
  const void* dy;     // backward: gradient of the output, (N, C, H, W)
  void* y;            // forward output: mix y, scan h (N, C, H, W)
  void* dx;           // backward outputs, each null when not wanted: like x,
  void* dlam;         //   like lam,
  void* du;           //   like u,
  void* dgate[3];     //   like gate[k]
  float* scratch;     // compact gates split across CTAs (gmode 2): fp32 per-channel gate gradients
  long long HW;
  long long map_n, map_d;     // element strides of lam / u: batch, direction (scan: C * HW, 0)
  long long gate_n, gate_d;   // element strides of the gates: batch, direction (scan: Cg * HW, 0)
  long long scr_n, scr_d, scr_k;  // strides of the scratch (gate k, channel c at + c * HW)
  int N, C, Cg, H, W;
  int K;              // chunk (steps per block), 0 for a global scan
  int kk;             // C / Cg: channels per gate channel
  int NC;             // N * C
  int lb;             // planes per CTA
  int ts;             // steps per tile
  int V;              // elements per global vector access: 1, or 16 / sizeof(T)
  int gmode;          // backward gate output: 0 final per channel (kk == 1), 1 summed inside the CTA, 2 scratch
  int nthreads;       // threads per CTA
  int dirs;           // 4 for gspn_mix, 1 for gspn_scan
  Geo geo[2];
};

// ---------------------------------------------------------------------------------------------
// One CTA's share of the work: its direction, planes, tables and shared-memory plan.
struct Cta {
  int d;            // direction
  bool col;         // column lines (d = 0, 1)
  bool desc;        // the forward scan walks toward decreasing s (d = 1, 3)
  Geo g;            // the plan of this line kind
  int pl0, nplanes; // first plane, planes owned (< lb in the last group)
  int gp0, ngp;     // first gate plane (n * Cg + cg), gate planes used
  int tid, nthreads;
  unsigned char* smem;
  long long* map_off;   // [lb] element offset of plane j in lam / u / dlam / du
  long long* gate_off;  // [lb] element offset of gate plane j (slots 0..ngp-1) in gate[k] / dgate[k]
  long long* x_off;     // [lb] element offset of plane j in x / y / dy / dx
  long long* scr_off;   // [lb] element offset of plane j in the scratch

  // Global element offset of (position p, step s) inside a plane.
  __device__ __forceinline__ long long pix(int p, int s, int W) const {
    return col ? (long long)p * W + s : (long long)s * W + p;
  }
};

// Geometry and the per-plane offset tables (one integer division per plane, once per CTA).
__device__ __forceinline__ Cta make_cta(const Args& a, int d, int group) {
  Cta c;
  c.d = d;
  c.col = d < 2;
  c.desc = (d & 1) != 0;
  c.g = c.col ? a.geo[0] : a.geo[1];
  c.pl0 = group * a.lb;
  c.nplanes = min(a.lb, a.NC - c.pl0);
  c.gp0 = c.pl0 / a.kk;
  c.ngp = (c.pl0 + c.nplanes - 1) / a.kk - c.gp0 + 1;
  c.tid = threadIdx.x;
  c.nthreads = a.nthreads;
  c.smem = dyn_smem();
  c.map_off = (long long*)c.smem;
  c.gate_off = c.map_off + a.lb;
  c.x_off = c.gate_off + a.lb;
  c.scr_off = c.x_off + a.lb;
  if (c.tid < a.lb) {
    const int j = c.tid;
    const int pl = c.pl0 + j;
    if (j < c.nplanes) {
      const int n = pl / a.C, ch = pl - n * a.C;
      c.map_off[j] = n * a.map_n + d * a.map_d + ch * a.HW;
      c.x_off[j] = pl * a.HW;
      c.scr_off[j] = n * a.scr_n + d * a.scr_d + ch * a.HW;
    }
    if (j < c.ngp) {
      const int gp = c.gp0 + j;
      const int n = gp / a.Cg, cg = gp - n * a.Cg;
      c.gate_off[j] = n * a.gate_n + d * a.gate_d + cg * a.HW;
    }
  }
  __syncthreads();
  return c;
}

// Steps of the scan in traversal order: tile `it` of a pass covers [s0, s0 + n); `m` = s % K tracks
// the chunk block without a division per step. A step starts its block ("first": nothing carried in)
// at s % K == 0 ascending, at s % K == K - 1 or s == L - 1 descending.
struct Walk {
  bool desc;
  int L, K, m;
  __device__ __forceinline__ void start(bool descending, int L_, int chunk) {
    desc = descending;
    L = L_;
    K = chunk > 0 ? chunk : L_;
    m = desc ? (L - 1) % K : 0;
  }
  __device__ __forceinline__ bool first(int s) const { return desc ? (m == K - 1 || s == L - 1) : m == 0; }
  __device__ __forceinline__ void advance() { m = desc ? (m == 0 ? K - 1 : m - 1) : (m + 1 == K ? 0 : m + 1); }
};

// Tile t of a pass walked in the given order: first step s0 and step count n.
__device__ __forceinline__ void tile_span(const Cta& c, int it, bool descending, int ts, int& s0, int& n) {
  const int t = descending ? c.g.nt - 1 - it : it;
  s0 = t * ts;
  n = min(ts, c.g.L - s0);
}

// ---------------------------------------------------------------------------------------------
// Loading a tile: `planes` planes x P positions x n steps of one map, from global memory (plane j at
// src + off[j]) into shared memory at dst + j * dplane + (row0 + ss) * drow + p, by threads li of nl.
// Vectors of V elements run along the contiguous global axis: s for column lines (n and s0 are
// multiples of V, host plan), p for row lines (P = W is a multiple of V). Up to 4 vectors per thread
// are in flight before the first shared-memory store.
template <class D>
__device__ void load_tile(const Args& a, const Cta& c, const typename D::T* src, const long long* off, int planes,
                          int s0, int n, typename D::T* dst, int dplane, int drow, int row0, int li, int nl) {
  typedef typename D::T T;
  const int P = c.g.P, V = a.V;
  const int per_line = c.col ? n / V : P / V;        // vectors along the contiguous axis
  const int lines = c.col ? P : n;                   // per plane
  const int total = planes * lines * per_line;
  constexpr int U = 4;
  for (int e0 = li; e0 < total; e0 += U * nl) {
    Vec16 v[U];
    int j[U], p[U], ss[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + u * nl;
      if (e >= total) continue;
      j[u] = e / (lines * per_line);
      const int r = e - j[u] * lines * per_line;
      const int ln = r / per_line, k = r - ln * per_line;
      p[u] = c.col ? ln : k * V;
      ss[u] = c.col ? k * V : ln;
      const T* ptr = src + off[j[u]] + c.pix(p[u], s0 + ss[u], a.W);
      if (V == 1) {
        v[u].w[0] = elem_bits<T>(gload(ptr));
      } else {
        v[u] = gload((const Vec16*)ptr);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + u * nl;
      if (e >= total) continue;
      T* out = dst + j[u] * dplane + (row0 + ss[u]) * drow + p[u];
      if (V == 1) {
        *out = word_elem<T>(v[u].w[0], 0);
      } else if (!c.col) {
        *(Vec16*)out = v[u];  // V consecutive positions of one row: aligned (Ps, p multiples of V)
      } else {
        constexpr int VM = 16 / sizeof(T);  // V is 1 or VM
#pragma unroll
        for (int k = 0; k < VM; ++k) out[k * drow] = word_elem<T>(v[u].w[k * sizeof(T) / 4], k & (sizeof(T) == 2));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// R consecutive values of a shared-memory row (aligned to R elements, host plan) into registers as
// floats; zeros when the lane holds no positions of a plane.
template <class D, int R>
__device__ __forceinline__ void read_row(const typename D::T* p, bool active, float* out) {
  typedef typename D::T T;
  constexpr int B = R * (int)sizeof(T);
  if (!active) {
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = 0.f;
    return;
  }
  if constexpr (B >= 16) {
#pragma unroll
    for (int q = 0; q < B / 16; ++q) {
      const Vec16 v = ((const Vec16*)p)[q];
#pragma unroll
      for (int e = 0; e < 16 / (int)sizeof(T); ++e) {
        out[q * (16 / sizeof(T)) + e] = D::load(word_elem<T>(v.w[e * sizeof(T) / 4], e & (sizeof(T) == 2)));
      }
    }
  } else if constexpr (B == 8) {
    const unsigned int* w = (const unsigned int*)p;
    const unsigned int w0 = w[0], w1 = w[1];
#pragma unroll
    for (int e = 0; e < R; ++e) {
      const unsigned int word = (e * sizeof(T) / 4) ? w1 : w0;
      out[e] = D::load(word_elem<T>(word, e & (sizeof(T) == 2)));
    }
  } else if constexpr (B == 4 && sizeof(T) == 2) {
    const unsigned int w = *(const unsigned int*)p;
    out[0] = D::load(word_elem<T>(w, 0));
    out[1] = D::load(word_elem<T>(w, 1));
  } else {
    out[0] = D::load(p[0]);
  }
}

// R floats into a row of an fp32 plane (rows are multiples of R floats, host plan).
template <int R>
__device__ __forceinline__ void write_row_f32(float* p, const float* v) {
  if constexpr (R >= 4) {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      Vec16 w;
#pragma unroll
      for (int e = 0; e < 4; ++e) w.w[e] = __float_as_uint(v[4 * q + e]);
      ((Vec16*)p)[q] = w;
    }
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) p[r] = v[r];
  }
}

template <int R>
__device__ __forceinline__ void read_row_f32(const float* p, float* v) {
  if constexpr (R >= 4) {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      const Vec16 w = ((const Vec16*)p)[q];
#pragma unroll
      for (int e = 0; e < 4; ++e) v[4 * q + e] = __uint_as_float(w.w[e]);
    }
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = p[r];
  }
}

// R values rounded to T into a shared-memory row (aligned to R elements).
template <class D, int R>
__device__ __forceinline__ void write_row(typename D::T* p, const float* v) {
#pragma unroll
  for (int r = 0; r < R; ++r) p[r] = D::make(v[r]);
}

// ---------------------------------------------------------------------------------------------
// Scan lanes.
// Scan lane's fixed place: plane slot j, lane li of the line's G * W lanes (lane sl of warp w of the
// line), first position p0 = li * R, gate slot jg.
struct Lane {
  int j, li, sl, w, p0, jg;
  bool active;
};

template <int R>
__device__ __forceinline__ Lane make_lane(const Args& a, const Cta& c) {
  Lane ln;
  const int GW = c.g.G * c.g.W;  // a power of two
  ln.j = c.tid / GW;
  ln.li = c.tid & (GW - 1);
  ln.sl = ln.li & (c.g.G - 1);
  ln.w = ln.li / c.g.G;
  ln.p0 = ln.li * R;
  ln.active = c.tid < c.g.nscan && ln.j < c.nplanes && ln.p0 < c.g.P;
  ln.jg = ln.active ? (c.pl0 + ln.j) / a.kk - c.gp0 : 0;
  return ln;
}

// The values beside a lane's positions on its line: prev = the previous lane's `last`, next = the next
// lane's `first`, 0 past the ends of the line. Within a warp by shuffles; across the W warps of a line
// through shared-memory slots and the line's named barrier, double buffered by `parity` so that one
// barrier per call suffices (a warp rewrites a slot only after every warp passed the barrier that
// followed its last reading). Every scan lane of the CTA calls it the same number of times.
__device__ __forceinline__ void exchange(const Args& a, const Cta& c, const Lane& ln, float first, float last,
                                         int& parity, float& prev, float& next) {
  const int G = c.g.G, W = c.g.W;
  prev = __shfl_up_sync(0xffffffffu, last, 1, G);
  next = __shfl_down_sync(0xffffffffu, first, 1, G);
  if (W > 1) {
    float* slots = (float*)(c.smem + c.g.xchg) + (parity * a.lb + ln.j) * W * 2;
    if (ln.sl == 0) slots[2 * ln.w] = first;
    if (ln.sl == G - 1) slots[2 * ln.w + 1] = last;
    line_sync(1 + ln.j, 32 * W);
    if (ln.sl == 0 && ln.w > 0) prev = slots[2 * (ln.w - 1) + 1];
    if (ln.sl == G - 1 && ln.w < W - 1) next = slots[2 * (ln.w + 1)];
    parity ^= 1;
  }
  if (ln.li == 0) prev = 0.f;
  if (ln.li == G * W - 1) next = 0.f;
}

// Gates of R positions from three staged rows: normalised sigmoids of the logits (MIX) or the given
// gates; 0 for missing neighbours and for positions past the line. With WITH_Q (MIX), s0..s2 come back
// holding 1 - sigmoid of the logits, for the gradient of the normalisation.
template <class D, int R, bool MIX, bool WITH_Q = false>
__device__ __forceinline__ void lane_gates(const typename D::T* r0, const typename D::T* r1, const typename D::T* r2,
                                           bool active, int p0, int P, float* s0, float* s1, float* s2,
                                           float* w0, float* w1, float* w2) {
  read_row<D, R>(r0, active, s0);
  read_row<D, R>(r1, active, s1);
  read_row<D, R>(r2, active, s2);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int pos = p0 + r;
    const bool valid = active && pos < P;
    if (MIX) {
      gspn_gates<float, WITH_Q>(s0[r], s1[r], s2[r], pos > 0, pos < P - 1, valid, w0[r], w1[r], w2[r], s0[r], s1[r],
                                s2[r]);
    } else {
      w0[r] = valid ? s0[r] : 0.f;
      w1[r] = valid ? s1[r] : 0.f;
      w2[r] = valid ? s2[r] : 0.f;
    }
  }
}

// The hidden state of the previous step at offsets -1 and +1 of each of the lane's R positions:
// inside the lane from registers, across lanes by exchange(); 0 outside the line.
template <int R>
__device__ __forceinline__ void neighbours(const Args& a, const Cta& c, const Lane& ln, const float* h, int& parity,
                                           float* left, float* right) {
  float prev, next;
  exchange(a, c, ln, h[0], h[R - 1], parity, prev, next);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    left[r] = r > 0 ? h[r - 1] : prev;
    right[r] = r < R - 1 ? h[r + 1] : next;
  }
}

// ---------------------------------------------------------------------------------------------
// Writing a tile: NOUT outputs of `planes` planes x P positions x n steps to global memory (output o
// of plane j at dst[o] + off[j], skipped when dst[o] is null), each element's values from
// val(j, p, ss, float out[NOUT]). Outputs are T (rounded) or fp32 (FP32); V-wide vectors along the
// contiguous global axis as in load_tile.
template <class D, bool FP32, int NOUT, class Fn>
__device__ void store_tile(const Args& a, const Cta& c, void* const* dst, const long long* off, int planes, int s0,
                           int n, int li, int nl, Fn val) {
  typedef typename D::T T;
  constexpr int VM = 16 / sizeof(T);                  // V is 1 or VM
  constexpr int B = VM * (FP32 ? 4 : (int)sizeof(T));  // bytes of a vector: 16, or 32 for fp32 of 16-bit maps
  const int P = c.g.P, V = a.V;
  const int per_line = c.col ? n / V : P / V;
  const int lines = c.col ? P : n;
  const int total = planes * lines * per_line;
  for (int e = li; e < total; e += nl) {
    const int j = e / (lines * per_line);
    const int r = e - j * lines * per_line;
    const int ln = r / per_line, k = r - ln * per_line;
    const int p = c.col ? ln : k * V, ss = c.col ? k * V : ln;
    const long long at = off[j] + c.pix(p, s0 + ss, a.W);
    if (V == 1) {
      float v[NOUT];
      val(j, p, ss, v);
#pragma unroll
      for (int o = 0; o < NOUT; ++o) {
        if (!dst[o]) continue;
        if (FP32) {
          gstore((float*)dst[o] + at, v[o]);
        } else {
          gstore((T*)dst[o] + at, D::make(v[o]));
        }
      }
      continue;
    }
    float v[NOUT][VM];
#pragma unroll
    for (int q = 0; q < VM; ++q) {
      float t[NOUT];
      val(j, c.col ? p : p + q, c.col ? ss + q : ss, t);
#pragma unroll
      for (int o = 0; o < NOUT; ++o) v[o][q] = t[o];
    }
#pragma unroll
    for (int o = 0; o < NOUT; ++o) {
      if (!dst[o]) continue;
#pragma unroll
      for (int h = 0; h < B / 16; ++h) {
        Vec16 w;
        if (FP32) {
#pragma unroll
          for (int q = 0; q < 4; ++q) w.w[q] = __float_as_uint(v[o][4 * h + q]);
          gstore((Vec16*)((float*)dst[o] + at) + h, w);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) w.w[q] = 0u;
#pragma unroll
          for (int q = 0; q < VM; ++q) w.w[q * sizeof(T) / 4] |= elem_bits<T>(D::make(v[o][q])) << (16 * (q & (sizeof(T) == 2)));
          gstore((Vec16*)((T*)dst[o] + at), w);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The output map (y forward, dx backward) from the fp32 planes: out[pixel] = sum over the CTAs of
// the cluster of their plane at that pixel, in the fixed order ((d0 + d1) + d2) + d3 (MIX), or this
// CTA's plane alone (one-direction scan). Rows of the group (plane, i) are split into 4 quarters,
// CTA rank d writes quarter d; V-wide vectors along j.
template <class D, bool MIX>
__device__ void write_sum(const Args& a, const Cta& c, typename D::T* out) {
  typedef typename D::T T;
  constexpr int VM = 16 / sizeof(T);  // V is 1 or VM
  const int H = a.H, W = a.W, V = a.V;
  const int rows = c.nplanes * H;
  const int r0 = MIX ? rows * c.d / 4 : 0, r1 = MIX ? rows * (c.d + 1) / 4 : rows;
  const int per_row = W / V;
  const int total = (r1 - r0) * per_row;
  auto sum_at = [&](int pl, int i, int j) {
    float sum = 0.f;
#pragma unroll
    for (int d = 0; d < (MIX ? 4 : 1); ++d) {
      const Geo& g = d < 2 ? a.geo[0] : a.geo[1];
      const int s = d < 2 ? j : i, p = d < 2 ? i : j;
      const float* ptr = (const float*)(c.smem + g.plane) + ((long long)pl * g.L + s) * g.Pp + p;
      const float val = MIX ? ld_cluster(ptr, d) : *ptr;
      sum = d == 0 ? val : sum + val;
    }
    return sum;
  };
  for (int e = c.tid; e < total; e += c.nthreads) {
    const int row = r0 + e / per_row;
    const int j0 = (e - (row - r0) * per_row) * V;
    const int pl = row / H, i = row - pl * H;
    T* dst = out + c.x_off[pl] + (long long)i * W + j0;
    if (V == 1) {
      gstore(dst, D::make(sum_at(pl, i, j0)));
      continue;
    }
    Vec16 w;
#pragma unroll
    for (int q = 0; q < 4; ++q) w.w[q] = 0u;
#pragma unroll
    for (int q = 0; q < VM; ++q) w.w[q * sizeof(T) / 4] |= elem_bits<T>(D::make(sum_at(pl, i, j0 + q))) << (16 * (q & (sizeof(T) == 2)));
    gstore((Vec16*)dst, w);
  }
}

// The output map (y forward, dx backward) once this CTA's plane is complete. gspn_mix: a cluster
// barrier (the 4 directions' planes complete and visible), the fixed-order sum, and a second barrier
// (no CTA leaves while another still reads its shared memory). gspn_scan: the CTA's plane itself.
template <class D, bool MIX>
__device__ __forceinline__ void write_output(const Args& a, const Cta& c, typename D::T* out) {
  if (MIX) {
    cluster_sync();  // the 4 directions' planes are complete and visible to the cluster
    write_sum<D, true>(a, c, out);
    cluster_sync();  // no CTA leaves while another still reads its shared memory
  } else {
    write_sum<D, false>(a, c, out);
  }
}
