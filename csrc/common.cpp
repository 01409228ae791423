#include "common.h"

#include <cmath>

#include "fused_wd/math.h"

#include <sstream>

namespace fused_wd {

namespace {

bool is_low(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble || is_low(t); }

// Whether a tensor of dtype tt may sit next to a param of dtype pt in a
// list with dtype rule `rule` (the rules of DtypeRule).
bool dtype_ok(int rule, at::ScalarType pt, at::ScalarType tt) {
  if (rule == kDtypeMaster) return is_low(pt) && tt == at::kFloat;
  if (rule == kDtypeState)
    return tt == pt || ((is_low(pt) || pt == at::kFloat) && (tt == at::kFloat || tt == at::kBFloat16));
  return tt == pt;
}

// a == b for sizes or strides, inline (IntArrayRef's == calls memcmp).
bool same_dims(at::IntArrayRef a, at::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k] != b[k]) return false;
  return true;
}

// Every check of check_lists on entry i as one predicate over TensorImpl
// fields (no dispatcher call, no message built): the per-step cost.
// check_lists builds the message only when some entry fails it.
bool entry_checks_ok(const std::vector<ListSpec>& lists, size_t i, const at::Device& device,
                     bool storages) {
  const at::TensorImpl* p = lists[0].tensors[i].unsafeGetTensorImpl();
  const at::ScalarType pt = p->dtype().toScalarType();
  for (const auto& l : lists) {
    if (l.optional && l.tensors.empty()) continue;
    const at::Tensor& ti = l.tensors[i];
    const at::TensorImpl* t = ti.unsafeGetTensorImpl();
    if (!ti.defined() || t->layout() != at::kStrided || t->device() != device) return false;
    const at::ScalarType tt = t->dtype().toScalarType();
    if (!is_kernel_dtype(tt) || !dtype_ok(l.dtype_rule, pt, tt)) return false;
    if (t != p && !same_dims(t->sizes(), p->sizes())) return false;
    if (storages && !storage_fits(t)) return false;
  }
  return true;
}

// Prefetches the metadata of entry i + kMetaAhead of the lists (and steps):
// with thousands of params it is not in cache, and the misses then overlap.
// Prefetches, at entry i, what the checks of the entries further on read:
// their metadata, and with `storages` their storages (in
// prefetch_with_storage's stages).
void prefetch_entry(const std::vector<ListSpec>& lists, at::TensorList steps, size_t i,
                    bool storages) {
  if (storages) {
    for (const auto& l : lists) prefetch_with_storage(l.tensors, i);
    prefetch_with_storage(steps, i);
    return;
  }
  for (const auto& l : lists)
    if (i + kMetaAhead < l.tensors.size()) prefetch_meta(l.tensors[i + kMetaAhead]);
  if (i + kMetaAhead < steps.size()) prefetch_meta(steps[i + kMetaAhead]);
}

bool lists_ok(const std::vector<ListSpec>& lists, size_t n, const at::Device& device,
              c10::DeviceType device_type) {
  if (device.type() != device_type) return false;
  // entry by entry: the tensors of one param are read together, each once
  for (size_t i = 0; i < n; ++i) {
    prefetch_entry(lists, {}, i, true);
    if (!entry_checks_ok(lists, i, device, true)) return false;
  }
  return true;
}

// check_same_state_dtype's predicate on entry i.
bool same_state_dtype_at(const std::vector<ListSpec>& lists, size_t i) {
  const at::TensorImpl* first = nullptr;
  for (const auto& l : lists) {
    if (l.dtype_rule != kDtypeState || l.tensors.empty()) continue;
    const at::TensorImpl* t = l.tensors[i].unsafeGetTensorImpl();
    if (first == nullptr) first = t;
    else if (t->dtype() != first->dtype()) return false;
  }
  return true;
}

// check_step's predicate, but for the storage (see checked_dense).
bool step_ok(const at::Tensor& s, const at::Device& device) {
  const at::TensorImpl* t = s.unsafeGetTensorImpl();
  if (!s.defined() || t->layout() != at::kStrided || t->numel() != 1 || t->device() != device)
    return false;
  const at::ScalarType st = t->dtype().toScalarType();
  return st == at::kFloat || st == at::kDouble;
}

