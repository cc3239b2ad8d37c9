// Device side of torchhealth::tensor_stats on CUDA: indexing, block reduction
// and launch. The arithmetic (update, hist_bin, Acc::merge/store) is stats.h's,
// shared with the CPU kernel; the work plan is plan.h's, tested on the CPU.
//
// Compiled and linked on a machine without a GPU (scripts/check_cuda_build.sh);
// never run there: no GPU was available. tests/test_cuda.py and
// benchmarks/bench_cuda.py are for a machine that has one.
//
// Two launches for any number of tensors:
//  1. stats_main: block b reads its contiguous range of the flat unit space
//     (plan.h: ranges equal to within one 16-byte unit, and enough blocks
//     that many tiny tensors are spread over every SM), tensor by tensor.
//     Per segment the block reduces one Acc with a fixed shuffle tree; a
//     tensor wholly inside the range gets its final row written here, a
//     tensor cut by the range's ends gets a partial slot.
//     A thread keeps its counts and extremes in the input's precision and its
//     sums in short float partials, widened to float64 once per 16 values
//     (thread_acc.h, which states the error bound).
//     Histogram counts go to shared-memory int counters (several copies, by
//     warp, to spread contention), one atomic add per distinct bin per warp
//     step (__match_any_sync), and are flushed to the int64 output with
//     integer atomics; a segment of at most kThreads elements adds straight
//     to the output instead, saving the zero/flush of 558 bins.
//     Compiled for kMinBlocksPerSm resident blocks per SM (launch.h).
//  2. stats_finish: one warp per tensor merges the partial slots of each
//     tensor read by several blocks (lane l takes slots l, l + 32, ... in
//     block order, then a fixed tree over lanes), and writes the rows of
//     empty tensors.
// No floating-point atomics: sums are the same bits run to run for a given
// GPU model and build (the grid size depends on the SM count and occupancy).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "../plan.h"
#include "../stats.h"
#include "launch.h"
#include "thread_acc.h"

