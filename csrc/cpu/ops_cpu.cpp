// CPU backend of the fused_wd operators: argument checks, per-tensor
// scalars, the (tensor, chunk) work split over threads, and the choice of
// the instruction-set kernels for the running machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
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

// ------------------------------------------------------------------ tuning

namespace {

// The tuning in force and why it was chosen (set once at first use, or by
// set_tuning for A/B runs; the kernels read it once per range).
std::atomic<int> g_prefetch_blocks{-1}, g_locality{3};
std::string g_reason;
std::mutex g_tuning_mutex;

struct Rule {
  Tuning tuning;
  std::string reason;
};

// The rule: per CPU vendor (the only distinction measured so far;
// docs/design.md, "CPU tuning"). Intel (a 2-core AVX-512 Xeon VM): 8 blocks
// ahead, locality 3, which took the bf16 clip + AdamW step from 48 to 27 ms
// and fp32 from 43 to 38 ms. AMD: no software prefetch; on a Zen 4 EPYC VM
// it made clip + AdamW 3-5% faster, on a Zen 3 EPYC VM every setting was
// within the noise, off at or below 8 blocks ahead (paired medians 0.94-1.0).
// Other vendors: Intel's.
Rule rule_for_this_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd")) return {Tuning{0, 3}, "rule for AMD CPUs: no software prefetch"};
  if (__builtin_cpu_is("intel")) return {Tuning{8, 3}, "rule for Intel CPUs: 8 blocks ahead, locality 3"};
#endif
  return {Tuning{8, 3}, "rule for CPUs of other vendors (Intel's): 8 blocks ahead, locality 3"};
}

// FUSED_WD_CPU_PREFETCH: "off", "<blocks>" or "<blocks>:<locality>".
Rule rule_from_env(const std::string& v) {
  const std::string what = "FUSED_WD_CPU_PREFETCH=" + v;
  if (v == "off" || v == "0") return {Tuning{0, 3}, what + " (forced): no software prefetch"};
  int blocks = -1, locality = 3;
  size_t used = 0;
  try {
    blocks = std::stoi(v, &used);
    if (used < v.size()) {
      TORCH_CHECK(v[used] == ':', "");
      size_t used2 = 0;
      locality = std::stoi(v.substr(used + 1), &used2);
      TORCH_CHECK(used + 1 + used2 == v.size(), "");
    }
  } catch (const std::exception&) {
    blocks = -1;
  }
  TORCH_CHECK(blocks >= 0 && blocks <= 1024 && locality >= 0 && locality <= 3,
              "FUSED_WD_CPU_PREFETCH must be 'off', '<blocks>' or '<blocks>:<locality>' with blocks in "
              "[0, 1024] and locality in [0, 3], got '", v, "'");
  return {Tuning{blocks, locality}, what + " (forced)"};
}

void choose_tuning() {
  std::lock_guard<std::mutex> lock(g_tuning_mutex);
  if (g_prefetch_blocks.load() >= 0) return;
  const char* env = std::getenv("FUSED_WD_CPU_PREFETCH");
  const Rule r = env && *env ? rule_from_env(env) : rule_for_this_cpu();
  g_reason = r.reason;
  g_locality.store(r.tuning.locality);
  g_prefetch_blocks.store(r.tuning.prefetch_blocks);
}

}  // namespace

Tuning tuning() {
  if (g_prefetch_blocks.load(std::memory_order_relaxed) < 0) choose_tuning();
  return Tuning{g_prefetch_blocks.load(std::memory_order_relaxed),
                g_locality.load(std::memory_order_relaxed)};
}

std::string tuning_reason() {
  tuning();
  std::lock_guard<std::mutex> lock(g_tuning_mutex);
  return g_reason;
}

void set_tuning(int prefetch_blocks, int locality) {
  TORCH_CHECK(prefetch_blocks >= 0 && prefetch_blocks <= 1024 && locality >= 0 && locality <= 3,
              "fused_wd: prefetch_blocks must be in [0, 1024] and locality in [0, 3], got ",
              prefetch_blocks, " and ", locality);
  tuning();
  std::lock_guard<std::mutex> lock(g_tuning_mutex);
  g_reason = "set by fused_wd.set_cpu_tuning: " + std::to_string(prefetch_blocks) +
             " blocks ahead, locality " + std::to_string(locality);
  g_locality.store(locality);
  g_prefetch_blocks.store(prefetch_blocks);
}

