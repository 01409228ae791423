// What device code needs from CUDA, for the host build of the kernels
// (csrc/emu). Under nvcc this header is empty. On the host it provides the
// qualifiers, the thread/block indices and __syncthreads() of the emulator
// (csrc/emu/emulator.h), and __shared__ as a function static: one copy per
// kernel, which the emulator makes each block's own by running one block at
// a time.
#pragma once

#if !defined(__CUDACC__)
#include "emu/emulator.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::fused_wd::emu::syncthreads()
#endif
