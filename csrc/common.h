// Host-side helpers shared by the CPU and CUDA backends: argument checks with
// messages that name the offending list and index, and a dense view of the
// tensor lists (tensors whose layout the flat kernels cannot walk are copied
// to contiguous temporaries and written back after the kernel).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include <string>
#include <vector>

#include "fused_wd/layout.h"

namespace fused_wd {

// Which dtypes a list may have, relative to the params.
enum DtypeRule : int {
  kDtypeSame = 0,    // the param's dtype
  kDtypeState = 1,   // the param's dtype, or float32/bfloat16 for fp32/fp16/bf16 params
  kDtypeMaster = 2,  // float32, for fp16/bf16 params (fp32 master weights)
};

// The lists of one step: lists[0] is the params, the others have one tensor
// per param (or are empty, when `optional`). mutated[k]: list k is written.
struct ListSpec {
  const char* name;
  at::TensorList tensors;
  bool mutated;
  bool optional;
  int dtype_rule = kDtypeSame;
};

// Optimizer states of one param (exp_avg, exp_avg_sq, ...) share one dtype:
// checks that the non-empty lists `names`/`lists` agree at every index.
void check_same_state_dtype(const char* op, const std::vector<ListSpec>& lists);

// The StorageImpl of a tensor's metadata, or null (a tensor without
// storage). Through has_storage(), an out-of-line call: reading the field
// inline made a step over 10,000 cold tensors 20-30% slower on the Zen 5 VM
// (three alternated pairs of the overhead preset), though warm steps were
// 2-4% faster.
inline c10::StorageImpl* storage_impl_of(const at::TensorImpl* impl) {
  return impl->has_storage() ? impl->unsafe_storage().unsafeGetStorageImpl() : nullptr;
}

// Asks for every cache line of the `bytes` bytes at p. Objects from the
// heap are 16-byte aligned, not line-aligned, so the lines are counted from
// p's own line to that of its last byte: prefetching p, p + 64, ... would
// miss the last line of an object that straddles one more.
inline void prefetch_bytes(const void* p, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p) + bytes - 1;
  for (uintptr_t a = first; a <= last; a += 64) __builtin_prefetch(reinterpret_cast<const void*>(a));
}

// The bytes of a StorageImpl the per-step passes read (its data pointer,
// size and flags, which come before its allocator). Measured on the Zen 5
// VM, 10,000 tiny tensors with fresh grads: asking for the object's first
// line only, which missed the flags (byte 61) of three storages in four, left
// the gather waiting on them (a third of the C++ time of an SGD step, 0.31
// against 0.17-0.20 us per tensor in all).
constexpr size_t kStorageBytes = 64;

// Asks for the metadata of a tensor (its TensorImpl) to be brought into
// cache. The per-step passes over thousands of tensors call it a few
// entries ahead: their misses then overlap instead of following one another
// (prefetch_with_storage also asks for the storages).
inline void prefetch_meta(const at::Tensor& t) {
  prefetch_bytes(t.unsafeGetTensorImpl(), sizeof(at::TensorImpl));
}

// How many entries ahead the per-step passes prefetch (prefetch_meta).
constexpr size_t kMetaAhead = 8;

// Lists shorter than this skip the staged prefetches below: their metadata
// (about 1 KiB per entry) stays in a 1 MiB second-level cache between steps,
// and the prefetches' own work (a grad() call per entry among them) made
// warm steps of 100 tiny tensors 10-15% slower on the Zen 5 VM.
constexpr size_t kStagedPrefetchFrom = 1024;

// The prefetch of a pass that reads the data pointers of list l (data_of),
// at entry i: the metadata of entry i + 2 kMetaAhead, and the storage of
// entry i + kMetaAhead, whose metadata was asked for kMetaAhead entries
// earlier (asking for both at one distance makes the pass wait for the
// metadata there to find the storage).
inline void prefetch_with_storage(at::TensorList l, size_t i) {
  if (l.size() < kStagedPrefetchFrom) return;
  if (i + 2 * kMetaAhead < l.size()) prefetch_meta(l[i + 2 * kMetaAhead]);
  if (i + kMetaAhead < l.size()) {
    const at::TensorImpl* impl = l[i + kMetaAhead].unsafeGetTensorImpl();
    if (const c10::StorageImpl* st = storage_impl_of(impl)) prefetch_bytes(st, kStorageBytes);
  }
}

