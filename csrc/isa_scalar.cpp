// Portable kernels: one lane per "vector", for CPUs without AVX2 and for non-x86 builds.
// Also the baseline the SIMD paths are tested against.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "canfast.h"

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num() { return 0; }
#endif

namespace canfast {
namespace {

#include "simd.h"
using V = VecScalar;
#include "kernels.inc.h"

}  // namespace

const KernelTable* kernels_scalar() {
  static const KernelTable table{"scalar", score_kernel, row_mask_kernel,
                                 ablate_kernel};
  return &table;
}

}  // namespace canfast
