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

struct AdamPtrs {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;  // null unless amsgrad
};

struct SgdPtrs {
  void* p;
  const void* g;
  void* buf;  // null when momentum == 0
};

struct SgdModes {
  int decay;  // DecayKind
  bool momentum, nesterov, first;
};

// Mixed precision (the layouts the homogeneous entries above do not cover):
// param/grad of storage `param`, states (m, v, vmax; SGD: buf in m) of
// storage `state`, optionally an fp32 master copy; math in float. The param
// is written as the master (or the updated value) rounded to nearest, or
// stochastically (`sr`, bf16 params only) with the bits of
// sr_bits(sr_key, element index).
struct MixedPtrs {
  void* p;
  const void* g;
  void* master;  // null: none
  void* m;
  void* v;
  void* vmax;
};

struct MixedLayout {
  Storage param, state;
  bool sr;
  uint64_t sr_key;
};

struct KernelTable {
  const char* isa;
  void (*adam_f32)(Storage, const AdamPtrs&, int64_t, int64_t, const AdamScalars<float>&, bool amsgrad, int decay);
  void (*adam_f64)(const AdamPtrs&, int64_t, int64_t, const AdamScalars<double>&, bool amsgrad, int decay);
  void (*sgd_f32)(Storage, const SgdPtrs&, int64_t, int64_t, const SgdScalars<float>&, SgdModes);
  void (*sgd_f64)(const SgdPtrs&, int64_t, int64_t, const SgdScalars<double>&, SgdModes);
  void (*adam_mixed)(const MixedLayout&, const MixedPtrs&, int64_t, int64_t, const AdamScalars<float>&, bool amsgrad, int decay);
  void (*sgd_mixed)(const MixedLayout&, const MixedPtrs&, int64_t, int64_t, const SgdScalars<float>&, SgdModes);
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
