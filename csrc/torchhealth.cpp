// Operator schemas, declared once; each backend registers its kernel in its own
// file under cpu/ and cuda/ (the Python module is python_call.cpp).
#include <torch/library.h>

TORCH_LIBRARY(torchhealth, m) {
  // Returns int64 [len(tensors), cols]: one row of statistics per tensor, laid
  // out as in csrc/stats.h (doubles stored by bit pattern).
  m.def("tensor_stats(Tensor[] tensors, bool histogram=True, float? saturation=None) -> Tensor");
  // Every health check of one step (torchhealth/checks.py, whose Python is the
  // reference); CPU only: see cpu/checks_cpu.cpp.
  m.def("run_checks(Tensor data, Tensor row_ints, Tensor row_floats, Tensor param_ints, float[] th, "
        "int[] ints, Tensor count, Tensor mean, Tensor var, Tensor dead, Tensor structural, "
        "Tensor peak, Tensor? total, Tensor? found_inf) -> Tensor[]");
}