// Whether entry i of the lists goes to the kernels as it is (see DenseLists).
bool direct_entry(const std::vector<ListSpec>& lists, size_t i) {
  const at::Tensor& p = lists[0].tensors[i];
  if (p.numel() == 0) return true;
  if (!p.is_non_overlapping_and_dense()) return false;
  for (const auto& l : lists)
    if (!l.tensors.empty() && !same_dims(l.tensors[i].strides(), p.strides())) return false;
  return true;
}

}  // namespace

// The bytes of storage t's elements reach (0 without elements): its offset
// plus, per dimension, (size - 1) * stride elements, plus one.
static int64_t bytes_needed(const at::TensorImpl* t) {
  const int64_t n = t->numel();
  if (n == 0) return 0;
  int64_t last = t->storage_offset() + n - 1;  // contiguous: the usual case
  if (!t->is_contiguous()) {
    last = t->storage_offset();
    const auto sizes = t->sizes(), strides = t->strides();
    for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  }
  return (last + 1) * static_cast<int64_t>(t->itemsize());
}

// Whether t's storage holds every element of t: a storage resized or freed
// after the tensor was made (FSDP frees its unsharded params' storages so)
// holds fewer, and the kernels would read and write past it.
bool storage_fits(const at::TensorImpl* t) {
  const int64_t need = bytes_needed(t);
  if (need == 0) return true;
  const c10::StorageImpl* st = storage_impl_of(t);
  return st != nullptr && st->data_ptr().get() != nullptr && static_cast<int64_t>(st->nbytes()) >= need;
}

// check_lists' and check_steps' error for a tensor storage_fits refuses.
void check_storage(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const at::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::StorageImpl* st = storage_impl_of(impl);
  TORCH_CHECK(storage_fits(impl), op, ": ", name, "[", i, "] (shape ", t.sizes(), ", storage offset ",
              t.storage_offset(), ") needs ", bytes_needed(impl), " bytes of storage but its storage ",
              st == nullptr ? std::string("is missing")
                            : "holds " + std::to_string(st->data_ptr().get() ? st->nbytes() : 0),
              "; its storage was resized or freed after the tensor was made (as FSDP does to "
              "unsharded params), and only tensors that hold their data can be updated");
}


void check_lists(const char* op, const std::vector<ListSpec>& lists, c10::DeviceType device_type) {
  TORCH_CHECK(!lists.empty(), op, ": no tensor lists");
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  for (const auto& l : lists) {
    if (l.optional && l.tensors.empty()) continue;
    TORCH_CHECK(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                " tensors but ", lists[0].name, " has ", n);
  }
  if (n == 0) return;
  TORCH_CHECK(params[0].defined(), op, ": ", lists[0].name, "[0] is undefined");
  const at::Device device = params[0].device();
  if (lists_ok(lists, n, device, device_type)) return;
  // Something is wrong: find it, and say which list, index and what.
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    for (const auto& l : lists) {
      if (l.optional && l.tensors.empty()) continue;
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", l.name, "[", i,
                  "] is sparse or not strided (layout ", t.layout(),
                  "); fused_wd supports dense tensors only");
      TORCH_CHECK(t.device() == device, op, ": ", l.name, "[", i, "] is on ", t.device(),
                  " but ", lists[0].name, "[0] is on ", device,
                  "; one call takes tensors of one device");
      TORCH_CHECK(t.device().type() == device_type, op, ": ", l.name, "[", i, "] is on ",
                  t.device(), ", not a ", device_type, " tensor");
      const auto pt = p.scalar_type(), tt = t.scalar_type();
      const bool low = pt == at::kHalf || pt == at::kBFloat16;
      if (l.dtype_rule == kDtypeMaster) {
        TORCH_CHECK(low && tt == at::kFloat, op, ": ", l.name, "[", i, "] has dtype ", tt,
                    " and ", lists[0].name, "[", i, "] has dtype ", pt,
                    "; master weights are float32 copies of float16/bfloat16 params");
      } else if (l.dtype_rule == kDtypeState) {
        TORCH_CHECK(tt == pt || ((low || pt == at::kFloat) && (tt == at::kFloat || tt == at::kBFloat16)),
                    op, ": ", l.name, "[", i, "] has dtype ", tt, " but ", lists[0].name, "[", i,
                    "] has dtype ", pt, " (states have the param's dtype, or float32/bfloat16 "
                    "for float32/float16/bfloat16 params)");
      } else {
        TORCH_CHECK(tt == pt, op, ": ", l.name, "[", i, "] has dtype ", tt, " but ",
                    lists[0].name, "[", i, "] has dtype ", pt);
      }
      TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                  " but ", lists[0].name, "[", i, "] has shape ", p.sizes());
      TORCH_CHECK(!t.is_complex(), op, ": ", l.name, "[", i,
                  "] is complex; pass torch.view_as_real views");
      storage_of(op, l.name, t.scalar_type());
      check_storage(op, l.name, i, t);
    }
  }
  TORCH_INTERNAL_ASSERT(false, op, ": lists_ok and the checks above disagree");
}

