// The CUDA kernel's per-thread accumulator: what one thread keeps while it
// reads its share of a segment, turned into a stats.h Acc once, before the
// block reduction. Host and device code, so it can be checked on the CPU
// (tests/test_thread_acc.py); on a GPU it has been compiled, never run.
//
// Classification is update()'s (stats.h), decided on the same bits, so counts,
// extremes and histogram bins are the same as every other kernel's. What
// differs is where the work is done: for the dtypes classified in float
// (float8, float16, bfloat16, float32) the extremes are kept in float (exact:
// every such value is a float) and the sums in short float partials, so a
// value costs no float64 instruction. Each conversion to float64 costs as much
// as several float instructions on most GPUs, and two of them per value would
// cap the 16-bit dtypes below the memory bandwidth. float64 tensors use
// update() itself.
//
// The bound |sum - exact| <= 1e-6 * sum|x| (torchhealth/stats.py SUM_RTOL),
// and the same for sumsq with x^2:
//  * A float partial adds at most kFlushEvery = 16 values in sequence, each
//    add (and each square, fused into the add by fmaf) rounding once with unit
//    roundoff u = 2^-24, so it is within gamma_16 = 16u / (1 - 16u) < 9.54e-7
//    of the exact sum of its values' magnitudes (Higham, Accuracy and
//    Stability of Numerical Algorithms, 2nd ed., section 4.2), provided no
//    step overflows or underflows. Values with |x| in [2^-63, 2^60) (and
//    zeros) guarantee that: squares stay at or above 2^-126, the smallest
//    normal float, and 16 of them stay below 2^124. Every value of float16
//    and of both float8 formats is in that band; float32 and bfloat16 values
//    outside it are added to the float64 sums one by one, as update() does.
//  * Partials are flushed into float64 sums exactly (a float converts exactly).
//    From there a value's path crosses fewer than 2^20 float64 additions (at
//    most 2^19 flushes per thread: 2^31 elements per block, kMaxUnitsPerBlock
//    in plan.h; then the fixed trees of the block and the finishing pass), so
//    they add less than 2^20 * 2^-53 < 1.2e-10 relative: 9.54e-7 + 1.2e-10 <
//    1e-6.
// Counts are int32: a thread reads at most 2^31 / kThreads = 2^23 elements of
// one segment.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../stats.h"

namespace torchhealth {
namespace cuda {

// Values per float partial sum (see the bound above).
constexpr int kFlushEvery = 16;
// |x| bits of 2^-63 and 2^60: the band where float partials are exact enough.
constexpr uint32_t kBandLo = 0x20000000u;
constexpr uint32_t kBandHi = 0x5d800000u;

template <typename acc_t>
struct ThreadAcc;

template <>
struct ThreadAcc<float> {
  int32_t nan, posinf, neginf, zero, subnormal, saturated;
  float min, max;    // of the finite values, -0 as +0
  float psum, psq;   // this partial's sums (at most kFlushEvery values)
  double sum, sumsq;  // flushed partials and out-of-band values

  C10_HOST_DEVICE static ThreadAcc identity() {
    ThreadAcc a;
    a.nan = a.posinf = a.neginf = a.zero = a.subnormal = a.saturated = 0;
    a.min = std::numeric_limits<float>::infinity();
    a.max = -std::numeric_limits<float>::infinity();
    a.psum = a.psq = 0.0f;
    a.sum = a.sumsq = 0.0;
    return a;
  }

  // update() of stats.h for one value; the caller flushes at least every
  // kFlushEvery calls. kWide: the dtype has float32's exponent range
  // (float32, bfloat16), so values can fall outside the band.
  template <bool kWide>
  C10_HOST_DEVICE int update(float x, const Limits<float>& lim) {
    using B = FloatBits<float>;
    const uint32_t b = bits_of(x);
    const uint32_t ab = b & B::kAbs;
    if (ab >= B::kInf) {
      if (ab > B::kInf) {
        nan++;
      } else if (ab != b) {
        neginf++;
      } else {
        posinf++;
      }
      return -1;
    }
    const float v = x + 0.0f;  // -0 -> +0, every other value unchanged
    min = v < min ? v : min;
    max = v > max ? v : max;
    if (!kWide || (ab >= kBandLo && ab < kBandHi)) {
      psum += v;
      psq = fmaf(v, v, psq);
    } else if (ab != 0) {
      const double d = exact_double(x);
      sum += d;
      sumsq += d * d;
    }
    saturated += ab >= bits_of(lim.saturation);
    if (ab == 0) {
      zero++;
      return -1;
    }
    subnormal += ab < bits_of(lim.min_normal);
    return hist_bin(x);
  }

  C10_HOST_DEVICE void flush() {
    sum += static_cast<double>(psum);
    sumsq += static_cast<double>(psq);
    psum = psq = 0.0f;
  }

  // The Acc update() would have built from the same values.
  C10_HOST_DEVICE Acc to_acc() {
    flush();
    Acc a;
    a.nan = nan;
    a.posinf = posinf;
    a.neginf = neginf;
    a.zero = zero;
    a.subnormal = subnormal;
    a.saturated = saturated;
    a.min = exact_double(min);  // +inf with no finite value
    a.max = exact_double(max);  // -inf with no finite value
    // The largest |x| is -min or max; with no finite value both are -inf and
    // absmax is update()'s identity, 0.
    const double m = -a.min > a.max ? -a.min : a.max;
    a.absmax = m > 0.0 ? m : 0.0;
    a.sum = sum;
    a.sumsq = sumsq;
    return a;
  }
};

template <>
struct ThreadAcc<double> {
  Acc acc;

  C10_HOST_DEVICE static ThreadAcc identity() { return ThreadAcc{Acc::identity()}; }
  template <bool kWide>
  C10_HOST_DEVICE int update(double x, const Limits<double>& lim) {
    return torchhealth::update<double>(acc, x, lim);
  }
  C10_HOST_DEVICE void flush() {}
  C10_HOST_DEVICE Acc to_acc() { return acc; }
};

}  // namespace cuda
}  // namespace torchhealth
