// The per-chunk loop of the CPU kernel: statistics of n contiguous values.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../stats.h"

namespace torchhealth {
namespace cpu {

// Accumulates p[0, n) into the returned Acc and, when hist is not null, adds
// each value's bin count to hist[kBins].
template <typename scalar_t>
Acc chunk_stats(const scalar_t* p, int64_t n, const Limits<acc_type_t<scalar_t>>& lim,
                int64_t* hist) {
  using acc_t = acc_type_t<scalar_t>;
  Acc a = Acc::identity();
  for (int64_t i = 0; i < n; ++i) {
    const int bin = update<acc_t>(a, static_cast<acc_t>(p[i]), lim);
    if (hist != nullptr && bin >= 0) {
      hist[bin]++;
    }
  }
  return a;
}

}  // namespace cpu
}  // namespace torchhealth
