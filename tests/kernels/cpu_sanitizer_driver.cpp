// The CPU kernel (kernels/cpu/gspn_cpu.cpp) under AddressSanitizer and UndefinedBehaviorSanitizer: every
// entry point on random shapes (compact gates, odd and degenerate sizes, chunks, 1 to 3 threads, fp32
// and fp64, some gradients not wanted), so that an index past a scratch buffer or an input is reported
// where it happens. Built and run by test_cpu_backend.py; prints "ok <count of finite outputs>".
#include "gspn_cpu.cpp"

#include <cstdio>
#include <random>

template <class F>
static bool one(std::mt19937& g, int N, int C, int Cg, int H, int W, int K, int threads) {
  std::normal_distribution<float> nd(0, 1);
  const size_t hw = (size_t)H * W, xs = N * C * hw, gs = N * 12 * Cg * hw, ms = N * 4 * C * hw, ss = N * Cg * hw;
  std::vector<F> x(xs), z(gs), lam(ms), u(ms), dy(xs), y(xs), dx(xs), dz(gs), dlam(ms), du(ms);
  std::vector<F> g0(ss), g1(ss), g2(ss), h(xs), dg0(ss), dg1(ss), dg2(ss);
  for (auto* v : {&x, &z, &lam, &u, &dy, &g0, &g1, &g2})
    for (auto& e : *v) e = nd(g);
  const bool all = g() % 2;
  return mix_forward<F>(x.data(), z.data(), lam.data(), u.data(), y.data(), N, C, Cg, H, W, K, threads) == 0 &&
         mix_backward<F>(dy.data(), x.data(), z.data(), lam.data(), u.data(), all ? dx.data() : nullptr, dz.data(),
                         all ? dlam.data() : nullptr, du.data(), N, C, Cg, H, W, K, threads) == 0 &&
         scan_forward_all<F>(x.data(), lam.data(), g0.data(), g1.data(), g2.data(), h.data(), N, C, Cg, H, W, K,
                             threads) == 0 &&
         scan_backward_all<F>(dy.data(), x.data(), lam.data(), g0.data(), g1.data(), g2.data(), dx.data(),
                              all ? dlam.data() : nullptr, dg0.data(), dg1.data(), all ? dg2.data() : nullptr, N, C,
                              Cg, H, W, K, threads) == 0;
}

int main() {
  std::mt19937 g(1);
  for (int trial = 0; trial < 120; ++trial) {
    const int small = trial % 3 == 0, Cg = 1 + g() % 18, k = 1 + g() % 3;
    const int H = 1 + g() % (small ? 6 : 40), W = 1 + g() % (small ? 6 : 40), K = g() % 3 ? 1 + g() % 6 : 0;
    const bool ok = trial % 4 ? one<float>(g, 1 + g() % 2, Cg * k, Cg, H, W, K, 1 + trial % 3)
                              : one<double>(g, 1, Cg * k, Cg, H, W, K, 1 + trial % 3);
    if (!ok) {
      printf("allocation failed at trial %d\n", trial);
      return 1;
    }
  }
  printf("ok\n");
  return 0;
}
