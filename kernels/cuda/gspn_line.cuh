// The per-line arithmetic of the GSPN scan, shared by every compiled backend: the CUDA kernels
// (gspn_forward.cu, gspn_backward.cu), their g++ emulation (tests/kernels/cuda_emulation.cpp) and the
// CPU kernel (kernels/cpu/gspn_cpu.cpp). One source, so the three cannot drift.
//
// Written in CUDA's dialect without any header: host includers define __device__ (empty),
// __forceinline__ (inline) and the bit casts __float_as_uint / __uint_as_float before including it.
//
// For one position p of step s of a line of P positions (GSPN, arXiv 2501.12381, eq. 1-3):
//   h[s, p] = lam[s, p] x[s, p] + w0 h[s-1, p-1] + w1 h[s-1, p] + w2 h[s-1, p+1]
// with w_k = sigmoid(z_k) / sum over the neighbours k' that exist of sigmoid(z_k') (Stability-Context
// Condition: "up", k = 0, is missing at p = 0, "down", k = 2, at p = P - 1).
#pragma once

// exp(x) in fp32 to about 1 ulp, from FMAs and integer bit arithmetic only, so the GPU, the CPU
// (where the compiler vectorises it) and the emulation compute the same function. x = n ln2 + r with
// |r| <= ln2 / 2 (two-part ln2, Cody-Waite), exp(r) by a degree-6 polynomial (Cephes' expf), 2^n built
// in the exponent bits. The argument is clamped to [-87.3, 88] so that 2^n stays a normal number
// (results below 1.2e-38 come out as about 1.2e-38; fp32 sigmoids round to 0 there anyway); NaN stays
// NaN. The clamps are bit selects: with a conditional expression GCC splits the loop on the constant
// results and then cannot vectorise it for AVX2.
__device__ __forceinline__ float gspn_expf(float x) {
  const unsigned int hi = 0u - (unsigned int)(x > 88.f), lo = 0u - (unsigned int)(x < -87.3f);
  x = __uint_as_float((__float_as_uint(x) & ~hi) | (__float_as_uint(88.f) & hi));
  x = __uint_as_float((__float_as_uint(x) & ~lo) | (__float_as_uint(-87.3f) & lo));
  const float shift = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // bits of t are 0x4B400000 + n; 2^n has the exponent bits n + 127 (in [1, 255) after the clamps)
  return p * __uint_as_float((__float_as_uint(t) - 0x4B400000u + 127u) << 23);
}

// The sigmoid as a fraction, from e = exp(-|z|) <= 1 so nothing overflows: sigmoid(z) = num / den and
// 1 - sigmoid(z) = rem / den, with den = 1 + e and (num, rem) = (1, e) for z >= 0, (e, 1) below. Both
// keep full relative accuracy (to 1.2e-38). For fp32 the exp is gspn_expf; host
// includers computing in fp64 declare `double gspn_expf(double)` before including this header.
template <class F>
__device__ __forceinline__ void gspn_sigmoid_frac(F z, F& num, F& rem, F& den) {
  const bool neg = z < F(0);
  const F e = gspn_expf(neg ? z : -z);
  num = neg ? e : F(1);
  rem = neg ? F(1) : e;
  den = F(1) + e;
}

// sigmoid(z) with an IEEE division.
__device__ __forceinline__ float gspn_sigmoid(float z) {
  float num, rem, den;
  gspn_sigmoid_frac(z, num, rem, den);
  return num / den;
}

// Normalised gates of one position from its three logits (Stability-Context Condition) with one
// division: w_k = s_k / sum of the existing s_k' = t_k / (t_0 + t_1 + t_2), t_k = num_k times the
// other two denominators (0 for a missing neighbour). Missing neighbours, and positions past the
// line (valid = false), get 0. With WITH_Q (the backward), also q_k = 1 - sigmoid(z_k) = rem_k / den_k,
// through one more division shared by the three.
template <class F, bool WITH_Q>
__device__ __forceinline__ void gspn_gates(F z0, F z1, F z2, bool up, bool down, bool valid, F& w0, F& w1, F& w2,
                                           F& q0, F& q1, F& q2) {
  F n0, r0, d0, n1, r1, d1, n2, r2, d2;
  gspn_sigmoid_frac(z0, n0, r0, d0);
  gspn_sigmoid_frac(z1, n1, r1, d1);
  gspn_sigmoid_frac(z2, n2, r2, d2);
  const F d12 = d1 * d2, d02 = d0 * d2, d01 = d0 * d1;
  const F t0 = up ? n0 * d12 : F(0), t1 = n1 * d02, t2 = down ? n2 * d01 : F(0);
  const F inv = F(1) / (t0 + t1 + t2);
  w0 = valid ? t0 * inv : F(0);
  w1 = valid ? t1 * inv : F(0);
  w2 = valid ? t2 * inv : F(0);
  if (WITH_Q) {
    const F inv_d = F(1) / (d0 * d12);
    q0 = r0 * d12 * inv_d;
    q1 = r1 * d02 * inv_d;
    q2 = r2 * d01 * inv_d;
  }
}

// One step of the scan at one position: the input term plus the gated states of the previous line
// at offsets -1, 0, +1 (0 outside the line or before the first step of a block).
template <class F>
__device__ __forceinline__ F gspn_step(F a, F w0, F w1, F w2, F left, F mid, F right) {
  return a + w0 * left + w1 * mid + w2 * right;
}

// The adjoint of one position of the previous line: its own term (u dy of that position) plus what
// the current line hands back, c_k = w_k b of the positions that read it with gate k: c_0 from the
// position below (q + 1), c_1 from q itself, c_2 from the one above (q - 1); 0 at a block start.
template <class F>
__device__ __forceinline__ F gspn_adjoint(F own, F c0_below, F c1, F c2_above) {
  return own + (c0_below + c1 + c2_above);
}

// Gradient of the normalisation: with D_k = dL/dw_k, w_k = s_k / S, s_k = sigmoid(z_k), q_k = 1 - s_k,
// dL/dz_k = w_k q_k (D_k - sum_k' D_k' w_k') for an existing neighbour k, 0 for a missing one
// (w_k = 0 there).
template <class F>
__device__ __forceinline__ void gspn_logit_grads(F q0, F q1, F q2, F w0, F w1, F w2, F D0, F D1, F D2, F& d0, F& d1,
                                                 F& d2) {
  const F dot = D0 * w0 + D1 * w1 + D2 * w2;
  d0 = w0 * q0 * (D0 - dot);
  d1 = w1 * q1 * (D1 - dot);
  d2 = w2 * q2 * (D2 - dot);
}
