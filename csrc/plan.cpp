// torchhealth::_work_plan: the CUDA kernel's work plan (plan.h) computed on the
// host, so that CPU tests can check it. Not part of the public API.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "plan.h"

namespace torchhealth {
namespace {

// Returns (segments, merges):
//   segments int64 [S, 6]: block, tensor, begin, end, kind, slot (the partial
//     slot the block writes, or -1 for a kWhole segment), in block order and,
//     within a block, in tensor order: what the main pass reads;
//   merges int64 [M, 3]: tensor, i, slot: the partial slots the finishing pass
//     merges, in order, for each tensor read by more than one block.
std::tuple<at::Tensor, at::Tensor> work_plan(at::IntArrayRef numels, at::IntArrayRef itemsizes,
                                            int64_t max_blocks) {
  TORCH_CHECK(numels.size() == itemsizes.size(), "_work_plan: numels has ", numels.size(),
              " entries but itemsizes has ", itemsizes.size());
  TORCH_CHECK(max_blocks >= 1, "_work_plan: max_blocks must be at least 1, got ", max_blocks);
  const int64_t num_tensors = static_cast<int64_t>(numels.size());
  std::vector<int64_t> unit_start(num_tensors + 1, 0);
  for (int64_t t = 0; t < num_tensors; ++t) {
    TORCH_CHECK(numels[t] >= 0, "_work_plan: numels[", t, "] is negative");
    TORCH_CHECK(itemsizes[t] == 2 || itemsizes[t] == 4 || itemsizes[t] == 8,
                "_work_plan: itemsizes[", t, "] must be 2, 4 or 8, got ", itemsizes[t]);
    unit_start[t + 1] = unit_start[t] + plan::units_of(numels[t], itemsizes[t]);
  }
  const int64_t total = unit_start[num_tensors];
  const int64_t blocks = plan::num_blocks(total, num_tensors, max_blocks);

  std::vector<int64_t> seg;
  for (int64_t b = 0; b < blocks; ++b) {
    plan::for_each_segment(
        unit_start.data(), num_tensors, plan::block_units(b, total, blocks),
        [&](int64_t t) { return numels[t]; }, [&](int64_t t) { return itemsizes[t]; },
        [&](int64_t t, plan::Segment s) {
          const int64_t slot = s.kind == plan::kWhole ? -1 : plan::partial_slot(b, s.kind);
          seg.insert(seg.end(), {b, t, s.begin, s.end, s.kind, slot});
        });
  }
  std::vector<int64_t> merges;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (unit_start[t + 1] == unit_start[t]) {
      continue;
    }
    const plan::UnitRange span =
        plan::tensor_blocks(unit_start[t], unit_start[t + 1], total, blocks);
    if (span.end - span.begin < 2) {
      continue;
    }
    for (int64_t i = 0; i < span.end - span.begin; ++i) {
      merges.insert(merges.end(), {t, i, plan::merge_slot(span.begin, i)});
    }
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor segments = at::empty({static_cast<int64_t>(seg.size() / 6), 6}, opts);
  std::copy(seg.begin(), seg.end(), segments.data_ptr<int64_t>());
  at::Tensor merge_list = at::empty({static_cast<int64_t>(merges.size() / 3), 3}, opts);
  std::copy(merges.begin(), merges.end(), merge_list.data_ptr<int64_t>());
  return {segments, merge_list};
}

}  // namespace

// A fragment rather than a line in torchhealth.cpp keeps this test hook next
// to its code. It has a catch-all kernel: it reads no tensor.
TORCH_LIBRARY_FRAGMENT(torchhealth, m) {
  m.def("_work_plan(int[] numels, int[] itemsizes, int max_blocks) -> (Tensor, Tensor)",
        &work_plan);
}

}  // namespace torchhealth
