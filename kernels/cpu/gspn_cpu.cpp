// Compiled CPU kernel of the GSPN propagation (DESIGN.md section 3), driven from kernels/cpu_backend.py
// through a C ABI (ctypes), built on first use by torch.utils.cpp_extension.
//
// Work split: one work item per group of B gate planes (n, j0 .. j0 + B - 1) of one sample and all the
// k = C / Cg channels each serves, items spread over OpenMP threads (torch's thread count). An item
// owns every output it writes, so results do not depend on the thread count (no reduction crosses
// items). B is 1 on maps of 64 x 64 and more, and grows on smaller ones so that lines stay long.
//
// The scan frame. A direction scans L steps of lines of P positions. In the scan frame a step is one
// contiguous line and the recurrence is vectorised along it: position p of plane b of the group sits
// at p B + b, so the B planes of a group are interleaved and a neighbour is B values away (a 4 x 4 map
// scans lines of up to 256 values). Row lines (d = 2, 3: steps are rows i) of a single plane are the image
// frame itself. Column lines (d = 0, 1: steps are columns j) of a single plane are made from strips of
// 8 image rows, computed elementwise (contiguous, vectorised) into a small buffer and transposed in
// 8x8 register blocks, and read back the same way. A group of B > 1 planes is made from whole planes,
// transposed (B x H W) into the interleaved order, and for column lines reordered pixel by pixel.
// Everything elementwise (lam x, u h, the products of the backward) runs on the image frame, over
// contiguous runs of each plane.

// Backward recomputes the hidden states from the inputs (nothing is saved between forward and
// backward), then runs the adjoint scan in reverse order with the transposed tridiagonal transition;
// the gate gradients of the k channels of a gate plane are summed in a fixed order before the
// gradient of the normalisation.
//
// The per-position arithmetic (sigmoid, normalisation, one step, the adjoint sum, the logit gradients)
// comes from ../cuda/gspn_line.cuh, the header the CUDA kernels and their emulation use.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#define __device__
#define __forceinline__ inline __attribute__((always_inline))
static inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// fp64 inputs compute in fp64 (the oracle's arithmetic); the header's fp32 exp is its own.
static inline double gspn_expf(double x) { return std::exp(x); }
#include "../cuda/gspn_line.cuh"

typedef long long i64;

namespace {

// ---------------------------------------------------------------------------------------------
// Strips: up to 8 image rows [i0, i0 + rows) of an H x W plane, as a buffer of `rows` rows of W, to and
// from the scan frame of column lines (W x H: dst[j * H + i] = image[i * W + j]).

constexpr int STRIP = 8;

#if defined(__AVX__)
inline void transpose8x8(const float* src, i64 ss, float* dst, i64 ds) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss), r2 = _mm256_loadu_ps(src + 2 * ss),
         r3 = _mm256_loadu_ps(src + 3 * ss), r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss),
         r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
         u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
         u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// dst (cols x rows, leading dimension ld_dst) = src (rows x cols, leading dimension ld_src)^T, in 8x8
// register blocks where the sizes allow.
template <class F>
void transpose(const F* src, i64 ld_src, int rows, int cols, F* dst, i64 ld_dst) {
  int i0 = 0, j0 = 0;
#if defined(__AVX__)
  if constexpr (sizeof(F) == 4) {
    i0 = rows & ~7;
    j0 = cols & ~7;
    for (int i = 0; i < i0; i += 8)
      for (int j = 0; j < j0; j += 8) transpose8x8(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
  }
#endif
  for (int i = 0; i < rows; ++i)  // what the blocks left: columns j0.. of every row, rows i0.. of the others
    for (int j = i < i0 ? j0 : 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

// ---------------------------------------------------------------------------------------------
// Gates of one line of n positions; up[q] / down[q] say whether position q has those neighbours.

template <class F, bool WITH_Q>
inline void gates_line(const F* __restrict__ z0, const F* __restrict__ z1, const F* __restrict__ z2,
                       const unsigned char* __restrict__ up, const unsigned char* __restrict__ down, int n,
                       F* __restrict__ w0, F* __restrict__ w1, F* __restrict__ w2, F* __restrict__ q0,
                       F* __restrict__ q1, F* __restrict__ q2) {
#pragma omp simd
  for (int q = 0; q < n; ++q) {
    F a, b, c;
    gspn_gates<F, WITH_Q>(z0[q], z1[q], z2[q], up[q] != 0, down[q] != 0, true, w0[q], w1[q], w2[q], a, b, c);
    if constexpr (WITH_Q) {
      q0[q] = a;
      q1[q] = b;
      q2[q] = c;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The scan and its adjoint in the scan frame: L steps of lines of n contiguous values, neighbours nb
// apart along a line (the group size B); the gates w and the states are L x n planes. The first nb
// values of a line have no neighbour before them, the last nb none after.

struct Steps {
  int L, K;
  bool desc;
  int at(int t) const { return desc ? L - 1 - t : t; }     // step visited t-th
  int prev(int s) const { return desc ? s + 1 : s - 1; }   // the step it continues from
  bool first(int s) const {                                // starts a block: nothing carried in
    return desc ? (s == L - 1 || (K && s % K == K - 1)) : (s == 0 || (K && s % K == 0));
  }
};

// h[s] = a[s] + w0 h[s', q - nb] + w1 h[s', q] + w2 h[s', q + nb], 0 outside the line.
template <class F>
void scan_lines(const Steps& st, int n, int nb, F* const* w, const F* a, F* h) {
  const int head = std::min(nb, n), tail = std::max(head, n - nb);
  for (int t = 0; t < st.L; ++t) {
    const int s = st.at(t);
    const i64 o = (i64)s * n;
    F* __restrict__ hs = h + o;
    const F* __restrict__ as = a + o;
    if (st.first(s)) {
      std::memcpy(hs, as, sizeof(F) * n);
      continue;
    }
    const F* __restrict__ g0 = w[0] + o;
    const F* __restrict__ g1 = w[1] + o;
    const F* __restrict__ g2 = w[2] + o;
    const F* __restrict__ hp = h + (i64)st.prev(s) * n;
    for (int q = 0; q < head; ++q)
      hs[q] = gspn_step(as[q], g0[q], g1[q], g2[q], F(0), hp[q], q + nb < n ? hp[q + nb] : F(0));
#pragma omp simd
    for (int q = nb; q < n - nb; ++q) hs[q] = gspn_step(as[q], g0[q], g1[q], g2[q], hp[q - nb], hp[q], hp[q + nb]);
    for (int q = tail; q < n; ++q) hs[q] = gspn_step(as[q], g0[q], g1[q], g2[q], hp[q - nb], hp[q], F(0));
  }
}

// Adjoint of scan_lines: b = dL/da from own = dL/dh, steps visited in reverse; `hand` (3 n) holds
// c_k = w_k b of the step handed back. When D is given, the gate gradients D_k[s, q] += b[s, q]
// h[s', q + (k - 1) nb] are accumulated too (h: the forward states).
template <class F>
void adjoint_lines(const Steps& st, int n, int nb, F* const* w, const F* own, F* b, const F* h, F* const* D,
                   F* hand) {
  const int head = std::min(nb, n), tail = std::max(head, n - nb);
  F* __restrict__ c0 = hand;
  F* __restrict__ c1 = hand + n;
  F* __restrict__ c2 = hand + 2 * n;
  bool carry = false;  // c holds the hand-back of the step after this one
  for (int t = st.L - 1; t >= 0; --t) {
    const int s = st.at(t);
    const i64 o = (i64)s * n;
    F* __restrict__ bs = b + o;
    const F* __restrict__ os = own + o;
    if (!carry) {
      std::memcpy(bs, os, sizeof(F) * n);
    } else {
      for (int q = 0; q < head; ++q) bs[q] = gspn_adjoint(os[q], q + nb < n ? c0[q + nb] : F(0), c1[q], F(0));
#pragma omp simd
      for (int q = nb; q < n - nb; ++q) bs[q] = gspn_adjoint(os[q], c0[q + nb], c1[q], c2[q - nb]);
      for (int q = tail; q < n; ++q) bs[q] = gspn_adjoint(os[q], F(0), c1[q], c2[q - nb]);
    }
    carry = !st.first(s);
    if (!carry) continue;
    const F* __restrict__ g0 = w[0] + o;
    const F* __restrict__ g1 = w[1] + o;
    const F* __restrict__ g2 = w[2] + o;
#pragma omp simd
    for (int q = 0; q < n; ++q) {
      c0[q] = g0[q] * bs[q];
      c1[q] = g1[q] * bs[q];
      c2[q] = g2[q] * bs[q];
    }
    if (!D) continue;
    const F* __restrict__ hp = h + (i64)st.prev(s) * n;
    F* __restrict__ d0 = D[0] + o;
    F* __restrict__ d1 = D[1] + o;
    F* __restrict__ d2 = D[2] + o;
#pragma omp simd
    for (int q = 0; q < n; ++q) d1[q] += bs[q] * hp[q];
#pragma omp simd
    for (int q = nb; q < n; ++q) d0[q] += bs[q] * hp[q - nb];
#pragma omp simd
    for (int q = 0; q < n - nb; ++q) d2[q] += bs[q] * hp[q + nb];
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes over n contiguous values.

template <class F>
inline void mul(const F* __restrict__ a, const F* __restrict__ b, F* __restrict__ out, i64 n) {
#pragma omp simd
  for (i64 i = 0; i < n; ++i) out[i] = a[i] * b[i];
}
template <class F>
inline void mul_add(const F* __restrict__ a, const F* __restrict__ b, F* __restrict__ out, i64 n, bool first) {
  if (first) return mul(a, b, out, n);
#pragma omp simd
  for (i64 i = 0; i < n; ++i) out[i] += a[i] * b[i];
}

// Per-thread scratch that keeps its memory between calls (OpenMP threads persist).
template <class F>
F* scratch(size_t n) {
  static thread_local std::vector<F> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---------------------------------------------------------------------------------------------
// Moving B planes between the image frame and the scan frame of a direction. fill(b, off, len, out)
// writes elements [off, off + len) of plane b (image frame) to out; use(b, off, len, values) takes them.

// Pixel order [i][j] <-> [j][i] of an H x W map of B-vectors (contiguous B values each).
template <class F>
void swap_pixel_axes(const F* src, int H, int W, int B, F* dst) {
  for (int i = 0; i < H; ++i)
    for (int j = 0; j < W; ++j) {
      const F* __restrict__ s = src + ((i64)i * W + j) * B;
      F* __restrict__ d = dst + ((i64)j * H + i) * B;
#pragma omp simd
      for (int b = 0; b < B; ++b) d[b] = s[b];
    }
}

template <class F>
struct Frame {
  int H, W, B;
  bool col;
  F *tmp, *tmp2;  // B > 1: B H W values each; B == 1: tmp holds the strips (STRIP x W)
  i64 hw() const { return (i64)H * W; }

  template <class Fill>
  void load(F* dst, Fill fill) const {
    const i64 n = hw();
    if (B == 1 && !col) return fill(0, 0, n, dst);
    if (B == 1) {
      for (int i0 = 0; i0 < H; i0 += STRIP) {
        const int rows = std::min(STRIP, H - i0);
        fill(0, (i64)i0 * W, (i64)rows * W, tmp);
        transpose(tmp, W, rows, W, dst + i0, H);
      }
      return;
    }
    for (int b = 0; b < B; ++b) fill(b, 0, n, tmp + b * n);
    if (!col) return transpose(tmp, n, B, (int)n, dst, B);  // [b][i][j] -> [i][j][b]
    transpose(tmp, n, B, (int)n, tmp2, B);
    swap_pixel_axes(tmp2, H, W, B, dst);                     // -> [j][i][b]
  }

  template <class Use>
  void store(const F* src, Use use) const {
    const i64 n = hw();
    if (B == 1 && !col) return use(0, 0, n, src);
    if (B == 1) {
      for (int i0 = 0; i0 < H; i0 += STRIP) {
        const int rows = std::min(STRIP, H - i0);
        transpose(src + i0, H, W, rows, tmp, W);
        use(0, (i64)i0 * W, (i64)rows * W, (const F*)tmp);
      }
      return;
    }
    if (col) {
      swap_pixel_axes(src, W, H, B, tmp2);  // [j][i][b] -> [i][j][b]
      src = tmp2;
    }
    transpose(src, B, (int)n, B, tmp, n);
    for (int b = 0; b < B; ++b) use(b, 0, n, (const F*)(tmp + b * n));
  }
};

// ---------------------------------------------------------------------------------------------
// The problem: maps (N, C, H, W); gspn_mix: logits, lam, u with 4 directions; gspn_scan: one direction
// (d = 0) with given gates and u = 1.

template <class F>
struct Problem {
  int N, C, Cg, H, W, K, B;  // B: gate planes per work item
  bool mix;
  const F *x, *z[3], *lam, *u, *dy;  // z: logits (mix, z[0] only) or the gates of offset k (scan)
  F *y, *dx, *dz[3], *dlam, *du;     // outputs, null when not wanted
  i64 HW() const { return (i64)H * W; }
  int kk() const { return C / Cg; }
  int dirs() const { return mix ? 4 : 1; }
  // element offsets of (n, c) in x-like maps, (n, d, c) in lam / u, (n, d, j) of offset k in the gates
  i64 xo(int n, int c) const { return ((i64)n * C + c) * HW(); }
  i64 mo(int n, int d, int c) const { return mix ? (((i64)n * 4 + d) * C + c) * HW() : xo(n, c); }
  i64 go(int n, int d, int j, int k) const {
    return mix ? ((((i64)n * 4 + d) * 3 + k) * Cg + j) * HW() : ((i64)n * Cg + j) * HW();
  }
  const F* gate_in(int n, int d, int j, int k) const { return (mix ? z[0] : z[k]) + go(n, d, j, k); }
  F* gate_out(int n, int d, int j, int k) const {
    F* base = mix ? dz[0] : dz[k];
    return base ? base + go(n, d, j, k) : nullptr;
  }
};

// One work item, B gate planes j0 .. j0 + B - 1 of sample n, and what one of its directions scans.
struct Item {
  int n, j0, B;
};

struct Dir {
  bool col;
  int L, P;  // steps; positions per line of one plane
  Steps st;
  Dir(int d, int H, int W, int K) : col(d < 2), L(col ? W : H), P(col ? H : W), st{L, K, (d & 1) != 0} {}
};

// Scratch of one work item: `planes` planes of B H W values, the frame's two buffers, the adjoint's
// hand-back (3 lines of B max(H, W) values) and the neighbour flags of a line.
template <class F>
struct Scratch {
  i64 plane_len, tmp_len, line_len;
  int planes;
  F* base;
  Scratch(int H, int W, int B, int planes_)
      : plane_len((i64)B * H * W), tmp_len(std::max(plane_len, (i64)STRIP * W)), line_len((i64)B * std::max(H, W)),
        planes(planes_), base(scratch<F>(plane_len * planes_ + 2 * tmp_len + 4 * line_len)) {}
  F* plane(int i) const { return base + i * plane_len; }
  F* tmp(int i) const { return base + planes * plane_len + i * tmp_len; }
  F* hand() const { return tmp(2); }
  unsigned char* flags() const { return (unsigned char*)(hand() + 3 * line_len); }  // 2 line_len bytes
  Frame<F> frame(const Dir& g, int H, int W, int B) const { return Frame<F>{H, W, B, g.col, tmp(0), tmp(1)}; }
};

// Normalised gates of direction d in the scan frame, w (and q = 1 - sigmoid when given), from the
// logits (gspn_mix; zt: 3 planes of scratch for them) or the given gates (gspn_scan).
template <class F>
void scan_frame_gates(const Problem<F>& pb, const Item& it, int d, const Dir& g, const Frame<F>& fr, F* const* w,
                      F* const* q, F* const* zt, unsigned char* flags) {
  const int n = it.B * g.P;
  for (int k = 0; k < 3; ++k)
    fr.load(pb.mix ? zt[k] : w[k], [&](int b, i64 off, i64 len, F* out) {
      std::memcpy(out, pb.gate_in(it.n, d, it.j0 + b, k) + off, sizeof(F) * len);
    });
  if (!pb.mix) return;
  unsigned char *up = flags, *down = flags + n;
  for (int p = 0; p < g.P; ++p)
    for (int b = 0; b < it.B; ++b) {
      up[p * it.B + b] = p > 0;
      down[p * it.B + b] = p < g.P - 1;
    }
  for (int s = 0; s < g.L; ++s) {
    const i64 o = (i64)s * n;
    if (q) {
      gates_line<F, true>(zt[0] + o, zt[1] + o, zt[2] + o, up, down, n, w[0] + o, w[1] + o, w[2] + o, q[0] + o,
                          q[1] + o, q[2] + o);
    } else {
      gates_line<F, false>(zt[0] + o, zt[1] + o, zt[2] + o, up, down, n, w[0] + o, w[1] + o, w[2] + o, nullptr,
                           nullptr, nullptr);
    }
  }
}

// Forward of one work item: every direction, the k channel offsets t, the B planes of a group together
// (channels (j0 + b) k + t): a = lam x into the scan frame, the scan, u h added to y on the way back.
template <class F>
void forward_item(const Problem<F>& pb, const Item& it) {
  const int H = pb.H, W = pb.W, B = it.B, k = pb.kk();
  const Scratch<F> sc(H, W, B, 8);
  F* const w[3] = {sc.plane(0), sc.plane(1), sc.plane(2)};
  F* const zt[3] = {sc.plane(3), sc.plane(4), sc.plane(5)};
  F *A = sc.plane(6), *Hs = sc.plane(7);
  for (int d = 0; d < pb.dirs(); ++d) {
    const Dir g(d, H, W, pb.K);
    const Frame<F> fr = sc.frame(g, H, W, B);
    scan_frame_gates<F>(pb, it, d, g, fr, w, nullptr, zt, sc.flags());
    for (int t = 0; t < k; ++t) {
      auto ch = [&](int b) { return (it.j0 + b) * k + t; };
      fr.load(A, [&](int b, i64 off, i64 len, F* out) {
        mul(pb.lam + pb.mo(it.n, d, ch(b)) + off, pb.x + pb.xo(it.n, ch(b)) + off, out, len);
      });
      scan_lines(g.st, B * g.P, B, w, A, Hs);
      fr.store(Hs, [&](int b, i64 off, i64 len, const F* h) {
        F* y = pb.y + pb.xo(it.n, ch(b)) + off;
        if (pb.mix) {
          mul_add(pb.u + pb.mo(it.n, d, ch(b)) + off, h, y, len, d == 0);
        } else {
          std::memcpy(y, h, sizeof(F) * len);
        }
      });
    }
  }
}

// Backward of one work item: states recomputed, adjoint scan, every wanted gradient.
template <class F>
void backward_item(const Problem<F>& pb, const Item& it) {
  const int H = pb.H, W = pb.W, B = it.B, k = pb.kk();
  const bool need_dz = pb.dz[0] || pb.dz[1] || pb.dz[2];
  const bool need_b = pb.dx || pb.dlam || need_dz;
  const bool need_h = pb.du || need_dz;
  const Scratch<F> sc(H, W, B, 12);
  const i64 plane = sc.plane_len;
  F* const w[3] = {sc.plane(0), sc.plane(1), sc.plane(2)};
  F* const q[3] = {sc.plane(3), sc.plane(4), sc.plane(5)};
  F* const D[3] = {sc.plane(6), sc.plane(7), sc.plane(8)};  // the scan-frame logits first
  F *A = sc.plane(9), *Hs = sc.plane(10), *Bs = sc.plane(11);
  for (int d = 0; d < pb.dirs(); ++d) {
    const Dir g(d, H, W, pb.K);
    const Frame<F> fr = sc.frame(g, H, W, B);
    const int n = B * g.P;
    scan_frame_gates<F>(pb, it, d, g, fr, w, need_dz && pb.mix ? q : nullptr, D, sc.flags());
    if (need_dz)
      for (int kk = 0; kk < 3; ++kk) std::memset(D[kk], 0, sizeof(F) * plane);
    for (int t = 0; t < k; ++t) {
      auto ch = [&](int b) { return (it.j0 + b) * k + t; };
      auto x_of = [&](int b) { return pb.x + pb.xo(it.n, ch(b)); };
      auto dy_of = [&](int b) { return pb.dy + pb.xo(it.n, ch(b)); };
      auto lam_of = [&](int b) { return pb.lam + pb.mo(it.n, d, ch(b)); };
      if (need_h) {  // the forward states, and du = h dy
        fr.load(A, [&](int b, i64 off, i64 len, F* out) { mul(lam_of(b) + off, x_of(b) + off, out, len); });
        scan_lines(g.st, n, B, w, A, Hs);
        if (pb.du)
          fr.store(Hs, [&](int b, i64 off, i64 len, const F* h) {
            mul(h, dy_of(b) + off, pb.du + pb.mo(it.n, d, ch(b)) + off, len);
          });
      }
      if (!need_b) continue;
      fr.load(A, [&](int b, i64 off, i64 len, F* out) {  // dL/dh = u dy (gspn_scan: dy)
        if (pb.mix) {
          mul(pb.u + pb.mo(it.n, d, ch(b)) + off, dy_of(b) + off, out, len);
        } else {
          std::memcpy(out, dy_of(b) + off, sizeof(F) * len);
        }
      });
      adjoint_lines(g.st, n, B, w, A, Bs, Hs, need_dz ? D : nullptr, sc.hand());
      fr.store(Bs, [&](int b, i64 off, i64 len, const F* bv) {  // dlam = b x, dx += b lam
        if (pb.dlam) mul(bv, x_of(b) + off, pb.dlam + pb.mo(it.n, d, ch(b)) + off, len);
        if (pb.dx) mul_add(bv, lam_of(b) + off, pb.dx + pb.xo(it.n, ch(b)) + off, len, d == 0);
      });
    }
    if (!need_dz) continue;
    // dL/dz: the gradient of the normalisation (gspn_mix) or D itself (gspn_scan), then to each plane
    if (pb.mix) {
#pragma omp simd
      for (i64 o = 0; o < plane; ++o)
        gspn_logit_grads(q[0][o], q[1][o], q[2][o], w[0][o], w[1][o], w[2][o], D[0][o], D[1][o], D[2][o], D[0][o],
                         D[1][o], D[2][o]);
    }
    for (int kk = 0; kk < 3; ++kk) {
      if (!pb.gate_out(it.n, d, it.j0, kk)) continue;
      fr.store(D[kk], [&](int b, i64 off, i64 len, const F* v) {
        std::memcpy(pb.gate_out(it.n, d, it.j0 + b, kk) + off, v, sizeof(F) * len);
      });
    }
  }
}

// Gate planes per work item: 1 on maps of 64 x 64 and more; on smaller ones enough for lines of about
// 256 values, a multiple of 8 (the transposes' blocks) where Cg allows. (Measured on 2 AVX2 cores: lines of
// 256 beat 64 and 512 from 4 x 4 to 32 x 32 maps; at 64 x 64, interleaving 8 planes doubles the backward.)
inline int group_size(int Cg, int H, int W) {
  const int side = std::min(H, W);
  if (side >= 64) return 1;
  return std::max(1, std::min(Cg, ((256 + side - 1) / side + 7) / 8 * 8));
}

template <class F>
int run(const Problem<F>& pb, bool backward, int nthreads) {
  const i64 groups = (pb.Cg + pb.B - 1) / pb.B, items = (i64)pb.N * groups;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, nthreads)) reduction(| : failed)
  for (i64 i = 0; i < items; ++i) {
    const int j0 = (int)(i % groups) * pb.B;
    const Item it{(int)(i / groups), j0, std::min(pb.B, pb.Cg - j0)};
    try {
      if (backward) {
        backward_item(pb, it);
      } else {
        forward_item(pb, it);
      }
    } catch (const std::bad_alloc&) {
      failed = 1;
    }
  }
  return failed;
}

template <class F>
Problem<F> problem(int N, int C, int Cg, int H, int W, int K, bool mix) {
  Problem<F> pb;
  std::memset((void*)&pb, 0, sizeof(pb));
  pb.N = N, pb.C = C, pb.Cg = Cg, pb.H = H, pb.W = W, pb.K = K, pb.mix = mix;
  pb.B = group_size(Cg, H, W);
  return pb;
}

template <class F>
int mix_forward(const F* x, const F* z, const F* lam, const F* u, F* y, int N, int C, int Cg, int H, int W, int K,
                int nthreads) {
  Problem<F> pb = problem<F>(N, C, Cg, H, W, K, true);
  pb.x = x, pb.z[0] = z, pb.lam = lam, pb.u = u, pb.y = y;
  return run(pb, false, nthreads);
}

template <class F>
int mix_backward(const F* dy, const F* x, const F* z, const F* lam, const F* u, F* dx, F* dz, F* dlam, F* du, int N,
                 int C, int Cg, int H, int W, int K, int nthreads) {
  Problem<F> pb = problem<F>(N, C, Cg, H, W, K, true);
  pb.dy = dy, pb.x = x, pb.z[0] = z, pb.lam = lam, pb.u = u;
  pb.dx = dx, pb.dz[0] = dz, pb.dlam = dlam, pb.du = du;
  return run(pb, true, nthreads);
}

template <class F>
int scan_forward_all(const F* x, const F* lam, const F* g0, const F* g1, const F* g2, F* h, int N, int C, int Cg, int H,
                     int W, int K, int nthreads) {
  Problem<F> pb = problem<F>(N, C, Cg, H, W, K, false);
  pb.x = x, pb.lam = lam, pb.z[0] = g0, pb.z[1] = g1, pb.z[2] = g2, pb.y = h;
  return run(pb, false, nthreads);
}

template <class F>
int scan_backward_all(const F* dh, const F* x, const F* lam, const F* g0, const F* g1, const F* g2, F* dx, F* dlam,
                      F* dg0, F* dg1, F* dg2, int N, int C, int Cg, int H, int W, int K, int nthreads) {
  Problem<F> pb = problem<F>(N, C, Cg, H, W, K, false);
  pb.dy = dh, pb.x = x, pb.lam = lam, pb.z[0] = g0, pb.z[1] = g1, pb.z[2] = g2;
  pb.dx = dx, pb.dlam = dlam, pb.dz[0] = dg0, pb.dz[1] = dg1, pb.dz[2] = dg2;
  return run(pb, true, nthreads);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C ABI (kernels/cpu_backend.py): contiguous tensors of the op's shapes, outputs null when not wanted,
// K = 0 for a global scan. Returns 0, or 1 when scratch memory could not be allocated.

#define GSPN_CPU_ENTRIES(F, SUFFIX)                                                                              \
  extern "C" int gspn_cpu_mix_forward_##SUFFIX(const F* x, const F* z, const F* lam, const F* u, F* y, int N,   \
                                               int C, int Cg, int H, int W, int K, int nthreads) {              \
    return mix_forward<F>(x, z, lam, u, y, N, C, Cg, H, W, K, nthreads);                                         \
  }                                                                                                              \
  extern "C" int gspn_cpu_mix_backward_##SUFFIX(const F* dy, const F* x, const F* z, const F* lam, const F* u,  \
                                                F* dx, F* dz, F* dlam, F* du, int N, int C, int Cg, int H,      \
                                                int W, int K, int nthreads) {                                   \
    return mix_backward<F>(dy, x, z, lam, u, dx, dz, dlam, du, N, C, Cg, H, W, K, nthreads);                    \
  }                                                                                                              \
  extern "C" int gspn_cpu_scan_forward_##SUFFIX(const F* x, const F* lam, const F* g0, const F* g1,             \
                                                const F* g2, F* h, int N, int C, int Cg, int H, int W, int K,   \
                                                int nthreads) {                                                 \
    return scan_forward_all<F>(x, lam, g0, g1, g2, h, N, C, Cg, H, W, K, nthreads);                             \
  }                                                                                                              \
  extern "C" int gspn_cpu_scan_backward_##SUFFIX(const F* dh, const F* x, const F* lam, const F* g0,           \
                                                 const F* g1, const F* g2, F* dx, F* dlam, F* dg0, F* dg1,     \
                                                 F* dg2, int N, int C, int Cg, int H, int W, int K,            \
                                                 int nthreads) {                                                \
    return scan_backward_all<F>(dh, x, lam, g0, g1, g2, dx, dlam, dg0, dg1, dg2, N, C, Cg, H, W, K, nthreads);  \
  }

GSPN_CPU_ENTRIES(float, f32)
GSPN_CPU_ENTRIES(double, f64)

// One sigmoid of the shared header, for the tests of its accuracy.
extern "C" void gspn_cpu_sigmoid_f32(const float* z, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = gspn_sigmoid(z[i]);
}
