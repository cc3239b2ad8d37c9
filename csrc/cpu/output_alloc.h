// The CPU op's output: an int64 [rows, cols] tensor of zeros.
//
// A large output (e.g. 10,000 tensors with histograms: 45 MB) is mostly
// page faults when allocated and zero-filled the usual way: malloc maps fresh
// memory and the fill touches it 4 KiB at a time. On Linux such an output is
// instead mapped directly and marked for transparent huge pages: fresh
// anonymous memory is already zero, so nothing is filled, and the kernel
// faults it in 2 MiB at a time where the op first writes it. Smaller outputs
// come from torch's allocator, whose memory malloc reuses without faults.
//
// When such an output is freed, its mapping is kept (one, the latest) for the
// next large output, which zero-fills it instead of mapping fresh memory: a
// check made every step then faults nothing in. Fresh huge pages cost the host
// kernel more when memory is fragmented, after other work: the same 21 faults
// took 8-20 ms or 48-60 ms (benchmarks/RESULTS.md, issue 10). So a process that
// made a large output holds, after freeing it, at most that output's memory
// more, like torch's caching allocators.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torchhealth {
namespace cpu {

// Outputs of at least this many bytes are mapped (on Linux).
constexpr size_t kMappedOutputBytes = size_t{32} << 20;

#if defined(__linux__)
namespace detail {

constexpr size_t kHugePage = size_t{2} << 20;

struct Mapping {
  void* base;
  size_t bytes;
};

inline void release(Mapping* m) {
  munmap(m->base, m->bytes);
  delete m;
}

// The mapping of the latest large output freed, kept for the next one.
struct Kept {
  std::mutex mutex;
  Mapping* mapping = nullptr;
};
inline Kept& kept() {
  static Kept* k = new Kept;  // never destroyed: outputs may be freed during exit
  return *k;
}

// The deleter of a mapped output: keeps its mapping, releasing the one kept before.
inline void keep(void* ctx) {
  Mapping* m = static_cast<Mapping*>(ctx);
  Kept& k = kept();
  std::unique_lock<std::mutex> lock(k.mutex);
  Mapping* old = k.mapping;
  k.mapping = m;
  lock.unlock();
  if (old != nullptr) {
    release(old);
  }
}

// The kept mapping if it holds `bytes` without wasting more than as much again,
// zero-filled; else nullptr (and a kept mapping of another size is released).
inline Mapping* take_kept(size_t bytes) {
  Kept& k = kept();
  std::unique_lock<std::mutex> lock(k.mutex);
  Mapping* m = k.mapping;
  k.mapping = nullptr;
  lock.unlock();
  if (m == nullptr) {
    return nullptr;
  }
  if (m->bytes < bytes || m->bytes / 2 > bytes) {
    release(m);
    return nullptr;
  }
  std::memset(m->base, 0, bytes);
  return m;
}

// `bytes` of zeros starting on a huge-page boundary (so that every whole 2 MiB
// of it can be a huge page): the kept mapping or a new one, or an empty DataPtr
// when the mapping fails.
inline at::DataPtr map_zeros(size_t bytes) {
  if (Mapping* m = take_kept(bytes)) {
    return at::DataPtr(m->base, m, &keep, at::Device(at::kCPU));
  }
  const size_t padded = bytes + kHugePage;
  void* raw = mmap(nullptr, padded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return at::DataPtr(nullptr, at::Device(at::kCPU));
  }
  // Give back the unaligned head and the tail beyond `bytes` (rounded to the
  // page the kernel maps in).
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  const size_t page = 4096;
  const uintptr_t end = (aligned + bytes + page - 1) & ~(page - 1);
  if (aligned > start) {
    munmap(raw, aligned - start);
  }
  if (start + padded > end) {
    munmap(reinterpret_cast<void*>(end), start + padded - end);
  }
  void* data = reinterpret_cast<void*>(aligned);
  // Without huge pages (THP disabled, or madvise refused) the mapping is still
  // zeroed memory, faulted in 4 KiB at a time: no slower than the usual way.
  madvise(data, end - aligned, MADV_HUGEPAGE);
  return at::DataPtr(data, new Mapping{data, end - aligned}, &keep, at::Device(at::kCPU));
}

}  // namespace detail
#endif

inline at::Tensor zeros_int64(int64_t rows, int64_t cols) {
  const auto options = at::TensorOptions().dtype(at::kLong);
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * sizeof(int64_t);
  if (bytes >= kMappedOutputBytes) {
    at::DataPtr data = detail::map_zeros(bytes);
    if (data.get() != nullptr) {
      // Resizable with torch's allocator, like any at::empty output: resize_
      // and share_memory_ move the data to memory of their own and give this back.
      c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data),
                           c10::GetCPUAllocator(), /*resizable=*/true);
      at::Tensor out = at::empty({0}, options);
      out.set_(std::move(storage), 0, {rows, cols}, {cols, 1});
      return out;
    }
  }
#endif
  return at::zeros({rows, cols}, options);
}

}  // namespace cpu
}  // namespace torchhealth
