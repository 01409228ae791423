// Host entry points of the CUDA backend, registered for the CUDA dispatch
// key in register.cu (and for the host build in csrc/emu). Semantics: the
// schemas and comments in csrc/schema.h.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace fused_wd {
namespace cuda {

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type);

void clip_(at::TensorList tensors, const at::Tensor& total_norm, double max_norm);

void adam(const AdamCall& c);

void sgd(const SgdCall& c);

}  // namespace cuda
}  // namespace fused_wd
