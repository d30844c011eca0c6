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
// Work split. A CTA owns `lb` consecutive planes (plane = n * C + c) and one direction; gspn_mix runs 4
// CTAs per group of planes, CTA d scanning direction d (gspn_scan: one CTA, d = 0). Threads below `nscan`
// are scan lanes: a line is held by G lanes of one warp (or by W whole warps, for long lines on few
// planes), R consecutive positions per lane in registers; neighbours across lanes come by warp
// shuffles, across the W warps of a line through shared memory and the line's named barrier, once per
// step. The other threads are loaders: they issue asynchronous copies (cp.async) of every array of a
// tile (ts steps) S - 1 tiles ahead of its use into an S-deep ring of staging buffers, and (backward)
// write the results of the previous tile; one __syncthreads per tile. Each map is read from global
// memory once per CTA, with 16-byte copies along rows and 4-byte copies along columns (a column line's
// tile is staged transposed, two 16-bit steps per word) when W and the pointers allow it.
// Results are summed over directions on chip: each CTA keeps its fp32 plane of u_d * h_d (backward:
// lam_d * b_d) in shared memory and the four planes are added in the fixed order ((d0 + d1) + d2) + d3
// and written once: through distributed shared memory inside a cluster (sm_90), or, in the portable
// variant (sm_80+), by the last CTA of the group, from the others' planes in a global fp32 scratch.
// No float atomics: results are bitwise reproducible, and the same in both variants.
//
// Shared memory (byte offsets from the host plan, cuda_plan.py; q = plane slot * Ps + position):
//   tab     [4][lb] long long  per-plane global offsets (maps, gates, x-like, gate scratch), then the ticket
//   stage   [S][arrays] tiles  staged input tiles (ring of S buffers)
//   plane   [lb][L][Pp] float  forward u * h; backward the adjoint, then lam * adjoint
//   res     [4] arrays of L steps  backward: the gate inputs and dy of the whole plane, resident
//   ostage  [2][5] tiles       backward outputs of a tile (dlam, du in T; gates in T, or fp32 sums)
//   xchg    [2][lb][W][2] float  values crossing between the warps of a line (when W > 1)
// A T array of n steps is laid out per line kind (`toff`): row lines [s][Q] elements; column lines
// "pair rows" of Qw words, word (s >> SH) * Qw + q holding steps s and s + 1 of position q (SH = 1 for
// 16-bit T, 0 for fp32). fp32 arrays: [s][Q] (row lines) or [s][Qw] (column lines) floats.
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

