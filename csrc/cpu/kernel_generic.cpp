// The portable chunk kernel: simd_kernel.h compiled with GCC/Clang vector
// extensions and no ISA intrinsic, at the build's baseline ISA (SSE2 on x86-64,
// NEON on aarch64, VSX on ppc64le, ...). It is what cpu_kernels() picks where
// no x86 kernel applies, with the same exact columns as the others; its sums
// add in its own lane order (4 float32 lanes), within the documented bound.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "chunk_kernel.h"

#if defined(__GNUC__)  // GCC and Clang

// What compilers do not find from portable code: float -> double of a
// register half (they convert a 2-float vector lane by lane), a per-lane
// variable shift, which SSE2 lacks, and a test of all lanes at once; on
// aarch64 also fmin/fmax, bsl for the majority, ushl's own zero for shifts of
// 32 or more (the portable forms cost 18% more instructions in pass 1 and 2
// there) and fcvtl for float16 (then float8 is decoded through float16 as on
// AVX2), counted in benchmarks/RESULTS.md.
#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

// The vectors are wider than the baseline registers (two SSE2 or NEON
// registers each): GCC notes that passing them by value would differ from a
// build with wider registers. Every function taking one is internal to this
// file and inlined, so no such call crosses a boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace torchhealth {
namespace cpu {
namespace generic {

#if defined(__SSE2__)
constexpr bool kUnsignedMin = false;  // the SSE2 one_bit below relies on the sign-bit slot
#else
constexpr bool kUnsignedMin = true;  // NEON, VSX: a vector unsigned min
#endif
#if defined(__aarch64__)
constexpr bool kHalfInHardware = true;  // fcvtl
#else
constexpr bool kHalfInHardware = false;  // half_to_float below is integer arithmetic
#endif
constexpr int kLanes = 4;  // one 128-bit register (SSE2, NEON, VSX): wider GCC vectors than the ISA has are lowered lane by lane

#include "simd_kernel.h"

#if defined(__SSE2__)
// 2^k as a float, truncated to int32: 1 << k for 0 <= k <= 30, for k = 31 the
// overflow result 0x80000000, which is 1 << 31, and 0 for -32768 <= k < 0,
// whose biased exponent k + 127 is clamped at 0 by a 16-bit signed max (the
// high half of a negative lane is -1, of a nonnegative one 0), so that
// 2^k is below 1 or 0. With the sign-bit slot of one_hot (kUnsignedMin
// false), every lane one_hot keeps has such a k: in-window values 0..31,
// zeros and values below the window -240..-1; lanes with larger k (NaN, Inf)
// are masked off by the variants that can meet them.
inline vu one_bit(vu k) {
  const __m128i e = _mm_max_epi16((__m128i)(k + 127u), _mm_setzero_si128());
  return (vu)_mm_cvttps_epi32(_mm_castsi128_ps(_mm_slli_epi32(e, 23)));
}
// Zeros unpacked into the low halves: the shift comes free.
inline vf bf16_to_float(const uint16_t* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), h);
}
inline vd lo_double(vf x) { return (vd)_mm_cvtps_pd((__m128)x); }
inline vd hi_double(vf x) { return (vd)_mm_cvtps_pd(_mm_movehl_ps((__m128)x, (__m128)x)); }
#elif defined(__aarch64__)
// ushl shifts by the signed low byte of each lane and gives 0 from a left
// shift by 32 or more: k is clamped to 32 first (one umin where the portable
// form below takes a compare and two ands).
inline vu one_bit(vu k) {
  return (vu)vshlq_u32(vdupq_n_u32(1), vreinterpretq_s32_u32(vminq_u32((uint32x4_t)k, vdupq_n_u32(32))));
}
inline vf bf16_to_float(const uint16_t* p) { return (vf)vshll_n_u16(vld1_u16(p), 16); }
// fcvtl is exact whatever FPCR says: a conversion from half precision ignores
// FZ16 (the Arm ARM's FPUnpackCV), and every half, subnormals included, is a
// normal float, which FZ cannot flush.
inline vf half_to_float(vh h) { return (vf)vcvt_f32_f16((float16x4_t)h); }
inline vd lo_double(vf x) { return (vd)vcvt_f64_f32(vget_low_f32((float32x4_t)x)); }
inline vd hi_double(vf x) { return (vd)vcvt_high_f64_f32((float32x4_t)x); }
#else
typedef float vf_half __attribute__((vector_size(2 * kLanes)));  // kLanes / 2 floats
inline vf bf16_to_float(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline vu one_bit(vu k) { return (vu)(k < 32u) & (splat(1) << (k & 31u)); }
inline vd lo_double(vf x) {
  vf_half h;
  std::memcpy(&h, &x, sizeof h);
  return __builtin_convertvector(h, vd);
}
inline vd hi_double(vf x) {
  vf_half h;
  std::memcpy(&h, reinterpret_cast<const char*>(&x) + sizeof h, sizeof h);
  return __builtin_convertvector(h, vd);
}
#endif

#if !defined(__aarch64__)
// float16 bits to float32 by integer arithmetic: normals by moving the fields,
// subnormals as mantissa * 2^-24 (an exact int -> float conversion; no
// subnormal float is ever an operand).
inline vf half_to_float(vh h) {
  const vu w = __builtin_convertvector(h, vu);
  const vu sign = (w & 0x8000u) << 16;
  const vu em = w & 0x7fffu;
  const vf sub = __builtin_convertvector((vi)em, vf) * 5.9604644775390625e-08f;  // 2^-24
  vu r = (em << 13) + ((127u - 15u) << 23);
  r = em < 0x0400u ? (vu)sub : r;
  r = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : r;
  return (vf)(r | sign);
}
#endif

#if defined(__SSE2__)
inline bool any_lane(vu m) { return _mm_movemask_epi8((__m128i)m) != 0; }
#elif defined(__aarch64__)
inline bool any_lane(vu m) { return vmaxvq_u32((uint32x4_t)m) != 0; }
#else
inline bool any_lane(vu m) {
  uint32_t r = 0;
  for (int l = 0; l < kLanes; ++l) r |= m[l];
  return r != 0;
}
#endif


#if defined(__aarch64__)
inline vf fast_min(vf a, vf b) { return (vf)vminq_f32((float32x4_t)a, (float32x4_t)b); }
inline vf fast_max(vf a, vf b) { return (vf)vmaxq_f32((float32x4_t)a, (float32x4_t)b); }
#else
inline vf fast_min(vf a, vf b) { return a < b ? a : b; }  // minps on x86-64
inline vf fast_max(vf a, vf b) { return a > b ? a : b; }
#endif

// Rounded once where the compiler contracts it (aarch64, -ffp-contract=fast),
// else twice: the bound of add_sums holds either way.
inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }

