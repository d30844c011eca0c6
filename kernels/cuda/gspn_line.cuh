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
// |r| <= ln2 / 2 (two-part ln2, Cody-Waite), exp(r) by a degree-6 polynomial (Cephes' expf), 2^n
// built in the exponent bits. The argument is clamped to [-87.3, 88] so 2^n stays a normal number;
// NaN stays NaN (both comparisons are false).
__device__ __forceinline__ float gspn_expf(float x) {
  x = x > 88.f ? 88.f : x;
  x = x < -87.3f ? -87.3f : x;
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
  // bits of t are 0x4B400000 + n; 2^n has exponent bits n + 127 (unsigned arithmetic: no overflow UB)
  const unsigned int scale = (__float_as_uint(t) - 0x4B400000u + 127u) << 23;
  return p * __uint_as_float(scale);
}

// sigmoid(z) = 1 / (1 + exp(-z)) with an IEEE division (exp overflow is clamped, so no inf arises).
__device__ __forceinline__ float gspn_sigmoid(float z) { return 1.f / (1.f + gspn_expf(-z)); }

// Normalised gates of one position from its three sigmoids: the weights of the existing neighbours
// sum to 1; missing ones, and positions past the line (valid = false), get 0.
template <class F>
__device__ __forceinline__ void gspn_normalise(F s0, F s1, F s2, bool up, bool down, bool valid, F& w0, F& w1,
                                               F& w2) {
  const F inv = F(1) / (s1 + (up ? s0 : F(0)) + (down ? s2 : F(0)));
  w0 = valid && up ? s0 * inv : F(0);
  w1 = valid ? s1 * inv : F(0);
  w2 = valid && down ? s2 * inv : F(0);
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

// Gradient of the normalisation: with D_k = dL/dw_k, w_k = s_k / S, s_k = sigmoid(z_k),
// dL/dz_k = w_k (1 - s_k) (D_k - sum_k' D_k' w_k') for an existing neighbour k, 0 for a missing one
// (w_k = 0 there).
template <class F>
__device__ __forceinline__ void gspn_logit_grads(F s0, F s1, F s2, F w0, F w1, F w2, F D0, F D1, F D2, F& d0,
                                                 F& d1, F& d2) {
  const F dot = D0 * w0 + D1 * w1 + D2 * w2;
  d0 = w0 * (F(1) - s0) * (D0 - dot);
  d1 = w1 * (F(1) - s1) * (D1 - dot);
  d2 = w2 * (F(1) - s2) * (D2 - dot);
}
