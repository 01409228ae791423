// CPU backend of the fused_wd operators: argument checks, per-tensor
// scalars, the (tensor, chunk) work split over threads, and the choice of
// the instruction-set kernels for the running machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace fused_wd {
namespace cpu {

// The kernel table for this machine; FUSED_WD_CPU_ISA=base|avx2|avx512
// forces one (an error if the machine lacks it).
const KernelTable& table() {
  static const KernelTable t = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
    const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                            __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512dq");
#else
    const bool has_avx2 = false, has_avx512 = false;
#endif
    const char* env = std::getenv("FUSED_WD_CPU_ISA");
    const std::string want = env ? env : "";
    if (want == "base") return kernels_base();
    if (want == "avx2") {
      TORCH_CHECK(has_avx2, "FUSED_WD_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
      return kernels_avx2();
    }
    if (want == "avx512") {
      TORCH_CHECK(has_avx512, "FUSED_WD_CPU_ISA=avx512 but this CPU lacks AVX-512 F/VL/BW/DQ");
      return kernels_avx512();
    }
    TORCH_CHECK(want.empty(), "FUSED_WD_CPU_ISA must be base, avx2 or avx512, got '", want, "'");
    if (has_avx512) return kernels_avx512();
    if (has_avx2) return kernels_avx2();
    return kernels_base();
  }();
  return t;
}

const char* isa_name() { return table().isa; }

namespace {

// Elements per work item. Fixed: the norm's partials (and so its bits)
// depend on it, never on the thread count.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Item {
  int64_t tensor, begin, end;
};

std::vector<Item> make_items(const std::vector<at::Tensor>& ts) {
  std::vector<Item> items;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t b = 0; b < n; b += kChunk)
      items.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
  }
  return items;
}

template <typename F>
void parallel_items(const std::vector<Item>& items, F f) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(items[k]);
  });
}

void* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

float read_float(const std::optional<at::Tensor>& t) { return t->item<float>(); }

// The decisions every update op shares: skip, unscale, clip.
struct StepPrep {
  bool skip = false;
  float inv_scale = 1.0f;
  float coef = 1.0f;
};

StepPrep step_prep(const std::optional<at::Tensor>& grad_norm, double max_norm,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
  StepPrep sp;
  if (found_inf.has_value() && found_inf->defined() && read_float(found_inf) != 0.0f) sp.skip = true;
  if (grad_scale.has_value() && grad_scale->defined())
    sp.inv_scale = static_cast<float>(1.0 / grad_scale->item<double>());
  if (grad_norm.has_value() && grad_norm->defined()) {
    const float n = read_float(grad_norm);
    if (skip_nonfinite && !is_finite(n)) sp.skip = true;
    if (max_norm > 0) sp.coef = clip_coef(n, static_cast<float>(max_norm));
  }
  return sp;
}

void check_step_scalars(const char* op, at::TensorList params,
                        const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& grad_norm,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  const at::Device cpu(at::kCPU);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, cpu, true);
  check_scalar_tensor(op, "grad_norm", grad_norm, cpu, true);
  check_scalar_tensor(op, "grad_scale", grad_scale, cpu, true);
  check_scalar_tensor(op, "found_inf", found_inf, cpu, true);
}

// stochastic_rounding needs one id per param.
void check_sr(const char* op, at::TensorList params, bool sr, at::IntArrayRef ids) {
  TORCH_CHECK(!sr || ids.size() == params.size(), op, ": stochastic_rounding needs one sr_ids "
              "entry per param, got ", ids.size(), " for ", params.size());
}

// The layout of entry i, with the stochastic-rounding key of step t.
Layout layout_of(const char* op, const at::Tensor& p, const at::Tensor& state, bool master,
                 bool sr, int64_t seed, at::IntArrayRef ids, size_t i, double t) {
  Layout L = layout_for(op, i, p.scalar_type(), state.scalar_type(), master, sr);
  if (L.sr)
    L.sr_key = sr_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(ids[i]), static_cast<uint64_t>(t));
  return L;
}

// ------------------------------------------------------------------ norm

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type) {
  const char* op = "fused_wd.multi_tensor_norm";
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  TORCH_CHECK(inf || norm_type == 2.0, op, ": norm_type must be 2.0 or inf, got ", norm_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] is sparse; dense tensors only");
    TORCH_CHECK(t.device().is_cpu(), op, ": tensors[", i, "] is on ", t.device(), ", not the CPU");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": tensors[", i, "] has dtype ",
                t.scalar_type(), "; floating point only");
  }
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (const auto& t : tensors) dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  const auto items = make_items(dense);
  std::vector<double> partial(items.size());
  const KernelTable& k = table();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const Item& it = items[j];
      const at::Tensor& t = dense[it.tensor];
      const Storage st = storage_of(op, "a tensor", t.scalar_type());
      partial[j] = inf ? k.absmax(st, t.data_ptr(), it.begin, it.end)
                       : k.sumsq(st, t.data_ptr(), it.begin, it.end);
    }
  });
  double total = 0.0;
  for (double v : partial) total = inf ? nan_max(v, total) : total + v;
  const double norm = inf ? total : std::sqrt(total);
  return at::scalar_tensor(static_cast<float>(norm), at::TensorOptions().dtype(at::kFloat));
}

