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

namespace torchhealth {
namespace {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

at::Tensor tensor_stats_cpu(at::TensorList tensors, bool histogram,
                            std::optional<double> saturation) {
  check_inputs(tensors, c10::DeviceType::CPU);
  // This thread merges the chunks' results (min, max, sums of subnormals too);
  // pool threads set their own mode in the loop below.
  const cpu::IeeeSubnormals ieee;
  check_saturation(saturation);
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::zeros({num_tensors, output_columns(histogram)},
                             at::TensorOptions().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  const int64_t stride = out.stride(0);

  std::vector<at::Tensor> spans;
  spans.reserve(num_tensors);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    spans.push_back(dense_span(tensors[t]));
    const int64_t n = tensors[t].numel();
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back({t, b, std::min(n, b + kChunk)});
    }
  }

  const cpu::Kernels& kernels = cpu::cpu_kernels();
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
      const at::Tensor& span = spans[ch.tensor];
      const at::ScalarType dt = span.scalar_type();
      const int64_t n = ch.end - ch.begin;
      cpu::HistOut hist{histogram ? local.data() : nullptr};
      const auto lim = limits_for<float>(dt, saturation);
      switch (dt) {
        case at::kDouble:
          partial[c] = kernels.f64(span.const_data_ptr<double>() + ch.begin, n,
                                   limits_for<double>(dt, saturation), &hist);
          break;
        case at::kFloat:
          partial[c] = kernels.f32(span.const_data_ptr<float>() + ch.begin, n, lim, &hist);
          break;
        case at::kBFloat16:
          partial[c] = kernels.bf16(span.const_data_ptr<c10::BFloat16>() + ch.begin, n, lim, &hist);
          break;
        case at::kHalf:
          partial[c] = kernels.f16(span.const_data_ptr<c10::Half>() + ch.begin, n, lim, &hist);
          break;
        case at::kFloat8_e4m3fn:
          partial[c] = kernels.f8e4m3(span.const_data_ptr<c10::Float8_e4m3fn>() + ch.begin, n, lim,
                                      &hist);
          break;
        default:
          TORCH_INTERNAL_ASSERT(dt == at::kFloat8_e5m2);
          partial[c] = kernels.f8e5m2(span.const_data_ptr<c10::Float8_e5m2>() + ch.begin, n, lim,
                                      &hist);
      }
      if (histogram) {
        // Integer counts commute, so chunks of one tensor may add concurrently.
        int64_t* row = out_data + ch.tensor * stride + kCols;
        for (int b = hist.lo; b < hist.hi; ++b) {
          if (local[b] != 0) {
            __atomic_fetch_add(row + b, local[b], __ATOMIC_RELAXED);
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
