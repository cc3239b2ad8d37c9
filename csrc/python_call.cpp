// The Python module torchhealth._C. Importing it loads this library, which
// registers the ops (torchhealth.cpp and the backends' files); it also holds
// one function, a direct call of the tensor_stats op for torchhealth.watch's
// hooks.
//
// Why a second entry point beside torch.ops: the hooks read activations many
// times a step, each read between the model's own operations, when the
// interpreter's and the CPU's caches are cold. There, the generic path of
// torch.ops (OpOverload.__call__, then matching every argument against the
// schema) costs several times the op's own work on a small batch
// (benchmarks/RESULTS.md, issue 9). This function takes only the arguments
// the hooks pass and calls the same op through the dispatcher, so every
// kernel, check and error is the op's.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

namespace torchhealth {
namespace {

// _tensor_stats(tensors: list, histogram: bool, saturation: float | None)
//   -> Tensor | None
// The rows of torch.ops.torchhealth.tensor_stats(tensors, histogram,
// saturation), or None, without calling the op, for any argument the caller
// must take through torch.ops instead: a list that is empty or holds anything
// but plain tensors (a tensor subclass such as a DTensor or a FakeTensor), or
// arguments of other types. The op's own errors (a dtype or device it does
// not read, a layout with no kernel) are raised as the op raises them.
PyObject* tensor_stats_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !PyList_Check(args[0]) || !PyBool_Check(args[1]) ||
      !(args[2] == Py_None || PyFloat_CheckExact(args[2]))) {
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  if (n == 0) {
    Py_RETURN_NONE;
  }
  std::vector<at::Tensor> tensors;
  tensors.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(args[0], i);
    if (!THPVariable_CheckExact(item)) {
      Py_RETURN_NONE;
    }
    tensors.push_back(THPVariable_Unpack(item));
  }
  const bool histogram = args[1] == Py_True;
  std::optional<double> saturation;
  if (args[2] != Py_None) {
    saturation = PyFloat_AS_DOUBLE(args[2]);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchhealth::tensor_stats", "")
          .typed<at::Tensor(at::TensorList, bool, std::optional<double>)>();
  at::Tensor rows;
  {
    pybind11::gil_scoped_release no_gil;
    rows = op.call(tensors, histogram, saturation);
  }
  return THPVariable_Wrap(std::move(rows));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_tensor_stats", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&tensor_stats_call)),
     METH_FASTCALL, "The tensor_stats op for plain tensors, or None (csrc/python_call.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace torchhealth

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, torchhealth::methods, nullptr, nullptr, nullptr, nullptr,
  };
  return PyModule_Create(&module_def);
}
