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

// The Autograd kernel of fused_wd's in-place ops (csrc/ops.cpp), so that a
// call takes the same way through the dispatcher as on a GPU.
TORCH_LIBRARY_IMPL(fused_wd_emu, Autograd, m) {
  for (const char* op : {"adam_", "sgd_", "norm_partials_"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fused_wd::write_only_autograd>());
}
