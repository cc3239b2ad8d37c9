// IEEE subnormal arithmetic for the duration of a scope on this thread.
//
// torch.set_flush_denormal(True) (and other libraries) set the CPU's
// flush-to-zero and denormals-are-zero modes (x86 MXCSR FTZ/DAZ, Arm FPCR FZ),
// per thread. Under DAZ a subnormal input reads as zero to every floating-point
// instruction: compares, min/max, float->double conversion, adds. The kernels
// classify values by their bits, but min, max and the sums are arithmetic, so
// each worker runs its chunks with both modes off and restores them afterwards:
// results then never depend on the caller's (or the worker's) mode.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace torchhealth {
namespace cpu {

class IeeeSubnormals {
 public:
  IeeeSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    if (saved_ & kFlushBits) _mm_setcsr(saved_ & ~kFlushBits);
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    if (saved_ & kFlushBits) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ & ~kFlushBits));
#endif
  }
  ~IeeeSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    if (saved_ & kFlushBits) _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    if (saved_ & kFlushBits) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr uint64_t kFlushBits = (1u << 15) | (1u << 6);  // MXCSR FTZ | DAZ
#elif defined(__aarch64__)
  static constexpr uint64_t kFlushBits = (uint64_t{1} << 24) | (uint64_t{1} << 19);  // FZ | FZ16
#else
  static constexpr uint64_t kFlushBits = 0;  // other ISAs: the mode is left as it is
#endif
  uint64_t saved_ = 0;
};

}  // namespace cpu
}  // namespace torchhealth
