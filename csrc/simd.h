// Vector types the kernels are written against: VecScalar everywhere, VecAVX2 / VecAVX512 on x86.
//
// This header is included only from isa_*.cpp, inside an anonymous namespace and (for the x86
// types) inside that file's `target` region, so every function here is compiled once per
// instruction set with internal linkage: no inline function with AVX-512 code can leak, through
// the linker's choice of one definition, into the path a CPU without AVX-512 runs.
//
// Every type offers: W lanes, load / load_n / store / store_n for float, bf16 and f16 storage
// (load converts to fp32, store rounds to nearest even), arithmetic, abs, sqrt, and pow_pos(x, a)
// = x**a for x >= 0 (the general-alpha path of the score).
// load_pair / load_pair_n read 2W channels as two vectors, the unroll step of the reductions.

// -------------------------------------------------------------------------------------------
// Portable fallback: one lane, the compiler may still auto-vectorize the loops around it.
struct VecScalar {
  using reg = float;
  static constexpr int W = 1;
  static const char* name() { return "scalar"; }

  static reg zero() { return 0.0f; }
  static reg set1(float v) { return v; }
  template <class S>
  static reg load(const S* p) {
    return to_float(*p);
  }
  template <class S>
  static reg load_n(const S* p, int) {
    return to_float(*p);
  }
  template <class S>
  static void store(S* p, reg v) {
    from_float(v, p);
  }
  template <class S>
  static void store_n(S* p, reg v, int) {
    from_float(v, p);
  }
  template <class S>
  static void load_pair(const S* p, reg& lo, reg& hi) {
    lo = to_float(p[0]);
    hi = to_float(p[1]);
  }
  template <class S>
  static void load_pair_n(const S* p, int, reg& lo, reg& hi) {
    lo = to_float(p[0]);  // n < 2W = 2 means one channel
    hi = 0.0f;
  }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg abs(reg a) { return std::fabs(a); }
  static reg sqrt(reg a) { return std::sqrt(a); }
  static reg pow_pos(reg x, reg alpha) { return std::pow(x, alpha); }
};

#if defined(CANFAST_X86_AVX2) || defined(CANFAST_X86_AVX512)

// x**alpha for x >= 0 and 0 < alpha < 1, as exp(alpha * ln x), with Cephes' single-precision
// polynomials (relative error of a few ulp once multiplied by alpha * ln x, far inside the fp32
// tolerance). Special values follow powf: 0 -> 0, inf -> inf, NaN -> NaN. Results below the
// smallest normal float come out as subnormals or 0 (ldexp handles them).
template <class V>
static inline typename V::reg pow_poly(typename V::reg x, typename V::reg alpha) {
  using reg = typename V::reg;
  reg e;
  reg m = V::mant_exp(x, e);  // x = m * 2**e, m in [1, 2)
  // Centre the mantissa on 1 so the series for ln(1 + f) converges fast: m in [sqrt(.5), sqrt(2)).
  const auto big = V::gt(m, V::set1(1.41421356237f));
  m = V::select(big, V::mul(m, V::set1(0.5f)), m);
  e = V::select(big, V::add(e, V::set1(1.0f)), e);
  const reg f = V::sub(m, V::set1(1.0f));
  const reg z = V::mul(f, f);
  reg p = V::set1(7.0376836292e-2f);
  p = V::fmadd(p, f, V::set1(-1.1514610310e-1f));
  p = V::fmadd(p, f, V::set1(1.1676998740e-1f));
  p = V::fmadd(p, f, V::set1(-1.2420140846e-1f));
  p = V::fmadd(p, f, V::set1(1.4249322787e-1f));
  p = V::fmadd(p, f, V::set1(-1.6668057665e-1f));
  p = V::fmadd(p, f, V::set1(2.0000714765e-1f));
  p = V::fmadd(p, f, V::set1(-2.4999993993e-1f));
  p = V::fmadd(p, f, V::set1(3.3333331174e-1f));
  reg y = V::mul(V::mul(p, f), z);
  // ln 2 split in two so that e * ln2_hi is exact for any float exponent.
  const reg ln2_hi = V::set1(0.693359375f);
  const reg ln2_lo = V::set1(-2.12194440e-4f);
  y = V::fmadd(e, ln2_lo, y);
  y = V::fmadd(z, V::set1(-0.5f), y);
  reg lnx = V::add(f, y);
  lnx = V::fmadd(e, ln2_hi, lnx);

  const reg t = V::mul(alpha, lnx);  // in [-104, 88.8] for finite x > 0
  const reg n = V::round(V::mul(t, V::set1(1.44269504088896341f)));
  reg r = V::fmadd(n, V::set1(-0.693359375f), t);
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  reg q = V::set1(1.9875691500e-4f);
  q = V::fmadd(q, r, V::set1(1.3981999507e-3f));
  q = V::fmadd(q, r, V::set1(8.3334519073e-3f));
  q = V::fmadd(q, r, V::set1(4.1665795894e-2f));
  q = V::fmadd(q, r, V::set1(1.6666665459e-1f));
  q = V::fmadd(q, r, V::set1(5.0000001201e-1f));
  q = V::fmadd(q, V::mul(r, r), V::add(r, V::set1(1.0f)));
  reg res = V::ldexp(q, n);

  res = V::select(V::eq(x, V::zero()), V::zero(), res);
  // x is |g| >= 0 here, so "not <= FLT_MAX" means inf or NaN, and inf**a = inf, NaN**a = NaN.
  res = V::select(V::not_le(x, V::set1(3.40282347e38f)), x, res);
  return res;
}

