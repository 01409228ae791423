// The CPU kernels' interface: plain C++ (no torch), one implementation per
// instruction set (kernels_base.cpp, kernels_avx2.cpp, kernels_avx512.cpp),
// the best one for the running machine chosen at run time by ops_cpu.cpp.
// Every entry works on the elements [begin, end) of one dense tensor.
#pragma once

#include <cstdint>

#include "fused_wd/math.h"

namespace fused_wd {
namespace cpu {

enum class Storage : int { kF32, kF64, kF16, kBF16 };

// The streams of one tensor; absent ones are null. Adam: s0 = exp_avg,
// s1 = exp_avg_sq, s2 = max_exp_avg_sq (amsgrad). SGD: s0 = momentum buffer.
struct Ptrs {
  void* p;
  const void* g;
  void* master;  // fp32 master copy of a 16-bit param (Layout::master)
  void* s0;
  void* s1;
  void* s2;
};

// How one tensor is stored: param/grad storage `param`, state storage
// `state`, optionally an fp32 master copy (the update runs on it and the
// param is written as its rounding). The math is in float (double for fp64,
// where param and state are both kF64). With `sr` (bf16 params without a
// master) the param is rounded stochastically with the bits of
// sr_bits(sr_key, element index), otherwise to nearest even.
struct Layout {
  Storage param, state;
  bool master, sr;
  uint64_t sr_key;
};

// The layouts the kernels are built for (the one rule: the kernels
// instantiate exactly these); ops_cpu.cpp refuses the others.
constexpr bool layout_supported(const Layout& L) {
  if (L.param == Storage::kF64 || L.state == Storage::kF64)
    return L.param == L.state && !L.master && !L.sr;
  if (L.param == Storage::kF32) return !L.master && !L.sr && L.state != Storage::kF16;
  if (L.sr && (L.param != Storage::kBF16 || L.master)) return false;
  if (L.state == Storage::kF16) return L.param == Storage::kF16 && !L.master;
  return true;
}

struct SgdModes {
  int decay;  // DecayKind
  bool momentum, nesterov, first;
};

struct KernelTable {
  const char* isa;
  // Layouts with float math (everything but fp64).
  void (*adam)(const Layout&, const Ptrs&, int64_t, int64_t, const AdamScalars<float>&, bool amsgrad, int decay);
  void (*adam_f64)(const Ptrs&, int64_t, int64_t, const AdamScalars<double>&, bool amsgrad, int decay);
  void (*sgd)(const Layout&, const Ptrs&, int64_t, int64_t, const SgdScalars<float>&, SgdModes);
  void (*sgd_f64)(const Ptrs&, int64_t, int64_t, const SgdScalars<double>&, SgdModes);
  // Sum of squares in double, in an order fixed by [begin, end) alone.
  double (*sumsq)(Storage, const void*, int64_t, int64_t);
  // max |x|, NaN if any element is NaN.
  double (*absmax)(Storage, const void*, int64_t, int64_t);
  // x *= coef (in float, or double for fp64 storage).
  void (*scale)(Storage, void*, int64_t, int64_t, double coef);
};

KernelTable kernels_base();
KernelTable kernels_avx2();
KernelTable kernels_avx512();

}  // namespace cpu
}  // namespace fused_wd
