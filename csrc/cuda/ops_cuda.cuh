// Host entry points of the CUDA backend, registered for the CUDA dispatch
// key in register.cu. Semantics: the schemas and comments in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>

namespace fused_wd {
namespace cuda {

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type);

void clip_(at::TensorList tensors, const at::Tensor& total_norm, double max_norm);

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
           double eps, double weight_decay, int64_t decay_mode, double initial_lr, bool amsgrad,
           bool maximize, const std::optional<at::Tensor>& grad_norm, double max_norm,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           bool skip_nonfinite, at::TensorList master_params, bool stochastic_rounding,
           int64_t sr_seed, at::IntArrayRef sr_ids);

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          const c10::List<bool>& buffer_is_new, double lr,
          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
          bool nesterov, double weight_decay, int64_t decay_mode, double initial_lr, bool maximize,
          const std::optional<at::Tensor>& grad_norm, double max_norm,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          bool skip_nonfinite, at::TensorList master_params, at::TensorList state_steps,
          bool stochastic_rounding, int64_t sr_seed, at::IntArrayRef sr_ids);

}  // namespace cuda
}  // namespace fused_wd