inline uint32_t reduce_add(vu v) {
  uint32_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline vu count_zero(vu acc, vu a) { return acc - (vu)(a == 0u); }
inline vu count_lt(vu acc, vi a, vi lim) { return acc - (vu)(a < lim); }

#if defined(__aarch64__)
// c where a and b differ, else a: one bsl after the a ^ b that xor3 shares.
inline vu maj3(vu a, vu b, vu c) { return (vu)vbslq_u32((uint32x4_t)(a ^ b), (uint32x4_t)c, (uint32x4_t)a); }
#else
inline vu maj3(vu a, vu b, vu c) { return (a & b) | ((a ^ b) & c); }
#endif
inline vu xor3(vu a, vu b, vu c) { return a ^ b ^ c; }

}  // namespace generic

#pragma GCC diagnostic pop

Kernels generic_kernels() {
  return {"generic", &generic::chunk_f32, &generic::chunk_bf16, &generic::chunk_f16,
          &generic::chunk_f64, &generic::chunk_f8e4m3, &generic::chunk_f8e5m2};
}

}  // namespace cpu
}  // namespace torchhealth

#else  // a compiler without vector extensions: the scalar loop

namespace torchhealth {
namespace cpu {
Kernels generic_kernels() {
  Kernels k = scalar_kernels();
  k.name = "generic";
  return k;
}
}  // namespace cpu
}  // namespace torchhealth

#endif