// ------------------------------------------------------------------ clip

void clip_(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  const char* op = "fused_wd.clip_";
  check_lists(op, {{"tensors", tensors, true, false}}, c10::DeviceType::CPU);
  check_scalar_tensor(op, "total_norm", total_norm, at::Device(at::kCPU), true);
  const float coef = clip_coef(total_norm.item<float>(), static_cast<float>(max_norm));
  DenseLists d = make_dense({{"tensors", tensors, true, false}});
  const auto items = make_items(d.dense[0]);
  const KernelTable& k = table();
  parallel_items(items, [&](const Item& it) {
    const at::Tensor& t = d.dense[0][it.tensor];
    k.scale(storage_of(op, "a tensor", t.scalar_type()), t.data_ptr(), it.begin, it.end, coef);
  });
  d.write_back();
}

// ------------------------------------------------------------------ adam

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
           at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
           double beta1, double beta2, double eps, double weight_decay, int64_t decay_mode,
           double initial_lr, bool amsgrad, bool maximize,
           const std::optional<at::Tensor>& grad_norm, double max_norm,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           bool skip_nonfinite, at::TensorList master_params, bool stochastic_rounding,
           int64_t sr_seed, at::IntArrayRef sr_ids) {
  const char* op = "fused_wd.adam_";
  TORCH_CHECK(decay_mode >= 0 && decay_mode <= 2, op, ": decay_mode must be 0, 1 or 2");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(), op,
              ": amsgrad needs one max_exp_avg_sq per param");
  const std::vector<ListSpec> lists = {{"params", params, true, false},
                                       {"grads", grads, false, false},
                                       {"exp_avgs", exp_avgs, true, false, kDtypeState},
                                       {"exp_avg_sqs", exp_avg_sqs, true, false, kDtypeState},
                                       {"max_exp_avg_sqs", max_exp_avg_sqs, true, true, kDtypeState},
                                       {"master_params", master_params, true, true, kDtypeMaster}};
  check_lists(op, lists, c10::DeviceType::CPU);
  check_same_state_dtype(op, lists);
  check_sr(op, params, stochastic_rounding, sr_ids);
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps has ", state_steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < state_steps.size(); ++i)
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].device().is_cpu(), op,
                ": state_steps[", i, "] must be a one-element CPU tensor");
  check_step_scalars(op, params, lr_tensor, grad_norm, grad_scale, found_inf);
  const StepPrep sp = step_prep(grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite);
  if (sp.skip || params.empty()) return;

  const double lr_v = lr_tensor.has_value() && lr_tensor->defined() ? lr_tensor->item<double>() : lr;
  const int decay = decay_kind(static_cast<int>(decay_mode), weight_decay);
  const bool ams = amsgrad;
  std::vector<AdamScalars<float>> sf(params.size());
  std::vector<AdamScalars<double>> sd(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = state_steps[i].item<double>() + 1.0;
    if (params[i].scalar_type() == at::kDouble)
      sd[i] = make_adam_scalars<double>(lr_v, beta1, beta2, eps, weight_decay, decay_mode,
                                        initial_lr, t, make_grad_prep<double>(sp.inv_scale, sp.coef, maximize));
    else
      sf[i] = make_adam_scalars<float>(lr_v, beta1, beta2, eps, weight_decay, decay_mode,
                                       initial_lr, t, make_grad_prep<float>(sp.inv_scale, sp.coef, maximize));
  }

  DenseLists d = make_dense(lists);
  const auto& P = d.dense[0];
  const auto& G = d.dense[1];
  const auto& M = d.dense[2];
  const auto& V = d.dense[3];
  const auto& VM = d.dense[4];
  const auto& MP = d.dense[5];
  const bool master = !MP.empty();
  std::vector<Layout> layouts(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    layouts[i] = layout_of(op, P[i], M[i], master, stochastic_rounding, sr_seed, sr_ids, i,
                           state_steps[i].item<double>() + 1.0);
  const auto items = make_items(P);
  const KernelTable& k = table();
  parallel_items(items, [&](const Item& it) {
    const int64_t i = it.tensor;
    const Ptrs ptrs{ptr(P[i]), ptr(G[i]), master ? ptr(MP[i]) : nullptr,
                    ptr(M[i]), ptr(V[i]), ams ? ptr(VM[i]) : nullptr};
    if (layouts[i].param == Storage::kF64)
      k.adam_f64(ptrs, it.begin, it.end, sd[i], ams, decay);
    else
      k.adam(layouts[i], ptrs, it.begin, it.end, sf[i], ams, decay);
  });
  d.write_back();
  for (const auto& s : state_steps) s.add_(1);
}

