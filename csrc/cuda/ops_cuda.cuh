// Host entry points of the CUDA backend, registered for the CUDA dispatch
// key in register.cu (and for the host build in csrc/emu). Semantics: the
// schemas and comments in csrc/schema.h.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace fused_wd {
namespace cuda {

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type);

void norm_partials_(OptionalTensors tensors, at::Tensor& out,
                    at::IntArrayRef index, double norm_type, bool of_grads);

at::Tensor norm_from_partials(const at::Tensor& partials, double norm_type);

void clip_(at::TensorList tensors, const at::Tensor& total_norm, double max_norm);

void adam(const AdamCall& c);

void sgd(const SgdCall& c);

at::Tensor auto_decay(const at::Tensor& stats, const at::Tensor& grad_sumsq, const at::Tensor& steps,
                      const at::Tensor& numels, at::Tensor& state, int64_t mode, double weight_decay,
                      double beta2, double eps, const std::optional<at::Tensor>& grad_norm,
                      double max_norm, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, bool skip_nonfinite);

// The kernels of every op, for a TORCH_LIBRARY_IMPL block: fused_wd's for
// the CUDA key (register.cu), fused_wd_emu's for the host build (csrc/emu).
inline void impl_ops(torch::Library& m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm);
  m.impl("norm_partials_", boxed<&norm_partials_>());
  m.impl("norm_from_partials", &norm_from_partials);
  m.impl("clip_", &clip_);
  m.impl("adam_", boxed<&adam_op<adam>>());
  m.impl("sgd_", boxed<&sgd_op<sgd>>());
  m.impl("auto_decay", &auto_decay);
}

}  // namespace cuda
}  // namespace fused_wd
