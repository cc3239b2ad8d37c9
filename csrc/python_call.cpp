// The Python module torchhealth._C. Importing it loads this library, which
// registers the ops (torchhealth.cpp and the backends' files); it also holds
// _C.Batch, the batched reads of torchhealth.watch's hooks.
//
// Why in C++: the hooks run between the model's own operations, when the
// interpreter's and the CPU's caches are cold, about a hundred times a step.
// There every Python operation costs many times what it does in a loop, and the
// bookkeeping of a batch (its byte count, each distinct tensor once) and the
// generic path of torch.ops (matching every argument against the schema, boxed
// dispatch) were a measurable part of watch's cost (benchmarks/RESULTS.md,
// issue 9). Batch does the same work as torchhealth.activations.Batch, its
// Python reference (tests/test_watch_reads.py holds them to the same rows and
// reads), and reads through the op's own dispatcher entry, so every kernel,
// check and error is the op's.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "validation.h"

namespace py = pybind11;

namespace torchhealth {
namespace {

// What makes two held tensors the same elements (activations.py's _key): the
// address of their first element, dtype, shape, strides and device. A tensor
// without data of its own (a wrapper subclass) or that is not strided (sparse,
// which the read refuses, naming it) is keyed by its TensorImpl.
struct Key {
  const void* ptr;
  c10::ScalarType dtype;
  c10::Device device;
  std::vector<int64_t> sizes, strides;

  explicit Key(const at::Tensor& t)
      : ptr(address(t)),
        dtype(t.scalar_type()),
        device(t.device()),
        sizes(t.sizes().vec()),
        strides(t.layout() == c10::kStrided ? t.strides().vec() : std::vector<int64_t>()) {}

  bool operator==(const Key& o) const {
    return ptr == o.ptr && dtype == o.dtype && device == o.device && sizes == o.sizes && strides == o.strides;
  }

  static const void* address(const at::Tensor& t) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (t.layout() != c10::kStrided || !impl->has_storage() || impl->is_python_dispatch()) {
      return impl;
    }
    return t.const_data_ptr();
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<const void*>()(k.ptr);
    for (int64_t s : k.sizes) {
      h = h * 1000003u ^ static_cast<size_t>(s);
    }
    return h;
  }
};

// A tensor awaiting its batch's read. Both the Python object and the tensor are
// held until then, as the Python reference holds them.
struct Item {
  py::object name, kind, obj;
  at::Tensor tensor;
  bool bounded;  // a sigmoid/tanh output
};

// A tensor read in an earlier batch of the pass: its row, if it is still alive
// (a weak reference holds no memory), unchanged (its version) and the same
// elements (its key) when a tensor with its key arrives again. The reference is
// to the TensorImpl, which may outlive the Python object that the Python
// reference's weakref follows (autograd saves it): a repeat found here may be
// one that the Python batch reads again, with the same row.
struct Seen {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  int64_t row;
  bool bounded;
};

class Batch {
 public:
  Batch(bool histogram, int64_t budget_cpu, int64_t budget, py::object bounded_kinds, double saturation,
        py::object read)
      : histogram_(histogram),
        budget_cpu_(budget_cpu),
        budget_(budget),
        bounded_kinds_(std::move(bounded_kinds)),
        saturation_(saturation),
        read_(std::move(read)) {}

  void add(py::handle name, py::handle kind, py::handle obj) {
    if (!THPVariable_Check(obj.ptr())) {
      throw py::type_error("Batch.add: not a tensor");
    }
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    if (full_) {
      const Key key(t);
      bool repeat = false;
      for (const Item& held : items_) {
        if (held.obj.ptr() == obj.ptr() || Key(held.tensor) == key) {
          repeat = true;
          break;
        }
      }
      if (!repeat) {
        flush();
      }
    }
    const int contains = PySet_Contains(bounded_kinds_.ptr(), kind.ptr());
    if (contains < 0) {
      throw py::error_already_set();
    }
    items_.push_back({py::reinterpret_borrow<py::object>(name), py::reinterpret_borrow<py::object>(kind),
                      py::reinterpret_borrow<py::object>(obj), t, contains == 1});
    bytes_ += static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
    full_ = bytes_ >= (t.device().is_cpu() ? budget_cpu_ : budget_);
  }

