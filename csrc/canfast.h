// Types shared by every translation unit of canfast._C.
//
// The kernels see only raw pointers, element strides and a dtype code: no torch header, no
// libtorch. Arguments are checked once in module.cpp; the kernels trust them.
#pragma once

#include <cstdint>
#include <cstring>

namespace canfast {

// Codes the Python side sends for the element type of activations and weights.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// 16-bit storage types. Distinct structs (not bare uint16_t) so overloads pick the conversion.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Scalar conversions, used by the portable path and for the few scalar tails of the SIMD paths.
// Round to nearest even, like torch's .to(); NaN stays NaN (quiet), overflow becomes inf.
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (h & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / NaN keep an all-ones exponent
  } else if (exp == 0) {
    // Subnormal half: renormalise through one float subtraction, exact in fp32.
    o += 1u << 23;
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  return bits_to_float(o | ((h & 0x8000u) << 16));
}

inline void from_float(float v, float* dst) { *dst = v; }

inline void from_float(float v, bf16* dst) {
  const uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    dst->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  dst->bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void from_float(float v, f16* dst) {
  uint32_t f = float_to_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= (143u << 23)) {  // >= 65536: inf, or NaN (kept quiet)
    o = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {
    // Half subnormal or zero: adding a magic float makes the FPU round at the right bit.
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = float_to_bits(bits_to_float(f) + bits_to_float(magic)) - magic;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu;
    f += mant_odd;
    o = f >> 13;
  }
  dst->bits = static_cast<uint16_t>(o | (sign >> 16));
}

// Widest channel chunk one work item of the reductions sums (see kernels.inc.h): 32 KiB of
// fp32 per row run, and 3 x 2 x 32 KiB of partial sums, which stay in L2.
constexpr int64_t kMaxChunk = 8192;

// A chunk's partial sums padded to whole pairs of the widest vector (2 x 16 floats).
inline int64_t padded_chunk(int64_t chunk) { return (chunk + 31) / 32 * 32; }
// fp32 scratch each thread of the score needs: two levels of partial sums for its 3 rows.
inline int64_t score_scratch_per_thread(int64_t C) {
  return 6 * padded_chunk(C < kMaxChunk ? C : kMaxChunk);
}

// score_accumulate: out[b, k, c] += sum over valid t of
//   k = 0: |g|^alpha * |a|,  k = 1: |a|,  k = 2: |g|
// a, g: [B, T, C] with unit channel stride; valid: bytes [B, T] (nonzero = keep) or null;
// out: float [B, 3, C] with unit channel stride. Strides are in elements.
struct ScoreArgs {
  const void* a;
  const void* g;
  DType dtype;
  int64_t B, T, C;
  int64_t a_sb, a_st, g_sb, g_st;
  const uint8_t* valid;
  int64_t v_sb, v_st;
  float* out;
  int64_t o_sb, o_sk;
  float alpha;
  int threads;
  float* scratch;  // threads * score_scratch_per_thread(C) floats
  // Optional, float [M, C] contiguous: g (then writable) is first multiplied in place by row
  // (b * T + t) / (B * T / M) of it, also on rows that valid leaves out, and scored masked.
  const float* g_mask;
  int64_t g_mask_M;
};


// dst[r, c] = src[r, c] * mask[r / (R / M), c]; src may equal dst.
struct RowMaskArgs {
  const void* src;
  void* dst;
  DType dtype;
  int64_t R, K, src_rs, dst_rs;
  const float* mask;
  int64_t M, mask_rs;
  int threads;
};

// out [n, R, N] contiguous; copy i is y [R, N] (row stride y_rs) with neuron i removed:
// unit out (neurons != null): out[i, r, neurons[i]] = 0;
// unit mid (mid_cols, w_rows != null): out[i, r, c] = y[r, c] - mid_cols[r * n + i] * w_rows[i * N + c].
struct AblateArgs {
  const void* y;
  void* out;
  DType dtype;
  int64_t R, N, y_rs, n;
  const int64_t* neurons;
  const float* mid_cols;
  const float* w_rows;
  int threads;
};

// One implementation of every kernel for one instruction set.
struct KernelTable {
  const char* isa;
  void (*score)(const ScoreArgs&);
  void (*row_mask)(const RowMaskArgs&);
  void (*ablate)(const AblateArgs&);
};

// Defined in isa_*.cpp; the x86 ones return null when not compiled for this target.
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace canfast