// The prefetch of a pass that reads each param's grad (params[i].grad()),
// at param i: the metadata of param i + 3 kMetaAhead, the autograd
// metadata (which holds the grad) of param i + 2 kMetaAhead, and the grad's
// metadata of param i + kMetaAhead, each found in what was asked for
// kMetaAhead params earlier. The three are a chain of dependent loads: asked
// for together, the pass would wait for each link.
inline void prefetch_grad_chain(at::TensorList params, size_t i) {
  const size_t n = params.size();
  if (n < kStagedPrefetchFrom) return;
  if (i + 3 * kMetaAhead < n) prefetch_meta(params[i + 3 * kMetaAhead]);
  if (i + 2 * kMetaAhead < n) {
    if (const void* m = params[i + 2 * kMetaAhead].unsafeGetTensorImpl()->autograd_meta())
      prefetch_bytes(m, 128);
  }
  if (i + kMetaAhead < n && params[i + kMetaAhead].defined()) {
    const at::Tensor& g = params[i + kMetaAhead].grad();
    if (g.defined()) prefetch_meta(g);
  }
}

// t.data_ptr() (t's first element, to be written) for a tensor the entry
// checks accepted, without TensorImpl::data_ptr's out-of-line call: the
// storage's pointer (copy-on-write storage is materialized, as data_ptr
// does) plus the offset. A tensor without storage, or whose storage holds no
// data, goes the way of data_ptr, which raises its error.
inline void* data_of(const at::Tensor& t) {
  const at::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (c10::StorageImpl* st = storage_impl_of(impl)) {
    if (char* base = static_cast<char*>(st->mutable_data()))
      return base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
  }
  return t.data_ptr();
}

// data_of for a tensor that is only read: no copy-on-write copy is made.
inline const void* const_data_of(const at::Tensor& t) {
  const at::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (const c10::StorageImpl* st = storage_impl_of(impl)) {
    if (const char* base = static_cast<const char*>(st->data()))
      return base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
  }
  return t.const_data_ptr();
}

// Checks lengths, devices, layouts (strided only: sparse grads are refused),
// dtypes and shapes of every list against the params. `device_type` is the
// backend running the op.
void check_lists(const char* op, const std::vector<ListSpec>& lists, c10::DeviceType device_type);

// Checks that steps has one 1-element float32 or float64 counter per param,
// on the param's device.
void check_steps(const char* op, at::TensorList steps, at::TensorList params);

// The norm ops' arguments (schemas: csrc/schema.h). norm_kind: true for
// inf, false for 2, an error otherwise.
bool norm_kind(const char* op, double norm_type);

// Tensors held without their reference counts touched: each one must stay
// alive (held by someone else) while this lives.
class Borrowed {
 public:
  Borrowed() = default;
  Borrowed(Borrowed&&) noexcept = default;
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  ~Borrowed() {
    for (at::Tensor& t : v_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void reserve(size_t n) { v_.reserve(n); }
  void push_back(const at::Tensor& t) { v_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t)); }
  at::TensorList tensors() const { return v_; }
  size_t size() const { return v_.size(); }
  bool empty() const { return v_.empty(); }

 private:
  std::vector<at::Tensor> v_;
};

// A Tensor?[] argument as the boxed kernels (boxed<Fn>) pass it: one
// tensor per entry, undefined for None, borrowed from the dispatcher's stack.
struct OptionalTensors {
  at::TensorList tensors;
};

// The tensors whose norm is taken (`tensors` holds an undefined tensor for
// a None entry): `present[k]` is the dense form of the k-th defined,
// non-empty entry (the entry itself, borrowed: its owner keeps it alive; or
// a contiguous copy held in `temps`) and `slot[k]` where its partial goes;
// `zero` the slots of None or empty entries. Checks every entry (strided, on
// `device`, a kernel dtype) and `index` (one slot in [0, nslots) per tensor,
// no slot twice).
struct NormInputs {
  Borrowed present;
  std::vector<at::Tensor> temps;
  std::vector<int64_t> slot, zero;
};
// of_grads: the entries' grads are taken in their place (norm_partials_'s
// of_grads).
NormInputs norm_inputs(const char* op, at::TensorList tensors, at::IntArrayRef index,
                       int64_t nslots, const at::Device& device, bool of_grads = false);

