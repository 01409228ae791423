// The per-element math of fused_wd: the one place where the Adam and SGD
// update rules, weight decay, clipping and gradient unscaling are written.
// Included by the CPU kernels (once per instruction set) and by the CUDA
// kernels. No torch headers: plain C++ that nvcc and g++ both compile.
//
// `T` is always the compute ("opmath") type: float for fp32/fp16/bf16
// storage, double for fp64. Per-tensor scalars are prepared once (on the
// host for the CPU, inside the kernel for CUDA) by the make_* functions below,
// which do their own arithmetic in double exactly as torch.optim does in
// Python before casting to T, so that the element math matches
// torch.optim.*(foreach=False) to the rounding of T.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FWD_HD __host__ __device__ __forceinline__
#else
#define FWD_HD inline __attribute__((always_inline))
#endif

// Each CPU instruction-set translation unit defines FUSED_WD_ISA to its own
// name before including this header, so the (identical) template code it
// instantiates with its own target flags gets distinct symbols and can never
// be merged by the linker with code built for another instruction set.
#ifndef FUSED_WD_ISA
#define FUSED_WD_ISA generic
#endif

namespace fused_wd {

// Weight decay as the kernels see it (decay_kind below maps the user's mode
// onto these): "l2" -> kL2; "decoupled", "independent" and "corrected" ->
// kScaleParam (they differ only in the factor, computed by decay_factor
// below), or kCautious with cautious decay (the same factor, applied only
// where the update and the param agree in sign); "l1" -> kL1 (g += wd *
// sign(p)); "l1_proximal" -> kProximal (soft threshold by lr * wd after the
// update); any mode with weight_decay == 0 -> kNone (torch skips the decay
// entirely then).
enum DecayKind : int { kNone = 0, kL2 = 1, kScaleParam = 2, kCautious = 3, kL1 = 4, kProximal = 5 };

// User-facing decay modes, as passed through the op schemas.
enum DecayMode : int {
  kModeL2 = 0,
  kModeDecoupled = 1,
  kModeIndependent = 2,
  kModeCorrected = 3,
  kModeL1 = 4,
  kModeL1Proximal = 5
};

// A flag or a mode as a compile-time constant (the kernels' template
// parameters come from these dispatchers).
template <bool B>
struct BoolC {
  static constexpr bool value = B;
};
template <int K>
struct IntC {
  static constexpr int value = K;
};

// The skip / unscale / clip decision of a step (docs/design.md, "The math",
// steps 1-3), from the values the step reads.
struct StepPrep {
  bool skip;
  float inv_scale;  // 1 / grad_scale, or 1
  float coef;       // clip coefficient, or 1
};

template <typename T>
struct GradPrep {
  T inv_scale;  // 1 / grad_scale, or 1
  T coef;       // clip coefficient (or 1), negated under maximize
};

template <typename T>
struct AdamScalars {
  GradPrep<T> gp;
  T wd;             // kL2: g += wd * p; kL1: g += wd * sign(p)
  T decay;          // kScaleParam, kCautious: p *= decay
  T threshold;      // kProximal: lr * wd, the soft threshold after the update
  T w1, one_minus_w1;  // lerp weight (1 - beta1) and 1 - that
  T beta2, one_minus_beta2;
  T bc2_sqrt;       // sqrt(1 - beta2^t)
  T neg_step_size;  // -lr / (1 - beta1^t)
  T eps;
};

template <typename T>
struct SgdScalars {
  GradPrep<T> gp;
  T wd;
  T decay;
  T threshold;
  T momentum;
  T one_minus_dampening;
  T neg_lr;
};

inline namespace FUSED_WD_ISA {

// Clip coefficient of torch.nn.utils.clip_grad_norm_, in float32 like torch:
// c = min(1, max_norm / (norm + 1e-6)).
// torch evaluates max_norm / tensor as reciprocal(tensor) * max_norm; so do
// we, to get its bits. A NaN norm gives a NaN coefficient, as torch's
// clamp(max=1) does.
FWD_HD float clip_coef(float total_norm, float max_norm) {
  const float c = (1.0f / (total_norm + 1e-6f)) * max_norm;
  return (c < 1.0f || c != c) ? c : 1.0f;
}

FWD_HD bool is_finite(float x) { return x - x == 0.0f; }

// The step t of the update that follows a step counter: counter + 1 in the
// counter's dtype. torch.optim keeps float32 counters (and adds 1 in
// float32, which stops advancing at 2^24); stochastic rounding keeps float64
// ones, so that its key still advances there.
FWD_HD double step_after(const void* counter, bool is_double) {
  return is_double ? *static_cast<const double*>(counter) + 1.0
                   : static_cast<double>(*static_cast<const float*>(counter) + 1.0f);
}

// found_inf, grad_scale and grad_norm as read (the has_* flags say which
// were given); clip: clip to max_norm (grad_norm given and max_norm > 0).
FWD_HD StepPrep step_prep(bool has_found_inf, double found_inf, bool has_scale, double grad_scale,
                          bool has_norm, float grad_norm, bool clip, float max_norm,
                          bool skip_nonfinite) {
  StepPrep r{false, 1.0f, 1.0f};
  if (has_found_inf && found_inf != 0.0) r.skip = true;
  if (has_norm && skip_nonfinite && !is_finite(grad_norm)) r.skip = true;
  if (has_norm && clip) r.coef = clip_coef(grad_norm, max_norm);
  // 1 / scale in double, rounded once (as GradScaler computes inv_scale)
  if (has_scale) r.inv_scale = static_cast<float>(1.0 / grad_scale);
  return r;
}

// Calls f(BoolC<b>{}): a runtime flag as a constant.
template <typename F>
FWD_HD void with_bool(bool b, F&& f) {
  if (b) f(BoolC<true>{});
  else f(BoolC<false>{});
}

// Calls f(IntC<kind>{}) with the decay kind (DecayKind) as a constant: the
// one dispatch on it, used by every kernel.
template <typename F>
FWD_HD void with_decay(int kind, F&& f) {
  switch (kind) {
    case kL2: f(IntC<kL2>{}); break;
    case kScaleParam: f(IntC<kScaleParam>{}); break;
    case kCautious: f(IntC<kCautious>{}); break;
    case kL1: f(IntC<kL1>{}); break;
    case kProximal: f(IntC<kProximal>{}); break;
    default: f(IntC<kNone>{}); break;
  }
}

// Calls f(IntC<decay>{}, BoolC<momentum>{}, BoolC<nesterov>{}): SGD's modes
// as constants (nesterov only with momentum).
template <typename F>
FWD_HD void with_sgd_modes(int kind, bool momentum, bool nesterov, F&& f) {
  with_decay(kind, [&](auto d) {
    if (!momentum) f(d, BoolC<false>{}, BoolC<false>{});
    else if (nesterov) f(d, BoolC<true>{}, BoolC<true>{});
    else f(d, BoolC<true>{}, BoolC<false>{});
  });
}

// Weight-decay kind the kernel runs, from the user mode, strength and the
// cautious flag (refused with "l2", "l1" and "l1_proximal" by check_step_args
// before this is used).
FWD_HD int decay_kind(int mode, double weight_decay, bool cautious) {
  if (weight_decay == 0.0) return kNone;
  if (mode == kModeL2) return kL2;
  if (mode == kModeL1) return kL1;
  if (mode == kModeL1Proximal) return kProximal;
  return cautious ? kCautious : kScaleParam;
}

// p *= decay_factor for decoupled (1 - lr*wd), independent
// (1 - wd*lr/initial_lr) and corrected (1 - wd*lr^2/initial_lr) decay.
FWD_HD double decay_factor(int mode, double lr, double weight_decay, double initial_lr) {
  if (mode == kModeIndependent) return 1.0 - weight_decay * lr / initial_lr;
  if (mode == kModeCorrected) return 1.0 - weight_decay * lr * lr / initial_lr;
  return 1.0 - lr * weight_decay;
}

// Cautious decay (Chen et al. 2025): the decay shrinks p only where the
// update direction u (what the step subtracts, before the lr) and p agree in
// sign, u*p >= 0, judged on the pre-decay p. The update that follows is the
// same as without decay, so with every coordinate agreeing the result has
// exactly kScaleParam's bits.
template <typename T>
FWD_HD T cautious_decay(T p, T u, T decay) {
  return u * p >= T(0) ? p * decay : p;
}

// sign(p) as torch.sign computes it, and as autograd differentiates |p|:
// 1, -1, or 0 for +-0 and NaN. Coupled L1 adds wd * sign(p) to the gradient,
// which is the gradient of wd * sum|p| added to the loss.
template <typename T>
FWD_HD T sign_of(T p) {
  return p > T(0) ? T(1) : (p < T(0) ? T(-1) : T(0));
}

// Proximal L1 (soft thresholding) after the update:
// sign(p) * max(|p| - threshold, 0), an exact +0 where |p| <= threshold.
// A NaN stays NaN (|NaN| - t <= 0 is false), an infinity stays infinite.
template <typename T>
FWD_HD T soft_threshold(T p, T threshold) {
  const T a = (p < T(0) ? -p : p) - threshold;
  return a <= T(0) ? T(0) : (p < T(0) ? -a : a);
}

// Gradient preprocessing shared by every optimizer: AMP unscale, clip and
// maximize. g = (g * inv_scale) * coef; maximize negates coef, which gives
// exactly -(g * inv_scale * coef).
template <typename T>
FWD_HD GradPrep<T> make_grad_prep(float inv_scale, float coef, bool maximize) {
  GradPrep<T> gp;
  gp.inv_scale = static_cast<T>(inv_scale);
  gp.coef = static_cast<T>(maximize ? -coef : coef);
  return gp;
}

template <typename T>
FWD_HD T prep_grad(T g, const GradPrep<T>& gp) {
  return (g * gp.inv_scale) * gp.coef;
}

// torch.lerp's formula: start + w*(end-start) for |w| < 0.5, otherwise
// end - (end-start)*(1-w), with the test on w in T as torch makes it. The
// second is written end + (-(1-w))*(end-start), the same bits (negation is
// exact and x + (-y) is x - y), so that both are one base plus one product:
// the test, on the step's w, picks a base and a coefficient, and a vector
// loop selects them once per element instead of computing both formulas
// and blending (a multiply and an add fewer per vector). (A comparison
// of T rather than a precomputed bool also lets GCC vectorize loops that mix
// 16- and 32-bit storage.)
template <typename T>
FWD_HD T lerp(T start, T end, T w, T one_minus_w) {
  const bool near_start = (w < T(0) ? -w : w) < T(0.5);
  return (near_start ? start : end) + (near_start ? w : -one_minus_w) * (end - start);
}

FWD_HD float fsqrt(float x) { return sqrtf(x); }
FWD_HD double fsqrt(double x) { return sqrt(x); }

template <typename T>
FWD_HD T nan_max(T a, T b) {
  // torch.maximum: NaN if either is NaN.
  return (a != a || a > b) ? a : b;
}

// ---------------------------------------------------------------- Adam

// Scalars for one tensor at (already incremented) step t. lr may come from a
// tensor; everything is computed in double as torch.optim does in Python.
template <typename T>
FWD_HD AdamScalars<T> make_adam_scalars(double lr, double beta1, double beta2, double eps,
                                        double weight_decay, int mode, double initial_lr,
                                        double t, GradPrep<T> gp) {
  AdamScalars<T> s;
  s.gp = gp;
  s.wd = static_cast<T>(weight_decay);
  s.decay = static_cast<T>(decay_factor(mode, lr, weight_decay, initial_lr));
  s.threshold = static_cast<T>(lr * weight_decay);
  const double w1 = 1.0 - beta1;
  s.w1 = static_cast<T>(w1);
  s.one_minus_w1 = static_cast<T>(1) - s.w1;
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  s.bc2_sqrt = static_cast<T>(sqrt(bc2));
  s.neg_step_size = static_cast<T>(-(lr / bc1));
  s.eps = static_cast<T>(eps);
  return s;
}

// One element of Adam/AdamW: steps 2-6 of docs/design.md, "The math" (the
// skip decision is taken before). vmax is read and written only when AMSGRAD.
// Under kCautious the direction u = m / denom (the sign of the bias-corrected
// m-hat / (sqrt(v-hat) + eps), as bc1 > 0) is computed before the decay,
// which is legal because decoupled decay never feeds the moments. kL1 feeds
// wd * sign(p) to the moments like kL2 feeds wd * p; kProximal thresholds
// the updated p by lr * wd.
template <typename T, bool AMSGRAD, int DECAY>
FWD_HD void adam_element(T& p, T g, T& m, T& v, T& vmax, const AdamScalars<T>& s) {
  g = prep_grad(g, s.gp);
  if (DECAY == kL2) g = g + s.wd * p;
  if (DECAY == kL1) g = g + s.wd * sign_of(p);
  if (DECAY == kScaleParam) p = p * s.decay;
  m = lerp(m, g, s.w1, s.one_minus_w1);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  T vv = v;
  if (AMSGRAD) {
    vmax = nan_max(vmax, v);
    vv = vmax;
  }
  const T denom = fsqrt(vv) / s.bc2_sqrt + s.eps;
  const T u = m / denom;
  if (DECAY == kCautious) p = cautious_decay(p, u, s.decay);
  p = p + s.neg_step_size * u;
  if (DECAY == kProximal) p = soft_threshold(p, s.threshold);
}

// ---------------------------------------------------------------- SGD

template <typename T>
FWD_HD SgdScalars<T> make_sgd_scalars(double lr, double momentum, double dampening,
                                      double weight_decay, int mode, double initial_lr,
                                      GradPrep<T> gp) {
  SgdScalars<T> s;
  s.gp = gp;
  s.wd = static_cast<T>(weight_decay);
  s.decay = static_cast<T>(decay_factor(mode, lr, weight_decay, initial_lr));
  s.threshold = static_cast<T>(lr * weight_decay);
  s.momentum = static_cast<T>(momentum);
  s.one_minus_dampening = static_cast<T>(1.0 - dampening);
  s.neg_lr = static_cast<T>(-lr);
  return s;
}

// One element of SGD. MOMENTUM: buf is read (unless first) and written.
// `first` is true on the step that creates the momentum buffer (buf = g).
// Under kCautious the direction u is the final g (the momentum direction,
// nesterov included, or the gradient without momentum). kL1 and kProximal
// as in adam_element.
template <typename T, int DECAY, bool MOMENTUM, bool NESTEROV>
FWD_HD void sgd_element(T& p, T g, T& buf, bool first, const SgdScalars<T>& s) {
  g = prep_grad(g, s.gp);
  if (DECAY == kL2) g = g + s.wd * p;
  if (DECAY == kL1) g = g + s.wd * sign_of(p);
  if (DECAY == kScaleParam) p = p * s.decay;
  if (MOMENTUM) {
    buf = first ? g : buf * s.momentum + s.one_minus_dampening * g;
    g = NESTEROV ? g + s.momentum * buf : buf;
  }
  if (DECAY == kCautious) p = cautious_decay(p, g, s.decay);
  p = p + s.neg_lr * g;
  if (DECAY == kProximal) p = soft_threshold(p, s.threshold);
}

// ---------------------------------------------- automatic weight decay

// Modes of the auto_decay op (csrc/schema.h).
enum AutoDecayMode : int { kAutoScheduled = 0, kAutoAdaptive = 1 };

// The decay strength of an automatic mode for one step, from per-param
// statistics (n entries, one per param the step updates): psq and vsum, the
// sums of p^2 and of exp_avg_sq that the last pass left (the params and
// moments before this step); gsq, the sum of squares of each grad as given;
// counter, its step counter before this step; numel. `prep` is the step's
// skip/unscale/clip decision (step_prep). Sums run in index order, in
// double: the result depends on the inputs alone. Runs on one thread.
//
// scheduled (SWD, Xie et al. 2023): per param, sum v_t = beta2 * sum v_{t-1}
// + (1 - beta2) * sum g_t^2, where g_t = g * inv_scale * coef is the
// gradient the update uses; v_bar is the mean of v_t / (1 - beta2^t) over
// every element, each param with its own t; the strength is
// weight_decay / (sqrt(v_bar) + eps).
//
// adaptive (AWD, Ghiasi et al. 2023): lambda = weight_decay * |g| / |p| with
// |g| = inv_scale * sqrt(sum gsq) (unscaled, before clipping) and |p| =
// sqrt(sum psq) (0 when every param is 0); *state = 0.1 * *state + 0.9 *
// lambda unless the step is skipped or lambda is not finite; the strength is
// *state.
FWD_HD double auto_decay_value(int mode, const double* psq, const double* vsum, const double* gsq,
                               const double* counter, const double* numel, int64_t n,
                               const StepPrep& prep, double weight_decay, double beta2, double eps,
                               double* state) {
  const double inv_scale = static_cast<double>(prep.inv_scale);
  if (mode == kAutoScheduled) {
    const double k = inv_scale * static_cast<double>(prep.coef);
    double total = 0.0, count = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = beta2 * vsum[i] + (1.0 - beta2) * (k * k) * gsq[i];
      total += v / (1.0 - pow(beta2, counter[i] + 1.0));
      count += numel[i];
    }
    const double vbar = count > 0.0 ? total / count : 0.0;
    return weight_decay / (sqrt(vbar) + eps);
  }
  double g2 = 0.0, p2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    g2 += gsq[i];
    p2 += psq[i];
  }
  const double lambda = p2 > 0.0 ? weight_decay * (inv_scale * sqrt(g2)) / sqrt(p2) : 0.0;
  if (!prep.skip && lambda - lambda == 0.0) *state = 0.1 * *state + 0.9 * lambda;
  return *state;
}

