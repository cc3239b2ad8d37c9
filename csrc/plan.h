// The work plan of the CUDA kernel: which block reads which range of which
// tensor, and which per-block partial results the finishing pass merges for
// each tensor. Pure integer arithmetic compiled for host and device, so that
// the CPU tests (tests/test_plan.py, through the _work_plan op in plan.cpp)
// run exactly the code the GPU runs.
//
// The plan works in units of 16 bytes: tensor t of `numel` elements of
// `itemsize` bytes covers units_of(numel, itemsize) units (its last unit may
// be partial), and the tensors are laid end to end in one flat unit space,
// unit_start[t] <= u < unit_start[t + 1] (a prefix sum; empty tensors cover no
// unit). The grid's G blocks split that space into G contiguous ranges whose
// sizes differ by at most one unit, so every block reads the same number of
// bytes whatever the mix of tensor sizes and dtypes: one huge tensor is cut
// into G pieces, 10,000 tiny ones are shared out a few per block (num_blocks
// picks G with the tensor count in mind, since each tensor a block meets costs
// it a block-wide reduction).
//
// A block's range meets a run of tensors; each meeting is a Segment. A tensor
// that lies within one block's range is a kWhole segment: that block writes
// the tensor's final row. A tensor spread over blocks first..last (first <
// last) is a kTail segment in block `first` and a kHead segment in each later
// block; each block has at most one of each, so it stores them in partial slots
// 2*b + kHead and 2*b + kTail. The finishing pass reads a tensor's slots in
// block order (merge_slot) and merges them in a fixed order, which makes the
// result deterministic.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torchhealth {
namespace plan {

// Bytes per unit: one 16-byte vector load.
constexpr int64_t kUnitBytes = 16;
// The grid has about one block per this many units (4 KiB) when the input is
// small, so a small call uses few blocks instead of many nearly idle ones
// (unless there are many tensors: kTensorsPerBlock).
constexpr int64_t kMinUnitsPerBlock = 256;
// A block gets at most this many units (2 GiB, at most 2^30 elements), so its
// per-segment counts fit the kernel's int shared-memory histogram counters.
// Only a huge input on a small grid reaches it; the grid then grows instead.
constexpr int64_t kMaxUnitsPerBlock = int64_t{1} << 27;
// The grid has at least one block per this many tensors, up to the grid cap.
constexpr int64_t kTensorsPerBlock = 8;

enum SegmentKind : int { kHead = 0, kTail = 1, kWhole = 2 };

struct UnitRange {
  int64_t begin;
  int64_t end;
};

// Elements [begin, end) of one tensor read by one block.
struct Segment {
  int64_t begin;
  int64_t end;
  int kind;
};

C10_HOST_DEVICE inline int64_t elems_per_unit(int64_t itemsize) {
  return kUnitBytes / itemsize;
}

C10_HOST_DEVICE inline int64_t units_of(int64_t numel, int64_t itemsize) {
  const int64_t v = elems_per_unit(itemsize);
  return numel / v + (numel % v != 0);
}

// Number of blocks for `total_units` units in `num_tensors` tensors: 0 for no
// work, else enough that a block gets at most kMinUnitsPerBlock units or
// kTensorsPerBlock tensors (a tiny tensor costs a block a reduction, not just
// its bytes, so 10,000 tiny tensors still spread over every SM), capped at
// max_blocks unless a block would then get more than kMaxUnitsPerBlock units
// (the grid then grows), and never more than total_units, so no block is
// empty.
C10_HOST_DEVICE inline int64_t num_blocks(int64_t total_units, int64_t num_tensors,
                                          int64_t max_blocks) {
  if (total_units <= 0) {
    return 0;
  }
  int64_t g = total_units / kMinUnitsPerBlock + (total_units % kMinUnitsPerBlock != 0);
  const int64_t by_tensors =
      num_tensors / kTensorsPerBlock + (num_tensors % kTensorsPerBlock != 0);
  g = g > by_tensors ? g : by_tensors;
  g = g < max_blocks ? g : max_blocks;
  const int64_t at_least =
      total_units / kMaxUnitsPerBlock + (total_units % kMaxUnitsPerBlock != 0);
  g = g > at_least ? g : at_least;
  g = g < total_units ? g : total_units;
  return g < 1 ? 1 : g;
}

// Block b's units: the first total % G blocks get one unit more than the rest.
// No product of two large numbers, so no overflow for any int64 total.
C10_HOST_DEVICE inline UnitRange block_units(int64_t b, int64_t total, int64_t blocks) {
  const int64_t base = total / blocks;
  const int64_t rem = total % blocks;
  UnitRange r;
  r.begin = b * base + (b < rem ? b : rem);
  r.end = r.begin + base + (b < rem ? 1 : 0);
  return r;
}

// The block whose range holds unit u (the inverse of block_units; needs
// blocks <= total, which num_blocks guarantees).
C10_HOST_DEVICE inline int64_t block_of_unit(int64_t u, int64_t total, int64_t blocks) {
  const int64_t base = total / blocks;
  const int64_t rem = total % blocks;
  const int64_t big = rem * (base + 1);  // units held by the first rem blocks
  return u < big ? u / (base + 1) : rem + (u - big) / base;
}

// The tensor holding unit u: the last t in [0, T) with unit_start[t] <= u
// (which skips empty tensors, since they share their start with the next one).
// unit_start has T + 1 entries; needs 0 <= u < unit_start[T].
C10_HOST_DEVICE inline int64_t tensor_of_unit(const int64_t* unit_start, int64_t num_tensors,
                                              int64_t u) {
  int64_t lo = 0;
  int64_t hi = num_tensors;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (unit_start[mid] <= u) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The elements of a nonempty tensor (units [t_begin, t_end) of the flat space,
// numel elements, v per unit) that fall in range r, and their kind.
C10_HOST_DEVICE inline Segment segment_of(int64_t t_begin, int64_t t_end, int64_t numel,
                                          int64_t v, UnitRange r) {
  const int64_t ub = (t_begin > r.begin ? t_begin : r.begin) - t_begin;
  const int64_t ue = (t_end < r.end ? t_end : r.end) - t_begin;
  Segment s;
  s.begin = ub * v;
  s.end = ue * v < numel ? ue * v : numel;
  s.kind = t_begin < r.begin ? kHead : (t_end > r.end ? kTail : kWhole);
  return s;
}

// Calls f(t, segment) for every nonempty tensor t that meets range r, in
// tensor order. itemsize(t) gives tensor t's element size in bytes and
// numel(t) its element count. The CUDA kernel calls this with every thread of
// a block in step (f may synchronise the block: the loop is block-uniform).
template <typename Numel, typename Itemsize, typename F>
C10_HOST_DEVICE inline void for_each_segment(const int64_t* unit_start, int64_t num_tensors,
                                             UnitRange r, Numel numel, Itemsize itemsize,
                                             F f) {
  for (int64_t t = tensor_of_unit(unit_start, num_tensors, r.begin);
       t < num_tensors && unit_start[t] < r.end; ++t) {
    if (unit_start[t + 1] == unit_start[t]) {
      continue;  // empty tensor between two others
    }
    f(t, segment_of(unit_start[t], unit_start[t + 1], numel(t), elems_per_unit(itemsize(t)), r));
  }
}

// The first and last block that read a nonempty tensor.
C10_HOST_DEVICE inline UnitRange tensor_blocks(int64_t t_begin, int64_t t_end, int64_t total,
                                               int64_t blocks) {
  UnitRange r;
  r.begin = block_of_unit(t_begin, total, blocks);
  r.end = block_of_unit(t_end - 1, total, blocks) + 1;
  return r;
}

// Partial slot the finishing pass reads i-th (i = 0 .. last - first) for a
// tensor that spans blocks first..last: block first's kTail slot, then the
// kHead slot of each later block.
C10_HOST_DEVICE inline int64_t merge_slot(int64_t first_block, int64_t i) {
  return i == 0 ? 2 * first_block + kTail : 2 * (first_block + i) + kHead;
}

// Slot a block writes a non-whole segment into.
C10_HOST_DEVICE inline int64_t partial_slot(int64_t block, int kind) {
  return 2 * block + kind;
}

}  // namespace plan
}  // namespace torchhealth
