// CPU kernels for the base instruction set (see kernels_impl.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>


#endif

#define FUSED_WD_ISA base
#define FWD_ISA_NAME "base"
#define FWD_TABLE_FN kernels_base
#include "cpu/kernels_impl.h"
