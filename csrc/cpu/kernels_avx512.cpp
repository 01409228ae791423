// CPU kernels for the avx512 instruction set (see kernels_impl.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif

#define FUSED_WD_ISA avx512
#define FWD_ISA_NAME "avx512"
#define FWD_TABLE_FN kernels_avx512
#include "cpu/kernels_impl.h"