  void flush() {
    std::vector<Item> items;
    items.swap(items_);
    bytes_ = 0;
    full_ = false;
    std::vector<const Item*> unique;
    std::vector<Key> keys;
    std::vector<char> bounded;
    std::unordered_map<Key, int64_t, KeyHash> slot;
    std::vector<int64_t> index;  // per row: its tensor's index in unique, or -1 - row for one read earlier
    for (const Item& it : items) {
      const at::Tensor& t = it.tensor;
      if (!is_supported_dtype(t.scalar_type())) {  // integers: no row
        continue;
      }
      Key key(t);
      int64_t i;
      auto in_batch = slot.find(key);
      if (in_batch != slot.end()) {
        i = in_batch->second;
      } else if (const Seen* seen = earlier(key, t, it.bounded)) {
        i = -1 - seen->row;
      } else {
        i = static_cast<int64_t>(unique.size());
        slot.emplace(key, i);
        unique.push_back(&it);
        keys.push_back(std::move(key));
        bounded.push_back(0);
      }
      if (i >= 0) {
        bounded[i] = bounded[i] || it.bounded;
      }
      index.push_back(i);
      names_.append(it.name);
      kinds_.append(it.kind);
      py::tuple shape(t.dim());
      for (int64_t d = 0; d < t.dim(); ++d) {
        shape[d] = py::int_(t.size(d));
      }
      shapes_.append(shape);
      dtypes_.append(py::handle(reinterpret_cast<PyObject*>(torch::getTHPDtype(t.scalar_type()))));
    }
    // Rows of sigmoid/tanh outputs come after the others: they are read in a call of their own.
    std::vector<int64_t> position(unique.size());
    std::vector<const Item*> plain, sat;
    for (size_t i = 0; i < unique.size(); ++i) {
      (bounded[i] ? sat : plain).push_back(unique[i]);
    }
    int64_t next_plain = read_rows_, next_sat = read_rows_ + static_cast<int64_t>(plain.size());
    for (size_t i = 0; i < unique.size(); ++i) {
      position[i] = bounded[i] ? next_sat++ : next_plain++;
      const at::Tensor& t = unique[i]->tensor;
      seen_.insert_or_assign(std::move(keys[i]), Seen{c10::weak_intrusive_ptr<c10::TensorImpl,
                                                          c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
                                                      t._version(), position[i], bounded[i] != 0});
    }
    for (int64_t i : index) {
      rows_.append(i >= 0 ? position[i] : -1 - i);
    }
    read_rows_ += static_cast<int64_t>(unique.size());
    if (!plain.empty()) {
      parts_.append(py::make_tuple(read(plain, histogram_, std::nullopt), false));
    }
    if (!sat.empty()) {
      parts_.append(py::make_tuple(read(sat, true, saturation_), true));
    }
  }

  // (names, kinds, shapes, dtypes, rows, parts) of every row so far, as
  // activations.Batch.result gives them.
  py::tuple result() const {
    return py::make_tuple(names_, kinds_, shapes_, dtypes_, rows_, parts_);
  }

  py::list calls() const {
    return calls_;
  }

 private:
  const Seen* earlier(const Key& key, const at::Tensor& t, bool bounded) const {
    auto found = seen_.find(key);
    if (found == seen_.end()) {
      return nullptr;
    }
    const Seen& seen = found->second;
    auto old = seen.impl.lock();
    if (!old || t._version() != seen.version || (bounded && !seen.bounded)) {
      return nullptr;
    }
    return Key(at::Tensor(std::move(old))) == key ? &seen : nullptr;
  }

  // The rows of `which`: through the op's dispatcher entry when every tensor is
  // a plain one, else (a tensor subclass such as a DTensor, or an input the op
  // refuses) through the Python reference's read, which takes subclasses and
  // names a refused tensor.
  py::object read(const std::vector<const Item*>& which, bool histogram, std::optional<double> saturation) {
    calls_.append(which.size());
    bool plain = true;
    std::vector<at::Tensor> tensors;
    tensors.reserve(which.size());
    for (const Item* it : which) {
      plain = plain && THPVariable_CheckExact(it->obj.ptr());
      tensors.push_back(it->tensor);
    }
    if (plain) {
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("torchhealth::tensor_stats", "")
              .typed<at::Tensor(at::TensorList, bool, std::optional<double>)>();
      std::optional<at::Tensor> rows;
      try {
        py::gil_scoped_release no_gil;
        rows = op.call(tensors, histogram, saturation);
      } catch (const c10::Error&) {
        rows.reset();  // the Python read raises it again, naming the tensor
      }
      if (rows && !rows->is_meta()) {
        return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(*rows)));
      }
    }
    py::list objs;
    for (const Item* it : which) {
      objs.append(it->obj);
    }
    return read_(objs, histogram, saturation ? py::cast(*saturation) : py::none());
  }

  const bool histogram_;
  const int64_t budget_cpu_, budget_;
  const py::object bounded_kinds_;
  const double saturation_;
  const py::object read_;
  std::vector<Item> items_;
  int64_t bytes_ = 0;
  bool full_ = false;
  py::list names_, kinds_, shapes_, dtypes_, rows_, parts_, calls_;
  int64_t read_rows_ = 0;
  std::unordered_map<Key, Seen, KeyHash> seen_;
};

}  // namespace
}  // namespace torchhealth

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  try {
    auto m = py::reinterpret_borrow<py::module_>(module);
    using torchhealth::Batch;
    py::class_<Batch>(m, "Batch", "The batched reads of a watched pass (csrc/python_call.cpp).")
        .def(py::init<bool, int64_t, int64_t, py::object, double, py::object>())
        .def("add", &Batch::add)
        .def("flush", &Batch::flush)
        .def("result", &Batch::result)
        .def_property_readonly("calls", &Batch::calls);
  } catch (py::error_already_set& e) {
    Py_DECREF(module);
    e.restore();
    return nullptr;
  }
  return module;
}
