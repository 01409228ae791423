// The CUDA backend compiled for the host: csrc/cuda's own sources (kernels,
// table packing, dispatch, launch shapes, argument checks), with the launch
// and the CUDA runtime calls swapped for the emulator (csrc/cuda/runtime.h).
// Registered as the fused_wd_emu library for CPU tensors, with the schemas of
// fused_wd, so the tests can run one call through both the CPU kernels and
// the CUDA code and compare the results (tests/test_cuda_emulated.py). Built
// on demand by the tests, never installed.
#include <torch/library.h>

#include "schema.h"

#include "cuda/adam.cu"
#include "cuda/auto_decay.cu"
#include "cuda/norm.cu"
#include "cuda/sgd.cu"

TORCH_LIBRARY(fused_wd_emu, m) {
  for (const char* schema : fused_wd::kSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(fused_wd_emu, CPU, m) { fused_wd::cuda::impl_ops(m); }