// The grads_ready op (schema: csrc/schema.h).
bool grads_ready(at::TensorList params, at::IntArrayRef dtypes);

// The grads an update op uses: `grads` itself, or with grads_from_params
// each param's .grad, gathered into `held` (an error names a param without
// one, or a non-empty grads).
at::TensorList grads_arg(const char* op, at::TensorList params, at::TensorList grads,
                         bool from_params, Borrowed& held);

// Checks `partials` for norm_from_partials: 1-D, contiguous, float64, on a
// device of `device_type`.
void check_partials(const char* op, const at::Tensor& partials, c10::DeviceType device_type);

// Checks one 1-element (0-dim or 1-element) optional tensor argument.
void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Device& device, bool allow_cpu);

// A dense view of the lists: dense[k][i] is lists[k].tensors[i] itself when
// the param is non-overlapping and dense and every tensor of entry i has its
// strides, else a contiguous temporary. write_back() copies the mutated
// temporaries into the user's tensors. When every entry is direct (the
// usual case) dense[k] is the caller's list itself: no tensor is copied, so
// no reference count is touched per tensor; else list k is copied into
// owned[k] with its temporaries in place.
struct DenseLists {
  std::vector<at::TensorList> dense;
  std::vector<std::vector<at::Tensor>> owned;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending;  // (user tensor, temporary)
  void write_back();
};

DenseLists make_dense(const std::vector<ListSpec>& lists);

// Whether every check of check_lists, check_same_state_dtype and (steps not
// empty) check_steps passes and every entry goes to the kernels as it is
// (make_dense would copy nothing): one pass over the entries that builds
// no message. False for an empty params list.
// It leaves the storages unread (see checked_dense).
bool lists_ready(const std::vector<ListSpec>& lists, at::TensorList steps, c10::DeviceType device_type);

// The lists checked (check_lists, check_same_state_dtype and, with_steps,
// check_steps) and made dense (make_dense): with lists_ready's one pass
// when it says yes, which is every step but a bad or an unusual one; else
// the checks, whose errors say which list, index and what, then make_dense.
// The one pass leaves the storages unread (storage_fits): the caller
// checks each tensor it reads the data of (held) before it writes anything,
// in the pass that reads the storages anyway (the CPU gather, the CUDA
// pack); the slow path checks them in any case.
DenseLists checked_dense(const char* op, const std::vector<ListSpec>& lists, at::TensorList steps,
                         bool with_steps, c10::DeviceType device_type);

// Whether t's storage holds every element t reaches (its offset plus
// (size - 1) * stride per dimension): a storage resized or freed after the
// tensor was made (FSDP frees its unsharded params' storages so) holds
// fewer, and the kernels would read and write past it. check_lists and
// check_steps refuse such a tensor; after checked_dense's one pass, `held`
// does (the CPU gather, and the CUDA pack, which packs every table of a
// call before its first launch).
bool storage_fits(const at::TensorImpl* t);

// The error for list `name`'s entry i when storage_fits refuses it (which
// names the sizes); nothing when it fits.
void check_storage(const char* op, const char* name, size_t i, const at::Tensor& t);

// t, entry i of list `name`, once its storage is found to hold it (else
// check_storage's error): what a pass that reads data pointers after
// checked_dense asks of each tensor before anything is written.
inline const at::Tensor& held(const char* op, const char* name, size_t i, const at::Tensor& t) {
  if (!storage_fits(t.unsafeGetTensorImpl())) check_storage(op, name, i, t);
  return t;
}

// The storage of a dtype the kernels take (float32/64, float16, bfloat16);
// an error naming `what` for any other.
Storage storage_of(const char* op, const char* what, at::ScalarType st);

// The layout of params[i] (dtype `param`) with states of dtype `state`: a
// master copy or not, and stochastic rounding when asked for and the param
// is bfloat16 without a master. An error if the rule (fused_wd/layout.h)
// refuses it.
Layout layout_for(const char* op, size_t i, at::ScalarType param, at::ScalarType state, bool master,
                  bool stochastic_rounding);

// ------------------------------------------------- the update ops' arguments

