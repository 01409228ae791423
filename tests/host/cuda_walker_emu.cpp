// Host emulation of the CUDA mixed-precision element walker
// (for_each_mixed in csrc/cuda/multi_tensor_apply.cuh), run by
// tests/test_cuda_walker_host.py on machines without a GPU: the walker's
// source text is cut out of the header into walker.inc and compiled here for
// the CPU, one block of 256 "threads" run one after the other (its threads
// share no data), and compared element for element with a plain loop of the
// same element math: aligned and misaligned lists, tails, master weights,
// stochastic rounding, amsgrad.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <type_traits>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "fused_wd/math.h"
#define __device__
#define __forceinline__ inline
struct dim { unsigned x; };
static dim threadIdx, blockDim;
namespace fused_wd { namespace cuda {
#include "walker.inc"
}}
using namespace fused_wd;
template <typename PT, typename ST>
int run(int n, int pmis, int smis, bool master, bool sr, bool ams) {
  std::vector<PT> P(n + 8), G(n + 8), P2(n + 8);
  std::vector<ST> S0(n + 8), S1(n + 8), S2(n + 8), R0, R1, R2;
  std::vector<float> MS(n + 8), MS2;
  for (int i = 0; i < n + 8; ++i) {
    P[i] = PT(0.5f + 0.001f * i); G[i] = PT(0.01f * ((i * 37) % 11 - 5)); S0[i] = ST(0.001f * (i % 7));
    S1[i] = ST(0.0001f * (i % 5)); S2[i] = ST(0.0002f * (i % 3)); MS[i] = 0.5f + 0.001f * i + 1e-6f;
  }
  P2 = P; R0 = S0; R1 = S1; R2 = S2; MS2 = MS;
  AdamScalars<float> s = make_adam_scalars<float>(1e-2, 0.9, 0.999, 1e-8, 0.1, 1, 1e-2, 3, make_grad_prep<float>(1, 1, false));
  uint64_t key = sr_key(5, 7, 3);
  int64_t base = 16384 * 3;
  PT* p = P.data() + pmis; const PT* g = G.data() + pmis;
  ST* const S[3] = {S0.data() + smis, S1.data() + smis, ams ? S2.data() + smis : nullptr};
  float* ms = master ? MS.data() + pmis : nullptr;
  blockDim.x = 256;
  for (unsigned t = 0; t < 256; ++t) {
    threadIdx.x = t;
    cuda::for_each_mixed<PT, ST, 3>(p, g, ms, S, base, n, sr, key, [&](float& pp, float gg, float (&x)[3]) {
      if (ams) adam_element<float, true, kScaleParam>(pp, gg, x[0], x[1], x[2], s);
      else { float u = 0; adam_element<float, false, kScaleParam>(pp, gg, x[0], x[1], u, s); }
    });
  }
  int bad = 0;
  for (int i = 0; i < n; ++i) {  // reference: plain element loop
    int pi_ = i + pmis, si = i + smis;
    float pp = master ? MS2[pi_] : float(P2[pi_]);
    float m = float(R0[si]), v = float(R1[si]), vm = float(R2[si]);
    if (ams) adam_element<float, true, kScaleParam>(pp, float(G[pi_]), m, v, vm, s);
    else { float u = 0; adam_element<float, false, kScaleParam>(pp, float(G[pi_]), m, v, u, s); }
    PT want = PT(pp);
    if constexpr (std::is_same<PT, c10::BFloat16>::value)
      if (sr) want = c10::BFloat16(bf16_bits_stochastic(pp, sr_bits(key, base + i)), c10::BFloat16::from_bits());
    if (std::memcmp(&P[pi_], &want, sizeof(PT))) ++bad;
    if (master && MS[pi_] != pp) ++bad;
    ST wm = ST(m), wv = ST(v), wvm = ams ? ST(vm) : R2[si];
    if (std::memcmp(&S0[si], &wm, sizeof(ST)) || std::memcmp(&S1[si], &wv, sizeof(ST)) || std::memcmp(&S2[si], &wvm, sizeof(ST))) ++bad;
  }
  // untouched outside [0, n)
  for (int i = n + pmis; i < n + 8; ++i) if (std::memcmp(&P[i], &P2[i], sizeof(PT))) ++bad;
  return bad;
}
int main() {
  int total = 0, cases = 0;
  for (int n : {1, 3, 4, 5, 1023, 1024, 16384, 16381})
    for (int pmis : {0, 1}) for (int smis : {0, 1, 2}) for (int master = 0; master < 2; ++master)
      for (int ams = 0; ams < 2; ++ams) {
        total += run<c10::BFloat16, float>(n, pmis, smis, master, false, ams);
        total += run<c10::BFloat16, c10::BFloat16>(n, pmis, smis, master, !master, ams);
        total += run<c10::Half, float>(n, pmis, smis, master, false, ams);
        total += run<float, c10::BFloat16>(n, pmis, smis, false, false, ams);
        cases += 4;
      }
  printf("%d cases, %d mismatches\n", cases, total);
  return total != 0;
}
