// The arithmetic of torchhealth, written once and compiled for both the CPU
// and CUDA kernels: the output layout, per-element classification, the
// accumulator's update and merge, and the histogram bin function.
//
// Semantics (mirrored exactly by torchhealth/reference.py):
//  * nan, posinf, neginf count non-finite values; every other statistic is
//    over the finite values only.
//  * zero counts +0 and -0. subnormal counts nonzero values whose magnitude is
//    below the smallest normal of the tensor's own dtype.
//  * saturated counts finite values with |x| >= the tensor's threshold.
//  * min/max/absmax are exact; a zero of either sign is reported as +0.0. A
//    tensor with no finite value has min=+inf, max=-inf, absmax=0 (the
//    identities of the merge, so rows combine exactly across calls).
//  * sum and sumsq are accumulated in double.
//  * The histogram counts finite nonzero values by sign and binary exponent e
//    (2^e <= |x| < 2^(e+1)) on one grid for every dtype: per sign, slot 0 holds
//    |x| < 2^kExpMin, slots 1..kExpMax-kExpMin+1 hold e = kExpMin..kExpMax and
//    the last slot holds |x| >= 2^(kExpMax+1) (only float64 reaches the two
//    end slots). Negative values come first, then positive, each in
//    ascending exponent order.
//  * A tensor written by another thread (or stream) while it is read gives
//    undefined statistics. Each row still classifies every element it read
//    exactly once: nan + posinf + neginf + zero + the histogram's total is
//    numel (the CPU kernels re-read a block only from a private copy, or
//    derive one count from the same read as the other).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace torchhealth {

// ---- Output layout: one int64 row per tensor ------------------------------
// Columns [0, kNumCounts) are counts, [kMin, kCols) are doubles stored by bit
// pattern, then kBins histogram columns when the histogram is requested.
enum Column : int {
  kNumel = 0,
  kNan,
  kPosInf,
  kNegInf,
  kZero,
  kSubnormal,
  kSaturated,
  kNumCounts,
  kMin = kNumCounts,
  kMax,
  kAbsMax,
  kSum,
  kSumSq,
  kCols,
};
constexpr int kNumValues = kCols - kMin;

constexpr int kExpMin = -149;  // float32's smallest subnormal, 2^-149
constexpr int kExpMax = 127;   // float32's largest finite exponent
constexpr int kBinsPerSign = kExpMax - kExpMin + 3;  // + underflow + overflow
constexpr int kBins = 2 * kBinsPerSign;

// ---- Bit casts usable on host and device ----------------------------------
C10_HOST_DEVICE inline uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

C10_HOST_DEVICE inline uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