// What every update op takes besides its lists (schemas: csrc/schema.h).
struct StepArgs {
  double lr;
  std::optional<at::Tensor> lr_tensor;
  double weight_decay;
  std::optional<at::Tensor> wd_tensor;
  int64_t decay_mode;
  bool cautious_wd;
  double initial_lr;
  bool maximize;
  std::optional<at::Tensor> grad_norm;
  double max_norm;
  std::optional<at::Tensor> grad_scale, found_inf;
  bool skip_nonfinite;
  bool stochastic_rounding;
  int64_t sr_seed;
  at::IntArrayRef sr_ids;
  // the pass's statistics (schema: csrc/schema.h): undefined, or float64
  // [2, nslots] with one slot per param in stat_slots
  std::optional<at::Tensor> stats;
  at::IntArrayRef stat_slots;
};

struct AdamCall {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params;
  double beta1, beta2, eps;
  bool amsgrad;
  StepArgs step;
};

struct SgdCall {
  at::TensorList params, grads, momentum_buffers;
  c10::List<bool> buffer_is_new;
  at::TensorList master_params, state_steps;
  double momentum, dampening;
  bool nesterov;
  StepArgs step;
};

// Checks of StepArgs that need no tensor list: the decay mode (and cautious
// decay only with a mode that scales the param), and one stochastic-rounding
// id per param.
void check_step_args(const char* op, const StepArgs& a, size_t nparams);

// Checks the statistics arguments against the params (on `device`):
// stats float64, contiguous, [2, nslots] on the params' device, and
// stat_slots one distinct slot in [0, nslots) per param; wd_tensor a
// 1-element float tensor on the device or the CPU.
void check_stats(const char* op, const StepArgs& a, size_t nparams, const at::Device& device,
                 bool allow_cpu_device);

// The kernels of adam_ / sgd_ as the dispatcher calls them (the schema's
// arguments in order), packed into one AdamCall / SgdCall for a backend's
// implementation Impl: the one C++ spelling of the argument lists.
template <void (*Impl)(const AdamCall&)>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
             at::TensorList master_params, at::IntArrayRef sr_ids,
             const std::optional<at::Tensor>& stats, at::IntArrayRef stat_slots, double lr,
             const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
             double weight_decay, const std::optional<at::Tensor>& wd_tensor, int64_t decay_mode, bool cautious_wd, double initial_lr,
             bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_norm, double max_norm,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, bool skip_nonfinite,
             bool stochastic_rounding, int64_t sr_seed, bool grads_from_params) {
  Borrowed held;
  grads = grads_arg("fused_wd.adam_", params, grads, grads_from_params, held);
  Impl(AdamCall{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                beta1, beta2, eps, amsgrad,
                StepArgs{lr, lr_tensor, weight_decay, wd_tensor, decay_mode, cautious_wd, initial_lr,
                         maximize, grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite,
                         stochastic_rounding, sr_seed, sr_ids, stats, stat_slots}});
}

template <void (*Impl)(const SgdCall&)>
void sgd_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
            const c10::List<bool>& buffer_is_new, at::TensorList master_params,
            at::TensorList state_steps, at::IntArrayRef sr_ids,
            const std::optional<at::Tensor>& stats, at::IntArrayRef stat_slots, double lr,
            const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
            bool nesterov, double weight_decay, const std::optional<at::Tensor>& wd_tensor,
            int64_t decay_mode, bool cautious_wd,
            double initial_lr, bool maximize, const std::optional<at::Tensor>& grad_norm, double max_norm,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf, bool skip_nonfinite,
            bool stochastic_rounding, int64_t sr_seed, bool grads_from_params) {
  Borrowed held;
  grads = grads_arg("fused_wd.sgd_", params, grads, grads_from_params, held);
  Impl(SgdCall{params, grads, momentum_buffers, buffer_is_new, master_params, state_steps, momentum,
               dampening, nesterov,
               StepArgs{lr, lr_tensor, weight_decay, wd_tensor, decay_mode, cautious_wd, initial_lr,
                        maximize, grad_norm, max_norm, grad_scale, found_inf, skip_nonfinite,
                        stochastic_rounding, sr_seed, sr_ids, stats, stat_slots}});
}