namespace {

// Elements per work item. Fixed: the norm's partials (and so its bits)
// depend on it, never on the thread count.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Item {
  int64_t tensor, begin, end;
};

// Appends the items of tensor i, of n elements.
void add_items(std::vector<Item>& items, size_t i, int64_t n) {
  for (int64_t b = 0; b < n; b += kChunk) items.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
}

std::vector<Item> make_items(at::TensorList ts) {
  std::vector<Item> items;
  for (size_t i = 0; i < ts.size(); ++i) add_items(items, i, ts[i].numel());
  return items;
}

// Elements a thread gets at least: below it, waking threads costs more than
// it saves (thousands of tiny tensors run on the calling thread). Does not
// change any result: items are independent, and the norm's partials are
// per item.
constexpr int64_t kMinTaskElems = int64_t(1) << 17;

// at::parallel_for's grain (in items) for the items: a task of at least
// kMinTaskElems elements on average.
int64_t grain_of(const std::vector<Item>& items) {
  int64_t total = 0;
  for (const Item& it : items) total += it.end - it.begin;
  const int64_t n = static_cast<int64_t>(items.size());
  if (total <= kMinTaskElems) return n + 1;  // one task, run inline
  return std::max<int64_t>(1, kMinTaskElems * n / total);
}

template <typename F>
void parallel_indexed(const std::vector<Item>& items, F f) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain_of(items), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(items[k], static_cast<size_t>(k));
  });
}

template <typename F>
void parallel_items(const std::vector<Item>& items, F f) {
  parallel_indexed(items, [&](const Item& it, size_t) { f(it); });
}

// The data pointers of a checked entry's tensors (null when empty).
void* ptr(const at::Tensor& t) { return t.numel() ? data_of(t) : nullptr; }
const void* cptr(const at::Tensor& t) { return t.numel() ? const_data_of(t) : nullptr; }

// Asks for the first elements of a one-item tensor's streams (its item is
// then all of it, or most): with thousands of tiny tensors each one's data
// is a cache miss of its own, and the kernels' prefetch (for_blocks) only
// looks ahead within a range.
void prefetch_item(const std::vector<Item>& items, const std::vector<Ptrs>& ptrs, size_t j) {
  if (items.size() < kStagedPrefetchFrom || j >= items.size() || items[j].begin != 0) return;
  const Ptrs& q = ptrs[items[j].tensor];
  for (const void* a : {static_cast<const void*>(q.p), q.g, static_cast<const void*>(q.master),
                        static_cast<const void*>(q.s0), static_cast<const void*>(q.s1),
                        static_cast<const void*>(q.s2)})
    if (a != nullptr) __builtin_prefetch(a);
}

// How many items ahead prefetch_item looks.
constexpr size_t kItemsAhead = 8;

// A (checked) step counter, read and advanced through its data pointer, as
// the CUDA kernels do on the device: no dispatcher call per tensor.
struct Counter {
  void* at = nullptr;
  bool f64 = false;
  explicit Counter(const at::Tensor& s) : at(data_of(s)), f64(s.scalar_type() == at::kDouble) {}
  Counter() = default;
  double next() const { return step_after(at, f64); }  // the step of the update that follows
  void advance() const {
    if (f64) *static_cast<double*>(at) += 1.0;
    else *static_cast<float*>(at) += 1.0f;
  }
};

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

double value_of(const std::optional<at::Tensor>& t) { return given(t) ? t->item<double>() : 0.0; }

// Checks the 1-element arguments (on the CPU) and takes the step's skip /
// unscale / clip decision (math.h) from their values.
StepPrep prepare(const char* op, const StepArgs& a) {
  const at::Device cpu(at::kCPU);
  check_scalar_tensor(op, "lr_tensor", a.lr_tensor, cpu, true);
  check_scalar_tensor(op, "grad_norm", a.grad_norm, cpu, true);
  check_scalar_tensor(op, "grad_scale", a.grad_scale, cpu, true);
  check_scalar_tensor(op, "found_inf", a.found_inf, cpu, true);
  return step_prep(given(a.found_inf), value_of(a.found_inf), given(a.grad_scale),
                   value_of(a.grad_scale), given(a.grad_norm),
                   given(a.grad_norm) ? a.grad_norm->item<float>() : 0.0f, a.max_norm > 0,
                   static_cast<float>(a.max_norm), a.skip_nonfinite);
}