namespace torchhealth {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;      // 16-byte loads in flight per thread
constexpr int kHistCopies = 4;  // shared histograms per block; warp w uses w % kHistCopies
constexpr int kWaves = 2;       // grid = kWaves x the blocks that fit at once
constexpr unsigned kFullMask = 0xffffffffu;

// ---- Element types: raw bits -> the type stats.h classifies in -----------
// kWide: the dtype has float32's exponent range, so some values fall outside
// the band of ThreadAcc's float partial sums (thread_acc.h).
struct HalfT {
  using raw_t = unsigned short;
  using acc_t = float;
  static constexpr bool kWide = false;
  __device__ static float to_acc(raw_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Limits<float> limits(const TensorEntry& e) { return e.lim_f; }
};
struct BFloat16T {
  using raw_t = unsigned short;
  using acc_t = float;
  static constexpr bool kWide = true;
  __device__ static float to_acc(raw_t b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }
  __device__ static Limits<float> limits(const TensorEntry& e) { return e.lim_f; }
};
struct FloatT {
  using raw_t = unsigned int;
  using acc_t = float;
  static constexpr bool kWide = true;
  __device__ static float to_acc(raw_t b) { return __uint_as_float(b); }
  __device__ static Limits<float> limits(const TensorEntry& e) { return e.lim_f; }
};
template <bool kE4M3>  // float8_e4m3fn, else float8_e5m2
struct Float8T {
  using raw_t = unsigned char;
  using acc_t = float;
  static constexpr bool kWide = false;
  __device__ static float to_acc(raw_t b) {
    return kE4M3 ? float8_e4m3fn_to_float(b) : float8_e5m2_to_float(b);
  }
  __device__ static Limits<float> limits(const TensorEntry& e) { return e.lim_f; }
};
struct DoubleT {
  using raw_t = unsigned long long;
  using acc_t = double;
  static constexpr bool kWide = true;
  __device__ static double to_acc(raw_t b) { return __longlong_as_double(static_cast<long long>(b)); }
  __device__ static Limits<double> limits(const TensorEntry& e) { return e.lim_d; }
};

__host__ __device__ inline int64_t itemsize_of(int32_t type) {
  return type == kDouble ? 8 : type == kFloat ? 4 : (type == kFloat8E4M3 || type == kFloat8E5M2) ? 1 : 2;
}

// ---- Where histogram bins go ----------------------------------------------
// Every lane of the warp calls a sink at the same point (bin -1: no value or
// no bin). Lanes holding the same bin are counted by one atomic add of their
// number, from the lowest of them: the values a warp reads at once often
// share a binary exponent (a layer's weights span a few binades), and atomic
// adds to one address serialise.
__device__ __forceinline__ bool leads_peers(int bin, unsigned* peers) {
  *peers = __match_any_sync(kFullMask, bin);
  return bin >= 0 && static_cast<int>(threadIdx.x % 32) == __ffs(*peers) - 1;
}
struct NoHist {
  __device__ void operator()(int) const {}
};
struct SharedHist {
  int* bins;  // this warp's copy in shared memory
  __device__ void operator()(int bin) const {
    unsigned peers;
    if (leads_peers(bin, &peers)) {
      atomicAdd(bins + bin, __popc(peers));
    }
  }
};
struct GlobalHist {
  unsigned long long* bins;  // the tensor's histogram columns in the output
  __device__ void operator()(int bin) const {
    unsigned peers;
    if (leads_peers(bin, &peers)) {
      atomicAdd(bins + bin, static_cast<unsigned long long>(__popc(peers)));
    }
  }
};

// ---- Reading one segment ---------------------------------------------------
// Each thread accumulates a fixed subset of the segment's elements in a fixed
// order, flushing its float partial sums after a fixed number of them, so the
// per-thread Acc, and after the fixed reduction tree the block's Acc, are the
// same bits on every run, with the histogram or without. Loops run while the
// warp's first lane has work, so that every lane reaches each sink call.
template <typename T, typename Sink>
__device__ __forceinline__ Acc read_segment(const TensorEntry& e, plan::Segment s,
                                            const Sink& sink) {
  using raw_t = typename T::raw_t;
  using acc_t = typename T::acc_t;
  constexpr int kPerUnit = static_cast<int>(plan::kUnitBytes / sizeof(raw_t));
  // Units per float partial: at most kFlushEvery values (1 for float64, which
  // has no partials).
  constexpr int kUnitsPerFlush = kPerUnit >= kFlushEvery ? 1 : kFlushEvery / kPerUnit;
  static_assert(kUnroll % kUnitsPerFlush == 0 || sizeof(raw_t) == 8, "partials end with a group");
  const Limits<acc_t> lim = T::limits(e);
  const raw_t* p = static_cast<const raw_t*>(e.data);
  const int lane = threadIdx.x % 32;
  ThreadAcc<acc_t> acc = ThreadAcc<acc_t>::identity();
  int64_t scalar_begin = s.begin;
  if (e.aligned) {
    // Segments start on a unit boundary (plan.h), so unit u of the tensor is
    // the 16-byte vector at p + u * kPerUnit. Only a tensor's last unit can be
    // partial; it is read by the scalar loop below.
    const uint4* pv = reinterpret_cast<const uint4*>(p);
    const int64_t u_end = s.end / kPerUnit;
    for (int64_t w = s.begin / kPerUnit + (threadIdx.x - lane); w < u_end;
         w += kThreads * kUnroll) {
      const int64_t u = w + lane;
      uint4 v[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        // Streamed: read once, evict first.
        v[j] = u + j * kThreads < u_end ? __ldcs(pv + u + j * kThreads) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const bool valid = u + j * kThreads < u_end;
        raw_t r[kPerUnit];
        memcpy(r, &v[j], sizeof r);
#pragma unroll
        for (int k = 0; k < kPerUnit; ++k) {
          sink(valid ? acc.template update<T::kWide>(T::to_acc(r[k]), lim) : -1);
        }
        if ((j + 1) % kUnitsPerFlush == 0) {
          acc.flush();
        }
      }
    }
    scalar_begin = u_end * kPerUnit;
  }
  for (int64_t w = scalar_begin + (threadIdx.x - lane); w < s.end;
       w += static_cast<int64_t>(kThreads) * kFlushEvery) {
#pragma unroll 4
    for (int k = 0; k < kFlushEvery && w + k * kThreads < s.end; ++k) {
      const int64_t i = w + lane + k * kThreads;
      sink(i < s.end ? acc.template update<T::kWide>(T::to_acc(__ldg(p + i)), lim) : -1);
    }
    acc.flush();
  }
  return acc.to_acc();
}

template <typename Sink>
__device__ __forceinline__ Acc read_any(const TensorEntry& e, plan::Segment s, const Sink& sink) {
  switch (e.type) {
    case kHalf: return read_segment<HalfT>(e, s, sink);
    case kBFloat16: return read_segment<BFloat16T>(e, s, sink);
    case kFloat: return read_segment<FloatT>(e, s, sink);
    case kFloat8E4M3: return read_segment<Float8T<true>>(e, s, sink);
    case kFloat8E5M2: return read_segment<Float8T<false>>(e, s, sink);
    default: return read_segment<DoubleT>(e, s, sink);
  }
}

// ---- Reductions with a fixed tree -------------------------------------------
__device__ __forceinline__ Acc shfl_down(const Acc& a, int d) {
  Acc o;
  o.nan = __shfl_down_sync(kFullMask, static_cast<long long>(a.nan), d);
  o.posinf = __shfl_down_sync(kFullMask, static_cast<long long>(a.posinf), d);
  o.neginf = __shfl_down_sync(kFullMask, static_cast<long long>(a.neginf), d);
  o.zero = __shfl_down_sync(kFullMask, static_cast<long long>(a.zero), d);
  o.subnormal = __shfl_down_sync(kFullMask, static_cast<long long>(a.subnormal), d);
  o.saturated = __shfl_down_sync(kFullMask, static_cast<long long>(a.saturated), d);
  o.min = __shfl_down_sync(kFullMask, a.min, d);
  o.max = __shfl_down_sync(kFullMask, a.max, d);
  o.absmax = __shfl_down_sync(kFullMask, a.absmax, d);
  o.sum = __shfl_down_sync(kFullMask, a.sum, d);
  o.sumsq = __shfl_down_sync(kFullMask, a.sumsq, d);
  return o;
}

// Lane 0 gets the merge of all 32 lanes (lane l takes lane l + d at each
// step; lanes whose partner is out of range never feed lane 0).
__device__ __forceinline__ Acc warp_reduce(Acc a) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    a.merge(shfl_down(a, d));
  }
  return a;
}

