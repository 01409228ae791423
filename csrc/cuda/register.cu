// The CUDA backend's registration: the one TORCH_LIBRARY_IMPL block for the
// CUDA dispatch key (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "cuda/ops_cuda.cuh"

TORCH_LIBRARY_IMPL(fused_wd, CUDA, m) { fused_wd::cuda::impl_ops(m); }
