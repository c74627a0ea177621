// The kernels, written once against a vector type `V` (see simd.h) and instantiated per
// instruction set by isa_*.cpp, which define `V` and include this file inside an anonymous
// namespace (and their target region). Not a standalone header: no includes, no include guard.
//
// Parallel layout of the score reduction: work items are (sample, channel chunk, row block). A chunk's partial sums live in a per-thread fp32 scratch
// buffer (L1/L2) while the rows stream past, so each input byte is read once, by one thread, in
// long contiguous runs, and the output is touched once per item.

constexpr int64_t kMinChunk = 128;      // below this the per-row runs get too short to stream
constexpr int64_t kRowsPerFlush = 256;  // rows summed before folding into the second-level sum

struct Plan {
  int64_t chunk;      // channels per item
  int64_t n_chunks;   // ceil(C / chunk)
  int64_t rows;       // rows per item
  int64_t n_rblocks;  // ceil(T / rows)
};

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chunks as wide as kMaxChunk allows (split evenly), since long runs per row stream best;
// narrower only when there would be fewer than a few items per thread (uneven padding then
// evens out). Rows are split only as a last resort, because items sharing a chunk must then
// add into the output atomically.
static Plan make_plan(int64_t groups, int64_t T, int64_t C, int threads) {
  const int64_t want = 4 * static_cast<int64_t>(threads > 0 ? threads : 1);
  Plan p{};
  int64_t n_chunks = ceil_div(C, kMaxChunk);
  if (groups * n_chunks < want && C > kMinChunk) n_chunks = ceil_div(want, groups);
  int64_t chunk = ceil_div(ceil_div(C, n_chunks), 64) * 64;  // whole cache lines per row run
  if (chunk < kMinChunk) chunk = kMinChunk;
  if (chunk > C) chunk = C;
  p.chunk = chunk > 0 ? chunk : 1;
  p.n_chunks = ceil_div(C, p.chunk);
  p.rows = T > 0 ? T : 1;
  p.n_rblocks = 1;
  const int64_t have = groups * p.n_chunks;
  if (have < want && T >= 128) {
    int64_t split = ceil_div(want, have);
    if (split > T / 64) split = T / 64;  // keep at least 64 rows per item
    if (split > 1) {
      p.rows = ceil_div(T, split);
      p.n_rblocks = ceil_div(T, p.rows);
    }
  }
  return p;
}

// dst[0:n] += src[0:n]; atomically when several items add into the same slice.
static void add_into(float* dst, const float* src, int64_t n, bool atomic) {
  if (atomic) {
    for (int64_t i = 0; i < n; ++i) {
#pragma omp atomic
      dst[i] += src[i];
    }
    return;
  }
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, V::add(V::load(dst + i), V::load(src + i)));
  if (i < n) V::store_n(dst + i, V::add(V::load_n(dst + i, int(n - i)), V::load_n(src + i, int(n - i))), int(n - i));
}

static void zero_floats(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
}

// ------------------------------------------------------------------------------------------
// score_accumulate

enum AlphaMode { kAlphaZero, kAlphaHalf, kAlphaOne, kAlphaAny };

template <int MODE>
static inline typename V::reg weight_of(typename V::reg ag, typename V::reg alpha) {
  if (MODE == kAlphaHalf) return V::sqrt(ag);
  if (MODE == kAlphaAny) return V::pow_pos(ag, alpha);
  (void)alpha;
  return ag;  // kAlphaOne; kAlphaZero never asks
}

// Stores 2W channels (`lanes` of them real) from two vectors.
template <class S>
static inline void store_pair(S* p, int lanes, typename V::reg lo, typename V::reg hi) {
  if (lanes >= V::W) {
    V::store(p, lo);
  } else {
    V::store_n(p, lo, lanes);
  }
  if (lanes >= 2 * V::W) {
    V::store(p + V::W, hi);
  } else if (lanes > V::W) {
    V::store_n(p + V::W, hi, lanes - V::W);
  }
}