// Thread 0 gets the merge of the whole block. Needs a __syncthreads() between
// two calls (the caller's loop has one at the top).
__device__ __forceinline__ Acc block_reduce(Acc a, Acc* warp_acc) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  a = warp_reduce(a);
  if (lane == 0) {
    warp_acc[warp] = a;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? warp_acc[lane] : Acc::identity();
    a = warp_reduce(a);
  }
  return a;
}

// ---- Pass 1: the main pass ----------------------------------------------------
template <bool kHist>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) stats_main(LaunchArgs a) {
  __shared__ Acc warp_acc[kWarps];
  __shared__ int hist_sh[kHist ? kHistCopies * kBins : 1];
  const int64_t block = blockIdx.x;
  const plan::UnitRange range = plan::block_units(block, a.total_units, a.num_blocks);
  plan::for_each_segment(
      a.unit_start, a.num_tensors, range,
      [&](int64_t t) { return a.entries[t].numel; },
      [&](int64_t t) { return itemsize_of(a.entries[t].type); },
      [&](int64_t t, plan::Segment s) {
        __syncthreads();  // the previous segment is done with warp_acc and hist_sh
        const TensorEntry& e = a.entries[t];
        int64_t* row = a.out + t * a.out_stride;
        Acc acc;
        // Block-uniform: every thread sees the same segment.
        const bool shared_hist = kHist && s.end - s.begin > kThreads;
        if (shared_hist) {
          for (int i = threadIdx.x; i < kHistCopies * kBins; i += kThreads) {
            hist_sh[i] = 0;
          }
          __syncthreads();
          acc = read_any(e, s, SharedHist{hist_sh + (threadIdx.x / 32) % kHistCopies * kBins});
        } else if (kHist) {
          acc = read_any(e, s, GlobalHist{reinterpret_cast<unsigned long long*>(row + kCols)});
        } else {
          acc = read_any(e, s, NoHist{});
        }
        acc = block_reduce(acc, warp_acc);
        if (threadIdx.x == 0) {
          if (s.kind == plan::kWhole) {
            acc.store(row, e.numel);
          } else {
            a.partials[plan::partial_slot(block, s.kind)] = acc;
          }
        }
        if (shared_hist) {
          __syncthreads();
          // Integer adds commute: the counts are exact whatever the order.
          for (int i = threadIdx.x; i < kBins; i += kThreads) {
            // Up to 2^31 (a block's elements at most): unsigned.
            unsigned c = 0;
#pragma unroll
            for (int k = 0; k < kHistCopies; ++k) {
              c += static_cast<unsigned>(hist_sh[k * kBins + i]);
            }
            if (c != 0) {
              atomicAdd(reinterpret_cast<unsigned long long*>(row + kCols + i),
                        static_cast<unsigned long long>(c));
            }
          }
        }
      });
}

