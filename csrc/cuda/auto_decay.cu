// auto_decay on CUDA: the strength of an automatic weight-decay mode,
// computed by one thread on the device (math.h auto_decay_value, the one
// spelling of the math) from the statistics and the step's skip/unscale/clip
// decision read there, so the step's wd_tensor never passes through the host.
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops_cuda.cuh"

namespace fused_wd {
namespace cuda {
namespace {

struct AutoDecayArgs {
  const double* stats;  // [2, n]
  const double* grad_sumsq;
  const double* steps;
  const double* numels;
  double* state;
  double* out;
  int64_t n;
  double weight_decay, beta2, eps;
  int mode;
};

__global__ void auto_decay_kernel(AutoDecayArgs a, PrepArgs prep) {
  const StepPrep pr = read_prep(prep);
  *a.out = auto_decay_value(a.mode, a.stats, a.stats + a.n, a.grad_sumsq, a.steps, a.numels, a.n, pr,
                            a.weight_decay, a.beta2, a.eps, a.state);
}

}  // namespace

at::Tensor auto_decay(const at::Tensor& stats, const at::Tensor& grad_sumsq, const at::Tensor& steps,
                      const at::Tensor& numels, at::Tensor& state, int64_t mode, double weight_decay,
                      double beta2, double eps, const std::optional<at::Tensor>& grad_norm,
                      double max_norm, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
  const char* op = "fused_wd::auto_decay";
  const int64_t n = check_auto_decay(op, stats, grad_sumsq, steps, numels, state, mode, kDeviceType);
  const at::Device device = stats.device();
  const PrepArgs prep =
      prep_args(op, device, grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite);
  DeviceGuard guard(device);
  at::Tensor out = at::empty({}, stats.options());
  AutoDecayArgs a;
  std::memset(&a, 0, sizeof(a));
  a.stats = stats.data_ptr<double>();
  a.grad_sumsq = grad_sumsq.data_ptr<double>();
  a.steps = steps.data_ptr<double>();
  a.numels = numels.data_ptr<double>();
  a.state = state.data_ptr<double>();
  a.out = out.data_ptr<double>();
  a.n = n;
  a.weight_decay = weight_decay;
  a.beta2 = beta2;
  a.eps = eps;
  a.mode = static_cast<int>(mode);
  launch(auto_decay_kernel, 1, 1, current_stream(device), a, prep);
  return out;
}

}  // namespace cuda
}  // namespace fused_wd