// Sums NR rows (pointers pa[k], pg[k], k < NR) into the three chunk buffers at channel c, 2W
// channels (`lanes` of them real) at a time. Loading the buffers once per NR rows rather than
// per row keeps their traffic well below the input stream, and NR independent rows keep
// several cache misses in flight. Buffers are padded to whole pairs, so their loads are full.
template <class S, int MODE, int NR, bool FULL, bool MASKED>
static inline void score_rows(const S* const* pa, S* const* pg, const float* const* pm, int64_t c,
                              int lanes, float* s0, float* s1, float* s2, typename V::reg alpha) {
  using reg = typename V::reg;
  reg w_lo = V::load(s0 + c), w_hi = V::load(s0 + c + V::W);
  reg a_lo = V::load(s1 + c), a_hi = V::load(s1 + c + V::W);
  reg g_lo = V::load(s2 + c), g_hi = V::load(s2 + c + V::W);
  for (int k = 0; k < NR; ++k) {
    reg xa_lo, xa_hi, xg_lo, xg_hi;
    if (FULL) {
      V::load_pair(pa[k] + c, xa_lo, xa_hi);
      V::load_pair(pg[k] + c, xg_lo, xg_hi);
    } else {
      V::load_pair_n(pa[k] + c, lanes, xa_lo, xa_hi);
      V::load_pair_n(pg[k] + c, lanes, xg_lo, xg_hi);
    }
    if (MASKED) {
      // The gradient's own mask (dL/dx of a masked input), applied and written back in the
      // same pass that scores it.
      reg m_lo, m_hi;
      if (FULL) {
        V::load_pair(pm[k] + c, m_lo, m_hi);
      } else {
        V::load_pair_n(pm[k] + c, lanes, m_lo, m_hi);
      }
      xg_lo = V::mul(xg_lo, m_lo);
      xg_hi = V::mul(xg_hi, m_hi);
      store_pair(pg[k] + c, lanes, xg_lo, xg_hi);
    }
    xa_lo = V::abs(xa_lo);
    xa_hi = V::abs(xa_hi);
    xg_lo = V::abs(xg_lo);
    xg_hi = V::abs(xg_hi);
    if (MODE != kAlphaZero) {
      w_lo = V::fmadd(weight_of<MODE>(xg_lo, alpha), xa_lo, w_lo);
      w_hi = V::fmadd(weight_of<MODE>(xg_hi, alpha), xa_hi, w_hi);
    }
    a_lo = V::add(a_lo, xa_lo);
    a_hi = V::add(a_hi, xa_hi);
    g_lo = V::add(g_lo, xg_lo);
    g_hi = V::add(g_hi, xg_hi);
  }
  if (MODE != kAlphaZero) {
    V::store(s0 + c, w_lo);
    V::store(s0 + c + V::W, w_hi);
  }
  V::store(s1 + c, a_lo);
  V::store(s1 + c + V::W, a_hi);
  V::store(s2 + c, g_lo);
  V::store(s2 + c + V::W, g_hi);
}

template <class S, int MODE, int NR, bool MASKED>
static void score_group(const S* const* pa, S* const* pg, const float* const* pm, int64_t n,
                        float* s0, float* s1, float* s2, typename V::reg alpha) {
  constexpr int64_t step = 2 * V::W;
  int64_t c = 0;
  for (; c + step <= n; c += step) {
    score_rows<S, MODE, NR, true, MASKED>(pa, pg, pm, c, int(step), s0, s1, s2, alpha);
  }
  if (c < n) score_rows<S, MODE, NR, false, MASKED>(pa, pg, pm, c, int(n - c), s0, s1, s2, alpha);
}

// g[0:n] *= mask[0:n], for a padding row that is masked but not scored.
template <class S>
static void mask_run(S* g, const float* mask, int64_t n) {
  int64_t c = 0;
  for (; c + V::W <= n; c += V::W) V::store(g + c, V::mul(V::load(g + c), V::load(mask + c)));
  if (c < n) {
    const int lanes = int(n - c);
    V::store_n(g + c, V::mul(V::load_n(g + c, lanes), V::load_n(mask + c, lanes)), lanes);
  }
}