#endif

#if defined(CANFAST_X86_AVX2)

struct VecAVX2 {
  using reg = __m256;
  using mask = __m256;
  static constexpr int W = 8;
  static const char* name() { return "avx2"; }

  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float v) { return _mm256_set1_ps(v); }

  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static reg load(const f16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // AVX2 has no 16-bit masked load: stage the tail through a zeroed buffer.
  template <class S>
  static reg load_n(const S* p, int n) {
    S tmp[W];
    for (int i = 0; i < W; ++i) tmp[i] = i < n ? p[i] : S{};
    return load(tmp);
  }

  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void store(bf16* p, reg v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, quiet, nan);
    // packus works within 128-bit lanes; the permute brings the two halves together.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store(f16* p, reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  template <class S>
  static void store_n(S* p, reg v, int n) {
    S tmp[W];
    store(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }

  template <class S>
  static void load_pair(const S* p, reg& lo, reg& hi) {
    lo = load(p);
    hi = load(p + W);
  }
  template <class S>
  static void load_pair_n(const S* p, int n, reg& lo, reg& hi) {
    lo = n >= W ? load(p) : load_n(p, n);
    hi = n > W ? load_n(p + W, n - W) : zero();
  }

  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg abs(reg a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static reg sqrt(reg a) { return _mm256_sqrt_ps(a); }

  static mask gt(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static mask eq(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static mask not_le(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_NLE_UQ); }
  static reg select(mask m, reg if_true, reg if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  // m in [1, 2) and e with x = m * 2**e; subnormals are scaled by 2**23 first.
  static reg mant_exp(reg x, reg& e) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
    const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);
    const __m256i bits = _mm256_castps_si256(xs);
    const __m256i biased = _mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff));
    e = _mm256_sub_ps(_mm256_cvtepi32_ps(biased), _mm256_set1_ps(127.0f));
    e = _mm256_sub_ps(e, _mm256_and_ps(tiny, _mm256_set1_ps(23.0f)));
    const __m256i mant =
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000));
    return _mm256_castsi256_ps(mant);
  }
  // q * 2**n for integral n in [-152, 130]: two factors, each a normal power of two.
  static reg ldexp(reg q, reg n) {
    n = _mm256_max_ps(_mm256_min_ps(n, _mm256_set1_ps(130.0f)), _mm256_set1_ps(-152.0f));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(ni, 1);
    const __m256i rest = _mm256_sub_epi32(ni, half);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(q, f1), f2);
  }
  static reg pow_pos(reg x, reg alpha) { return pow_poly<VecAVX2>(x, alpha); }
};

#endif

#if defined(CANFAST_X86_AVX512)

struct VecAVX512 {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;
  static const char* name() { return "avx512"; }

  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float v) { return _mm512_set1_ps(v); }

  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static reg widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }

  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const bf16* p) {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load(const f16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static reg load_n(const bf16* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(first(n), p)); }
  static reg load_n(const f16* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p)); }

  static __m256i narrow_bf16(reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, quiet);
    return _mm512_cvtepi32_epi16(r);
  }
  static __m256i narrow_f16(reg v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void store(bf16* p, reg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }
  static void store(f16* p, reg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_f16(v)); }
  static void store_n(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static void store_n(bf16* p, reg v, int n) { _mm256_mask_storeu_epi16(p, first(n), narrow_bf16(v)); }
  static void store_n(f16* p, reg v, int n) { _mm256_mask_storeu_epi16(p, first(n), narrow_f16(v)); }

  template <class S>
  static void load_pair(const S* p, reg& lo, reg& hi) {
    lo = load(p);
    hi = load(p + W);
  }
  template <class S>
  static void load_pair_n(const S* p, int n, reg& lo, reg& hi) {
    lo = n >= W ? load(p) : load_n(p, n);
    hi = n > W ? load_n(p + W, n - W) : zero();
  }

  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  // sqrt for a >= 0 from the 14-bit reciprocal square root and one Newton step (about 1e-7
  // relative): vsqrtps zmm issues once every several cycles, and with alpha = 0.5 it alone
  // would bound the score kernel below the memory stream. rsqrt14 reads subnormals correctly;
  // 0 is masked to 0 and +inf patched back (inf * rsqrt(inf) = inf * 0 is NaN).
  static reg sqrt(reg a) {
    const __mmask16 positive = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
    const reg y = _mm512_maskz_rsqrt14_ps(positive, a);
    const reg s = _mm512_mul_ps(a, y);
    const reg residual = _mm512_fnmadd_ps(s, y, _mm512_set1_ps(1.0f));
    const reg refined = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(0.5f)), residual, s);
    const __mmask16 inf = _mm512_cmp_ps_mask(a, _mm512_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(inf, refined, a);
  }

  static mask gt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static mask eq(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static mask not_le(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ); }
  static reg select(mask m, reg if_true, reg if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  // getexp / getmant read subnormals correctly, so no pre-scaling is needed here.
  static reg mant_exp(reg x, reg& e) {
    e = _mm512_getexp_ps(x);
    return _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  }
  static reg ldexp(reg q, reg n) { return _mm512_scalef_ps(q, n); }
  static reg pow_pos(reg x, reg alpha) { return pow_poly<VecAVX512>(x, alpha); }
};

#endif