double lr_of(const StepArgs& a) { return given(a.lr_tensor) ? a.lr_tensor->item<double>() : a.lr; }

double wd_of(const StepArgs& a) {
  return given(a.wd_tensor) ? a.wd_tensor->item<double>() : a.weight_decay;
}

// The statistics of an update (schema: csrc/schema.h): each item writes its
// two sums into its own entry; stats_done combines a tensor's items in item
// order (the sums depend on the tensor alone) and writes its slot.
struct ItemStats {
  std::vector<double> sums;  // 2 per item
  double* at(size_t item) { return sums.empty() ? nullptr : &sums[2 * item]; }
};

ItemStats stats_for(const StepArgs& a, size_t nitems) {
  ItemStats s;
  if (given(a.stats)) s.sums.assign(2 * nitems, 0.0);
  return s;
}

void stats_done(const StepArgs& a, const std::vector<Item>& items, const ItemStats& s,
                size_t nparams) {
  if (!given(a.stats)) return;
  std::vector<double> per(2 * nparams, 0.0);
  for (size_t j = 0; j < items.size(); ++j) {
    per[2 * items[j].tensor] += s.sums[2 * j];
    per[2 * items[j].tensor + 1] += s.sums[2 * j + 1];
  }
  double* out = a.stats->data_ptr<double>();
  const int64_t nslots = a.stats->size(1);
  for (size_t i = 0; i < nparams; ++i) {
    out[a.stat_slots[i]] = per[2 * i];
    out[nslots + a.stat_slots[i]] = per[2 * i + 1];
  }
}

// The layouts of a step's entries: entry i's (param p, states of the dtype
// of `state`), with the stochastic-rounding key of step t. The entries of a
// step mostly share one pair of dtypes, whose layout (layout_for: checked,
// an error naming the entry if unsupported) is then made once.
class LayoutOf {
 public:
  LayoutOf(const char* op, bool master, const StepArgs& a) : op_(op), master_(master), a_(a) {}
  Layout operator()(const at::Tensor& p, const at::Tensor& state, size_t i, double t) {
    const at::ScalarType pt = p.scalar_type(), st = state.scalar_type();
    if (!made_ || pt != pt_ || st != st_) {
      last_ = layout_for(op_, i, pt, st, master_, a_.stochastic_rounding);
      pt_ = pt, st_ = st, made_ = true;
    }
    Layout L = last_;
    if (L.sr)
      L.sr_key = sr_key(static_cast<uint64_t>(a_.sr_seed), static_cast<uint64_t>(a_.sr_ids[i]),
                        static_cast<uint64_t>(t));
    return L;
  }

 private:
  const char* op_;
  bool master_;
  const StepArgs& a_;
  bool made_ = false;
  at::ScalarType pt_ = at::kFloat, st_ = at::kFloat;
  Layout last_{};
};

// ------------------------------------------------------------------ norm

// The partial of each tensor (float64): the partials of its chunks (fixed
// size, computed in parallel), combined in chunk order. It depends on the
// tensor alone, never on the list it came in or the thread count.
std::vector<double> tensor_partials(const char* op, at::TensorList dense, bool inf) {
  const auto items = make_items(dense);
  std::vector<double> chunk(items.size());
  const KernelTable& k = table();
  // small reads run on the calling thread (grain_of): the backward hooks
  // write one param's part at a time, where waking the pool costs more
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain_of(items), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const Item& it = items[j];
      const at::Tensor& t = dense[it.tensor];
      const Storage st = storage_of(op, "a tensor", t.scalar_type());
      chunk[j] = inf ? k.absmax(st, t.data_ptr(), it.begin, it.end)
                     : k.sumsq(st, t.data_ptr(), it.begin, it.end);
    }
  });
  std::vector<double> out(dense.size(), 0.0);
  for (size_t j = 0; j < items.size(); ++j) {
    double& acc = out[items[j].tensor];
    acc = inf ? nan_max(chunk[j], acc) : acc + chunk[j];
  }
  return out;
}