void check_steps(const char* op, at::TensorList steps, at::TensorList params) {
  TORCH_CHECK(steps.size() == params.size(), op, ": state_steps has ", steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1, op, ": state_steps[", i, "] must be a 1-element tensor");
    TORCH_CHECK(s.device() == params[i].device(), op, ": state_steps[", i, "] is on ", s.device(),
                " but params[", i, "] is on ", params[i].device());
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                ": state_steps[", i, "] must be float32 (or float64), got ", s.scalar_type());
    check_storage(op, "state_steps", i, s);
  }
}

void check_step_args(const char* op, const StepArgs& a, size_t nparams) {
  TORCH_CHECK(a.decay_mode >= kModeL2 && a.decay_mode <= kModeL1Proximal, op,
              ": decay_mode must be 0 (l2), 1 (decoupled), 2 (independent), 3 (corrected), 4 (l1) "
              "or 5 (l1_proximal), got ", a.decay_mode);
  TORCH_CHECK(!a.cautious_wd || (a.decay_mode != kModeL2 && a.decay_mode != kModeL1), op,
              ": cautious_wd needs decay_mode 1 (decoupled), 2 (independent) or 3 (corrected); "
              "with 0 (l2) or 4 (l1) the decay is part of the gradient and there is no separate "
              "shrink to mask");
  TORCH_CHECK(!a.cautious_wd || a.decay_mode != kModeL1Proximal, op,
              ": cautious_wd needs decay_mode 1 (decoupled), 2 (independent) or 3 (corrected); "
              "5 (l1_proximal) is a soft threshold, not a shrink to mask");
  TORCH_CHECK(!a.stochastic_rounding || a.sr_ids.size() == nparams, op,
              ": stochastic_rounding needs one sr_ids entry per param, got ", a.sr_ids.size(),
              " for ", nparams);
}

void check_same_state_dtype(const char* op, const std::vector<ListSpec>& lists) {
  std::vector<const ListSpec*> states;
  for (const auto& l : lists)
    if (l.dtype_rule == kDtypeState && !l.tensors.empty()) states.push_back(&l);
  if (states.size() < 2) return;
  const ListSpec& first = *states[0];
  for (size_t i = 0; i < first.tensors.size(); ++i) {  // entry by entry, as lists_ok
    const at::ScalarType ft = first.tensors[i].scalar_type();
    for (size_t k = 1; k < states.size(); ++k) {
      const ListSpec& l = *states[k];
      if (i >= l.tensors.size()) continue;
      TORCH_CHECK(l.tensors[i].scalar_type() == ft, op, ": ", l.name, "[", i, "] has dtype ",
                  l.tensors[i].scalar_type(), " but ", first.name, "[", i, "] has dtype ", ft,
                  "; the states of one param share one dtype");
    }
  }
}

bool norm_kind(const char* op, double norm_type) {
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  TORCH_CHECK(inf || norm_type == 2.0, op, ": norm_type must be 2.0 or inf, got ", norm_type);
  return inf;
}

