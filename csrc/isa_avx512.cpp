// Kernels for x86 CPUs with AVX-512 F, BW, VL and DQ (Skylake-X, Ice Lake, Zen 4 and later).
//
// Only this file's own code is compiled for AVX-512: standard headers are included before the
// target region, and everything inside it has internal linkage (see simd.h), so no AVX-512 code
// can be picked by the linker for a shared inline function the baseline path calls.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "canfast.h"

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num() { return 0; }
#endif

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own intrinsic headers self-initialise an "undefined" vector (`__Y = __Y`), which
// -Wmaybe-uninitialized reports at every inlined use; the pattern is intended.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#define CANFAST_X86_AVX512
namespace canfast {
namespace {
#include "simd.h"
using V = VecAVX512;
#include "kernels.inc.h"
}  // namespace
}  // namespace canfast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace canfast {
const KernelTable* kernels_avx512() {
  static const KernelTable table{"avx512", score_kernel, row_mask_kernel,
                                 ablate_kernel};
  return &table;
}
}  // namespace canfast

#else

namespace canfast {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace canfast

#endif