// ------------------------------------------------- stochastic rounding

// Counter-based random bits for stochastic rounding: the bits of an element
// depend only on (seed, param id, step, element index), never on the
// thread, the chunking or the device, so CPU and CUDA round identically and
// a resumed run reproduces the bits of an uninterrupted one.
// splitmix64's output function (Steele, Lea, Flood 2014) derives one key
// per (seed, param, step) and per 2^32 elements of it; a 32-bit mixer
// (Wellons' lowbias32) then gives each element its bits, cheap enough to
// vectorize (32-bit multiplies) on the CPU.
FWD_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// The stream of one tensor at one step (computed once per tensor).
FWD_HD uint64_t sr_key(uint64_t seed, uint64_t param_id, uint64_t step) {
  uint64_t k = mix64(seed + kGolden);
  k = mix64(k + (param_id + 1) * kGolden);
  return mix64(k + (step + 1) * kGolden);
}

// The key of the 2^32 elements of stream `key` that contain `index`.
FWD_HD uint32_t sr_range_key(uint64_t key, uint64_t index) {
  return static_cast<uint32_t>(mix64(key + ((index >> 32) + 1) * kGolden) >> 32);
}

// 16 random bits for the element whose index has low 32 bits `lo`.
FWD_HD uint32_t sr_bits32(uint32_t range_key, uint32_t lo) {
  uint32_t x = (lo * 0x9E3779B9u) ^ range_key;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x >> 16;
}

// 16 random bits for element `index` of the stream `key`.
FWD_HD uint32_t sr_bits(uint64_t key, uint64_t index) {
  return sr_bits32(sr_range_key(key, index), static_cast<uint32_t>(index));
}

FWD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// float -> bfloat16 bits, rounded stochastically: adding 16 uniform random
// bits below the kept mantissa and truncating rounds up with probability
// (dropped bits) / 2^16, so E[round(x)] = x to 2^-16 of an ulp. Inf and NaN
// as round-to-nearest (NaN -> canonical quiet NaN, like c10::BFloat16).
FWD_HD uint16_t bf16_bits_stochastic(float f, uint32_t rnd16) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + (rnd16 & 0xFFFFu)) >> 16;
  const uint32_t special = (u & 0x007FFFFFu) ? 0x7FC0u : (u >> 16);
  return static_cast<uint16_t>((u & 0x7F800000u) == 0x7F800000u ? special : rounded);
}

}  // namespace FUSED_WD_ISA
}  // namespace fused_wd
