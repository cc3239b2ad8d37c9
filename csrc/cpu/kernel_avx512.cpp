// The SIMD chunk kernel for x86-64-v4 (AVX-512 F/BW/DQ/VL/CD): 16 float32
// lanes, one 512-bit register per GCC vector. Chosen by cpu_kernels() (auto)
// only when __builtin_cpu_supports("x86-64-v4"); tests/test_cpu_kernels.py
// runs it wherever the CPU has it and skips it elsewhere. Compiled and run
// (tests and benchmark) on an AMD EPYC Zen 4 KVM guest (family 25, model 17),
// not yet run on an Intel AVX-512 CPU.
#include <cstdint>
#include <cstring>
#include <limits>

#include "chunk_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns about the deliberately undefined source register of
// _mm512_sllv_epi32, _mm512_cvtph_ps and _mm512_reduce_add_epi32
// (_mm*_undefined_*); the warning is issued inside its header, so it is
// silenced before including it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

// Everything above is compiled for the baseline ISA; only what follows is v4.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

namespace torchhealth {
namespace cpu {
namespace avx512 {

constexpr int kLanes = 16;

#include "simd_kernel.h"

inline vu sllv(vu a, vu k) { return (vu)_mm512_sllv_epi32((__m512i)a, (__m512i)k); }

inline vf half_to_float(vh h) { return (vf)_mm512_cvtph_ps((__m256i)h); }

inline bool any_lane(vu m) { return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0; }

inline vd lo_double(vf x) { return (vd)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)x)); }
inline vd hi_double(vf x) {
  return (vd)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)x), 1)));
}

inline vd lo_double_at(const float* p) { return (vd)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
inline vd hi_double_at(const float* p) { return (vd)_mm512_cvtps_pd(_mm256_loadu_ps(p + 8)); }

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

#pragma GCC pop_options
#pragma GCC diagnostic pop

namespace torchhealth {
namespace cpu {

Kernels avx512_kernels() {
  return {"avx512", &avx512::chunk_f32, &avx512::chunk_bf16, &avx512::chunk_f16,
          &avx512::chunk_f64, &avx512::chunk_f8e4m3, &avx512::chunk_f8e5m2};
}

}  // namespace cpu
}  // namespace torchhealth

#else  // not GCC on x86-64: cpu_kernels() never asks for these

namespace torchhealth {
namespace cpu {
Kernels avx512_kernels() { return scalar_kernels(); }
}  // namespace cpu
}  // namespace torchhealth

#endif