// The norm of n partials, combined in index order.
at::Tensor reduce_partials(const double* partials, int64_t n, bool inf) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total = inf ? nan_max(partials[i], total) : total + partials[i];
  const double norm = inf ? total : std::sqrt(total);
  return at::scalar_tensor(static_cast<float>(norm), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor multi_tensor_norm(at::TensorList tensors, double norm_type) {
  const char* op = "fused_wd.multi_tensor_norm";
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const bool inf = norm_kind(op, norm_type);
  std::vector<int64_t> index(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) index[i] = static_cast<int64_t>(i);
  const NormInputs in = norm_inputs(op, tensors, index, static_cast<int64_t>(tensors.size()),
                                    at::Device(at::kCPU));
  std::vector<double> all(tensors.size(), 0.0);
  const std::vector<double> part = tensor_partials(op, in.present.tensors(), inf);
  for (size_t k = 0; k < part.size(); ++k) all[in.slot[k]] = part[k];
  return reduce_partials(all.data(), static_cast<int64_t>(all.size()), inf);
}

void norm_partials_(OptionalTensors tensors, at::Tensor& out, at::IntArrayRef index,
                    double norm_type, bool of_grads) {
  const char* op = "fused_wd.norm_partials_";
  const bool inf = norm_kind(op, norm_type);
  check_partials(op, out, c10::DeviceType::CPU);
  const NormInputs in =
      norm_inputs(op, tensors.tensors, index, out.numel(), out.device(), of_grads);
  const std::vector<double> part = tensor_partials(op, in.present.tensors(), inf);
  double* o = out.data_ptr<double>();
  for (int64_t s : in.zero) o[s] = 0.0;
  for (size_t k = 0; k < part.size(); ++k) o[in.slot[k]] = part[k];
}

at::Tensor norm_from_partials(const at::Tensor& partials, double norm_type) {
  const char* op = "fused_wd.norm_from_partials";
  const bool inf = norm_kind(op, norm_type);
  check_partials(op, partials, c10::DeviceType::CPU);
  return reduce_partials(partials.data_ptr<double>(), partials.numel(), inf);
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

void adam(const AdamCall& c) {
  const char* op = "fused_wd.adam_";
  const StepArgs& a = c.step;
  const size_t n = c.params.size();
  check_step_args(op, a, n);
  TORCH_CHECK(!c.amsgrad || c.max_exp_avg_sqs.size() == n, op,
              ": amsgrad needs one max_exp_avg_sq per param");
  const std::vector<ListSpec> lists = {{"params", c.params, true, false},
                                       {"grads", c.grads, false, false},
                                       {"exp_avgs", c.exp_avgs, true, false, kDtypeState},
                                       {"exp_avg_sqs", c.exp_avg_sqs, true, false, kDtypeState},
                                       {"max_exp_avg_sqs", c.max_exp_avg_sqs, true, true, kDtypeState},
                                       {"master_params", c.master_params, true, true, kDtypeMaster}};
  DenseLists d = checked_dense(op, lists, c.state_steps, true, c10::DeviceType::CPU);
  check_stats(op, a, n, n ? c.params[0].device() : at::Device(at::kCPU), true);
  const StepPrep sp = prepare(op, a);
  const bool master = !c.master_params.empty();
  const auto& P = d.dense[0];
  const auto& G = d.dense[1];
  const auto& M = d.dense[2];
  const auto& V = d.dense[3];
  const auto& VM = d.dense[4];
  const auto& MP = d.dense[5];
  // One pass over the entries after checked_dense's (with thousands of
  // params their metadata is not in cache, and each pass costs as much as
  // the first): counters read, every layout checked before anything is
  // written, data pointers and work items gathered.
  std::vector<double> ts(n);
  std::vector<Layout> layouts(n);
  LayoutOf layout_of(op, master, a);
  std::vector<Ptrs> ptrs(n);
  std::vector<Counter> counters(n);
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    for (const auto& l : d.dense) prefetch_with_storage(l, i);
    prefetch_with_storage(c.state_steps, i);
    counters[i] = Counter(held(op, "state_steps", i, c.state_steps[i]));
    ts[i] = counters[i].next();
    layouts[i] = layout_of(c.params[i], c.exp_avgs[i], i, ts[i]);
    ptrs[i] = Ptrs{ptr(held(op, "params", i, P[i])), cptr(held(op, "grads", i, G[i])),
                   master ? ptr(held(op, "master_params", i, MP[i])) : nullptr,
                   ptr(held(op, "exp_avgs", i, M[i])), ptr(held(op, "exp_avg_sqs", i, V[i])),
                   c.amsgrad ? ptr(held(op, "max_exp_avg_sqs", i, VM[i])) : nullptr};
    add_items(items, i, P[i].numel());
  }
  if (sp.skip || n == 0) return;

  const double lr = lr_of(a);
  const double wd = wd_of(a);
  const int decay = decay_kind(static_cast<int>(a.decay_mode), a.weight_decay, a.cautious_wd);
  auto scalars = [&](auto zero, double t) {
    using T = decltype(zero);
    return make_adam_scalars<T>(lr, c.beta1, c.beta2, c.eps, wd,
                                static_cast<int>(a.decay_mode), a.initial_lr, t,
                                make_grad_prep<T>(sp.inv_scale, sp.coef, a.maximize));
  };
  // The counters of a group usually agree: the scalars (two pow in double)
  // are computed once per distinct step, not once per tensor.
  std::vector<AdamScalars<float>> sf(n);
  std::vector<AdamScalars<double>> sd(n);
  bool have_f = false, have_d = false;
  double tf = 0.0, td = 0.0;  // the steps of lf / ld
  AdamScalars<float> lf{};
  AdamScalars<double> ld{};
  for (size_t i = 0; i < n; ++i) {
    const double t = ts[i];
    if (layouts[i].param == Storage::kF64) {
      if (!have_d || t != td) ld = scalars(0.0, t), td = t, have_d = true;
      sd[i] = ld;
    } else {
      if (!have_f || t != tf) lf = scalars(0.0f, t), tf = t, have_f = true;
      sf[i] = lf;
    }
  }

  const KernelTable& k = table();
  ItemStats stats = stats_for(a, items.size());
  parallel_indexed(items, [&](const Item& it, size_t j) {
    prefetch_item(items, ptrs, j + kItemsAhead);
    const int64_t i = it.tensor;
    if (layouts[i].param == Storage::kF64)
      k.adam_f64(ptrs[i], it.begin, it.end, sd[i], c.amsgrad, decay, stats.at(j));
    else
      k.adam(layouts[i], ptrs[i], it.begin, it.end, sf[i], c.amsgrad, decay, stats.at(j));
  });
  d.write_back();
  for (const Counter& t : counters) t.advance();
  stats_done(a, items, stats, n);
}

// ------------------------------------------------------------------ sgd

void sgd(const SgdCall& c) {
  const char* op = "fused_wd.sgd_";
  const StepArgs& a = c.step;
  const size_t n = c.params.size();
  check_step_args(op, a, n);
  const bool mom = c.momentum != 0.0;
  TORCH_CHECK(!mom || c.momentum_buffers.size() == n, op,
              ": momentum != 0 needs one momentum buffer per param");
  TORCH_CHECK(!mom || c.buffer_is_new.size() == n, op, ": buffer_is_new needs one flag per param");
  const std::vector<ListSpec> lists = {{"params", c.params, true, false},
                                       {"grads", c.grads, false, false},
                                       {"momentum_buffers", c.momentum_buffers, true, true, kDtypeState},
                                       {"master_params", c.master_params, true, true, kDtypeMaster}};
  DenseLists d = checked_dense(op, lists, c.state_steps, a.stochastic_rounding, c10::DeviceType::CPU);
  check_stats(op, a, n, n ? c.params[0].device() : at::Device(at::kCPU), true);
  const StepPrep sp = prepare(op, a);
  const bool master = !c.master_params.empty();
  const auto& P = d.dense[0];
  const auto& G = d.dense[1];
  const auto& B = d.dense[2];
  const auto& MP = d.dense[3];
  // one pass over the entries, as in adam
  std::vector<Layout> layouts(n);
  LayoutOf layout_of(op, master, a);
  std::vector<Ptrs> ptrs(n);
  std::vector<Counter> counters(a.stochastic_rounding ? n : 0);
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    for (const auto& l : d.dense) prefetch_with_storage(l, i);
    prefetch_with_storage(c.state_steps, i);
    double t = 0.0;
    if (a.stochastic_rounding) {
      counters[i] = Counter(held(op, "state_steps", i, c.state_steps[i]));
      t = counters[i].next();
    }
    // without momentum there is no state: the layout's state storage is the
    // master's (or the param's)
    const at::Tensor& state = mom ? c.momentum_buffers[i] : master ? c.master_params[i] : c.params[i];
    layouts[i] = layout_of(c.params[i], state, i, t);
    ptrs[i] = Ptrs{ptr(held(op, "params", i, P[i])), cptr(held(op, "grads", i, G[i])),
                   master ? ptr(held(op, "master_params", i, MP[i])) : nullptr,
                   mom ? ptr(held(op, "momentum_buffers", i, B[i])) : nullptr, nullptr, nullptr};
    add_items(items, i, P[i].numel());
  }
  if (sp.skip || n == 0) return;

  const double lr = lr_of(a);
  const double wd = wd_of(a);
  const int decay = decay_kind(static_cast<int>(a.decay_mode), a.weight_decay, a.cautious_wd);
  auto scalars = [&](auto zero) {
    using T = decltype(zero);
    return make_sgd_scalars<T>(lr, c.momentum, c.dampening, wd,
                               static_cast<int>(a.decay_mode), a.initial_lr,
                               make_grad_prep<T>(sp.inv_scale, sp.coef, a.maximize));
  };
  const auto sf = scalars(0.0f);
  const auto sd = scalars(0.0);
  const KernelTable& k = table();
  ItemStats stats = stats_for(a, items.size());
  parallel_indexed(items, [&](const Item& it, size_t j) {
    prefetch_item(items, ptrs, j + kItemsAhead);
    const int64_t i = it.tensor;
    const SgdModes md{decay, mom, c.nesterov, mom && c.buffer_is_new.get(i)};
    if (layouts[i].param == Storage::kF64)
      k.sgd_f64(ptrs[i], it.begin, it.end, sd, md, stats.at(j));
    else
      k.sgd(layouts[i], ptrs[i], it.begin, it.end, sf, md, stats.at(j));
  });
  d.write_back();
  for (const Counter& t : counters) t.advance();
  stats_done(a, items, stats, n);
}

