// Checks csrc/cuda/thread_acc.h (the CUDA kernel's per-thread accumulator) on
// the CPU against stats.h's update(), the definition: the same histogram bin
// for every value, the same counts and extremes bit for bit, and sums within
// |sum - exact| <= 1e-6 * sum|x| (and the same for sumsq), reading values in
// the kernel's way: a flush every kFlushEvery values. Built and run by
// tests/test_thread_acc.py; prints the worst relative errors seen.
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/thread_acc.h"

using namespace torchhealth;

namespace {

int failures = 0;
double worst_sum = 0.0;
double worst_sumsq = 0.0;

template <bool kWide>
void check(const std::vector<float>& xs, const Limits<float>& lim, const char* what) {
  cuda::ThreadAcc<float> t = cuda::ThreadAcc<float>::identity();
  Acc r = Acc::identity();
  double abs_sum = 0.0, sq_sum = 0.0;  // exact enough: float products are exact in double
  for (size_t i = 0; i < xs.size(); ++i) {
    const int got = t.update<kWide>(xs[i], lim);
    const int want = update<float>(r, xs[i], lim);
    if (got != want) {
      std::printf("%s: value %zu (%a) in bin %d, update() says %d\n", what, i, xs[i], got, want);
      failures++;
      return;
    }
    if ((i + 1) % cuda::kFlushEvery == 0) t.flush();
    if (std::isfinite(xs[i])) {
      const double d = xs[i];
      abs_sum += std::fabs(d);
      sq_sum += d * d;
    }
  }
  const Acc a = t.to_acc();
  const bool exact = a.nan == r.nan && a.posinf == r.posinf && a.neginf == r.neginf &&
                     a.zero == r.zero && a.subnormal == r.subnormal && a.saturated == r.saturated &&
                     bits_of(a.min) == bits_of(r.min) && bits_of(a.max) == bits_of(r.max) &&
                     bits_of(a.absmax) == bits_of(r.absmax);
  if (!exact) {
    std::printf("%s: counts or extremes differ: min %a/%a max %a/%a absmax %a/%a zero %lld/%lld\n",
                what, a.min, r.min, a.max, r.max, a.absmax, r.absmax,
                static_cast<long long>(a.zero), static_cast<long long>(r.zero));
    failures++;
  }
  const double es = std::fabs(a.sum - r.sum), eq = std::fabs(a.sumsq - r.sumsq);
  if (abs_sum > 0) worst_sum = std::max(worst_sum, es / abs_sum);
  if (sq_sum > 0) worst_sumsq = std::max(worst_sumsq, eq / sq_sum);
  if (es > 1e-6 * abs_sum || eq > 1e-6 * sq_sum) {
    std::printf("%s: sums beyond the bound: sum %a vs %a (sum|x| %a), sumsq %a vs %a (sum x^2 %a)\n",
                what, a.sum, r.sum, abs_sum, a.sumsq, r.sumsq, sq_sum);
    failures++;
  }
}

template <typename T>
std::vector<float> rounded(const std::vector<float>& xs) {
  std::vector<float> out;
  for (float x : xs) out.push_back(static_cast<float>(static_cast<T>(x)));
  return out;
}

}  // namespace

int main() {
  std::mt19937_64 gen(20261129);
  std::normal_distribution<double> normal(0.0, 1.0);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Limits<float> f32{0x1p-126f, 0x1p127f};
  const Limits<float> f16{0x1p-14f, 32752.0f};
  const Limits<float> e4m3{0x1p-6f, 224.0f};
  const float specials[] = {nan, inf, -inf, 0.0f, -0.0f, 0x1p-149f, -0x1p-149f, 0x1p-130f,
                            0x1p-126f, 0x1.fffffep127f, -0x1.fffffep127f, 0x1p60f, -0x1p-63f,
                            0x1.fffffep-64f, 0x1.fffffep59f, 65504.0f, 448.0f, 1.0f};
  constexpr int kSpecials = sizeof(specials) / sizeof(specials[0]);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(gen() % 700);
    // Scales from 2^-160 to 2^140: inside, across and beyond the float band.
    const double scale = std::ldexp(1.0, static_cast<int>(gen() % 300) - 160);
    std::vector<float> xs(n);
    for (float& x : xs) x = static_cast<float>(normal(gen) * scale);
    for (int k = static_cast<int>(gen() % 6); k > 0; --k) xs[gen() % n] = specials[gen() % kSpecials];
    if (trial % 3 == 0) {
      for (float& x : xs) x = std::fabs(x);  // no cancellation: the bound is tight
    }
    check<true>(xs, f32, "float32");
    check<true>(rounded<c10::BFloat16>(xs), f32, "bfloat16");
    std::vector<float> small(n);
    const double s16 = std::ldexp(1.0, static_cast<int>(gen() % 36) - 24);
    for (float& x : small) x = static_cast<float>(std::clamp(normal(gen) * s16, -6e4, 6e4));
    check<false>(rounded<c10::Half>(small), f16, "float16");
    check<false>(rounded<c10::Float8_e4m3fn>(small), e4m3, "float8_e4m3fn");
  }
  // The worst case for float partials: a 1 then 15 values just under half an
  // ulp of the running sum, each add rounding away almost all of it.
  std::vector<float> adversarial;
  for (int i = 0; i < 4096; ++i) adversarial.push_back(i % cuda::kFlushEvery == 0 ? 1.0f : 0x1.fcp-25f);
  check<true>(adversarial, f32, "adversarial sum");
  std::vector<float> adversarial_sq;
  for (int i = 0; i < 4096; ++i) adversarial_sq.push_back(i % cuda::kFlushEvery == 0 ? 1.0f : 0x1.fcp-13f);
  check<true>(adversarial_sq, f32, "adversarial sumsq");
  // Whole tensors below, at and above the band, where float partials would
  // underflow or overflow.
  check<true>(std::vector<float>(1000, 0x1.8p-70f), f32, "below the band");
  check<true>(std::vector<float>(1000, -0x1p-149f), f32, "subnormal");
  check<true>(std::vector<float>(1000, 0x1p-63f), f32, "at the band's low end");
  check<true>(std::vector<float>(1000, 0x1.fffffep59f), f32, "at the band's high end");
  check<true>(std::vector<float>(1000, 0x1p100f), f32, "above the band");
  check<true>(std::vector<float>(1000, 0x1.fffffep127f), f32, "float32 max");
  std::printf("worst relative error: sum %.3g, sumsq %.3g (bound 1e-6); %d failures\n", worst_sum,
              worst_sumsq, failures);
  return failures == 0 ? 0 : 1;
}
