// CPU kernels for the avx2 instruction set (see kernels_impl.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
#endif

#define FUSED_WD_ISA avx2
#define FWD_ISA_NAME "avx2"
#define FWD_TABLE_FN kernels_avx2
#include "cpu/kernels_impl.h"