// ------------------------------------------------------------ auto_decay

at::Tensor auto_decay(const at::Tensor& stats, const at::Tensor& grad_sumsq, const at::Tensor& steps,
                      const at::Tensor& numels, at::Tensor& state, int64_t mode, double weight_decay,
                      double beta2, double eps, const std::optional<at::Tensor>& grad_norm,
                      double max_norm, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, bool skip_nonfinite) {
  const char* op = "fused_wd.auto_decay";
  const int64_t n = check_auto_decay(op, stats, grad_sumsq, steps, numels, state, mode,
                                     c10::DeviceType::CPU);
  StepArgs a{};
  a.grad_norm = grad_norm;
  a.max_norm = max_norm;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  a.skip_nonfinite = skip_nonfinite;
  const StepPrep sp = prepare(op, a);
  const double* s = stats.data_ptr<double>();
  const double value =
      auto_decay_value(static_cast<int>(mode), s, s + n, grad_sumsq.data_ptr<double>(),
                       steps.data_ptr<double>(), numels.data_ptr<double>(), n, sp, weight_decay,
                       beta2, eps, state.data_ptr<double>());
  return at::scalar_tensor(value, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace
}  // namespace cpu
}  // namespace fused_wd

TORCH_LIBRARY_IMPL(fused_wd, CPU, m) {
  m.impl("auto_decay", &fused_wd::cpu::auto_decay);
  m.impl("multi_tensor_norm", &fused_wd::cpu::multi_tensor_norm);
  m.impl("norm_partials_", fused_wd::boxed<&fused_wd::cpu::norm_partials_>());
  m.impl("norm_from_partials", &fused_wd::cpu::norm_from_partials);
  m.impl("clip_", &fused_wd::cpu::clip_);
  m.impl("adam_", fused_wd::boxed<&fused_wd::adam_op<fused_wd::cpu::adam>>());
  m.impl("sgd_", fused_wd::boxed<&fused_wd::sgd_op<fused_wd::cpu::sgd>>());
}