// ------------------------------------------------------------------ sgd

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          const c10::List<bool>& buffer_is_new, double lr, const std::optional<at::Tensor>& lr_tensor,
          double momentum, double dampening, bool nesterov, double weight_decay,
          int64_t decay_mode, double initial_lr, bool maximize,
          const std::optional<at::Tensor>& grad_norm, double max_norm,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          bool skip_nonfinite, at::TensorList master_params, at::TensorList state_steps,
          bool stochastic_rounding, int64_t sr_seed, at::IntArrayRef sr_ids) {
  const char* op = "fused_wd.sgd_";
  TORCH_CHECK(decay_mode >= 0 && decay_mode <= 2, op, ": decay_mode must be 0, 1 or 2");
  const bool mom = momentum != 0.0;
  TORCH_CHECK(!mom || momentum_buffers.size() == params.size(), op,
              ": momentum != 0 needs one momentum buffer per param");
  TORCH_CHECK(!mom || buffer_is_new.size() == params.size(), op,
              ": buffer_is_new needs one flag per param");
  const std::vector<ListSpec> lists = {{"params", params, true, false},
                                       {"grads", grads, false, false},
                                       {"momentum_buffers", momentum_buffers, true, true, kDtypeState},
                                       {"master_params", master_params, true, true, kDtypeMaster}};
  check_lists(op, lists, c10::DeviceType::CPU);
  check_sr(op, params, stochastic_rounding, sr_ids);
  TORCH_CHECK(!stochastic_rounding || state_steps.size() == params.size(), op,
              ": stochastic_rounding needs one state_steps counter per param");
  for (size_t i = 0; i < state_steps.size(); ++i)
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].device().is_cpu(), op,
                ": state_steps[", i, "] must be a one-element CPU tensor");
  check_step_scalars(op, params, lr_tensor, grad_norm, grad_scale, found_inf);
  const StepPrep sp = step_prep(grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite);
  if (sp.skip || params.empty()) return;

  const double lr_v = lr_tensor.has_value() && lr_tensor->defined() ? lr_tensor->item<double>() : lr;
  const int decay = decay_kind(static_cast<int>(decay_mode), weight_decay);
  const auto sf = make_sgd_scalars<float>(lr_v, momentum, dampening, weight_decay, decay_mode,
                                          initial_lr, make_grad_prep<float>(sp.inv_scale, sp.coef, maximize));
  const auto sd = make_sgd_scalars<double>(lr_v, momentum, dampening, weight_decay, decay_mode,
                                           initial_lr, make_grad_prep<double>(sp.inv_scale, sp.coef, maximize));
  DenseLists d = make_dense(lists);
  const auto& P = d.dense[0];
  const auto& G = d.dense[1];
  const auto& B = d.dense[2];
  const auto& MP = d.dense[3];
  const bool master = !MP.empty();
  std::vector<Layout> layouts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = stochastic_rounding ? state_steps[i].item<double>() + 1.0 : 0.0;
    // without momentum there is no state: the layout's state storage is moot
    const at::Tensor& state = mom ? B[i] : master ? MP[i] : P[i];
    layouts[i] = layout_of(op, P[i], state, master, stochastic_rounding, sr_seed, sr_ids, i, t);
  }
  const auto items = make_items(P);
  const KernelTable& k = table();
  parallel_items(items, [&](const Item& it) {
    const int64_t i = it.tensor;
    const SgdModes md{decay, mom, nesterov, mom && buffer_is_new.get(i)};
    const Ptrs ptrs{ptr(P[i]), ptr(G[i]), master ? ptr(MP[i]) : nullptr,
                    mom ? ptr(B[i]) : nullptr, nullptr, nullptr};
    if (layouts[i].param == Storage::kF64)
      k.sgd_f64(ptrs, it.begin, it.end, sd, md);
    else
      k.sgd(layouts[i], ptrs, it.begin, it.end, sf, md);
  });
  d.write_back();
  if (stochastic_rounding)
    for (const auto& s : state_steps) s.add_(1);
}

}  // namespace
}  // namespace cpu
}  // namespace fused_wd

TORCH_LIBRARY_IMPL(fused_wd, CPU, m) {
  m.impl("multi_tensor_norm", &fused_wd::cpu::multi_tensor_norm);
  m.impl("clip_", &fused_wd::cpu::clip_);
  m.impl("adam_", &fused_wd::cpu::adam_);
  m.impl("sgd_", &fused_wd::cpu::sgd_);
}