template <class S, int MODE, bool MASKED>
static void score_item(const ScoreArgs& p, const Plan& plan, int64_t b, int64_t ci, int64_t rb,
                       float* scratch) {
  const int64_t c0 = ci * plan.chunk;
  const int64_t n = (p.C - c0) < plan.chunk ? (p.C - c0) : plan.chunk;
  const int64_t padded = (n + 2 * V::W - 1) / (2 * V::W) * (2 * V::W);
  const int64_t stride = padded_chunk(plan.chunk);
  const int64_t t_begin = rb * plan.rows;
  const int64_t t_end = (t_begin + plan.rows) < p.T ? (t_begin + plan.rows) : p.T;
  const S* a = static_cast<const S*>(p.a) + b * p.a_sb + c0;
  // Written only when MASKED (the caller then owns g, see ScoreArgs).
  S* g = static_cast<S*>(const_cast<void*>(p.g)) + b * p.g_sb + c0;
  const int64_t rows_per_mask = MASKED ? p.B * p.T / p.g_mask_M : 1;
  const typename V::reg alpha = V::set1(p.alpha);

  // Two levels: `blk` sums at most kRowsPerFlush rows, `tot` sums the blocks, so a long
  // sequence never adds a small term to a large fp32 sum more than a few hundred times in a row.
  float* blk[3] = {scratch, scratch + stride, scratch + 2 * stride};
  float* tot[3] = {scratch + 3 * stride, scratch + 4 * stride, scratch + 5 * stride};
  for (int k = 0; k < 3; ++k) zero_floats(tot[k], padded);

  int64_t t = t_begin;
  while (t < t_end) {
    for (int k = 0; k < 3; ++k) zero_floats(blk[k], padded);
    int64_t picked = 0;
    const S* pa[4];
    S* pg[4];
    const float* pm[4] = {nullptr, nullptr, nullptr, nullptr};
    int used = 0;
    while (t < t_end && picked < kRowsPerFlush) {
      const bool keep = p.valid == nullptr || p.valid[b * p.v_sb + t * p.v_st] != 0;
      const float* mask =
          MASKED ? p.g_mask + ((b * p.T + t) / rows_per_mask) * p.C + c0 : nullptr;
      if (keep) {
        pa[used] = a + t * p.a_st;
        pg[used] = g + t * p.g_st;
        pm[used] = mask;
        ++used;
        ++picked;
        if (used == 4) {
          score_group<S, MODE, 4, MASKED>(pa, pg, pm, n, blk[0], blk[1], blk[2], alpha);
          used = 0;
        }
      } else if (MASKED) {
        mask_run<S>(g + t * p.g_st, mask, n);
      }
      ++t;
    }
    if (used == 3) score_group<S, MODE, 3, MASKED>(pa, pg, pm, n, blk[0], blk[1], blk[2], alpha);
    if (used == 2) score_group<S, MODE, 2, MASKED>(pa, pg, pm, n, blk[0], blk[1], blk[2], alpha);
    if (used == 1) score_group<S, MODE, 1, MASKED>(pa, pg, pm, n, blk[0], blk[1], blk[2], alpha);
    if (picked == 0) break;
    for (int k = 0; k < 3; ++k) add_into(tot[k], blk[k], padded, false);
  }

  const bool atomic = plan.n_rblocks > 1;
  float* out = p.out + b * p.o_sb + c0;
  // With alpha = 0 the weighted sum is the |a| sum (|g|**0 = 1, also for g = 0, as in torch).
  add_into(out, MODE == kAlphaZero ? tot[1] : tot[0], n, atomic);
  add_into(out + p.o_sk, tot[1], n, atomic);
  add_into(out + 2 * p.o_sk, tot[2], n, atomic);
}

template <class S, int MODE, bool MASKED>
static void score_typed(const ScoreArgs& p) {
  const Plan plan = make_plan(p.B, p.T, p.C, p.threads);
  const int64_t per_b = plan.n_chunks * plan.n_rblocks;
  const int64_t items = p.B * per_b;
#pragma omp parallel num_threads(p.threads)
  {
    float* scratch = p.scratch + omp_get_thread_num() * score_scratch_per_thread(p.C);
    // Dynamic: items differ in cost when samples have different numbers of padding rows.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / per_b;
      const int64_t ci = (it % per_b) / plan.n_rblocks;
      const int64_t rb = it % plan.n_rblocks;
      score_item<S, MODE, MASKED>(p, plan, b, ci, rb, scratch);
    }
  }
}

