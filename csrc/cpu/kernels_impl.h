// Body of the CPU kernels, compiled once per instruction set. The including
// file defines FUSED_WD_ISA (its namespace), FWD_ISA_NAME and FWD_TABLE_FN
// (the name of its table function), and sets the target with
// `#pragma GCC target` after the standard headers and before this one.
//
// Every update is one loop over the elements of a range that reads each
// stream in its storage type, converts to the math type in registers, runs
// the element math of fused_wd/math.h and writes each stream back: written
// so that GCC vectorizes it for the target (restrict pointers, branch-free
// conversions, mode flags as template parameters). The ranges are walked in
// blocks with software prefetch a few blocks ahead, so that memory keeps
// streaming while the vector units work. Reductions go into kLanes
// independent accumulators combined in a fixed order (so the result does
// not depend on the vector width or the thread count: fp contraction is off).
#include <cstring>
#include <type_traits>

#include "cpu/kernels.h"

namespace fused_wd {
namespace cpu {
namespace FUSED_WD_ISA {
namespace {

// ------------------------------------------------------------ conversions

template <typename To, typename From>
inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// Element access of one storage type: get() to the math type, put() back,
// rounding to nearest even like c10::Half / c10::BFloat16 (NaN -> their
// canonical quiet NaN). Integer bit operations and selects only, so that the
// loops vectorize with any instruction set.
template <Storage S>
struct Io;

template <>
struct Io<Storage::kF32> {
  using T = float;
  using raw = float;
  static T get(raw x) { return x; }
  static raw put(T x) { return x; }
};

template <>
struct Io<Storage::kF64> {
  using T = double;
  using raw = double;
  static T get(raw x) { return x; }
  static raw put(T x) { return x; }
};

template <>
struct Io<Storage::kBF16> {
  using T = float;
  using raw = uint16_t;
  static T get(raw h) { return bits_as<float>(static_cast<uint32_t>(h) << 16); }
  static raw put(T f) {
    const uint32_t u = bits_as<uint32_t>(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    // NaN by a float self-compare: one vector compare, where the unsigned
    // test on the bits took three with AVX2 (no unsigned compare there)
    return static_cast<raw>(f != f ? 0x7FC0u : r);
  }
};

template <>
struct Io<Storage::kF16> {
  using T = float;
  using raw = uint16_t;
  static T get(raw h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7FFFu;
    const uint32_t normal = (em << 13) + (112u << 23);
    const uint32_t inf_nan = (em << 13) | 0x7F800000u;
    // subnormal: mantissa * 2^-24, exact (and unaffected by DAZ)
    const uint32_t sub = bits_as<uint32_t>(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
    const uint32_t mag = em >= 0x7C00u ? inf_nan : (em >= 0x0400u ? normal : sub);
    return bits_as<float>(sign | mag);
  }
  static raw put(T f) {
    const uint32_t x = bits_as<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7FFFFFFFu;
    // normal half: drop 13 mantissa bits rounding to nearest even (a carry
    // into the exponent gives the next binade, or inf from 65520 up)
    const uint32_t v = ax - (112u << 23);
    const uint32_t normal = (v + 0xFFFu + ((v >> 13) & 1u)) >> 13;
    // below 2^-14: |f| + 0.5 rounds |f| to a multiple of 2^-24 (the half
    // subnormal step), whose count is then the low mantissa bits
    const uint32_t sub = bits_as<uint32_t>(bits_as<float>(ax) + 0.5f) - 0x3F000000u;
    const uint32_t mag = f != f             ? 0x7E00u
                         : ax >= 0x477FF000u ? 0x7C00u
                         : ax < 0x38800000u  ? sub
                                             : normal;
    return static_cast<raw>(sign | mag);
  }
};

template <Storage S>
using T_of = typename Io<S>::T;

template <Storage S>
using StorageC = std::integral_constant<Storage, S>;

// ------------------------------------------------------------ blocks

// Elements per block of the update loops. How far ahead each block
// prefetches its streams is the CPU's Tuning (kernels.h; chosen in
// ops_cpu.cpp). Measured on a 2-core AVX-512 Intel VM (50M params, clip +
// AdamW): without the prefetch the bf16 step takes 48 ms instead of 27 and
// fp32 43 instead of 38; blocks of 64-256 elements prefetched 512-1024
// elements ahead are within noise of each other, larger blocks or distances
// are slower.
constexpr int64_t kBlock = 64;

// One stream of a range: its base pointer (null: absent), element size, and
// whether it is written (prefetched for ownership) or only read.
struct Stream {
  const void* base;
  int64_t size;
  bool write;
};

template <int LOCALITY>
inline void prefetch_at(const Stream& st, int64_t from, int64_t to) {
  if (st.base == nullptr) return;
  const char* p = static_cast<const char*>(st.base);
  for (int64_t off = from * st.size; off < to * st.size; off += 64) {
    if (st.write)
      __builtin_prefetch(p + off, 1, LOCALITY);
    else
      __builtin_prefetch(p + off, 0, LOCALITY);
  }
}

// Prefetches elements [from, to) of a stream with the locality hint (0-3).
inline void prefetch(const Stream& st, int64_t from, int64_t to, int locality = 3) {
  switch (locality) {
    case 0: return prefetch_at<0>(st, from, to);
    case 1: return prefetch_at<1>(st, from, to);
    case 2: return prefetch_at<2>(st, from, to);
    default: return prefetch_at<3>(st, from, to);
  }
}

// Calls body(b, n) for the blocks of [begin, end), after prefetching the
// block tuning().prefetch_blocks blocks ahead of b in each stream; blocks
// never straddle a multiple of 2^32 (the stochastic-rounding key changes
// there).
template <int N, typename Body>
void for_blocks(const Stream (&streams)[N], int64_t begin, int64_t end, Body body) {
  const Tuning tn = tuning();
  const int64_t distance = static_cast<int64_t>(tn.prefetch_blocks) * kBlock;
  for (int64_t b = begin; b < end;) {
    int64_t n = end - b < kBlock ? end - b : kBlock;
    const int64_t to_wrap = (((b >> 32) + 1) << 32) - b;
    if (n > to_wrap) n = to_wrap;
    const int64_t ahead = b + distance;
    if (distance > 0 && ahead < end) {
      const int64_t stop = ahead + kBlock < end ? ahead + kBlock : end;
      for (const Stream& st : streams) prefetch(st, ahead, stop, tn.locality);
    }
    body(b, n);
    b += n;
  }
}

// The updated param in its storage: rounded stochastically with the bits
// of element `index` (low 32 bits) of the range key rk, or to nearest even.
template <Storage PS, bool SR>
inline typename Io<PS>::raw param_out(T_of<PS> x, uint32_t rk, uint32_t index) {
  if constexpr (SR)
    return bf16_bits_stochastic(x, sr_bits32(rk, index));
  else
    return Io<PS>::put(x);
}

// ------------------------------------------------------------ statistics

// Lanes of the reductions: enough independent dependency chains to keep the
// vector adders busy (a reduction is then bound by memory, not by add
// latency).
constexpr int kLanes = 64;

// Lanes are combined pairwise: (0+1)+(2+3)... a fixed tree.
inline double combine_sum(double* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] = acc[2 * j] + acc[2 * j + 1];
  return acc[0];
}

// The statistics of an update range (kernels.h): element i of a block adds
// to lane i, in the math type T; every kStatFold blocks the lanes are added
// to float64 lanes, which combine_sum reduces at the end. Which lane and run
// an element falls in depends only on its offset in [begin, end), so the
// sums are fixed by the range. Always accumulated (a few vector adds per
// element, in registers and L1, next to a loop bound by memory); written
// only when asked for. Measured on the Zen 3 VM (50M params, AdamW, the op
// alone, paired in one process): a build that compiles them out when not
// asked for (each range instantiated with and without) was 7.5% faster in
// bf16, which moves half the bytes of fp32, and 1-5% in fp32, but took the
// CPU kernels' build from 3.5 to 6.8 minutes; not adopted.
static_assert(kBlock == kLanes, "one lane per element of a block");
constexpr int kStatFold = 16;

// V: the range also sums exp_avg_sq values (Adam; SGD has none). The float64
// lanes are set by the first fold rather than zeroed up front (the sums are
// never -0.0, so 0.0 + x and x are the same bits): a range of a tiny tensor
// then clears 256 or 512 bytes, not 1.5 KB.
template <typename T, bool V>
struct RangeStats {
  T p[kLanes] = {};
  T v[V ? kLanes : 1] = {};
  double ap[kLanes];
  double av[V ? kLanes : 1];
  int blocks = 0;
  bool folded = false;

