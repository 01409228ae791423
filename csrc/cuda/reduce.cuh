// Fixed-shape block reductions shared by the norm kernels (norm.cu) and the
// update kernels' statistics (adam.cu, sgd.cu): no atomics, one order for
// every run, so a sum depends on its inputs alone.
#pragma once

#include <cstdint>

#include "cuda/compat.h"
#include "fused_wd/math.h"

namespace fused_wd {
namespace cuda {

template <bool INF>
__device__ __forceinline__ double combine(double a, double b) {
  return INF ? fused_wd::nan_max(a, b) : a + b;
}

// Fixed-shape tree reduction of one value per thread (NT threads, the
// block's size) through sh[NT]; every thread gets the result. A second
// reduction in the same kernel needs its own sh (a thread may still read
// sh[0] while another writes the next value).
template <bool INF, int NT>
__device__ __forceinline__ double block_reduce(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = combine<INF>(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  return sh[0];
}

// The reduction of nc chunk partials part[0..nc) by a block of NT threads:
// thread j combines chunks j, j + NT, ... in order, then the block tree.
template <bool INF, int NT>
__device__ __forceinline__ double reduce_chunks(const double* part, int64_t nc, double* sh) {
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < nc; c += NT) acc = combine<INF>(part[c], acc);
  return block_reduce<INF, NT>(acc, sh);
}

}  // namespace cuda
}  // namespace fused_wd
