// fused_wd.KeptCall (torch.classes.fused_wd.KeptCall): the arguments of one
// call of an op, kept in C++ so that a step that repeats the last one calls
// the op through the dispatcher without Python's argument parsing (about
// half a microsecond per keyword, most of a small step's cost). The steady
// step (fused_wd/optim.py, _Steady; docs/design.md, "The steady step")
// fills one per op call once, by argument name, and runs it every step with
// the two values that change: lr and grad_norm. Optionally it first checks
// that the params' grads are still what grads_ready accepts: when they are
// not, run returns False without calling the op, and nothing was written.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "common.h"

namespace fused_wd {
namespace {

class KeptCall : public torch::CustomClassHolder {
 public:
  // op: the operator's qualified name, e.g. "fused_wd::adam_".
  explicit KeptCall(const std::string& op)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), "")) {
    const auto& args = op_.schema().arguments();
    TORCH_CHECK(op_.schema().returns().empty(), "fused_wd.KeptCall: ", op,
                " returns something; only ops that return nothing can be kept");
    stack_.resize(args.size());
    given_.assign(args.size(), false);
    lr_at_ = index_of("lr");
    grad_norm_at_ = index_of("grad_norm");
    for (size_t k = 0; k < args.size(); ++k) {
      // lr comes with every run
      given_[k] = args[k].default_value().has_value() || static_cast<int64_t>(k) == lr_at_;
      if (args[k].default_value().has_value()) stack_[k] = *args[k].default_value();
      missing_ += given_[k] ? 0 : 1;
    }
  }

  void tensors(const std::string& name, const c10::List<at::Tensor>& v) {
    set(name, c10::TypeKind::ListType, c10::TypeKind::TensorType, v);
  }
  void tensor(const std::string& name, const std::optional<at::Tensor>& v) {
    set(name, c10::TypeKind::OptionalType, c10::TypeKind::TensorType,
        v.has_value() ? c10::IValue(*v) : c10::IValue());
  }
  void floating(const std::string& name, double v) { set(name, c10::TypeKind::FloatType, {}, v); }
  void integer(const std::string& name, int64_t v) { set(name, c10::TypeKind::IntType, {}, v); }
  void boolean(const std::string& name, bool v) { set(name, c10::TypeKind::BoolType, {}, v); }
  void integers(const std::string& name, const c10::List<int64_t>& v) {
    set(name, c10::TypeKind::ListType, c10::TypeKind::IntType, v);
  }
  void booleans(const std::string& name, const c10::List<bool>& v) {
    set(name, c10::TypeKind::ListType, c10::TypeKind::BoolType, v);
  }

  // Makes run() check first that grads_ready(params, dtypes) holds.
  void check_grads(const std::vector<at::Tensor>& params, const std::vector<int64_t>& dtypes) {
    TORCH_CHECK(params.size() == dtypes.size(), "fused_wd.KeptCall.check_grads: ", dtypes.size(),
                " dtypes for ", params.size(), " params");
    ready_params_ = params;
    ready_dtypes_ = dtypes;
    check_ready_ = true;
  }

  // Calls the op with lr and grad_norm as given (each only where the op
  // has them) and the kept values for the rest; False (and no call) when
  // the grads check fails.
  bool run(double lr, const std::optional<at::Tensor>& grad_norm) {
    if (missing_ > 0) {
      for (size_t k = 0; k < given_.size(); ++k)
        TORCH_CHECK(given_[k], "fused_wd.KeptCall: ", op_.schema().name(), " needs ",
                    op_.schema().arguments()[k].name(), ", which was never given");
    }
    if (check_ready_ && !grads_ready(ready_params_, ready_dtypes_)) return false;
    std::vector<c10::IValue> stack(stack_);
    if (lr_at_ >= 0) stack[lr_at_] = lr;
    if (grad_norm_at_ >= 0 && grad_norm.has_value()) stack[grad_norm_at_] = *grad_norm;
    op_.callBoxed(&stack);
    return true;
  }

 private:
  int64_t index_of(const std::string& name) const {
    const auto& args = op_.schema().arguments();
    for (size_t k = 0; k < args.size(); ++k)
      if (args[k].name() == name) return static_cast<int64_t>(k);
    return -1;
  }

  // Keeps v for argument `name` after checking that the schema declares it
  // with that kind (and element kind, for lists and optionals).
  void set(const std::string& name, c10::TypeKind kind, std::optional<c10::TypeKind> element,
           c10::IValue v) {
    const int64_t k = index_of(name);
    TORCH_CHECK(k >= 0, "fused_wd.KeptCall: ", op_.schema().name(), " has no argument '", name, "'");
    const c10::TypePtr& t = op_.schema().arguments()[k].type();
    bool fits = t->kind() == kind;
    if (fits && element.has_value()) fits = t->containedTypes().size() == 1 &&
                                            t->containedTypes()[0]->kind() == *element;
    TORCH_CHECK(fits, "fused_wd.KeptCall: ", op_.schema().name(), "'s argument '", name, "' is ",
                t->str(), ", not what was given");
    stack_[k] = std::move(v);
    missing_ -= given_[k] ? 0 : 1;
    given_[k] = true;
  }

  c10::OperatorHandle op_;
  std::vector<c10::IValue> stack_;
  std::vector<bool> given_;  // per argument: a value is kept (or comes with run: lr)
  int64_t missing_ = 0;      // how many are not
  int64_t lr_at_ = -1, grad_norm_at_ = -1;
  bool check_ready_ = false;
  std::vector<at::Tensor> ready_params_;
  std::vector<int64_t> ready_dtypes_;
};

}  // namespace
}  // namespace fused_wd

TORCH_LIBRARY_FRAGMENT(fused_wd, m) {
  m.class_<fused_wd::KeptCall>("KeptCall")
      .def(torch::init<std::string>())
      .def("tensors", &fused_wd::KeptCall::tensors)
      .def("tensor", &fused_wd::KeptCall::tensor)
      .def("floating", &fused_wd::KeptCall::floating)
      .def("integer", &fused_wd::KeptCall::integer)
      .def("boolean", &fused_wd::KeptCall::boolean)
      .def("integers", &fused_wd::KeptCall::integers)
      .def("booleans", &fused_wd::KeptCall::booleans)
      .def("check_grads", &fused_wd::KeptCall::check_grads)
      .def("run", &fused_wd::KeptCall::run);
}