C10_HOST_DEVICE inline float float_of(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

C10_HOST_DEVICE inline double double_of(int64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(b);
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

C10_HOST_DEVICE inline int64_t int_of(double x) {
  return static_cast<int64_t>(bits_of(x));
}

C10_HOST_DEVICE inline int clz32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __clz(static_cast<int>(v));
#else
  return __builtin_clz(v);
#endif
}

// ---- Histogram bin of a finite nonzero value ------------------------------
// Both overloads give the same bin for the same value; the float one needs no
// conversion, which is what the vectorised CPU path and CUDA use for the
// 16- and 32-bit dtypes.
C10_HOST_DEVICE inline int hist_bin(double x) {
  const uint64_t b = bits_of(x);
  const int biased = static_cast<int>((b >> 52) & 0x7ff);
  int e = biased - 1023;  // float64 subnormals land far below kExpMin anyway
  e = e < kExpMin - 1 ? kExpMin - 1 : (e > kExpMax + 1 ? kExpMax + 1 : e);
  return ((b >> 63) ? 0 : kBinsPerSign) + (e - (kExpMin - 1));
}

C10_HOST_DEVICE inline int hist_bin(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t biased = (b >> 23) & 0xff;
  // Normal: e = biased - 127, slot = e - (kExpMin - 1) = biased + 23.
  // Subnormal m * 2^-149: e = floor(log2 m) - 149, slot = 32 - clz(m).
  const int slot = biased != 0 ? static_cast<int>(biased) + 23
                               : 32 - clz32(b & 0x7fffff);
  return ((b >> 31) ? 0 : kBinsPerSign) + slot;
}

// ---- float8 -> float32 --------------------------------------------------------
// A float8 value with kE exponent bits and kM mantissa bits (bias 2^(kE-1) - 1)
// as the float32 of the same value, exactly. kIeee: the largest exponent holds
// Inf and NaN (float8_e5m2); otherwise only all-ones is NaN and there is no Inf
// (float8_e4m3fn, whose largest finite value is 448). A subnormal is converted
// as integer mantissa times a power of two, both normal floats, so no
// flush-to-zero mode changes it.
template <int kE, int kM, bool kIeee>
C10_HOST_DEVICE inline float float8_to_float(uint32_t b) {
  constexpr uint32_t kTop = (1u << kE) - 1;
  constexpr uint32_t kManMask = (1u << kM) - 1;
  constexpr int kBias = (1 << (kE - 1)) - 1;
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t e = (b >> kM) & kTop;
  const uint32_t m = b & kManMask;
  if (e == kTop && (kIeee || m == kManMask)) {
    return float_of(sign | (kIeee && m == 0 ? 0x7f800000u : 0x7fc00000u));
  }
  if (e == 0) {
    // 2^(1 - kBias - kM): 2^-9 for e4m3fn, 2^-16 for e5m2.
    const float scale = float_of(static_cast<uint32_t>(127 + 1 - kBias - kM) << 23);
    return float_of(sign | bits_of(static_cast<float>(m) * scale));
  }
  return float_of(sign | ((e - kBias + 127) << 23) | (m << (23 - kM)));
}
C10_HOST_DEVICE inline float float8_e4m3fn_to_float(uint32_t b) { return float8_to_float<4, 3, false>(b); }
C10_HOST_DEVICE inline float float8_e5m2_to_float(uint32_t b) { return float8_to_float<5, 2, true>(b); }

// ---- Per-dtype limits -----------------------------------------------------
// acc_t is the type a value is classified in: float for the 8-, 16- and
// 32-bit dtypes (every such value is exact in float), double for float64.
template <typename scalar_t>
using acc_type_t =
    std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename acc_t>
struct Limits {
  acc_t min_normal;  // smallest positive normal of the tensor's dtype
  acc_t saturation;  // |x| >= saturation counts as saturated
};

// The smallest acc_t that is >= t, so that comparing in acc_t gives exactly
// the answer of comparing in double.
template <typename acc_t>
inline acc_t round_up_to(double t) {
  acc_t r = static_cast<acc_t>(t);
  if (static_cast<double>(r) < t) {
    r = std::nextafter(r, std::numeric_limits<acc_t>::infinity());
  }
  return r;
}

// ---- The accumulator ------------------------------------------------------
struct Acc {
  int64_t nan, posinf, neginf, zero, subnormal, saturated;
  double min, max, absmax, sum, sumsq;

  C10_HOST_DEVICE static Acc identity() {
    Acc a;
    a.nan = a.posinf = a.neginf = a.zero = a.subnormal = a.saturated = 0;
    a.min = std::numeric_limits<double>::infinity();
    a.max = -std::numeric_limits<double>::infinity();
    a.absmax = 0.0;
    a.sum = 0.0;
    a.sumsq = 0.0;
    return a;
  }

  C10_HOST_DEVICE void merge(const Acc& o) {
    nan += o.nan;
    posinf += o.posinf;
    neginf += o.neginf;
    zero += o.zero;
    subnormal += o.subnormal;
    saturated += o.saturated;
    min = o.min < min ? o.min : min;
    max = o.max > max ? o.max : max;
    absmax = o.absmax > absmax ? o.absmax : absmax;
    sum += o.sum;
    sumsq += o.sumsq;
  }

  // Writes the non-histogram columns of one output row.
  C10_HOST_DEVICE void store(int64_t* row, int64_t numel) const {
    row[kNumel] = numel;
    row[kNan] = nan;
    row[kPosInf] = posinf;
    row[kNegInf] = neginf;
    row[kZero] = zero;
    row[kSubnormal] = subnormal;
    row[kSaturated] = saturated;
    row[kMin] = int_of(min);
    row[kMax] = int_of(max);
    row[kAbsMax] = int_of(absmax);
    row[kSum] = int_of(sum);
    row[kSumSq] = int_of(sumsq);
  }
};

// The bit layout of the type a value is classified in.
template <typename acc_t>
struct FloatBits;
template <>
struct FloatBits<float> {
  static constexpr uint32_t kAbs = 0x7fffffffu;
  static constexpr uint32_t kInf = 0x7f800000u;
  static constexpr uint32_t kMinNormal = 0x00800000u;
};
template <>
struct FloatBits<double> {
  static constexpr uint64_t kAbs = 0x7fffffffffffffffull;
  static constexpr uint64_t kInf = 0x7ff0000000000000ull;
  static constexpr uint64_t kMinNormal = 0x0010000000000000ull;
};

// x as a double, exactly, whatever the CPU's denormals-are-zero mode: a float
// subnormal m * 2^-149 is converted from its integer mantissa (a normal double
// times a normal double), not by a conversion instruction that DAZ would read
// as zero.
C10_HOST_DEVICE inline double exact_double(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t a = b & FloatBits<float>::kAbs;
  if (a >= FloatBits<float>::kMinNormal) return static_cast<double>(x);
  const double m = static_cast<double>(static_cast<int32_t>(a)) * 1.4012984643248171e-45;  // 2^-149
  return (b >> 31) ? -m : m;
}
C10_HOST_DEVICE inline double exact_double(double x) { return x; }

// Classifies one value. Returns the histogram bin, or -1 when the value has
// none (non-finite or zero). Every class is decided on the value's bits (for
// non-negative floats the bit patterns order like the values), so no
// flush-to-zero mode can turn a subnormal into a zero.
template <typename acc_t>
C10_HOST_DEVICE inline int update(Acc& a, acc_t x, const Limits<acc_t>& lim) {
  using B = FloatBits<acc_t>;
  const auto b = bits_of(x);
  const auto ab = b & B::kAbs;
  if (ab > B::kInf) {
    a.nan++;
    return -1;
  }
  const bool negative = ab != b;
  if (ab == B::kInf) {
    if (negative) {
      a.neginf++;
    } else {
      a.posinf++;
    }
    return -1;
  }
  const double d = ab == 0 ? 0.0 : exact_double(x);  // -0 -> +0
  a.min = d < a.min ? d : a.min;
  a.max = d > a.max ? d : a.max;
  const double ad = negative ? -d : d;
  a.absmax = ad > a.absmax ? ad : a.absmax;
  a.sum += d;
  a.sumsq += d * d;
  a.saturated += ab >= bits_of(lim.saturation);
  if (ab == 0) {
    a.zero++;
    return -1;
  }
  a.subnormal += ab < bits_of(lim.min_normal);
  return hist_bin(x);
}

}  // namespace torchhealth