  void fold() {
    for (int j = 0; j < kLanes; ++j) {
      ap[j] = folded ? ap[j] + static_cast<double>(p[j]) : static_cast<double>(p[j]);
      p[j] = T(0);
    }
    if constexpr (V)
      for (int j = 0; j < kLanes; ++j) {
        av[j] = folded ? av[j] + static_cast<double>(v[j]) : static_cast<double>(v[j]);
        v[j] = T(0);
      }
    folded = true;
    blocks = 0;
  }
  void block_done() {
    if (++blocks == kStatFold) fold();
  }
  void write(double* out) {
    if (out == nullptr) return;
    fold();
    out[0] = combine_sum(ap);
    if constexpr (V)
      out[1] = combine_sum(av);
    else
      out[1] = 0.0;
  }
};

// ------------------------------------------------------------ Adam

template <Storage PS, Storage SS, bool MASTER, bool SR, bool AMS, int DECAY>
void adam_range(const Ptrs& P, int64_t begin, int64_t end, const AdamScalars<T_of<PS>>& s_in,
                uint64_t sr_key, double* stats) {
  using T = T_of<PS>;
  using PR = typename Io<PS>::raw;
  using ST = typename Io<SS>::raw;
  const AdamScalars<T> s = s_in;  // a local copy: no aliasing with the arrays
  const Stream streams[6] = {{P.p, sizeof(PR), true},
                             {P.g, sizeof(PR), false},
                             {MASTER ? P.master : nullptr, 4, true},
                             {P.s0, sizeof(ST), true},
                             {P.s1, sizeof(ST), true},
                             {AMS ? P.s2 : nullptr, sizeof(ST), true}};
  RangeStats<T, true> st;
  for_blocks(streams, begin, end, [&](int64_t b, int64_t n) {
    PR* __restrict p = static_cast<PR*>(P.p) + b;
    const PR* __restrict g = static_cast<const PR*>(P.g) + b;
    float* __restrict mp = MASTER ? static_cast<float*>(P.master) + b : nullptr;
    ST* __restrict m = static_cast<ST*>(P.s0) + b;
    ST* __restrict v = static_cast<ST*>(P.s1) + b;
    ST* __restrict vm = AMS ? static_cast<ST*>(P.s2) + b : nullptr;
    const uint32_t rk = SR ? sr_range_key(sr_key, static_cast<uint64_t>(b)) : 0;
    const uint32_t lo = static_cast<uint32_t>(b);
    T* __restrict sp = st.p;
    T* __restrict sv = st.v;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      T pi = MASTER ? mp[i] : Io<PS>::get(p[i]);
      T mi = Io<SS>::get(m[i]), vi = Io<SS>::get(v[i]);
      T vmi = AMS ? Io<SS>::get(vm[i]) : T(0);
      adam_element<T, AMS, DECAY>(pi, Io<PS>::get(g[i]), mi, vi, vmi, s);
      if (MASTER) mp[i] = pi;
      p[i] = param_out<PS, SR>(pi, rk, lo + static_cast<uint32_t>(i));
      m[i] = Io<SS>::put(mi);
      v[i] = Io<SS>::put(vi);
      if (AMS) vm[i] = Io<SS>::put(vmi);
      sp[i] += pi * pi;
      sv[i] += vi;
    }
    st.block_done();
  });
  st.write(stats);
}

// ------------------------------------------------------------ SGD

template <Storage PS, Storage SS, bool MASTER, bool SR, int DECAY, bool MOM, bool NEST>
void sgd_range(const Ptrs& P, int64_t begin, int64_t end, const SgdScalars<T_of<PS>>& s_in,
               bool first, uint64_t sr_key, double* stats) {
  using T = T_of<PS>;
  using PR = typename Io<PS>::raw;
  using ST = typename Io<SS>::raw;
  const SgdScalars<T> s = s_in;
  const Stream streams[4] = {{P.p, sizeof(PR), true},
                             {P.g, sizeof(PR), false},
                             {MASTER ? P.master : nullptr, 4, true},
                             {MOM ? P.s0 : nullptr, sizeof(ST), true}};
  RangeStats<T, false> st;
  for_blocks(streams, begin, end, [&](int64_t b, int64_t n) {
    PR* __restrict p = static_cast<PR*>(P.p) + b;
    const PR* __restrict g = static_cast<const PR*>(P.g) + b;
    float* __restrict mp = MASTER ? static_cast<float*>(P.master) + b : nullptr;
    ST* __restrict buf = MOM ? static_cast<ST*>(P.s0) + b : nullptr;
    const uint32_t rk = SR ? sr_range_key(sr_key, static_cast<uint64_t>(b)) : 0;
    const uint32_t lo = static_cast<uint32_t>(b);
    // `first` (the step that creates the momentum buffer) as a constant:
    // the buffer is then not read at all.
    T* __restrict sp = st.p;
    auto loop = [&](auto first_c) {
      constexpr bool FIRST = decltype(first_c)::value;
#pragma GCC ivdep
      for (int64_t i = 0; i < n; ++i) {
        T pi = MASTER ? mp[i] : Io<PS>::get(p[i]);
        T bi = MOM && !FIRST ? Io<SS>::get(buf[i]) : T(0);
        sgd_element<T, DECAY, MOM, NEST>(pi, Io<PS>::get(g[i]), bi, FIRST, s);
        if (MASTER) mp[i] = pi;
        p[i] = param_out<PS, SR>(pi, rk, lo + static_cast<uint32_t>(i));
        if (MOM) buf[i] = Io<SS>::put(bi);
        sp[i] += pi * pi;
      }
    };
    with_bool(MOM && first, loop);
    st.block_done();
  });
  st.write(stats);
}

// ------------------------------------------------------------ dispatch

// Calls f(Storage S) with the float storage st as a compile-time constant.
template <typename F>
void with_float_storage(Storage st, F&& f) {
  switch (st) {
    case Storage::kF32: return f(StorageC<Storage::kF32>{});
    case Storage::kF16: return f(StorageC<Storage::kF16>{});
    case Storage::kBF16: return f(StorageC<Storage::kBF16>{});
    default: return;
  }
}

// Calls f(PS, SS, MASTER, SR) with the layout as compile-time constants;
// only the float layouts of layout_supported() are instantiated.
template <typename F>
void with_layout(const Layout& L, F&& f) {
  with_float_storage(L.param, [&](auto ps) {
    with_float_storage(L.state, [&](auto ss) {
      with_bool(L.master, [&](auto master) {
        with_bool(L.sr, [&](auto sr) {
          constexpr Layout C{decltype(ps)::value, decltype(ss)::value, decltype(master)::value,
                             decltype(sr)::value, 0};
          if constexpr (layout_supported(C)) f(ps, ss, master, sr);
        });
      });
    });
  });
}

void adam(const Layout& L, const Ptrs& P, int64_t b, int64_t e, const AdamScalars<float>& s,
          bool ams, int decay, double* stats) {
  with_layout(L, [&](auto ps, auto ss, auto master, auto sr) {
    with_bool(ams, [&](auto a) {
      with_decay(decay, [&](auto d) {
        adam_range<decltype(ps)::value, decltype(ss)::value, decltype(master)::value,
                   decltype(sr)::value, decltype(a)::value, decltype(d)::value>(P, b, e, s, L.sr_key,
                                                                                stats);
      });
    });
  });
}

void adam_f64(const Ptrs& P, int64_t b, int64_t e, const AdamScalars<double>& s, bool ams,
              int decay, double* stats) {
  with_bool(ams, [&](auto a) {
    with_decay(decay, [&](auto d) {
      adam_range<Storage::kF64, Storage::kF64, false, false, decltype(a)::value, decltype(d)::value>(
          P, b, e, s, 0, stats);
    });
  });
}

void sgd(const Layout& L, const Ptrs& P, int64_t b, int64_t e, const SgdScalars<float>& s,
         SgdModes md, double* stats) {
  with_layout(L, [&](auto ps, auto ss, auto master, auto sr) {
    with_sgd_modes(md.decay, md.momentum, md.nesterov, [&](auto d, auto mom, auto nest) {
      sgd_range<decltype(ps)::value, decltype(ss)::value, decltype(master)::value,
                decltype(sr)::value, decltype(d)::value, decltype(mom)::value,
                decltype(nest)::value>(P, b, e, s, md.first, L.sr_key, stats);
    });
  });
}

void sgd_f64(const Ptrs& P, int64_t b, int64_t e, const SgdScalars<double>& s, SgdModes md,
             double* stats) {
  with_sgd_modes(md.decay, md.momentum, md.nesterov, [&](auto d, auto mom, auto nest) {
    sgd_range<Storage::kF64, Storage::kF64, false, false, decltype(d)::value, decltype(mom)::value,
              decltype(nest)::value>(P, b, e, s, md.first, 0, stats);
  });
}

// ------------------------------------------------------------ reductions

// Squares are summed in T (float for fp32/fp16/bf16) over runs of kFold
// elements, kFold / kLanes per lane, and each run's lane sums are added to
// float64 accumulators: float-speed arithmetic with float64 accuracy (a
// run's float sum of 16 squares is off by a few float ulps at most).
// Lane j always takes the elements whose offset from `begin` is j mod
// kLanes within its run; the runs are fixed by [begin, end).
constexpr int64_t kFold = 1024;



template <Storage S>
double sumsq_typed(const void* x, int64_t begin, int64_t end) {
  using T = T_of<S>;
  const typename Io<S>::raw* __restrict a = static_cast<const typename Io<S>::raw*>(x) + begin;
  const int64_t n = end - begin;
  double acc[kLanes] = {0};
  for (int64_t r = 0; r < n; r += kFold) {
    const int64_t m = n - r < kFold ? n - r : kFold;
    // two runs ahead (a standalone bf16 norm of 50M: 5.5 -> 3 ms here)
    if (r + 2 * kFold < n) prefetch({a, sizeof(*a), false}, r + 2 * kFold, r + 3 * kFold < n ? r + 3 * kFold : n);
    T part[kLanes] = {0};
    int64_t i = 0;
    for (; i + kLanes <= m; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const T y = Io<S>::get(a[r + i + j]);
        part[j] += y * y;
      }
    for (int j = 0; i < m; ++i, ++j) {
      const T y = Io<S>::get(a[r + i]);
      part[j] += y * y;
    }
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(part[j]);
  }
  return combine_sum(acc);
}

template <Storage S>
double absmax_typed(const void* x, int64_t begin, int64_t end) {
  using T = T_of<S>;
  const typename Io<S>::raw* __restrict a = static_cast<const typename Io<S>::raw*>(x) + begin;
  const int64_t n = end - begin;
  T acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T y = Io<S>::get(a[i + j]);
      acc[j] = nan_max(y < 0 ? -y : y, acc[j]);
    }
  for (int j = 0; i < n; ++i, ++j) {
    const T y = Io<S>::get(a[i]);
    acc[j] = nan_max(y < 0 ? -y : y, acc[j]);
  }
  T r = acc[0];
  for (int j = 1; j < kLanes; ++j) r = nan_max(acc[j], r);
  return static_cast<double>(r);
}

template <Storage S>
void scale_typed(void* x, int64_t begin, int64_t end, double coef) {
  using T = T_of<S>;
  const T c = static_cast<T>(coef);
  typename Io<S>::raw* __restrict y = static_cast<typename Io<S>::raw*>(x) + begin;
  for (int64_t i = 0; i < end - begin; ++i) y[i] = Io<S>::put(Io<S>::get(y[i]) * c);
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
  return KernelTable{FWD_ISA_NAME, k::adam, k::adam_f64, k::sgd, k::sgd_f64,
                     k::sumsq, k::absmax, k::scale};
}

}  // namespace cpu
}  // namespace fused_wd