void check_partials(const char* op, const at::Tensor& partials, c10::DeviceType device_type) {
  TORCH_CHECK(partials.device().type() == device_type, op, ": partials are on ",
              partials.device(), ", not on a ", device_type, " device");
  TORCH_CHECK(partials.layout() == at::kStrided && partials.dim() == 1 &&
                  partials.is_contiguous() && partials.scalar_type() == at::kDouble,
              op, ": partials must be a contiguous 1-D float64 tensor, got ",
              partials.scalar_type(), " of shape ", partials.sizes());
}

NormInputs norm_inputs(const char* op, at::TensorList tensors, at::IntArrayRef index,
                       int64_t nslots, const at::Device& device, bool of_grads) {
  TORCH_CHECK(index.size() == tensors.size(), op, ": index has ", index.size(),
              " entries for ", tensors.size(), " tensors");
  std::vector<bool> taken(static_cast<size_t>(nslots), false);
  NormInputs in;
  in.present.reserve(tensors.size());
  in.slot.reserve(tensors.size());
  for (size_t j = 0; j < tensors.size(); ++j) {
    if (of_grads)
      prefetch_grad_chain(tensors, j);
    else if (j + kMetaAhead < tensors.size() && tensors[j + kMetaAhead].defined())
      prefetch_meta(tensors[j + kMetaAhead]);
    const int64_t s = index[j];
    TORCH_CHECK(s >= 0 && s < nslots, op, ": index[", j, "] = ", s, " is outside out (",
                nslots, " slots)");
    TORCH_CHECK(!taken[s], op, ": index[", j, "] = ", s, " names a slot twice");
    taken[s] = true;
    const at::Tensor& entry = tensors[j];
    const at::Tensor& t = of_grads && entry.defined() ? entry.grad() : entry;
    if (!t.defined() || t.numel() == 0) {
      in.zero.push_back(s);
      continue;
    }
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", j, "] is sparse; dense tensors only");
    TORCH_CHECK(t.device() == device, op, ": tensors[", j, "] is on ", t.device(), ", not on ",
                device);
    storage_of(op, "a tensor", t.scalar_type());
    check_storage(op, of_grads ? "the grad of tensors" : "tensors", j, t);
    if (t.is_non_overlapping_and_dense()) {
      in.present.push_back(t);
    } else {
      in.temps.push_back(t.contiguous());
      in.present.push_back(in.temps.back());
    }
    in.slot.push_back(s);
  }
  return in;
}

namespace {
// Whether g can stand for p's gradient as it is (grads_ready).
bool usable_grad(const at::Tensor& p, const at::Tensor& g) {
  return g.defined() && g.layout() == at::kStrided && g.scalar_type() == p.scalar_type() &&
         g.device() == p.device() && g.sizes().equals(p.sizes());
}
}  // namespace

bool grads_ready(at::TensorList params, at::IntArrayRef dtypes) {
  TORCH_CHECK(dtypes.size() == params.size(), "fused_wd.grads_ready: ", dtypes.size(),
              " dtypes for ", params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) {
    prefetch_grad_chain(params, i);
    if (static_cast<int64_t>(params[i].scalar_type()) != dtypes[i] ||
        !usable_grad(params[i], params[i].grad()))
      return false;
  }
  return true;
}

at::TensorList grads_arg(const char* op, at::TensorList params, at::TensorList grads,
                         bool from_params, Borrowed& held) {
  if (!from_params) return grads;
  TORCH_CHECK(grads.empty(), op, ": grads must be empty with grads_from_params=True, got ",
              grads.size(), " tensors");
  held.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    prefetch_grad_chain(params, i);
    const at::Tensor& g = params[i].grad();
    TORCH_CHECK(g.defined(), op, ": params[", i, "] (shape ", params[i].sizes(),
                ") has no grad, and grads_from_params=True takes each param's grad");
    held.push_back(g);
  }
  return held.tensors();
}

