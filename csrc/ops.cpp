// The registration of the fused_wd operators (their schemas are in
// csrc/schema.h), and the Python module that loading fused_wd._C needs. Backends register their kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; fake (meta) kernels are
// registered from Python (fused_wd/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "schema.h"

#ifndef FUSED_WD_TORCH_VERSION
#define FUSED_WD_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fused_wd, m) {
  for (const char* schema : fused_wd::kSchemas) m.def(schema);
}

// The ops that only write their arguments have one Autograd kernel
// (write_only_autograd, csrc/common.h) for every backend.
TORCH_LIBRARY_IMPL(fused_wd, Autograd, m) {
  for (const char* op : {"adam_", "sgd_", "norm_partials_", "grads_ready"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fused_wd::write_only_autograd>());
}

// grads_ready reads metadata only: one kernel for every device (and meta).
TORCH_LIBRARY_IMPL(fused_wd, CompositeExplicitAutograd, m) {
  m.impl("grads_ready", fused_wd::boxed<&fused_wd::grads_ready>());
}

#include <string>

#include "cpu/kernels.h"

namespace fused_wd {
namespace cpu {
const char* isa_name();
std::string tuning_reason();
void set_tuning(int prefetch_blocks, int locality);
}  // namespace cpu
}  // namespace fused_wd

static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fused_wd::cpu::isa_name());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* cpu_tuning(PyObject*, PyObject*) {
  try {
    const fused_wd::cpu::Tuning t = fused_wd::cpu::tuning();
    const std::string why = fused_wd::cpu::tuning_reason();
    return Py_BuildValue("(iis)", t.prefetch_blocks, t.locality, why.c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* set_cpu_tuning(PyObject*, PyObject* args) {
  int blocks = 0, locality = 0;
  if (!PyArg_ParseTuple(args, "ii", &blocks, &locality)) return nullptr;
  try {
    fused_wd::cpu::set_tuning(blocks, locality);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// same_items(a, b): whether a and b (lists or tuples) hold the same objects
// in the same order, by identity (never calling __eq__, which a tensor
// answers elementwise). The step plan's checks of its params and options
// (fused_wd/optim.py): one pointer comparison per item instead of a Python
// call per item.
static PyObject* same_items(PyObject*, PyObject* args) {
  PyObject *a = nullptr, *b = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &a, &b)) return nullptr;
  const auto items = [](PyObject* x, Py_ssize_t* n) -> bool {
    if (PyList_Check(x)) *n = PyList_Size(x);
    else if (PyTuple_Check(x)) *n = PyTuple_Size(x);
    else return false;
    return true;
  };
  Py_ssize_t na = 0, nb = 0;
  if (!items(a, &na) || !items(b, &nb)) {
    PyErr_SetString(PyExc_TypeError, "same_items takes two lists or tuples");
    return nullptr;
  }
  if (na != nb) Py_RETURN_FALSE;
  const bool la = PyList_Check(a), lb = PyList_Check(b);
  for (Py_ssize_t i = 0; i < na; ++i) {
    PyObject* x = la ? PyList_GetItem(a, i) : PyTuple_GetItem(a, i);
    PyObject* y = lb ? PyList_GetItem(b, i) : PyTuple_GetItem(b, i);
    if (x != y) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

static PyMethodDef fused_wd_methods[] = {
    {"same_items", same_items, METH_VARARGS,
     "same_items(a, b): whether two lists or tuples hold the same objects, by identity."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {"cpu_tuning", cpu_tuning, METH_NOARGS,
     "(prefetch_blocks, locality, reason): the CPU kernels' tuning in force."},
    {"set_cpu_tuning", set_cpu_tuning, METH_VARARGS,
     "set_cpu_tuning(prefetch_blocks, locality): force the CPU kernels' tuning (A/B runs)."},
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
