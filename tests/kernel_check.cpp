// Checks the chunk kernels against chunk_stats, the definition
// (csrc/cpu/chunk_kernel.h), without torch: the portable kernel
// (kernel_generic.cpp) and, on x86-64, the AVX2 and AVX-512 ones this CPU runs,
// built from the extension's own sources (with float8_tables.cpp) into one
// program. tests/test_kernel_check.py builds it with GCC, with Clang (whose
// build of the x86 kernels the extension's build with GCC does not show), and
// with the aarch64 cross g++ and runs that under qemu-user: the NEON build of
// the portable kernel, which every non-x86 machine gets and no test can reach
// through torch here. Per dtype, histogram on and off, two saturation
// thresholds: counts, extremes and every histogram bin bit for bit, sums within
// |sum - exact| <= 1e-6 * sum|x|. Prints what it checked per kernel.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/chunk_kernel.h"

using namespace torchhealth;
using namespace torchhealth::cpu;

namespace {

int failures = 0;
long long checked = 0;

bool same(double a, double b) { return bits_of(a) == bits_of(b); }
// Within the documented bound, or the same overflow (a sum of squares above
// DBL_MAX is +Inf for both).
bool near(double got, double want, double bound) {
  return same(got, want) || std::fabs(got - want) <= 1e-6 * bound;
}

template <typename T, typename acc_t>
void check(const std::vector<T>& xs, const Limits<acc_t>& lim, bool hist,
           Acc (*kernel)(const T*, int64_t, const Limits<acc_t>&, HistOut*), const std::string& what) {
  std::vector<int64_t> got_h(kBins, 0), want_h(kBins, 0);
  HistOut got_out{hist ? got_h.data() : nullptr};
  HistOut want_out{hist ? want_h.data() : nullptr};
  const int64_t n = static_cast<int64_t>(xs.size());
  const Acc g = kernel(xs.data(), n, lim, &got_out);
  const Acc w = chunk_stats<T>(xs.data(), n, lim, &want_out);
  double abs_sum = 0, sq_sum = 0;
  for (const T& x : xs) {
    const double d = static_cast<double>(to_acc(x));
    if (std::isfinite(d)) {
      abs_sum += std::fabs(d);
      sq_sum += d * d;
    }
  }
  bool ok = g.nan == w.nan && g.posinf == w.posinf && g.neginf == w.neginf && g.zero == w.zero &&
            g.subnormal == w.subnormal && g.saturated == w.saturated && same(g.min, w.min) &&
            same(g.max, w.max) && same(g.absmax, w.absmax) &&
            near(g.sum, w.sum, abs_sum) && near(g.sumsq, w.sumsq, sq_sum);
  for (int b = 0; b < kBins && ok; ++b) {
    // The caller adds only the touched range [lo, hi) to the row.
    const int64_t g_b = b >= got_out.lo && b < got_out.hi ? got_h[b] : 0;
    ok = g_b == want_h[b] && (got_h[b] == 0 || (b >= got_out.lo && b < got_out.hi));
  }
  ++checked;
  if (!ok && failures++ < 10) {
    std::printf(
        "%s, n=%lld, histogram %d: generic/definition nan %lld/%lld +inf %lld/%lld -inf %lld/%lld "
        "zero %lld/%lld sub %lld/%lld sat %lld/%lld min %a/%a max %a/%a absmax %a/%a sum %a/%a "
        "sumsq %a/%a\n",
        what.c_str(), static_cast<long long>(n), hist, (long long)g.nan, (long long)w.nan,
        (long long)g.posinf, (long long)w.posinf, (long long)g.neginf, (long long)w.neginf,
        (long long)g.zero, (long long)w.zero, (long long)g.subnormal, (long long)w.subnormal,
        (long long)g.saturated, (long long)w.saturated, g.min, w.min, g.max, w.max, g.absmax,
        w.absmax, g.sum, w.sum, g.sumsq, w.sumsq);
  }
}

template <typename T>
std::vector<T> convert(const std::vector<float>& xs) {
  std::vector<T> out;
  out.reserve(xs.size());
  for (float x : xs) out.push_back(static_cast<T>(x));
  return out;
}

template <typename T, typename acc_t>
void both(const std::vector<T>& xs, const Limits<acc_t>& lim,
          Acc (*kernel)(const T*, int64_t, const Limits<acc_t>&, HistOut*), const std::string& what) {
  for (int hist = 0; hist < 2; ++hist) check(xs, lim, hist == 1, kernel, what);
}

void check_kernel(const Kernels& k) {
  const std::string name = k.name;
  const long long before = checked;
  const int failed = failures;
  std::mt19937_64 gen(20261130);
  std::normal_distribution<double> normal(0.0, 1.0);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float specials[] = {nan, -nan, inf, -inf, 0.0f, -0.0f, 0x1p-149f, -0x1p-149f, 0x1p-130f,
                            0x1p-126f, 0x1p-64f, -0x1p-63f, 0x1.fffffep127f, -0x1.fffffep127f,
                            0x1p70f, 65504.0f, 57344.0f, 448.0f, 0x1p-14f, 0x1p-24f, 1.0f, -0.5f};
  constexpr int kSpecials = sizeof(specials) / sizeof(specials[0]);
  // Per dtype: the smallest normal and two saturation thresholds (near the
  // dtype's maximum, and 1 - 2^-10, as watch uses for sigmoid outputs).
  const float low = 1.0f - 0x1p-10f;
  const Limits<float> f32[] = {{0x1p-126f, 0x1p127f}, {0x1p-126f, low}};
  const Limits<float> f16[] = {{0x1p-14f, 32752.0f}, {0x1p-14f, low}};
  const Limits<float> e4m3[] = {{0x1p-6f, 224.0f}, {0x1p-6f, low}};
  const Limits<float> e5m2[] = {{0x1p-14f, 28672.0f}, {0x1p-14f, low}};
  const Limits<double> f64[] = {{0x1p-1022, 0x1p1023}, {0x1p-1022, 1.0 - 0x1p-10}};
  for (int trial = 0; trial < 400; ++trial) {
    // Lengths across blocks (960 values at 4 lanes, 1920 at 8) and tails.
    const int n = 1 + static_cast<int>(gen() % 5000);
    const int e = static_cast<int>(gen() % 300) - 160;  // scales 2^-160 .. 2^140
    const int e16 = static_cast<int>(gen() % 40) - 26;  // scales 2^-26 .. 2^13
    std::vector<float> xs(n), ys(n);
    std::vector<double> ds(n);
    for (int i = 0; i < n; ++i) {
      const double z = normal(gen);
      xs[i] = static_cast<float>(std::ldexp(z, e));
      ys[i] = static_cast<float>(std::ldexp(z, e16));
      ds[i] = std::ldexp(z, e * 6);
    }
    const int kinds = trial % 4;  // 0: clean data; else a few special values
    for (int j = 0; kinds != 0 && j < 1 + static_cast<int>(gen() % 8); ++j) {
      const size_t i = gen() % n;
      xs[i] = ys[i] = specials[gen() % kSpecials];
      ds[i] = static_cast<double>(xs[i]);
    }
    if (trial % 5 == 1) {
      for (int i = 0; i < n; i += 3) xs[i] = ys[i] = 0.0f;  // many zeros (ReLU, dropout)
    }
    if (trial % 7 == 2) {
      for (int i = 0; i < n; ++i) ys[i] = 1.0f / (1.0f + std::exp(-8.0f * ys[i]));  // sigmoid-like
    }
    if (trial % 11 == 3) {
      // ReLU-like, zeros of both signs: the minimum is a zero, reported as +0.0
      // whichever zero the kernel's min kept (fmin on aarch64 keeps -0.0).
      for (int i = 0; i < n; ++i) xs[i] = i % 4 == 0 ? (i % 8 == 0 ? -0.0f : 0.0f) : std::fabs(xs[i]);
    }
    if (trial % 11 == 4) {
      for (int i = 0; i < n; ++i) xs[i] = i % 4 == 0 ? -0.0f : -std::fabs(xs[i]);  // the maximum is -0.0
    }
    for (int t = 0; t < 2; ++t) {
      both(xs, f32[t], k.f32, name + " float32");
      both(convert<c10::BFloat16>(xs), f32[t], k.bf16, name + " bfloat16");
      both(convert<c10::Half>(ys), f16[t], k.f16, name + " float16");
      both(convert<c10::Float8_e4m3fn>(ys), e4m3[t], k.f8e4m3, name + " float8_e4m3fn");
      both(convert<c10::Float8_e5m2>(ys), e5m2[t], k.f8e5m2, name + " float8_e5m2");
      both(ds, f64[t], k.f64, name + " float64");
    }
  }
  // Every float8 bit pattern, over several blocks (vector path) and alone.
  std::vector<uint8_t> all(256 * 9 + 5);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(i * 7 + 3);
  for (const size_t n : {all.size(), size_t{256}}) {
    std::vector<c10::Float8_e4m3fn> e4(n);
    std::vector<c10::Float8_e5m2> e5(n);
    for (size_t i = 0; i < n; ++i) {
      e4[i].x = n == 256 ? static_cast<uint8_t>(i) : all[i];
      e5[i].x = e4[i].x;
    }
    both(e4, e4m3[0], k.f8e4m3, name + " float8_e4m3fn, every bit pattern");
    both(e5, e5m2[0], k.f8e5m2, name + " float8_e5m2, every bit pattern");
  }
  // Every float16 bit pattern (subnormals, NaN payloads, both infinities), in order.
  std::vector<c10::Half> halves(65536);
  for (size_t i = 0; i < halves.size(); ++i) halves[i].x = static_cast<uint16_t>(i);
  both(halves, f16[0], k.f16, name + " float16, every bit pattern");
  std::printf("kernel %s against the definition: %lld checks, %d failures\n", k.name,
              checked - before, failures - failed);
}

// Every kernel of the build that this CPU runs: the x86 ones are compiled in
// only on x86-64 (elsewhere they fall back to the scalar kernels of
// dispatch.cpp, which needs libtorch).
std::vector<Kernels> runnable() {
  std::vector<Kernels> ks = {generic_kernels()};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2");
  if (avx2) ks.push_back(avx2_kernels());
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    ks.push_back(avx512_kernels());
  }
#endif
  return ks;
}

}  // namespace

int main() {
  for (const Kernels& k : runnable()) check_kernel(k);
  std::printf("%lld checks, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