// ----------------------------------------- boxed kernels of the update ops
//
// The dispatcher hands a kernel its arguments as a stack of IValues. An
// unboxed kernel's TensorList arguments are copied out of it into new
// vectors: one reference-count increment and one decrement per tensor,
// atomic, on TensorImpls that are cold when a step has thousands of them.
// boxed<Fn>() registers Fn with its tensor lists borrowed from the stack
// instead: the vector holds the same pointers with no count touched, and
// is released (not destroyed) afterwards. The stack keeps every tensor
// alive until the kernel returns.

namespace boxing {

// One argument of C++ type T, read from its IValue.
template <typename T>
struct Arg {
  T value;
  explicit Arg(const c10::IValue& v) : value(v.to<T>()) {}
  T& get() { return value; }
};

template <>
struct Arg<at::TensorList> {
  Borrowed list;
  explicit Arg(const c10::IValue& v) {
    const c10::ArrayRef<c10::IValue> ivalues = v.toListRef();
    list.reserve(ivalues.size());
    for (const c10::IValue& e : ivalues) list.push_back(e.toTensor());
  }
  at::TensorList get() const { return list.tensors(); }
};

template <>
struct Arg<OptionalTensors> {
  Borrowed list;
  explicit Arg(const c10::IValue& v) {
    static const at::Tensor none;
    const c10::ArrayRef<c10::IValue> ivalues = v.toListRef();
    list.reserve(ivalues.size());
    for (const c10::IValue& e : ivalues) list.push_back(e.isNone() ? none : e.toTensor());
  }
  OptionalTensors get() const { return OptionalTensors{list.tensors()}; }
};

template <>
struct Arg<at::IntArrayRef> {
  std::vector<int64_t> values;
  explicit Arg(const c10::IValue& v) : values(v.toIntVector()) {}
  at::IntArrayRef get() const { return values; }
};

template <auto Fn>
struct Boxed;

template <typename R, typename... A, R (*Fn)(A...)>
struct Boxed<Fn> {
  static void call(const c10::OperatorHandle&, torch::jit::Stack* stack) {
    run(stack, std::index_sequence_for<A...>{});
  }
  template <size_t... I>
  static void run(torch::jit::Stack* stack, std::index_sequence<I...>) {
    constexpr size_t n = sizeof...(A);
    TORCH_INTERNAL_ASSERT(stack->size() >= n);
    const c10::IValue* base = stack->data() + (stack->size() - n);
    std::tuple<Arg<std::decay_t<A>>...> args{Arg<std::decay_t<A>>(base[I])...};
    if constexpr (std::is_void_v<R>) {
      Fn(std::get<I>(args).get()...);
      torch::jit::drop(*stack, n);
    } else {
      R result = Fn(std::get<I>(args).get()...);
      torch::jit::drop(*stack, n);
      torch::jit::push(*stack, std::move(result));
    }
  }
};

}  // namespace boxing

// Fn as a boxed kernel whose tensor lists are borrowed from the
// dispatcher's stack.
template <auto Fn>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<&boxing::Boxed<Fn>::call>();
}

// The Autograd kernel of the ops that only write their arguments (adam_,
// sgd_, norm_partials_, grads_ready): none of them is differentiable. In grad
// mode it refuses an argument it would write that requires grad (as torch
// refuses an in-place op on a leaf that requires grad); otherwise it goes on
// to the backend. Unlike torch's fallback for ops without an autograd
// kernel, it reads no tensor while grad mode is off, as in every step.
void write_only_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack);

// The inputs of auto_decay (schema: csrc/schema.h), checked: every tensor
// float64, contiguous, on one device of `device_type` (the statistics'),
// stats [2, n] and the others [n]; state one element. Returns n.
int64_t check_auto_decay(const char* op, const at::Tensor& stats, const at::Tensor& grad_sumsq,
                         const at::Tensor& steps, const at::Tensor& numels, const at::Tensor& state,
                         int64_t mode, c10::DeviceType device_type);

// Tensor indices grouped by dtype, in first-seen order (deterministic).
std::vector<std::vector<int64_t>> group_by_dtype(at::TensorList tensors);

// Indices grouped by the pair (dtype of a[i], dtype of b[i]) (b may be
// empty: a's dtype twice), in first-seen order.
std::vector<std::vector<int64_t>> group_by_dtypes(at::TensorList a, at::TensorList b);

}  // namespace fused_wd
