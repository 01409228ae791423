// The one schema definition of the fused_wd operators, and the Python module
// that loading fused_wd._C needs. Backends register their kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; fake (meta) kernels are
// registered from Python (fused_wd/_ops.py).
#include <Python.h>
#include <torch/library.h>

#ifndef FUSED_WD_TORCH_VERSION
#define FUSED_WD_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fused_wd, m) {
  // Global norm of many tensors (mixed dtypes, one device), as a float32
  // 0-dim tensor on that device. norm_type: 2.0 or inf. Deterministic.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor");

  // tensors[i] *= min(1, max_norm / (total_norm + 1e-6)), the scaling of
  // torch.nn.utils.clip_grad_norm_, with total_norm read on the device.
  m.def("clip_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()");

  // One Adam/AdamW step over many tensors. grad_norm is the unscaled global
  // norm (clipping happens when it is given and max_norm > 0); grad_scale and
  // found_inf come from a GradScaler. When found_inf is set, or the norm is
  // not finite and skip_nonfinite, nothing is written and the step counters
  // do not advance. decay_mode: 0 l2, 1 decoupled, 2 independent.
  //
  // Mixed precision (all optional): exp_avgs/exp_avg_sqs/max_exp_avg_sqs may
  // be float32 or bfloat16 for float32/float16/bfloat16 params (math in
  // float32 whatever the storage). master_params (empty, or one float32 copy
  // per float16/bfloat16 param): the update reads and writes the master and
  // writes the param as the master rounded to nearest, in the same pass.
  // stochastic_rounding (bfloat16 params without a master): the param is
  // rounded stochastically with bits keyed by (sr_seed, sr_ids[i], step,
  // element index); sr_ids has one id per param.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
      "float weight_decay, int decay_mode, float initial_lr, bool amsgrad, bool maximize, "
      "Tensor? grad_norm, float max_norm, Tensor? grad_scale, Tensor? found_inf, "
      "bool skip_nonfinite, Tensor(f!)[] master_params, bool stochastic_rounding=False, "
      "int sr_seed=0, int[] sr_ids=[]) -> ()");

  // One SGD step over many tensors. momentum_buffers is empty when
  // momentum == 0; buffer_is_new[i] marks a buffer created for this step
  // (it is set to the gradient instead of being decayed). Mixed precision as
  // for adam_; stochastic_rounding also needs state_steps (one counter per
  // param, the step of the rounding's key, advanced unless the step is
  // skipped).
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "bool[] buffer_is_new, float lr, Tensor? lr_tensor, float momentum, float dampening, "
      "bool nesterov, float weight_decay, int decay_mode, float initial_lr, bool maximize, "
      "Tensor? grad_norm, float max_norm, Tensor? grad_scale, Tensor? found_inf, "
      "bool skip_nonfinite, Tensor(c!)[] master_params, Tensor(d!)[] state_steps, "
      "bool stochastic_rounding=False, int sr_seed=0, int[] sr_ids=[]) -> ()");
}

namespace fused_wd {
namespace cpu {
const char* isa_name();
}
}  // namespace fused_wd

static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fused_wd::cpu::isa_name());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyMethodDef fused_wd_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef fused_wd_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "fused_wd compiled kernels", -1, fused_wd_methods};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fused_wd_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FUSED_WD_TORCH_VERSION);
#ifdef FUSED_WD_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
