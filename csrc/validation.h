// Input validation, per-tensor limits and input layout shared by the CPU and
// CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <optional>
#include <string>

#include "stats.h"

namespace torchhealth {

// Elements per unit of work; also where parallel partial results meet, which
// the tests use to place special values at chunk edges.
constexpr int64_t kChunk = int64_t{1} << 16;

inline bool is_supported_dtype(at::ScalarType dt) {
  return dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat ||
      dt == at::kDouble || dt == at::kFloat8_e4m3fn || dt == at::kFloat8_e5m2;
}

// The op's own checks, for every caller (the Python API, torch.ops, C++). The
// pure-PyTorch reference makes the same checks with the same words
// (reference.check_op_inputs; tests/test_stats.py compares the two). What
// never reaches a kernel (non-tensors, sparse or quantized layouts, the meta
// device) is named by the Python API: non-tensors before dispatch, the rest
// once the dispatcher refuses them or the fake kernel answers.

// The dtype as Python spells it, so that messages read the same from both sides.
inline std::string dtype_name(at::ScalarType dt) {
  switch (dt) {
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // e.g. UInt16 -> torch.uint16, Float8_e4m3fnuz -> torch.float8_e4m3fnuz
      std::string name = c10::toString(dt);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

// Every tensor must have a supported dtype and sit on `device_type`, all on one
// device.
inline void check_inputs(at::TensorList tensors, c10::DeviceType device_type) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "tensor_stats: tensors[", i, "] is undefined");
    TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "tensor_stats: tensors[", i,
        "] has dtype ", dtype_name(t.scalar_type()),
        "; torchhealth reads float8_e4m3fn, float8_e5m2, float16, bfloat16, float32 and float64");
    TORCH_CHECK_VALUE(t.device().type() == device_type && t.device() == tensors[0].device(),
        "tensor_stats: tensors[", i, "] is on ", t.device(), " but tensors[0] is on ",
        tensors[0].device(), "; call tensor_stats once per device");
  }
}

inline void check_saturation(std::optional<double> saturation) {
  TORCH_CHECK_VALUE(!saturation.has_value() || *saturation > 0,
      "tensor_stats: saturation must be a positive magnitude, got ",
      saturation.value_or(0.0));
}

// Default saturation threshold: half the dtype's largest finite value, i.e.
// within a factor of 2 of overflow (32752 for float16, 224 for float8_e4m3fn).
inline double default_saturation(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat8_e4m3fn: return 448.0 / 2;
    case at::kFloat8_e5m2: return 57344.0 / 2;
    case at::kHalf: return 65504.0 / 2;
    case at::kBFloat16: return 3.3895313892515355e38 / 2;
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::max()) / 2;
    default: return std::numeric_limits<double>::max() / 2;
  }
}

inline double smallest_normal(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat8_e4m3fn: return 0.015625;  // 2^-6
    case at::kFloat8_e5m2:
    case at::kHalf: return 6.103515625e-05;  // 2^-14
    case at::kBFloat16:
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::min());
    default: return std::numeric_limits<double>::min();
  }
}

template <typename acc_t>
inline Limits<acc_t> limits_for(at::ScalarType dt, std::optional<double> saturation) {
  Limits<acc_t> lim;
  lim.min_normal = static_cast<acc_t>(smallest_normal(dt));
  lim.saturation = round_up_to<acc_t>(saturation.value_or(default_saturation(dt)));
  return lim;
}

inline int64_t output_columns(bool histogram) {
  return kCols + (histogram ? kBins : 0);
}

// A non-overlapping and dense tensor (contiguous, transposed, permuted) holds
// its numel elements in one span starting at data_ptr(): statistics do not
// depend on order, so it is read in memory order without a copy. Anything else
// (e.g. a strided slice) is made contiguous first.
inline bool reads_in_place(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense();
}

inline at::Tensor dense_span(const at::Tensor& t) {
  return reads_in_place(t) ? t : t.contiguous();
}

}  // namespace torchhealth
