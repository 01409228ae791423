// The CPU kernels' interface: plain C++ (no torch), one implementation per
// instruction set (kernels_base.cpp, kernels_avx2.cpp, kernels_avx512.cpp),
// the best one for the running machine chosen at run time by ops_cpu.cpp.
// Every entry works on the elements [begin, end) of one dense tensor.
#pragma once

#include <cstdint>

#include "fused_wd/layout.h"
#include "fused_wd/math.h"

namespace fused_wd {
namespace cpu {

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

struct SgdModes {
  int decay;  // DecayKind
  bool momentum, nesterov, first;
};

// The update entries also write the statistics of their range to
// stats[0] (sum of the squares of the param values they compute, the
// master's when there is one, before rounding to storage) and stats[1]
// (sum of the exp_avg_sq values they compute; 0 for SGD), in double, in an
// order fixed by [begin, end) alone; stats may be null.
struct KernelTable {
  const char* isa;
  // Layouts with float math (everything but fp64).
  void (*adam)(const Layout&, const Ptrs&, int64_t, int64_t, const AdamScalars<float>&, bool amsgrad,
               int decay, double* stats);
  void (*adam_f64)(const Ptrs&, int64_t, int64_t, const AdamScalars<double>&, bool amsgrad, int decay,
                   double* stats);
  void (*sgd)(const Layout&, const Ptrs&, int64_t, int64_t, const SgdScalars<float>&, SgdModes,
              double* stats);
  void (*sgd_f64)(const Ptrs&, int64_t, int64_t, const SgdScalars<double>&, SgdModes, double* stats);
  // Sum of squares in double, in an order fixed by [begin, end) alone.
  double (*sumsq)(Storage, const void*, int64_t, int64_t);
  // max |x|, NaN if any element is NaN.
  double (*absmax)(Storage, const void*, int64_t, int64_t);
  // x *= coef (in float, or double for fp64 storage).
  void (*scale)(Storage, void*, int64_t, int64_t, double coef);
};

// How the update loops stream memory on this CPU (docs/design.md, "CPU
// tuning"): each block of the loops prefetches the block prefetch_blocks
// blocks ahead of it (0: no software prefetch) with __builtin_prefetch's
// locality hint `locality` (0-3). Chosen by a rule per CPU at first use,
// forced with FUSED_WD_CPU_PREFETCH, or set for A/B runs; no choice changes
// a bit of any result (prefetches only move data into caches).
struct Tuning {
  int prefetch_blocks;
  int locality;
};

// The tuning in force (read once per range by the kernels).
Tuning tuning();

KernelTable kernels_base();
KernelTable kernels_avx2();
KernelTable kernels_avx512();

}  // namespace cpu
}  // namespace fused_wd
