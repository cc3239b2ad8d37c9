// The SIMD chunk kernel for x86-64-v4 (AVX-512 F/BW/DQ/VL/CD): 16 float32
// lanes, one 512-bit register per GCC vector. Chosen by cpu_kernels() (auto)
// only on CPUs with those features; tests/test_cpu_kernels.py runs it wherever
// the CPU has them and skips it elsewhere (benchmarks/RESULTS.md names the CPUs
// it was measured on).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "chunk_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__)  // GCC or Clang
// GCC 12 warns about the deliberately undefined source register of
// _mm512_sllv_epi32, _mm512_cvtph_ps and _mm512_reduce_add_epi32
// (_mm*_undefined_*); the warning is issued inside its header, so it is
// silenced before including it.
#pragma GCC diagnostic push
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

// Everything above is compiled for the baseline ISA; only what follows is v4.
// (Clang ignores GCC's target pragma; its own applies the same features.)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,sse4.2,avx512f,avx512bw,avx512dq,avx512vl,avx512cd"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#endif

namespace torchhealth {
namespace cpu {
namespace avx512 {

constexpr bool kUnsignedMin = true;
constexpr bool kHalfInHardware = true;  // vcvtph2ps
constexpr int kLanes = 16;

#include "simd_kernel.h"

inline vu one_bit(vu k) { return (vu)_mm512_sllv_epi32((__m512i)splat(1), (__m512i)k); }

inline vf half_to_float(vh h) { return (vf)_mm512_cvtph_ps((__m256i)h); }
inline vf bf16_to_float(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}

inline bool any_lane(vu m) { return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0; }

inline vd lo_double(vf x) { return (vd)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)x)); }
inline vd hi_double(vf x) {
  return (vd)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)x), 1)));
}


inline vf fast_min(vf a, vf b) { return a < b ? a : b; }  // vminps
inline vf fast_max(vf a, vf b) { return a > b ? a : b; }  // vmaxps
inline vf fmadd(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }

inline uint32_t reduce_add(vu v) {
  return static_cast<uint32_t>(_mm512_reduce_add_epi32((__m512i)v));
}

inline vu count_zero(vu acc, vu a) {
  return (vu)_mm512_mask_sub_epi32((__m512i)acc, _mm512_testn_epi32_mask((__m512i)a, (__m512i)a),
                                   (__m512i)acc, _mm512_set1_epi32(-1));
}
inline vu count_lt(vu acc, vi a, vi lim) {
  return (vu)_mm512_mask_sub_epi32((__m512i)acc, _mm512_cmplt_epi32_mask((__m512i)a, (__m512i)lim),
                                   (__m512i)acc, _mm512_set1_epi32(-1));
}

// Truth tables indexed by (a << 2) | (b << 1) | c.
inline vu maj3(vu a, vu b, vu c) {
  return (vu)_mm512_ternarylogic_epi32((__m512i)a, (__m512i)b, (__m512i)c, 0xe8);
}
inline vu xor3(vu a, vu b, vu c) {
  return (vu)_mm512_ternarylogic_epi32((__m512i)a, (__m512i)b, (__m512i)c, 0x96);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace torchhealth

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

namespace torchhealth {
namespace cpu {

Kernels avx512_kernels() {
  return {"avx512", &avx512::chunk_f32, &avx512::chunk_bf16, &avx512::chunk_f16,
          &avx512::chunk_f64, &avx512::chunk_f8e4m3, &avx512::chunk_f8e5m2};
}

}  // namespace cpu
}  // namespace torchhealth

#else  // not x86-64 or no GCC/Clang: cpu_kernels() never asks for these

namespace torchhealth {
namespace cpu {
Kernels avx512_kernels() { return scalar_kernels(); }
}  // namespace cpu
}  // namespace torchhealth

#endif