void write_only_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const c10::IValue* base = stack->data() + (stack->size() - args.size());
    for (size_t k = 0; k < args.size(); ++k) {
      const c10::AliasInfo* alias = args[k].alias_info();
      if (alias == nullptr || !alias->isWrite()) continue;
      const auto refuse = [&](const at::Tensor& t, const std::string& where) {
        TORCH_CHECK(!t.defined() || !t.requires_grad(), op.schema().name(), ": ", where,
                    " requires grad and grad mode is on; the op writes it in place and is not "
                    "differentiable: call it under torch.no_grad(), as the fused_wd optimizers do");
      };
      const c10::IValue& v = base[k];
      if (v.isTensor()) {
        refuse(v.toTensor(), args[k].name());
      } else if (v.isTensorList()) {
        const c10::ArrayRef<c10::IValue> list = v.toListRef();
        for (size_t i = 0; i < list.size(); ++i)
          refuse(list[i].toTensor(), args[k].name() + "[" + std::to_string(i) + "]");
      }
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Device& device, bool allow_cpu) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device || (allow_cpu && t->device().is_cpu()), op, ": ", name,
              " is on ", t->device(), " but the tensors are on ", device);
}

void check_stats(const char* op, const StepArgs& a, size_t nparams, const at::Device& device,
                 bool allow_cpu_device) {
  check_scalar_tensor(op, "wd_tensor", a.wd_tensor, device, allow_cpu_device);
  if (a.wd_tensor.has_value() && a.wd_tensor->defined())
    TORCH_CHECK(a.wd_tensor->is_floating_point(), op, ": wd_tensor must be a float tensor, got ",
                a.wd_tensor->scalar_type());
  const bool given = a.stats.has_value() && a.stats->defined();
  if (!given) {
    TORCH_CHECK(a.stat_slots.empty(), op, ": stat_slots given without stats");
    return;
  }
  const at::Tensor& s = *a.stats;
  TORCH_CHECK(s.scalar_type() == at::kDouble && s.dim() == 2 && s.size(0) == 2 && s.is_contiguous(),
              op, ": stats must be a contiguous float64 tensor of shape [2, nslots], got ",
              s.scalar_type(), " ", s.sizes(), s.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(s.device() == device, op, ": stats is on ", s.device(), " but the params are on ",
              device);
  TORCH_CHECK(a.stat_slots.size() == nparams, op, ": stats needs one stat_slots entry per param, got ",
              a.stat_slots.size(), " for ", nparams);
  const int64_t nslots = s.size(1);
  std::vector<uint8_t> seen(static_cast<size_t>(nslots), 0);
  for (size_t i = 0; i < nparams; ++i) {
    const int64_t k = a.stat_slots[i];
    TORCH_CHECK(k >= 0 && k < nslots, op, ": stat_slots[", i, "] = ", k, " is outside [0, ", nslots,
                ")");
    TORCH_CHECK(!seen[k], op, ": stat_slots[", i, "] = ", k, " is the slot of an earlier param");
    seen[k] = 1;
  }
}

int64_t check_auto_decay(const char* op, const at::Tensor& stats, const at::Tensor& grad_sumsq,
                         const at::Tensor& steps, const at::Tensor& numels, const at::Tensor& state,
                         int64_t mode, c10::DeviceType device_type) {
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (scheduled) or 1 (adaptive), got ", mode);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2, op, ": stats must have shape [2, n], got ",
              stats.sizes());
  const int64_t n = stats.size(1);
  const at::Device device = stats.device();
  TORCH_CHECK(device.type() == device_type, op, ": stats is on ", device, ", not a ", device_type,
              " tensor");
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"stats", &stats}, {"grad_sumsq", &grad_sumsq}, {"steps", &steps}, {"numels", &numels},
      {"state", &state}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous(), op, ": ", name,
                " must be a contiguous float64 tensor, got ", t->scalar_type(),
                t->is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but stats is on ",
                device);
  }
  for (const auto& [name, t] : {all[1], all[2], all[3]})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape [", n,
                "] (one entry per param, like stats), got ", t->sizes());
  TORCH_CHECK(state.numel() == 1, op, ": state must have one element, got shape ", state.sizes());
  return n;
}

void DenseLists::write_back() {
  for (auto& pr : pending) pr.first.copy_(pr.second);
  pending.clear();
}

