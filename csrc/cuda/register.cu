// The CUDA backend's registration: the one TORCH_LIBRARY_IMPL block for the
// CUDA dispatch key (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "cuda/ops_cuda.cuh"

TORCH_LIBRARY_IMPL(fused_wd, CUDA, m) {
  m.impl("multi_tensor_norm", &fused_wd::cuda::multi_tensor_norm);
  m.impl("clip_", &fused_wd::cuda::clip_);
  m.impl("adam_", &fused_wd::adam_op<fused_wd::cuda::adam>);
  m.impl("sgd_", &fused_wd::sgd_op<fused_wd::cuda::sgd>);
}
