// The SIMD chunk kernel for x86-64-v3 (AVX2, FMA, F16C, BMI2): 8 float32
// lanes, one 256-bit register per GCC vector.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "chunk_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__)  // GCC or Clang
#include <immintrin.h>

// Everything above is compiled for the baseline ISA; only what follows is v3.
// (Clang ignores GCC's target pragma; its own applies the same features.)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,sse4.2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#endif

namespace torchhealth {
namespace cpu {
namespace avx2 {

constexpr bool kUnsignedMin = true;
constexpr bool kHalfInHardware = true;  // vcvtph2ps
constexpr int kLanes = 8;

#include "simd_kernel.h"

inline vu one_bit(vu k) { return (vu)_mm256_sllv_epi32((__m256i)splat(1), (__m256i)k); }

inline vf half_to_float(vh h) { return (vf)_mm256_cvtph_ps((__m128i)h); }
inline vf bf16_to_float(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
}

inline bool any_lane(vu m) { return !_mm256_testz_si256((__m256i)m, (__m256i)m); }

inline vd lo_double(vf x) { return (vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)x)); }
inline vd hi_double(vf x) { return (vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)x, 1)); }


inline vf fast_min(vf a, vf b) { return a < b ? a : b; }  // vminps
inline vf fast_max(vf a, vf b) { return a > b ? a : b; }  // vmaxps
inline vf fmadd(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }

inline uint32_t reduce_add(vu v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128((__m256i)v),
                            _mm256_extracti128_si256((__m256i)v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

inline vu count_zero(vu acc, vu a) { return acc - (vu)(a == 0); }
inline vu count_lt(vu acc, vi a, vi lim) { return acc - (vu)(a < lim); }

inline vu maj3(vu a, vu b, vu c) { return (a & b) | ((a ^ b) & c); }
inline vu xor3(vu a, vu b, vu c) { return a ^ b ^ c; }

}  // namespace avx2
}  // namespace cpu
}  // namespace torchhealth

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace torchhealth {
namespace cpu {

Kernels avx2_kernels() {
  return {"avx2", &avx2::chunk_f32, &avx2::chunk_bf16, &avx2::chunk_f16, &avx2::chunk_f64,
          &avx2::chunk_f8e4m3, &avx2::chunk_f8e5m2};
}

}  // namespace cpu
}  // namespace torchhealth

#else  // not x86-64 or no GCC/Clang: cpu_kernels() never asks for these

namespace torchhealth {
namespace cpu {
Kernels avx2_kernels() { return scalar_kernels(); }
}  // namespace cpu
}  // namespace torchhealth

#endif
