// The 256 float32 values of each float8 format, built once from stats.h's
// decoders. Kept apart from dispatch.cpp, which needs libtorch, so that
// tests/kernel_check.cpp builds the kernels without it.
#include <array>
#include <cstdint>

#include "chunk_kernel.h"

namespace torchhealth {
namespace cpu {
namespace {
template <float (*kDecode)(uint32_t)>
const float* float8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (uint32_t b = 0; b < 256; ++b) t[b] = kDecode(b);
    return t;
  }();
  return table.data();
}
}  // namespace

const float* float8_e4m3fn_table() { return float8_table<&float8_e4m3fn_to_float>(); }
const float* float8_e5m2_table() { return float8_table<&float8_e5m2_to_float>(); }

}  // namespace cpu
}  // namespace torchhealth