// ---- Pass 2: the finishing pass -------------------------------------------------
// One warp per tensor. Lane l merges the tensor's partial slots l, l + 32, ...
// in order, then the warp merges lanes in a fixed tree: deterministic.
__global__ void __launch_bounds__(kThreads) stats_finish(LaunchArgs a) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (t >= a.num_tensors) {
    return;  // whole warp
  }
  int64_t* row = a.out + t * a.out_stride;
  const int64_t begin = a.unit_start[t];
  const int64_t end = a.unit_start[t + 1];
  if (begin == end) {
    if (lane == 0) {
      Acc::identity().store(row, 0);
    }
    return;
  }
  const plan::UnitRange blocks = plan::tensor_blocks(begin, end, a.total_units, a.num_blocks);
  const int64_t n = blocks.end - blocks.begin;
  if (n < 2) {
    return;  // its one block wrote the row
  }
  Acc acc = Acc::identity();
  for (int64_t i = lane; i < n; i += 32) {
    acc.merge(a.partials[plan::merge_slot(blocks.begin, i)]);
  }
  acc = warp_reduce(acc);
  if (lane == 0) {
    acc.store(row, a.entries[t].numel);
  }
}

}  // namespace

cudaError_t max_blocks(int device, int64_t* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int64_t hit = cache[device].load(std::memory_order_relaxed);
    if (hit > 0) {
      *blocks = hit;
      return cudaSuccess;
    }
  }
  int sms = 0;
  int with_hist = 0;
  int without = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&with_hist, stats_main<true>, kThreads, 0);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&without, stats_main<false>, kThreads, 0);
  }
  if (err != cudaSuccess) {
    return err;
  }
  sms = sms < 1 ? 1 : sms;
  int per_sm = with_hist < without ? with_hist : without;
  per_sm = per_sm < 1 ? 1 : per_sm;
  *blocks = static_cast<int64_t>(sms) * per_sm * kWaves;
  if (device >= 0 && device < kMaxDevices) {
    cache[device].store(*blocks, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

cudaError_t launch_tensor_stats(const LaunchArgs& args, cudaStream_t stream) {
  if (args.num_blocks > 0) {
    const dim3 grid(static_cast<unsigned>(args.num_blocks));
    if (args.histogram) {
      stats_main<true><<<grid, kThreads, 0, stream>>>(args);
    } else {
      stats_main<false><<<grid, kThreads, 0, stream>>>(args);
    }
  }
  if (args.num_tensors > 0) {
    // stats_finish gives each tensor one warp, so a block finishes kWarps tensors.
    const dim3 grid(static_cast<unsigned>((args.num_tensors + kWarps - 1) / kWarps));
    stats_finish<<<grid, kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace torchhealth
