// CPU kernel of torchhealth::tensor_stats: every tensor is cut into chunks of
// kChunk elements, the chunks run in parallel, and the per-chunk partial
// results are merged in chunk order so that sums are deterministic (for a given
// kernel: the scalar and SIMD kernels add in different orders). The per-chunk
// work is done by the kernels cpu_kernels() picks for this CPU (chunk_kernel.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../validation.h"
#include "chunk_kernel.h"
#include "float_env.h"
#include "output_alloc.h"

namespace torchhealth {
namespace {

struct Chunk {
  const void* data;  // the chunk's first element
  int64_t tensor;
  int64_t n;
  at::ScalarType dtype;
};

// Each dtype's limits, made once per call rather than once per chunk.
struct LimitsByDtype {
  Limits<double> f64;
  Limits<float> f32, bf16, f16, f8e4m3, f8e5m2;

  explicit LimitsByDtype(std::optional<double> saturation)
      : f64(limits_for<double>(at::kDouble, saturation)),
        f32(limits_for<float>(at::kFloat, saturation)),
        bf16(limits_for<float>(at::kBFloat16, saturation)),
        f16(limits_for<float>(at::kHalf, saturation)),
        f8e4m3(limits_for<float>(at::kFloat8_e4m3fn, saturation)),
        f8e5m2(limits_for<float>(at::kFloat8_e5m2, saturation)) {}
};

template <typename scalar_t>
const scalar_t* as(const void* p) {
  return static_cast<const scalar_t*>(p);
}

at::Tensor tensor_stats_cpu(at::TensorList tensors, bool histogram,
                            std::optional<double> saturation) {
  check_inputs(tensors, c10::DeviceType::CPU);
  // This thread merges the chunks' results (min, max, sums of subnormals too);
  // pool threads set their own mode in the loop below.
  const cpu::IeeeSubnormals ieee;
  check_saturation(saturation);
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  at::Tensor out = cpu::zeros_int64(num_tensors, output_columns(histogram));
  int64_t* out_data = out.data_ptr<int64_t>();
  const int64_t stride = out.stride(0);

  // Chunks point into the inputs themselves, or into `copies` for the few
  // inputs that cannot be read in place: holding a reference to every input
  // would cost each of many tiny tensors a reference count round trip.
  std::vector<at::Tensor> copies;
  std::vector<Chunk> chunks;
  chunks.reserve(num_tensors);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const at::Tensor& input = tensors[t];
    const int64_t n = input.numel();
    if (n == 0) {
      continue;
    }
    const bool in_place = reads_in_place(input);
    if (!in_place) {
      copies.push_back(dense_span(input));
    }
    const at::Tensor& span = in_place ? input : copies.back();
    const char* data = static_cast<const char*>(span.const_data_ptr());
    const int64_t itemsize = static_cast<int64_t>(span.element_size());
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back({data + b * itemsize, t, std::min(n - b, kChunk), span.scalar_type()});
    }
  }

  const cpu::Kernels& kernels = cpu::cpu_kernels();
  const LimitsByDtype lims(saturation);
  std::vector<Acc> partial(chunks.size());
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // Less than one chunk's worth in all (e.g. many one-element tensors) runs on
  // this thread: waking the pool would cost more than the work.
  const int64_t grain = total < kChunk ? std::max<int64_t>(num_chunks, 1) : 1;
  at::parallel_for(0, num_chunks, grain, [&](int64_t lo, int64_t hi) {
    const cpu::IeeeSubnormals ieee_worker;
    std::vector<int64_t> local(histogram ? kBins : 0, 0);
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t n = ch.n;
      cpu::HistOut hist{histogram ? local.data() : nullptr};
      switch (ch.dtype) {
        case at::kDouble:
          partial[c] = kernels.f64(as<double>(ch.data), n, lims.f64, &hist);
          break;
        case at::kFloat:
          partial[c] = kernels.f32(as<float>(ch.data), n, lims.f32, &hist);
          break;
        case at::kBFloat16:
          partial[c] = kernels.bf16(as<c10::BFloat16>(ch.data), n, lims.bf16, &hist);
          break;
        case at::kHalf:
          partial[c] = kernels.f16(as<c10::Half>(ch.data), n, lims.f16, &hist);
          break;
        case at::kFloat8_e4m3fn:
          partial[c] = kernels.f8e4m3(as<c10::Float8_e4m3fn>(ch.data), n, lims.f8e4m3, &hist);
          break;
        default:
          TORCH_INTERNAL_ASSERT(ch.dtype == at::kFloat8_e5m2);
          partial[c] = kernels.f8e5m2(as<c10::Float8_e5m2>(ch.data), n, lims.f8e5m2, &hist);
      }
      if (histogram) {
        // Integer counts commute, so chunks of one tensor may add concurrently;
        // a tensor of one chunk has its row to itself (and the row is zero).
        int64_t* row = out_data + ch.tensor * stride + kCols;
        const bool whole = ch.n == tensors[ch.tensor].numel();
        for (int b = hist.lo; b < hist.hi; ++b) {
          if (local[b] != 0) {
            if (whole) {
              row[b] = local[b];
            } else {
              __atomic_fetch_add(row + b, local[b], __ATOMIC_RELAXED);
            }
            local[b] = 0;
          }
        }
      }
    }
  });

  size_t c = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    Acc acc = Acc::identity();
    for (; c < chunks.size() && chunks[c].tensor == t; ++c) {
      acc.merge(partial[c]);
    }
    acc.store(out_data + t * stride, tensors[t].numel());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchhealth, CPU, m) {
  m.impl("tensor_stats", &tensor_stats_cpu);
}

}  // namespace torchhealth
