// Host side of torchhealth::tensor_stats on CUDA: validation, the tensor table,
// buffers and registration. The kernels are in tensor_stats_kernel.cu.
//
// Compiled and linked on a machine without a GPU (scripts/check_cuda_build.sh);
// never run there: no GPU was available. tests/test_cuda.py is for a machine
// that has one.
//
// One call enqueues, on the current stream and without a host sync:
//   an async copy of the tensor table from pinned host memory to the device,
//   a memset of the output (only with the histogram: its columns are atomic
//   sums), the main pass and the finishing pass: two kernel launches whatever
//   the number of tensors. A non-dense input is first made contiguous (one copy
//   kernel for that tensor); dense ones, permuted or not, are read in memory
//   order in place, as on the CPU.
//
// CUDA graphs. The table (pointer, numel, dtype, thresholds per tensor) is
// rebuilt from the tensors on every call, so an eager call always sees the
// current pointers: there is no cache that a new set of tensors could make
// stale. Under capture (torch.cuda.graph) the table copy becomes a memcpy node
// that reads the pinned buffer on every replay; that buffer is kept alive for
// the process's life (keep_for_graph_replays), so every replay copies the very
// table captured: the same pointers, numels and thresholds, with whatever data
// the tensors then hold. Replays are therefore valid while the captured
// tensors stay allocated at the same addresses, which is the rule for every
// kernel in a graph (copy new values into them in place). A replay cannot
// notice that the caller now means other tensors: no host code of this op runs
// at replay, so detecting a changed pointer set is the job of whoever replays,
// by capturing again for new tensors. torch.compile(mode="reduce-overhead")
// does this: its CUDA-graph trees check the addresses of their inputs on each
// call and re-record when they change. The device memory of the table and of
// the partial results comes from the graph's private pool, as for any op, and
// the pinned table from the pinned allocator's pool for the graph, which torch
// has since 2.11 (earlier ones query events during capture, which fails the
// capture; a build against them refuses to capture). The first call on a
// device may be the captured one: the grid-size query it makes then (an
// occupancy query, which may load the kernels' module) runs in relaxed capture
// mode, as torch does for cudaMalloc during capture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "../validation.h"
#include "../plan.h"
#include "launch.h"