DenseLists make_dense(const std::vector<ListSpec>& lists) {
  DenseLists out;
  out.dense.reserve(lists.size());
  for (const auto& l : lists) out.dense.push_back(l.tensors);
  const size_t n = lists[0].tensors.size();
  size_t first = 0;
  while (first < n && direct_entry(lists, first)) ++first;
  if (first == n) return out;
  out.owned.resize(lists.size());
  for (size_t k = 0; k < lists.size(); ++k) {
    out.owned[k] = lists[k].tensors.vec();
    out.dense[k] = out.owned[k];
  }
  for (size_t i = first; i < n; ++i) {
    if (direct_entry(lists, i)) continue;
    for (size_t k = 0; k < lists.size(); ++k) {
      if (lists[k].tensors.empty()) continue;
      const at::Tensor& t = lists[k].tensors[i];
      at::Tensor tmp = t.contiguous();
      if (lists[k].mutated && !tmp.is_same(t)) out.pending.emplace_back(t, tmp);
      out.owned[k][i] = std::move(tmp);
    }
  }
  return out;
}

bool lists_ready(const std::vector<ListSpec>& lists, at::TensorList steps, c10::DeviceType device_type) {
  const size_t n = lists[0].tensors.size();
  for (const auto& l : lists)
    if (l.tensors.size() != n && !(l.optional && l.tensors.empty())) return false;
  if (!steps.empty() && steps.size() != n) return false;
  if (n == 0 || !lists[0].tensors[0].defined()) return false;
  const at::Device device = lists[0].tensors[0].device();
  if (device.type() != device_type) return false;
  for (size_t i = 0; i < n; ++i) {
    prefetch_entry(lists, steps, i, false);
    if (!entry_checks_ok(lists, i, device, false) || !same_state_dtype_at(lists, i) ||
        (!steps.empty() && !step_ok(steps[i], device)) || !direct_entry(lists, i))
      return false;
  }
  return true;
}

DenseLists checked_dense(const char* op, const std::vector<ListSpec>& lists, at::TensorList steps,
                         bool with_steps, c10::DeviceType device_type) {
  if (lists_ready(lists, with_steps ? steps : at::TensorList(), device_type) &&
      (!with_steps || !steps.empty())) {
    DenseLists out;
    out.dense.reserve(lists.size());
    for (const auto& l : lists) out.dense.push_back(l.tensors);
    return out;
  }
  check_lists(op, lists, device_type);
  check_same_state_dtype(op, lists);
  if (with_steps) check_steps(op, steps, lists[0].tensors);
  return make_dense(lists);
}

Storage storage_of(const char* op, const char* what, at::ScalarType st) {
  switch (st) {
    case at::kFloat: return Storage::kF32;
    case at::kDouble: return Storage::kF64;
    case at::kHalf: return Storage::kF16;
    case at::kBFloat16: return Storage::kBF16;
    default:
      TORCH_CHECK(false, op, ": ", what, " has dtype ", st,
                  "; the kernels take float32, float64, float16 and bfloat16");
  }
}

Layout layout_for(const char* op, size_t i, at::ScalarType param, at::ScalarType state, bool master,
                  bool stochastic_rounding) {
  Layout L;
  L.param = storage_of(op, "a param", param);
  L.state = storage_of(op, "an optimizer state", state);
  L.master = master;
  L.sr = stochastic_rounding && !master && param == at::kBFloat16;
  L.sr_key = 0;
  TORCH_CHECK(layout_supported(L), op, ": params[", i, "] (", param, ") with state dtype ", state,
              master ? " and an fp32 master copy" : "", " is not a supported layout");
  return L;
}

std::vector<std::vector<int64_t>> group_by_dtypes(at::TensorList a, at::TensorList b) {
  std::vector<std::pair<at::ScalarType, at::ScalarType>> keys;
  std::vector<std::vector<int64_t>> groups;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto k = std::make_pair(a[i].scalar_type(), b.empty() ? a[i].scalar_type() : b[i].scalar_type());
    size_t g = 0;
    while (g < keys.size() && keys[g] != k) ++g;
    if (g == keys.size()) {
      keys.push_back(k);
      groups.emplace_back();
    }
    groups[g].push_back(static_cast<int64_t>(i));
  }
  return groups;
}

std::vector<std::vector<int64_t>> group_by_dtype(at::TensorList tensors) {
  return group_by_dtypes(tensors, {});
}

}  // namespace fused_wd