// 16 and 8 bytes moved as one vector (LDG.128 / STG.128 / LDS.128, LDS.64).
struct __align__(16) Vec16 {
  unsigned int w[4];
};
struct __align__(8) Vec8 {
  unsigned int w[2];
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
// log2 of the elements per 4-byte word: steps per pair-row word of a column-line array.
template <class T>
__device__ constexpr int pair_shift() {
  return sizeof(T) == 2 ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Launch arguments: one struct, filled by cupy_backend._args (a ctypes mirror of this layout: only
// 8-byte pointers / long longs, then 4-byte ints, so host and device agree on every offset).
struct Geo {      // the plan of one line kind: [0] column lines (d = 0, 1), [1] row lines (d = 2, 3)
  int P, L, G;    // positions per line, steps per scan, lanes of a warp on one line (power of two <= 32)
  int W;          // warps per line (1, 2 or 4; G = 32 when W > 1)
  int nt;         // tiles per pass, ceil(L / ts)
  int Ps;         // positions per plane slot in staged arrays (a multiple of R and of the vector width)
  int Q;          // lb * Ps
  int Qw;         // words per pair row of a column-line array (4 x an odd number)
  int Pp;         // row length of the fp32 planes (floats; a multiple of 4 and of R, Pp / 4 odd)
  int nscan;      // scan threads (whole warps); the others load
  int stage, stage_arr, stage_buf;      // byte offset of the staging ring, bytes per array, per buffer
  int plane;                            // byte offset of the fp32 planes
  int res, res_arr;                     // byte offset of the resident arrays (backward), bytes per array
  int ostage, ostage_t, ostage_f, ostage_buf;  // backward outputs: offset, bytes per T / fp32 array, per buffer
  int xchg;       // byte offset of the exchange slots between the warps of a line
  int D;          // backward pass 1: tiles the resident arrays are loaded ahead beyond the ring's S - 1
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
  float* part;        // portable variant: fp32 partial planes of 3 directions, [3][N * C][H * W]
  int* meta;          // portable variant: per group [ticket, done, direction of ticket 0, 1, 2, ...] (8 ints, zeroed)
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
  int S;              // pipeline stages (staging buffers): 2 or 3
  int V;              // elements per global vector access: 1 (synchronous scalar copies), or 16 / sizeof(T)
  int gmode;          // backward gate output: 0 final per channel (kk == 1), 1 summed inside the CTA, 2 scratch
  int nthreads;       // threads per CTA
  int dirs;           // 4 for gspn_mix, 1 for gspn_scan
  Geo geo[2];
};

enum Variant { SINGLE = 0, CLUSTER = 1, PORTABLE = 2 };  // how the output is written: one plane, or the sum of 4

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
  int* ticket;          // [4] the portable variant's ticket and the directions of tickets 0..2

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
  c.ticket = (int*)(c.scr_off + a.lb);
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

// The loaders' wait for the oldest pending tile: all but the S - 2 most recent commit groups complete.
__device__ __forceinline__ void wait_oldest_tile(int S) {
  if (S >= 3) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layout of the arrays of one line kind (header comment): byte offset of element
// (step s, position q) in a T array, and of a float in an fp32 array.
template <class T, bool COL>
__device__ __forceinline__ int toff(const Geo& g, int s, int q) {
  if constexpr (COL) {
    constexpr int SH = pair_shift<T>();
    return (((s >> SH) * g.Qw + q) << 2) + ((s & SH) << 1);
  } else {
    return (s * g.Q + q) * (int)sizeof(T);
  }
}
template <bool COL>
__device__ __forceinline__ int foff(const Geo& g, int s, int q) {
  return ((COL ? s * g.Qw : s * g.Q) + q) << 2;
}

// ---------------------------------------------------------------------------------------------
// Staging a tile: `planes` planes x P positions x n steps of one map, from global memory (plane j at
// src + off[j]) into the T array at `dst`, steps s0 + ss at array rows row0 + ss, by threads li of nl.
// With vectors (V > 1: W and the pointers allow them; n and s0 are then multiples of V) as
// asynchronous copies: row lines 16 bytes along p, the planes of one step side by side; column lines
// 4 bytes (one pair-row word) along s, 8 words x 4 positions per warp (one 32-byte sector of 4 global
// rows; banks 4 w + q). Else synchronous scalar copies.
template <class D, bool COL>
__device__ void stage_tile(const Args& a, const Cta& c, const typename D::T* src, const long long* off, int planes,
                           int s0, int n, unsigned char* dst, int row0, int li, int nl) {
  typedef typename D::T T;
  const Geo& g = c.g;
  const int P = g.P;
  if (a.V > 1) {
    if constexpr (COL) {
      constexpr int SH = pair_shift<T>();
      const int nw = n >> SH;                // words per position (n even for 16-bit T)
      const int nq = planes * P;
      const int total = ((nw + 7) >> 3) * nq * 8;
      for (int e = li; e < total; e += nl) {
        const int t = e >> 3;
        const int w = ((t / nq) << 3) + (e & 7);
        if (w >= nw) continue;
        const int qi = t % nq;
        const int j = qi / P, p = qi - j * P;
        const T* from = src + off[j] + (long long)p * a.W + s0 + (w << SH);
        cp_async4(dst + ((((row0 >> SH) + w) * g.Qw + j * g.Ps + p) << 2), from);
      }
    } else {
      const int V = a.V;
      const int per_row = P / V;             // 16-byte chunks of a row
      const int total = planes * n * per_row;
      for (int e = li; e < total; e += nl) {  // chunks, then planes, then steps: one step's row is contiguous
        const int t = e / per_row, k = e - t * per_row;
        const int ss = t / planes, j = t - ss * planes;
        const T* from = src + off[j] + (long long)(s0 + ss) * a.W + k * V;
        cp_async16(dst + toff<T, false>(g, row0 + ss, j * g.Ps + k * V), from);
      }
    }
    return;
  }
  const int total = planes * P * n;
  for (int e = li; e < total; e += nl) {
    const int j = e / (P * n);
    const int r = e - j * P * n;
    int p, ss;
    if (COL) {  // consecutive threads along s, contiguous in global memory
      p = r / n;
      ss = r - p * n;
    } else {
      ss = r / P;
      p = r - ss * P;
    }
    const T v = gload(src + off[j] + c.pix(p, s0 + ss, a.W));
    sst((T*)(dst + toff<T, COL>(g, row0 + ss, j * g.Ps + p)), v);
  }
}

// ---------------------------------------------------------------------------------------------
// R consecutive positions q0..q0+R-1 of step s of a T array into registers as floats (zeros for an
// inactive lane): row lines one vector of R elements, column lines one vector of R pair-row words.
template <int R>
__device__ __forceinline__ void read_words(const unsigned int* p, unsigned int* w) {
  if constexpr (R >= 4) {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      const Vec16 v = sld((const Vec16*)p + q);
#pragma unroll
      for (int e = 0; e < 4; ++e) w[4 * q + e] = v.w[e];
    }
  } else if constexpr (R == 2) {
    const Vec8 v = sld((const Vec8*)p);
    w[0] = v.w[0];
    w[1] = v.w[1];
  } else {
    w[0] = sld(p);
  }
}

template <class D, int R, bool COL>
__device__ __forceinline__ void read_lane(const unsigned char* arr, const Geo& g, int s, int q0, bool active,
                                          float* out) {
  typedef typename D::T T;
  if (!active) {
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = 0.f;
    return;
  }
  if constexpr (COL) {
    constexpr int SH = pair_shift<T>();
    unsigned int w[R];
    read_words<R>((const unsigned int*)arr + (s >> SH) * g.Qw + q0, w);
    const int half = s & SH;
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = D::load(word_elem<T>(w[r], half));
    return;
  } else {
    const T* p = (const T*)(arr + toff<T, false>(g, s, q0));
    constexpr int B = R * (int)sizeof(T);
    if constexpr (B >= 16) {
#pragma unroll
      for (int q = 0; q < B / 16; ++q) {
        const Vec16 v = sld((const Vec16*)p + q);
#pragma unroll
        for (int e = 0; e < 16 / (int)sizeof(T); ++e) {
          out[q * (16 / sizeof(T)) + e] = D::load(word_elem<T>(v.w[e * sizeof(T) / 4], e & (sizeof(T) == 2)));
        }
      }
    } else if constexpr (B == 8) {
      const Vec8 v = sld((const Vec8*)p);
#pragma unroll
      for (int e = 0; e < R; ++e) {
        const unsigned int word = (e * sizeof(T) / 4) ? v.w[1] : v.w[0];
        out[e] = D::load(word_elem<T>(word, e & (sizeof(T) == 2)));
      }
    } else if constexpr (B == 4 && sizeof(T) == 2) {
      const unsigned int w = sld((const unsigned int*)p);
      out[0] = D::load(word_elem<T>(w, 0));
      out[1] = D::load(word_elem<T>(w, 1));
    } else {
      out[0] = D::load(sld(p));
    }
  }
}

// R floats into / out of a row of an fp32 plane or array (rows are multiples of R floats, host plan).
template <int R>
__device__ __forceinline__ void write_row_f32(float* p, const float* v) {
  if constexpr (R >= 4) {
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      Vec16 w;
#pragma unroll
      for (int e = 0; e < 4; ++e) w.w[e] = __float_as_uint(v[4 * q + e]);
      sst((Vec16*)p + q, w);
    }
  } else if constexpr (R == 2) {
    Vec8 w;
    w.w[0] = __float_as_uint(v[0]);
    w.w[1] = __float_as_uint(v[1]);
    sst((Vec8*)p, w);
  } else {
    sst(p, v[0]);
  }
}

template <int R>
__device__ __forceinline__ void read_row_f32(const float* p, float* v) {
  unsigned int w[R];
  read_words<R>((const unsigned int*)p, w);
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = __uint_as_float(w[r]);
}

// R values rounded to T into positions q0.. of step s of a T array: row lines R consecutive elements,
// column lines the half s & SH of R consecutive pair-row words.
template <class D, int R, bool COL>
__device__ __forceinline__ void write_lane(unsigned char* arr, const Geo& g, int s, int q0, const float* v) {
  typedef typename D::T T;
  if constexpr (COL && sizeof(T) == 4) {
    write_row_f32<R>((float*)(arr + toff<T, true>(g, s, q0)), v);
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sst((T*)(arr + (COL ? toff<T, true>(g, s, q0 + r) : toff<T, false>(g, s, q0 + r))), D::make(v[r]));
    }
  }
}

// One element of a T array / one float of an fp32 array.
template <class D, bool COL>
__device__ __forceinline__ float t_get(const unsigned char* arr, const Geo& g, int s, int q) {
  typedef typename D::T T;
  if constexpr (COL) {
    constexpr int SH = pair_shift<T>();
    const unsigned int w = sld((const unsigned int*)arr + (s >> SH) * g.Qw + q);
    return D::load(word_elem<T>(w, s & SH));
  } else {
    return D::load(sld((const T*)(arr + toff<T, false>(g, s, q))));
  }
}
template <bool COL>
__device__ __forceinline__ float f_get(const unsigned char* arr, const Geo& g, int s, int q) {
  return sld((const float*)(arr + foff<COL>(g, s, q)));
}

// A run of N elements along the contiguous global axis of a T / fp32 array, starting at (s, q): steps
// s.. of position q (column lines: one pair-row word per two steps), or positions q.. of step s (row
// lines: 16-byte reads when the run is a whole vector, VM = 16 / sizeof(T) elements, aligned by the
// plan). The loaders' reads of the output tiles and of the resident logits.
template <class D, bool COL, int N>
__device__ __forceinline__ void t_run(const unsigned char* arr, const Geo& g, int s, int q, float* out) {
  typedef typename D::T T;
  constexpr int VM = 16 / sizeof(T);
  if constexpr (!COL && N == VM) {
    const Vec16 v = sld((const Vec16*)(arr + toff<T, false>(g, s, q)));
#pragma unroll
    for (int e = 0; e < VM; ++e) out[e] = D::load(word_elem<T>(v.w[e * sizeof(T) / 4], e & (sizeof(T) == 2)));
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = COL ? t_get<D, true>(arr, g, s + e, q) : t_get<D, false>(arr, g, s, q + e);
  }
}
template <class D, bool COL, int N>
__device__ __forceinline__ void f_run(const unsigned char* arr, const Geo& g, int s, int q, float* out) {
  constexpr int VM = 16 / sizeof(typename D::T);
  if constexpr (!COL && N == VM) {
#pragma unroll
    for (int h = 0; h < VM / 4; ++h) {
      const Vec16 v = sld((const Vec16*)(arr + foff<false>(g, s, q)) + h);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[4 * h + e] = __uint_as_float(v.w[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = COL ? f_get<true>(arr, g, s + e, q) : f_get<false>(arr, g, s, q + e);
  }
}
// The same for a run of n = 1 or VM elements (the store loop's vector width) of a T (FP32 = false) or fp32
// array.
template <class D, bool COL, bool FP32>
__device__ __forceinline__ void runs(const unsigned char* arr, const Geo& g, int s, int q, int n, float* out) {
  constexpr int VM = 16 / sizeof(typename D::T);
  if (n == 1) {
    if constexpr (FP32) f_run<D, COL, 1>(arr, g, s, q, out); else t_run<D, COL, 1>(arr, g, s, q, out);
  } else {
    if constexpr (FP32) f_run<D, COL, VM>(arr, g, s, q, out); else t_run<D, COL, VM>(arr, g, s, q, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Scan lanes.
// Scan lane's fixed place: plane slot j, lane li of the line's G * W lanes (lane sl of warp w of the
// line), first position p0 = li * R, gate slot jg; q0 / qg its first position in staged arrays.
struct Lane {
  int j, li, sl, w, p0, jg, q0, qg;
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
  ln.q0 = ln.j * c.g.Ps + ln.p0;
  ln.qg = ln.jg * c.g.Ps + ln.p0;
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
    if (ln.sl == 0) sst(slots + 2 * ln.w, first);
    if (ln.sl == G - 1) sst(slots + 2 * ln.w + 1, last);
    line_sync(1 + ln.j, 32 * W);
    if (ln.sl == 0 && ln.w > 0) prev = sld(slots + 2 * (ln.w - 1) + 1);
    if (ln.sl == G - 1 && ln.w < W - 1) next = sld(slots + 2 * (ln.w + 1));
    parity ^= 1;
  }
  if (ln.li == 0) prev = 0.f;
  if (ln.li == G * W - 1) next = 0.f;
}

// Gates of R positions from three staged arrays: normalised sigmoids of the logits (MIX) or the given
// gates; 0 for missing neighbours and for positions past the line. With WITH_Q (MIX), s0..s2 come back
// holding 1 - sigmoid of the logits, for the gradient of the normalisation.
template <class D, int R, bool MIX, bool COL, bool WITH_Q = false>
__device__ __forceinline__ void lane_gates(const unsigned char* g0, const unsigned char* g1, const unsigned char* g2,
                                           const Geo& g, int s, int qg, bool active, int p0, float* s0, float* s1,
                                           float* s2, float* w0, float* w1, float* w2) {
  read_lane<D, R, COL>(g0, g, s, qg, active, s0);
  read_lane<D, R, COL>(g1, g, s, qg, active, s1);
  read_lane<D, R, COL>(g2, g, s, qg, active, s2);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int pos = p0 + r;
    const bool valid = active && pos < g.P;
    if (MIX) {
      gspn_gates<float, WITH_Q>(s0[r], s1[r], s2[r], pos > 0, pos < g.P - 1, valid, w0[r], w1[r], w2[r], s0[r], s1[r],
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
// of plane j at dst[o] + off[j], skipped when dst[o] is null). val(j, p, ss, n, v) gives the values of n
// (1 or VM) elements along the contiguous global axis (s for column lines, p for row lines) from (p, ss):
// v[o * VM + e] for element e. Outputs are T (rounded) or fp32 (FP32); V-wide vectors (n = V).
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
    // column lines: vectors, then positions, then planes; row lines: vectors, then planes, then steps
    // (the planes of one step lie side by side in the output tile)
    const int t = e / per_line, k = e - t * per_line;
    const int j = c.col ? t / lines : t % planes;
    const int ln = c.col ? t - j * lines : t / planes;
    const int p = c.col ? ln : k * V, ss = c.col ? k * V : ln;
    const long long at = off[j] + c.pix(p, s0 + ss, a.W);
    float v[NOUT * VM];
    if (V == 1) {
      val(j, p, ss, 1, v);
#pragma unroll
      for (int o = 0; o < NOUT; ++o) {
        if (!dst[o]) continue;
        if (FP32) {
          gstore((float*)dst[o] + at, v[o * VM]);
        } else {
          gstore((T*)dst[o] + at, D::make(v[o * VM]));
        }
      }
      continue;
    }
    val(j, p, ss, VM, v);
#pragma unroll
    for (int o = 0; o < NOUT; ++o) {
      if (!dst[o]) continue;
#pragma unroll
      for (int h = 0; h < B / 16; ++h) {
        Vec16 w;
        if (FP32) {
#pragma unroll
          for (int q = 0; q < 4; ++q) w.w[q] = __float_as_uint(v[o * VM + 4 * h + q]);
          gstore((Vec16*)((float*)dst[o] + at) + h, w);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) w.w[q] = 0u;
#pragma unroll
          for (int q = 0; q < VM; ++q) w.w[q * sizeof(T) / 4] |= elem_bits<T>(D::make(v[o * VM + q])) << (16 * (q & (sizeof(T) == 2)));
          gstore((Vec16*)((T*)dst[o] + at), w);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The output map (y forward, dx backward) from the fp32 planes. The work is cut into cells: rows
// i0 .. i0 + 3 of column jj of plane slot j, consecutive threads on consecutive columns, so that a
// warp reads a row plane ([j][i][Pp]) along its rows and a column plane ([j][jj][Pp]) as one 16-byte
// vector per thread (Pp / 4 odd: 8 threads hit 8 different bank groups), and writes each output row
// coalesced. Rows past H are clamped for shared-memory reads and never stored.
struct Cell {
  int j, i0, jj;
};
__device__ __forceinline__ int cells(const Args& a, int planes) { return planes * ((a.H + 3) >> 2) * a.W; }
__device__ __forceinline__ Cell cell_of(const Args& a, int e) {
  const int nib = (a.H + 3) >> 2;
  Cell cl;
  cl.jj = e % a.W;
  const int t = e / a.W;
  cl.j = t / nib;
  cl.i0 = (t - cl.j * nib) << 2;
  return cl;
}

// The 4 plane values of a cell from the plane of line kind `col`: in this CTA (rank < 0), or at the same
// offset in cluster CTA `rank`.
__device__ __forceinline__ void plane_cell(const Args& a, bool col, int rank, const Cell& cl, float* v) {
  const Geo& g = a.geo[col ? 0 : 1];
  const float* pl = (const float*)(dyn_smem() + g.plane) + (long long)cl.j * g.L * g.Pp;
  if (col) {
    const Vec16* p = (const Vec16*)(pl + cl.jj * g.Pp + cl.i0);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    const Vec16 w = rank < 0 ? sld(p) : ld_cluster16(p, rank);
#else
    const Vec16 w = sld(p);
#endif
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = __uint_as_float(w.w[q]);
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float* p = pl + min(cl.i0 + q, a.H - 1) * g.Pp + cl.jj;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    v[q] = rank < 0 ? sld(p) : ld_cluster(p, rank);
#else
    v[q] = sld(p);
#endif
  }
}

// Rows of a cell that exist, stored: out[x_off[j] + i * W + jj] = vals[q].
template <class D>
__device__ __forceinline__ void store_cell(const Args& a, const Cta& c, const Cell& cl, const float* vals,
                                           typename D::T* out) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (cl.i0 + q < a.H) gstore(out + c.x_off[cl.j] + (long long)(cl.i0 + q) * a.W + cl.jj, D::make(vals[q]));
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Cluster: after a cluster barrier (the 4 planes complete and visible), CTA rank d sums a quarter of the
// cells from the 4 CTAs' shared memory; a second barrier keeps every CTA until the others stop reading.
template <class D>
__device__ void write_sum_cluster(const Args& a, const Cta& c, typename D::T* out) {
  cluster_sync();
  const int total = cells(a, c.nplanes);
  const int e1 = (int)((long long)total * (c.d + 1) / 4);
  for (int e = (int)((long long)total * c.d / 4) + c.tid; e < e1; e += c.nthreads) {
    const Cell cl = cell_of(a, e);
    float sum[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) {  // ((d0 + d1) + d2) + d3
      float v[4];
      plane_cell(a, d < 2, d, cl, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) sum[q] = d == 0 ? v[q] : sum[q] + v[q];
    }
    store_cell<D>(a, c, cl, sum, out);
  }
  cluster_sync();
}
#endif

// Portable: the CTA takes its group's ticket. Tickets 0..2 copy their plane to slot `ticket` of the
// global scratch (rows as in the image) and count themselves done; ticket 3, the last CTA, waits for the
// three, then sums the cells in the same fixed order as the cluster, its own plane from shared memory
// and the others from the scratch (L2: written microseconds before). The wait cannot deadlock: the three
// it waits for took their tickets, so they are resident, and they wait for nothing.
template <class D>
__device__ void write_sum_portable(const Args& a, const Cta& c, int group, typename D::T* out) {
  int* meta = a.meta + group * 8;
  if (c.tid == 0) {
    const int t = ticket_take(meta);
    if (t < 3) meta[2 + t] = c.d;
    sst(c.ticket, t);
  }
  __syncthreads();
  const int ticket = sld(c.ticket);
  const int total = cells(a, c.nplanes);
  if (ticket < 3) {
    float* part = a.part + ((long long)ticket * a.NC + c.pl0) * a.HW;
    for (int e = c.tid; e < total; e += c.nthreads) {
      const Cell cl = cell_of(a, e);
      float v[4];
      plane_cell(a, c.col, -1, cl, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (cl.i0 + q < a.H) gstore(part + (long long)cl.j * a.HW + (long long)(cl.i0 + q) * a.W + cl.jj, v[q]);
      }
    }
    __syncthreads();
    if (c.tid == 0) release_add(meta + 1);
    return;
  }
  if (c.tid == 0) {
    while (acquire_load(meta + 1) < 3) backoff();
#pragma unroll
    for (int k = 0; k < 3; ++k) sst(c.ticket + 1 + k, acquire_load(meta + 2 + k));
  }
  __syncthreads();
  const int dir0 = sld(c.ticket + 1), dir1 = sld(c.ticket + 2);
  for (int e = c.tid; e < total; e += c.nthreads) {
    const Cell cl = cell_of(a, e);
    float own[4], sum[4];
    plane_cell(a, c.col, -1, cl, own);
#pragma unroll
    for (int d = 0; d < 4; ++d) {  // ((d0 + d1) + d2) + d3, as the cluster adds them
      const int slot = d == dir0 ? 0 : (d == dir1 ? 1 : 2);
      const float* part = a.part + ((long long)slot * a.NC + c.pl0 + cl.j) * a.HW + cl.jj;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float v = d == c.d ? own[q] : (cl.i0 + q < a.H ? gload_cg(part + (long long)(cl.i0 + q) * a.W) : 0.f);
        sum[q] = d == 0 ? v : sum[q] + v;
      }
    }
    store_cell<D>(a, c, cl, sum, out);
  }
}

// The output map once this CTA's plane is complete (every thread arrives here after a __syncthreads
// that followed the plane's last write): one plane (gspn_scan) or the fixed-order sum of 4.
template <class D, int VARIANT>
__device__ __forceinline__ void write_output(const Args& a, const Cta& c, int group, typename D::T* out) {
  if constexpr (VARIANT == CLUSTER) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    write_sum_cluster<D>(a, c, out);
#endif
  } else if constexpr (VARIANT == PORTABLE) {
    write_sum_portable<D>(a, c, group, out);
  } else {
    const int total = cells(a, c.nplanes);
    for (int e = c.tid; e < total; e += c.nthreads) {
      const Cell cl = cell_of(a, e);
      float v[4];
      plane_cell(a, true, -1, cl, v);
      store_cell<D>(a, c, cl, v, out);
    }
  }
}