namespace torchhealth {
namespace cuda {
namespace {

static_assert(sizeof(TensorEntry) == 48, "TensorEntry is copied to the device as bytes");
static_assert(alignof(TensorEntry) == 8 && alignof(Acc) == 8, "table alignment");

ElemType elem_type(at::ScalarType dt) {
  switch (dt) {
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    case at::kFloat8_e4m3fn: return kFloat8E4M3;
    case at::kFloat8_e5m2: return kFloat8E5M2;
    default: return kDouble;  // check_inputs admitted only these six
  }
}

// The first torch whose pinned host allocator serves allocations during stream
// capture from a pool of the graph's and queries no event then
// (ATen/core/CachingHostAllocator.h: get_allocation_pool_for_current_stream).
constexpr bool kPinnedAllocatorCaptures =
    TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11);

// Under stream capture the table copy becomes a graph memcpy node that reads
// `host` on every replay, so the host block must outlive the graph, whose end
// this op never sees. torch's pinned allocator (2.11 and later) never
// recycles a used block allocated during a capture; holding a reference here
// makes that so whatever the allocator does, at the cost of keeping a few
// bytes per tensor per captured call for the process's life.
void keep_for_graph_replays(at::Tensor host) {
  static std::mutex mutex;
  static std::vector<at::Tensor>* kept = new std::vector<at::Tensor>();  // never destroyed
  const std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(std::move(host));
}

at::Tensor tensor_stats_cuda(at::TensorList tensors, bool histogram,
                             std::optional<double> saturation) {
  check_inputs(tensors, c10::DeviceType::CUDA);
  check_saturation(saturation);
  const int64_t num_tensors = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(num_tensors > 0, "tensor_stats: the CUDA kernel needs at least one tensor");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dev = at::TensorOptions().device(tensors[0].device());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  TORCH_CHECK(kPinnedAllocatorCaptures || !capturing,
              "tensor_stats: CUDA graph capture needs torch 2.11 or later (its pinned host "
              "allocator can allocate during capture); this extension was built against torch ",
              TORCH_VERSION, ". Call it outside the capture, or upgrade torch.");

  // Table bytes: unit_start[T + 1] (int64), then entries[T].
  const int64_t start_bytes = (num_tensors + 1) * static_cast<int64_t>(sizeof(int64_t));
  const int64_t table_bytes =
      start_bytes + num_tensors * static_cast<int64_t>(sizeof(TensorEntry));
  at::Tensor host =
      at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* unit_start = reinterpret_cast<int64_t*>(host.data_ptr());
  auto* entries = reinterpret_cast<TensorEntry*>(host.data_ptr<uint8_t>() + start_bytes);

  // Copies of non-dense inputs must live until the kernels are queued: freed
  // earlier, the next copy could take the same memory. Freed after, the
  // caching allocator hands it out only to work queued behind ours on this
  // stream, so the kernels read them intact.
  std::vector<at::Tensor> copies;
  unit_start[0] = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    at::Tensor span = dense_span(tensors[t]);
    const at::ScalarType dt = span.scalar_type();
    TensorEntry& e = entries[t];
    e.data = span.numel() > 0 ? span.const_data_ptr() : nullptr;
    e.numel = span.numel();
    e.type = elem_type(dt);
    e.aligned = reinterpret_cast<uintptr_t>(e.data) % plan::kUnitBytes == 0;
    e.lim_f = limits_for<float>(dt, saturation);
    e.lim_d = limits_for<double>(dt, saturation);
    unit_start[t + 1] = unit_start[t] + plan::units_of(e.numel, span.element_size());
    if (!span.is_same(tensors[t])) {
      copies.push_back(std::move(span));
    }
  }

  int64_t cap = 0;
  {
    // Cached after the first call on a device; that call's queries are not
    // stream work and are safe during a capture, which global capture mode
    // cannot know.
    std::optional<c10::cuda::CUDAStreamCaptureModeGuard> relaxed;
    if (capturing) {
      relaxed.emplace(cudaStreamCaptureModeRelaxed);
    }
    C10_CUDA_CHECK(max_blocks(tensors[0].get_device(), &cap));
  }
  LaunchArgs args{};
  args.num_tensors = num_tensors;
  args.total_units = unit_start[num_tensors];
  args.num_blocks = plan::num_blocks(args.total_units, num_tensors, cap);
  args.histogram = histogram;

  // One device buffer: the table, then the partial slots (never read before
  // the main pass writes them, so not initialised).
  const int64_t partial_offset = (table_bytes + 15) / 16 * 16;
  at::Tensor buffer = at::empty(
      {partial_offset + 2 * args.num_blocks * static_cast<int64_t>(sizeof(Acc))},
      dev.dtype(at::kByte));
  // An async copy on the current stream; copy_ records the stream with the
  // pinned allocator, which keeps the host block until the copy has run.
  buffer.narrow(0, 0, table_bytes).copy_(host, /*non_blocking=*/true);
  if (capturing) {
    keep_for_graph_replays(std::move(host));
  }
  uint8_t* base = buffer.data_ptr<uint8_t>();
  args.unit_start = reinterpret_cast<const int64_t*>(base);
  args.entries = reinterpret_cast<const TensorEntry*>(base + start_bytes);
  args.partials = reinterpret_cast<Acc*>(base + partial_offset);

  at::Tensor out = at::empty({num_tensors, output_columns(histogram)}, dev.dtype(at::kLong));
  args.out = out.data_ptr<int64_t>();
  args.out_stride = out.stride(0);
  if (histogram) {
    C10_CUDA_CHECK(cudaMemsetAsync(args.out, 0, out.nbytes(), stream));
  }
  C10_CUDA_CHECK(launch_tensor_stats(args, stream));
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(torchhealth, CUDA, m) {
  m.impl("tensor_stats", &cuda::tensor_stats_cuda);
}

}  // namespace torchhealth
