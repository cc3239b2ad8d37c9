// The interface between the host side of the CUDA kernel (tensor_stats_cuda.cpp:
// validation, the tensor table, allocation, registration) and the device side
// (tensor_stats_kernel.cu: indexing, block reduction, launch). Plain types
// only, so the .cu file needs no ATen header.
//
// Compiled and linked on the development machine, which has no GPU; never run
// there.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../stats.h"

namespace torchhealth {
namespace cuda {

enum ElemType : int32_t {
  kHalf = 0,
  kBFloat16 = 1,
  kFloat = 2,
  kDouble = 3,
  kFloat8E4M3 = 4,  // float8_e4m3fn
  kFloat8E5M2 = 5,
};

// One row of the device-resident tensor table.
struct TensorEntry {
  const void* data;      // first element in memory order (a dense span)
  int64_t numel;
  int32_t type;          // ElemType
  int32_t aligned;       // data is 16-byte aligned: vector loads allowed
  Limits<float> lim_f;   // used for float8, float16, bfloat16, float32
  Limits<double> lim_d;  // used for float64
};

struct LaunchArgs {
  const int64_t* unit_start;   // device, num_tensors + 1 entries (plan.h)
  const TensorEntry* entries;  // device, num_tensors entries
  int64_t num_tensors;
  int64_t total_units;         // unit_start[num_tensors]
  int64_t num_blocks;          // plan::num_blocks(total_units, num_tensors, max_blocks())
  Acc* partials;               // device, 2 * num_blocks slots (written before read)
  int64_t* out;                // device, [num_tensors, out_stride]; histogram columns zeroed
  int64_t out_stride;
  bool histogram;
};

// Threads per block of the main pass.
constexpr int kThreads = 256;

// Resident blocks per SM the main pass is compiled for: the second argument of
// its __launch_bounds__, which caps ptxas at 65536 / (kThreads * this)
// registers per thread (64 for 4). The kernel does a few dozen integer and
// float instructions per value read, and needs enough warps per SM to hide
// both the loads' latency and those instructions' at full memory bandwidth:
// 4 blocks give 32 warps (half of an A100/H100 SM's 64) with 4 x 16-byte loads
// in flight per thread, 64 KiB per SM, several times what covers the DRAM
// latency. Raise it only while ptxas reports no spill (the CUDA build check
// prints its register counts); lower it if a GPU measurement says fewer,
// fatter threads do better. Override at build time with
// NVCC_APPEND_FLAGS=-DTORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM=N.
#ifndef TORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM
#define TORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM 3
#endif
constexpr int kMinBlocksPerSm = TORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM;
static_assert(kMinBlocksPerSm >= 1 && kMinBlocksPerSm * kThreads <= 2048,
              "TORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM must be between 1 and 2048 / kThreads");

// The main pass's grid size cap for `device`: SMs x resident blocks per SM
// (the smaller of the two kernel variants, so one grid serves histogram on and
// off and sums do not depend on the flag) x a small number of waves. Host
// queries, cached per device; no sync.
cudaError_t max_blocks(int device, int64_t* blocks);

// Enqueues the main pass (when there is any element) and the finishing pass
// (when there is any tensor) on `stream`: at most two kernel launches. Returns
// the launch error, if any.
cudaError_t launch_tensor_stats(const LaunchArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchhealth
