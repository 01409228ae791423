// Body of the CPU kernels, compiled once per instruction set. The including
// file defines FUSED_WD_ISA (its namespace), FWD_TABLE_FN (the name of its
// table function) and, when the ISA has F16C, FWD_F16C; it sets the target
// with `#pragma GCC target` after the standard headers and before this one.
//
// The loops are written so that GCC vectorizes them for the target: element
// math on opmath arrays with restrict pointers, 16-bit storage converted in
// blocks of kBlock elements through stack buffers, reductions into kLanes
// independent accumulators combined in a fixed order (so the result does not
// depend on the vector width or the thread count: fp contraction is off).
#include <cstring>
#include <type_traits>

#include "cpu/kernels.h"

namespace fused_wd {
namespace cpu {
namespace FUSED_WD_ISA {
namespace {

constexpr int64_t kBlock = 256;
// 64 independent accumulators: enough dependency chains to keep the vector
// adders busy (the norm is then bound by memory, not by add latency).
constexpr int kLanes = 64;

// ------------------------------------------------------------ conversions

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  // Round to nearest even; NaN -> canonical quiet NaN (as c10::BFloat16).
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past 65504
  if (ax < 0x38800000u) {  // below 2^-14: subnormal half, value * 2^24 rounded to even
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t v = ax - (112u << 23);
  return static_cast<uint16_t>(sign | ((v + 0xFFFu + ((v >> 13) & 1u)) >> 13));
}

// Storage <-> opmath for a block of n (<= kBlock) elements.
template <Storage S>
struct Io;

template <>
struct Io<Storage::kF32> {
  using T = float;
  using raw = float;
};

template <>
struct Io<Storage::kF64> {
  using T = double;
  using raw = double;
};

template <>
struct Io<Storage::kBF16> {
  using T = float;
  using raw = uint16_t;
  static void load(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
  static void store(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
};

template <>
struct Io<Storage::kF16> {
  using T = float;
  using raw = uint16_t;
  static void load(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
    int64_t i = 0;
#ifdef FWD_F16C
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(src[i]);
  }
  static void store(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
    int64_t i = 0;
#ifdef FWD_F16C
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
  }
};

// ------------------------------------------------------------ element loops

template <typename T, bool AMS, int DECAY>
void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
               T* __restrict vm, int64_t n, const AdamScalars<T>& s_in) {
  const AdamScalars<T> s = s_in;  // a local copy: no aliasing with the arrays
  T unused = 0;
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i], mi = m[i], vi = v[i];
    T vmi = AMS ? vm[i] : unused;
    adam_element<T, AMS, DECAY>(pi, g[i], mi, vi, vmi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
  }
}

template <typename T, int DECAY, bool MOM, bool NEST>
void sgd_loop(T* __restrict p, const T* __restrict g, T* __restrict buf, int64_t n, bool first,
              const SgdScalars<T>& s_in) {
  const SgdScalars<T> s = s_in;
  T unused = 0;
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T bi = MOM ? buf[i] : unused;
    sgd_element<T, DECAY, MOM, NEST>(pi, g[i], bi, first, s);
    p[i] = pi;
    if (MOM) buf[i] = bi;
  }
}

// Runs `body(p, g, m, v, vm, n)` on opmath arrays: the storage itself for
// fp32/fp64, block-converted copies for 16-bit storage. `nbuf` pointers of
// ptrs are read and written back, `g` is only read; null pointers skipped.
template <Storage S, int NPTR, typename Body>
void run_blocks(void* const (&rw)[NPTR], const void* g, int64_t begin, int64_t end, Body body) {
  using T = typename Io<S>::T;
  using raw = typename Io<S>::raw;
  if constexpr (S == Storage::kF32 || S == Storage::kF64) {
    T* a[NPTR];
    for (int k = 0; k < NPTR; ++k) a[k] = rw[k] ? static_cast<T*>(rw[k]) + begin : nullptr;
    body(a, static_cast<const T*>(g) + begin, end - begin);
  } else {
    alignas(64) T tmp[NPTR][kBlock];
    alignas(64) T gt[kBlock];
    T* a[NPTR];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = end - b < kBlock ? end - b : kBlock;
      for (int k = 0; k < NPTR; ++k) {
        a[k] = rw[k] ? tmp[k] : nullptr;
        if (rw[k]) Io<S>::load(static_cast<const raw*>(rw[k]) + b, tmp[k], n);
      }
      Io<S>::load(static_cast<const raw*>(g) + b, gt, n);
      body(a, gt, n);
      for (int k = 0; k < NPTR; ++k)
        if (rw[k]) Io<S>::store(tmp[k], static_cast<raw*>(rw[k]) + b, n);
    }
  }
}

template <Storage S, bool AMS, int DECAY>
void adam_typed(const AdamPtrs& ptr, int64_t begin, int64_t end,
                const AdamScalars<typename Io<S>::T>& s) {
  using T = typename Io<S>::T;
  void* const rw[4] = {ptr.p, ptr.m, ptr.v, AMS ? ptr.vmax : nullptr};
  run_blocks<S, 4>(rw, ptr.g, begin, end, [&](T* const (&a)[4], const T* g, int64_t n) {
    adam_loop<T, AMS, DECAY>(a[0], g, a[1], a[2], a[3], n, s);
  });
}

// Adam's mode flags become template parameters here, once per call:
// f(std::integral_constant<bool, AMSGRAD>, std::integral_constant<int, DECAY>).
template <typename F>
void with_adam_modes(bool ams, int decay, F&& f) {
  auto by_decay = [&](auto a) {
    if (decay == kL2) return f(a, std::integral_constant<int, kL2>{});
    if (decay == kScaleParam) return f(a, std::integral_constant<int, kScaleParam>{});
    return f(a, std::integral_constant<int, kNone>{});
  };
  if (ams) return by_decay(std::true_type{});
  return by_decay(std::false_type{});
}

template <Storage S>
void adam_dispatch(const AdamPtrs& ptr, int64_t b, int64_t e,
                   const AdamScalars<typename Io<S>::T>& s, bool ams, int decay) {
  with_adam_modes(ams, decay, [&](auto A, auto D) {
    adam_typed<S, decltype(A)::value, decltype(D)::value>(ptr, b, e, s);
  });
}

void adam_f32(Storage st, const AdamPtrs& ptr, int64_t b, int64_t e, const AdamScalars<float>& s,
              bool ams, int decay) {
  switch (st) {
    case Storage::kF32: return adam_dispatch<Storage::kF32>(ptr, b, e, s, ams, decay);
    case Storage::kF16: return adam_dispatch<Storage::kF16>(ptr, b, e, s, ams, decay);
    case Storage::kBF16: return adam_dispatch<Storage::kBF16>(ptr, b, e, s, ams, decay);
    default: return;
  }
}

void adam_f64(const AdamPtrs& ptr, int64_t b, int64_t e, const AdamScalars<double>& s, bool ams,
              int decay) {
  adam_dispatch<Storage::kF64>(ptr, b, e, s, ams, decay);
}

template <Storage S, int DECAY, bool MOM, bool NEST>
void sgd_typed(const SgdPtrs& ptr, int64_t begin, int64_t end,
               const SgdScalars<typename Io<S>::T>& s, bool first) {
  using T = typename Io<S>::T;
  void* const rw[2] = {ptr.p, MOM ? ptr.buf : nullptr};
  run_blocks<S, 2>(rw, ptr.g, begin, end, [&](T* const (&a)[2], const T* g, int64_t n) {
    sgd_loop<T, DECAY, MOM, NEST>(a[0], g, a[1], n, first, s);
  });
}

template <Storage S, int DECAY>
void sgd_mom(const SgdPtrs& ptr, int64_t b, int64_t e, const SgdScalars<typename Io<S>::T>& s,
             SgdModes md) {
  if (!md.momentum) return sgd_typed<S, DECAY, false, false>(ptr, b, e, s, md.first);
  if (md.nesterov) return sgd_typed<S, DECAY, true, true>(ptr, b, e, s, md.first);
  return sgd_typed<S, DECAY, true, false>(ptr, b, e, s, md.first);
}

template <Storage S>
void sgd_dispatch(const SgdPtrs& ptr, int64_t b, int64_t e, const SgdScalars<typename Io<S>::T>& s,
                  SgdModes md) {
  if (md.decay == kL2) return sgd_mom<S, kL2>(ptr, b, e, s, md);
  if (md.decay == kScaleParam) return sgd_mom<S, kScaleParam>(ptr, b, e, s, md);
  return sgd_mom<S, kNone>(ptr, b, e, s, md);
}

void sgd_f32(Storage st, const SgdPtrs& ptr, int64_t b, int64_t e, const SgdScalars<float>& s,
             SgdModes md) {
  switch (st) {
    case Storage::kF32: return sgd_dispatch<Storage::kF32>(ptr, b, e, s, md);
    case Storage::kF16: return sgd_dispatch<Storage::kF16>(ptr, b, e, s, md);
    case Storage::kBF16: return sgd_dispatch<Storage::kBF16>(ptr, b, e, s, md);
    default: return;
  }
}

void sgd_f64(const SgdPtrs& ptr, int64_t b, int64_t e, const SgdScalars<double>& s, SgdModes md) {
  sgd_dispatch<Storage::kF64>(ptr, b, e, s, md);
}

// ------------------------------------------------------------ mixed precision

// Block conversions chosen at run time (one switch per block of kBlock
// elements): the mixed layouts are many, the element loops are the
// homogeneous float ones above.
void load_float(Storage st, const void* src, int64_t off, float* __restrict dst, int64_t n) {
  switch (st) {
    case Storage::kBF16: return Io<Storage::kBF16>::load(static_cast<const uint16_t*>(src) + off, dst, n);
    case Storage::kF16: return Io<Storage::kF16>::load(static_cast<const uint16_t*>(src) + off, dst, n);
    default: std::memcpy(dst, static_cast<const float*>(src) + off, n * sizeof(float)); return;
  }
}

void store_float(Storage st, const float* __restrict src, void* dst, int64_t off, int64_t n) {
  switch (st) {
    case Storage::kBF16: return Io<Storage::kBF16>::store(src, static_cast<uint16_t*>(dst) + off, n);
    case Storage::kF16: return Io<Storage::kF16>::store(src, static_cast<uint16_t*>(dst) + off, n);
    default: std::memcpy(static_cast<float*>(dst) + off, src, n * sizeof(float)); return;
  }
}

void store_bf16_stochastic(const float* __restrict src, uint16_t* __restrict dst, int64_t n,
                           uint64_t key, int64_t first) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = bf16_bits_stochastic(src[i], sr_bits(key, static_cast<uint64_t>(first + i)));
}

// Runs body(p, g, s0, s1, s2, n) on float blocks; states s_k exist when
// their pointer does.
template <typename Body>
void run_mixed(const MixedLayout& L, const MixedPtrs& P, int64_t begin, int64_t end, Body body) {
  alignas(64) float pt[kBlock], gt[kBlock], st[3][kBlock];
  void* const sp[3] = {P.m, P.v, P.vmax};
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = end - b < kBlock ? end - b : kBlock;
    if (P.master) std::memcpy(pt, static_cast<const float*>(P.master) + b, n * sizeof(float));
    else load_float(L.param, P.p, b, pt, n);
    load_float(L.param, P.g, b, gt, n);
    for (int k = 0; k < 3; ++k)
      if (sp[k]) load_float(L.state, sp[k], b, st[k], n);
    body(pt, gt, st[0], st[1], st[2], n);
    if (P.master) std::memcpy(static_cast<float*>(P.master) + b, pt, n * sizeof(float));
    if (L.sr && !P.master && L.param == Storage::kBF16)
      store_bf16_stochastic(pt, static_cast<uint16_t*>(P.p) + b, n, L.sr_key, b);
    else
      store_float(L.param, pt, P.p, b, n);
    for (int k = 0; k < 3; ++k)
      if (sp[k]) store_float(L.state, st[k], sp[k], b, n);
  }
}

template <bool AMS, int DECAY>
void adam_mixed_typed(const MixedLayout& L, const MixedPtrs& P, int64_t b, int64_t e,
                      const AdamScalars<float>& s) {
  MixedPtrs q = P;
  if (!AMS) q.vmax = nullptr;
  run_mixed(L, q, b, e, [&](float* p, const float* g, float* m, float* v, float* vm, int64_t n) {
    adam_loop<float, AMS, DECAY>(p, g, m, v, vm, n, s);
  });
}

void adam_mixed(const MixedLayout& L, const MixedPtrs& P, int64_t b, int64_t e,
                const AdamScalars<float>& s, bool ams, int decay) {
  with_adam_modes(ams, decay, [&](auto A, auto D) {
    adam_mixed_typed<decltype(A)::value, decltype(D)::value>(L, P, b, e, s);
  });
}

template <int DECAY, bool MOM, bool NEST>
void sgd_mixed_typed(const MixedLayout& L, const MixedPtrs& P, int64_t b, int64_t e,
                     const SgdScalars<float>& s, bool first) {
  MixedPtrs q = P;
  q.v = q.vmax = nullptr;
  if (!MOM) q.m = nullptr;
  run_mixed(L, q, b, e, [&](float* p, const float* g, float* buf, float*, float*, int64_t n) {
    sgd_loop<float, DECAY, MOM, NEST>(p, g, buf, n, first, s);
  });
}

template <int DECAY>
void sgd_mixed_mom(const MixedLayout& L, const MixedPtrs& P, int64_t b, int64_t e,
                   const SgdScalars<float>& s, SgdModes md) {
  if (!md.momentum) return sgd_mixed_typed<DECAY, false, false>(L, P, b, e, s, md.first);
  if (md.nesterov) return sgd_mixed_typed<DECAY, true, true>(L, P, b, e, s, md.first);
  return sgd_mixed_typed<DECAY, true, false>(L, P, b, e, s, md.first);
}

void sgd_mixed(const MixedLayout& L, const MixedPtrs& P, int64_t b, int64_t e,
               const SgdScalars<float>& s, SgdModes md) {
  if (md.decay == kL2) return sgd_mixed_mom<kL2>(L, P, b, e, s, md);
  if (md.decay == kScaleParam) return sgd_mixed_mom<kScaleParam>(L, P, b, e, s, md);
  return sgd_mixed_mom<kNone>(L, P, b, e, s, md);
}

// ------------------------------------------------------------ reductions

// Runs `f(x, n)` over opmath blocks of [begin, end) of read-only storage.
template <Storage S, typename F>
void for_blocks(const void* x, int64_t begin, int64_t end, F f) {
  using T = typename Io<S>::T;
  if constexpr (S == Storage::kF32 || S == Storage::kF64) {
    f(static_cast<const T*>(x) + begin, end - begin);
  } else {
    alignas(64) T tmp[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = end - b < kBlock ? end - b : kBlock;
      Io<S>::load(static_cast<const typename Io<S>::raw*>(x) + b, tmp, n);
      f(tmp, n);
    }
  }
}

// Lanes are combined pairwise: (0+1)+(2+3)... a fixed tree.
inline double combine_sum(double* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] = acc[2 * j] + acc[2 * j + 1];
  return acc[0];
}

// Squares are summed in T (float for fp32/fp16/bf16) over runs of kFold
// elements, kFold / kLanes per lane, and each run's lane sums are added to
// float64 accumulators: float-speed arithmetic with float64 accuracy (a
// run's float sum of 16 squares is off by a few float ulps at most).
constexpr int64_t kFold = 1024;

template <Storage S>
double sumsq_typed(const void* x, int64_t begin, int64_t end) {
  using T = typename Io<S>::T;
  double acc[kLanes] = {0};
  // Lane j always takes the elements whose offset from the start of the
  // callback's run is j mod kLanes; the runs are fixed by [begin, end).
  for_blocks<S>(x, begin, end, [&](const T* __restrict a, int64_t n) {
    for (int64_t r = 0; r < n; r += kFold) {
      const int64_t m = n - r < kFold ? n - r : kFold;
      T part[kLanes] = {0};
      int64_t i = 0;
      for (; i + kLanes <= m; i += kLanes)
        for (int j = 0; j < kLanes; ++j) part[j] += a[r + i + j] * a[r + i + j];
      for (int j = 0; i < m; ++i, ++j) part[j] += a[r + i] * a[r + i];
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(part[j]);
    }
  });
  return combine_sum(acc);
}

template <Storage S>
double absmax_typed(const void* x, int64_t begin, int64_t end) {
  using T = typename Io<S>::T;
  T acc[kLanes] = {0};
  for_blocks<S>(x, begin, end, [&](const T* __restrict a, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] = nan_max(a[i + j] < 0 ? -a[i + j] : a[i + j], acc[j]);
    for (int j = 0; i < n; ++i, ++j) acc[j] = nan_max(a[i] < 0 ? -a[i] : a[i], acc[j]);
  });
  T r = acc[0];
  for (int j = 1; j < kLanes; ++j) r = nan_max(acc[j], r);
  return static_cast<double>(r);
}

template <Storage S>
void scale_typed(void* x, int64_t begin, int64_t end, double coef) {
  using T = typename Io<S>::T;
  const T c = static_cast<T>(coef);
  void* const rw[1] = {x};
  run_blocks<S, 1>(rw, x, begin, end, [&](T* const (&a)[1], const T*, int64_t n) {
    T* __restrict y = a[0];
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] * c;
  });
}

#define FWD_BY_STORAGE(FN, st, ...)                                  \
  switch (st) {                                                      \
    case Storage::kF32: return FN<Storage::kF32>(__VA_ARGS__);       \
    case Storage::kF64: return FN<Storage::kF64>(__VA_ARGS__);       \
    case Storage::kF16: return FN<Storage::kF16>(__VA_ARGS__);       \
    case Storage::kBF16: return FN<Storage::kBF16>(__VA_ARGS__);     \
  }

double sumsq(Storage st, const void* x, int64_t b, int64_t e) {
  FWD_BY_STORAGE(sumsq_typed, st, x, b, e)
  return 0;
}

double absmax(Storage st, const void* x, int64_t b, int64_t e) {
  FWD_BY_STORAGE(absmax_typed, st, x, b, e)
  return 0;
}

void scale(Storage st, void* x, int64_t b, int64_t e, double coef) {
  FWD_BY_STORAGE(scale_typed, st, x, b, e, coef)
}
#undef FWD_BY_STORAGE

}  // namespace
}  // namespace FUSED_WD_ISA

KernelTable FWD_TABLE_FN() {
  namespace k = FUSED_WD_ISA;
  return KernelTable{FWD_ISA_NAME, k::adam_f32, k::adam_f64, k::sgd_f32, k::sgd_f64,
                     k::adam_mixed, k::sgd_mixed,
                     k::sumsq, k::absmax, k::scale};
}

}  // namespace cpu
}  // namespace fused_wd