template <class S, bool MASKED>
static void score_masked(const ScoreArgs& p) {
  if (p.alpha == 0.0f) return score_typed<S, kAlphaZero, MASKED>(p);
  if (p.alpha == 0.5f) return score_typed<S, kAlphaHalf, MASKED>(p);
  if (p.alpha == 1.0f) return score_typed<S, kAlphaOne, MASKED>(p);
  return score_typed<S, kAlphaAny, MASKED>(p);
}

template <class S>
static void score_dtype(const ScoreArgs& p) {
  if (p.g_mask != nullptr) return score_masked<S, true>(p);
  return score_masked<S, false>(p);
}

static void score_kernel(const ScoreArgs& p) {
  if (p.B == 0 || p.C == 0 || p.T == 0) return;
  switch (p.dtype) {
    case DType::f32: return score_dtype<float>(p);
    case DType::bf16: return score_dtype<bf16>(p);
    case DType::f16: return score_dtype<f16>(p);
  }
}

// ------------------------------------------------------------------------------------------
// Row-block mask: dst = src * mask[row block]. Rows are independent, so plain row parallelism.

template <class S>
static void row_mask_typed(const RowMaskArgs& p) {
  const int64_t rows_per_mask = p.R / p.M;
#pragma omp parallel for num_threads(p.threads) schedule(static)
  for (int64_t r = 0; r < p.R; ++r) {
    const S* src = static_cast<const S*>(p.src) + r * p.src_rs;
    S* dst = static_cast<S*>(p.dst) + r * p.dst_rs;
    const float* mask = p.mask + (r / rows_per_mask) * p.mask_rs;
    int64_t c = 0;
    for (; c + V::W <= p.K; c += V::W) V::store(dst + c, V::mul(V::load(src + c), V::load(mask + c)));
    if (c < p.K) {
      const int lanes = int(p.K - c);
      V::store_n(dst + c, V::mul(V::load_n(src + c, lanes), V::load_n(mask + c, lanes)), lanes);
    }
  }
}

static void row_mask_kernel(const RowMaskArgs& p) {
  if (p.R == 0 || p.K == 0) return;
  switch (p.dtype) {
    case DType::f32: return row_mask_typed<float>(p);
    case DType::bf16: return row_mask_typed<bf16>(p);
    case DType::f16: return row_mask_typed<f16>(p);
  }
}

// ------------------------------------------------------------------------------------------
// ablate_expand: the n copies are written in one pass, each output row once.

template <class S>
static void ablate_typed(const AblateArgs& p) {
  const int64_t items = p.n * p.R;
#pragma omp parallel for num_threads(p.threads) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / p.R;
    const int64_t r = it % p.R;
    const S* src = static_cast<const S*>(p.y) + r * p.y_rs;
    S* dst = static_cast<S*>(p.out) + it * p.N;
    if (p.neurons) {
      // Unit out: the copy is bit-exact, so no conversion is needed on the way.
      std::memcpy(dst, src, static_cast<size_t>(p.N) * sizeof(S));
      dst[p.neurons[i]] = S{};
      continue;
    }
    // Unit mid: y - mid[r, j] * W[:, j] in fp32, rounded once, like the reference.
    const typename V::reg coef = V::set1(p.mid_cols[r * p.n + i]);
    const float* w = p.w_rows + i * p.N;
    int64_t c = 0;
    for (; c + V::W <= p.N; c += V::W) {
      V::store(dst + c, V::sub(V::load(src + c), V::mul(coef, V::load(w + c))));
    }
    if (c < p.N) {
      const int lanes = int(p.N - c);
      V::store_n(dst + c, V::sub(V::load_n(src + c, lanes), V::mul(coef, V::load_n(w + c, lanes))),
                 lanes);
    }
  }
}

static void ablate_kernel(const AblateArgs& p) {
  if (p.n == 0 || p.R == 0 || p.N == 0) return;
  switch (p.dtype) {
    case DType::f32: return ablate_typed<float>(p);
    case DType::bf16: return ablate_typed<bf16>(p);
    case DType::f16: return ablate_typed<f16>(p);
  }
}
