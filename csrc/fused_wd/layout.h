// The storage layouts the kernels run: the one rule, used by the CPU
// kernels (which instantiate exactly these layouts) and the CUDA kernels
// (which dispatch on it), and by both to refuse the others. Plain C++,
// constexpr, no torch.
#pragma once

#include <cstdint>

namespace fused_wd {

enum class Storage : int { kF32, kF64, kF16, kBF16 };

// How one tensor is stored: param/grad storage `param`, optimizer state
// storage `state`, optionally an fp32 master copy (the update runs on it and
// the param is written as its rounding). The math is in float (double for
// fp64, where param and state are both kF64). With `sr` (bf16 params
// without a master) the param is rounded stochastically, otherwise to
// nearest even. sr_key: the stream of random bits (CPU kernels).
struct Layout {
  Storage param, state;
  bool master, sr;
  uint64_t sr_key;
};

constexpr bool layout_supported(const Layout& L) {
  if (L.param == Storage::kF64 || L.state == Storage::kF64)
    return L.param == L.state && !L.master && !L.sr;
  if (L.param == Storage::kF32) return !L.master && !L.sr && L.state != Storage::kF16;
  if (L.sr && (L.param != Storage::kBF16 || L.master)) return false;
  if (L.state == Storage::kF16) return L.param == Storage::kF16 && !L.master;
  return true;
}

// Whether some layout with these storages is supported (a kernel for the
// pair is worth instantiating).
constexpr bool storages_supported(Storage param, Storage state) {
  for (int m = 0; m < 2; ++m)
    for (int sr = 0; sr < 2; ++sr)
      if (layout_supported(Layout{param, state, m == 1, sr == 1, 0})) return true;
  return false;
}

}  // namespace fused_wd
