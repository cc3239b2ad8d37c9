// The per-chunk kernels of the CPU backend: statistics of n contiguous values.
//
// Two implementations with one semantics (csrc/stats.h):
//  * chunk_stats<scalar_t>: one `update()` per element. It is the definition,
//    the path for float64 and for CPUs without AVX2, and the tail of the
//    vector kernels.
//  * the SIMD kernels (simd_kernel.h), compiled once per ISA (kernel_avx2.cpp,
//    kernel_avx512.cpp) and once for any ISA with portable vector extensions
//    (kernel_generic.cpp), and chosen at run time by cpu_kernels().
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include "../stats.h"

namespace torchhealth {
namespace cpu {

// Histogram counts of one chunk, with the range of bins touched so that the
// caller adds only those to the output row (many tiny tensors would otherwise
// pay for all kBins bins per chunk).
struct HistOut {
  int64_t* counts;  // kBins zero-initialised counters, or null: no histogram
  int lo = kBins;
  int hi = 0;  // touched bins are in [lo, hi)

  void add(int bin, int64_t n) {
    counts[bin] += n;
    lo = bin < lo ? bin : lo;
    hi = bin + 1 > hi ? bin + 1 : hi;
  }
};

// Accumulates p[0, n) into the returned Acc and, when hist->counts is not
// null, each finite nonzero value's bin into hist.
// float8 bits -> float32: tables of the 256 values (float8_to_float in
// stats.h), built once.
const float* float8_e4m3fn_table();
const float* float8_e5m2_table();

// A value of scalar_t in the type it is classified in, exactly.
template <typename scalar_t>
inline acc_type_t<scalar_t> to_acc(scalar_t x) {
  return static_cast<acc_type_t<scalar_t>>(x);
}
template <>
inline float to_acc(c10::Float8_e4m3fn x) { return float8_e4m3fn_table()[x.x]; }
template <>
inline float to_acc(c10::Float8_e5m2 x) { return float8_e5m2_table()[x.x]; }

template <typename scalar_t>
Acc chunk_stats(const scalar_t* p, int64_t n, const Limits<acc_type_t<scalar_t>>& lim,
                HistOut* hist) {
  using acc_t = acc_type_t<scalar_t>;
  Acc a = Acc::identity();
  for (int64_t i = 0; i < n; ++i) {
    const int bin = update<acc_t>(a, to_acc(p[i]), lim);
    if (hist->counts != nullptr && bin >= 0) {
      hist->add(bin, 1);
    }
  }
  return a;
}

// One chunk kernel per dtype, all with chunk_stats' contract.
struct Kernels {
  const char* name;  // "scalar", "generic", "avx2" or "avx512"
  Acc (*f32)(const float*, int64_t, const Limits<float>&, HistOut*);
  Acc (*bf16)(const c10::BFloat16*, int64_t, const Limits<float>&, HistOut*);
  Acc (*f16)(const c10::Half*, int64_t, const Limits<float>&, HistOut*);
  Acc (*f64)(const double*, int64_t, const Limits<double>&, HistOut*);
  Acc (*f8e4m3)(const c10::Float8_e4m3fn*, int64_t, const Limits<float>&, HistOut*);
  Acc (*f8e5m2)(const c10::Float8_e5m2*, int64_t, const Limits<float>&, HistOut*);
};

Kernels scalar_kernels();
Kernels generic_kernels();  // any ISA: GCC/Clang vector extensions, baseline flags
Kernels avx2_kernels();    // needs AVX2, FMA, F16C, BMI2 (x86-64-v3)
Kernels avx512_kernels();  // needs AVX-512 F/BW/DQ/VL (x86-64-v4)

// The kernels for this CPU: the widest x86 ISA it supports, else generic,
// unless TORCHHEALTH_CPU_KERNEL=scalar|generic|avx2|avx512 asks for one at the
// first call, or
// the private op torchhealth::_cpu_kernel switches later (for tests and
// before/after measurements; asking for an ISA the CPU lacks is an error).
const Kernels& cpu_kernels();

}  // namespace cpu
}  // namespace torchhealth
