// The schemas of the fused_wd operators, in one place: registered by
// csrc/ops.cpp for the fused_wd library, and by the host build of the CUDA
// kernels (csrc/emu) for its fused_wd_emu library, which runs the CUDA
// code on the same arguments.
#pragma once

namespace fused_wd {

constexpr const char* kSchemas[] = {
  // Global norm of many tensors (mixed dtypes, one device), as a float32
  // 0-dim tensor on that device. norm_type: 2.0 or inf. Deterministic.
  "multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor",

  // The norm in two deterministic halves (docs/design.md, "The global norm"):
  // norm_partials_ writes the partial of tensors[j] (its sum of squares, or
  // max |x| for inf, in float64) at out[index[j]]; a None or empty tensor
  // writes 0. A tensor's partial depends on nothing but the tensor, so
  // partials written one by one (as backward finishes each grad) equal those
  // of one call over all of them, bit for bit. norm_from_partials reduces
  // every partial of `partials` in a fixed order and returns the norm as a
  // float32 0-dim tensor; multi_tensor_norm is the two in one.
  //
  // of_grads: the partial of each entry's .grad instead (an entry without a
  // grad writes 0). A step passes its params: no list of grads is built in
  // Python.
  "norm_partials_(Tensor?[] tensors, Tensor(a!) out, int[] index, float norm_type, "
      "bool of_grads=False) -> ()",
  "norm_from_partials(Tensor partials, float norm_type) -> Tensor",

  // tensors[i] *= min(1, max_norm / (total_norm + 1e-6)), the scaling of
  // torch.nn.utils.clip_grad_norm_, with total_norm read on the device.
  "clip_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()",

  // One Adam/AdamW step over many tensors. grad_norm is the unscaled global
  // norm (clipping happens when it is given and max_norm > 0); grad_scale and
  // found_inf come from a GradScaler. When found_inf is set, or the norm is
  // not finite and skip_nonfinite, nothing is written and the step counters
  // do not advance. decay_mode: 0 l2, 1 decoupled, 2 independent, 3
  // corrected, 4 l1 (g += wd * sign(p)), 5 l1_proximal (after the update,
  // p = sign(p) * max(|p| - lr * wd, 0)); cautious_wd: the decay shrinks
  // only the elements where the update and the param agree in sign (modes
  // 1-3; refused with 0, 4 and 5).
  //
  // Mixed precision (all optional): exp_avgs/exp_avg_sqs/max_exp_avg_sqs may
  // be float32 or bfloat16 for float32/float16/bfloat16 params (math in
  // float32 whatever the storage). master_params (empty, or one float32 copy
  // per float16/bfloat16 param): the update reads and writes the master and
  // writes the param as the master rounded to nearest, in the same pass.
  // stochastic_rounding (bfloat16 params without a master): the param is
  // rounded stochastically with bits keyed by (sr_seed, sr_ids[i], step,
  // element index); sr_ids has one id per param.
  //
  // Statistics (optional, docs/design.md "Statistics of the pass"): stats is
  // a float64 [2, nslots] tensor on the params' device; the step writes, for
  // each param i, stats[0][stat_slots[i]] = the sum of squares of the param
  // values it computes (in the math type, before any rounding to 16-bit
  // storage: the fp32 master's new value when there is one) and
  // stats[1][stat_slots[i]] = the sum of the exp_avg_sq values it computes
  // (0 for sgd_). Deterministic: a param's sums depend on that param alone,
  // not on the list, the thread count or the launch. A skipped step writes
  // nothing.
  //
  // wd_tensor (optional, a 1-element float tensor on the params' device or
  // the CPU): the decay strength read on the device in place of
  // weight_decay's value; weight_decay still says whether the step decays
  // (0: no decay). The automatic decay modes pass auto_decay_'s result here.
  //
  // grads_from_params: grads is empty and each param's own .grad is its
  // gradient (an error names a param without one): a step whose grads
  // grads_ready accepted passes no list of grads from Python.
  //
  // Hyperparameters are keyword-only (after `*`): two floats can never be
  // swapped by position. Those that define the update (lr, betas, eps,
  // weight_decay, decay_mode) are always given; the switches and extras
  // default to the plain step (no clipping, no scaler, no rounding, ...),
  // and a call passes only what differs: each keyword costs the Python
  // binding about half a microsecond. The C++ side receives them as one
  // AdamCall (csrc/common.h).
  "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "Tensor(f!)[] master_params, int[] sr_ids=[], Tensor(g!)? stats=None, int[] stat_slots=[], *, "
      "float lr, Tensor? lr_tensor=None, float beta1, float beta2, float eps, "
      "float weight_decay, Tensor? wd_tensor=None, int decay_mode, bool cautious_wd=False, "
      "float initial_lr=1.0, bool amsgrad=False, bool maximize=False, "
      "Tensor? grad_norm=None, float max_norm=0.0, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool skip_nonfinite=True, bool stochastic_rounding=False, int sr_seed=0, "
      "bool grads_from_params=False) -> ()",

  // One SGD step over many tensors. momentum_buffers is empty when
  // momentum == 0; buffer_is_new[i] marks a buffer created for this step
  // (it is set to the gradient instead of being decayed). Mixed precision,
  // stats and wd_tensor as for adam_; stochastic_rounding also needs state_steps (one counter per
  // param, the step of the rounding's key, advanced unless the step is
  // skipped).
  "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "bool[] buffer_is_new, Tensor(c!)[] master_params, Tensor(d!)[] state_steps, "
      "int[] sr_ids=[], Tensor(e!)? stats=None, int[] stat_slots=[], *, float lr, "
      "Tensor? lr_tensor=None, float momentum, float dampening, bool nesterov, float weight_decay, "
      "Tensor? wd_tensor=None, int decay_mode, bool cautious_wd=False, float initial_lr=1.0, "
      "bool maximize=False, "
      "Tensor? grad_norm=None, float max_norm=0.0, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool skip_nonfinite=True, bool stochastic_rounding=False, int sr_seed=0, "
      "bool grads_from_params=False) -> ()",

  // Whether every param has the dtype dtypes[i] names (a c10::ScalarType
  // code: the dtype the caller validated the param's state against) and a
  // grad that adam_/sgd_ with grads_from_params and norm_partials_ with
  // of_grads take as it is: defined, strided, with the param's dtype, shape
  // and device. Reads metadata only (no device work, no sync).
  "grads_ready(Tensor[] params, int[] dtypes) -> bool",

  // The decay strength of an automatic weight-decay mode for this step
  // (docs/weight-decay.md, "Automatic weight decay"), as a float64 0-dim
  // tensor on the statistics' device, for adam_/sgd_'s wd_tensor. Inputs,
  // one entry per param the step updates (all float64, 1-D, on one device):
  // stats [2, n] (rows: the sum of squares of the params and the sum of
  // exp_avg_sq before this step, as the last pass left them), grad_sumsq [n]
  // (the sum of squares of each grad as given: scaled when grad_scale is),
  // steps [n] (the step counters before this step), numels [n]. mode 0
  // "scheduled" (SWD): weight_decay / (sqrt(mean of v_hat_t) + eps); mode 1
  // "adaptive" (AWD): lambda_bar, smoothed in state (float64, 1 element)
  // unless the step is skipped. grad_scale, found_inf, grad_norm, max_norm
  // and skip_nonfinite as for adam_ (the same skip/unscale/clip decision).
  "auto_decay(Tensor stats, Tensor grad_sumsq, Tensor steps, Tensor numels, Tensor(a!) state, *, "
      "int mode, float weight_decay, float beta2, float eps, Tensor? grad_norm, float max_norm, "
      "Tensor? grad_scale, Tensor? found_inf, bool skip_nonfinite) -> Tensor",
};

}  // namespace fused_wd
