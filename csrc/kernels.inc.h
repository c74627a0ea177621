// The kernels, written once against a vector type `V` (see simd.h) and instantiated per
// instruction set by isa_*.cpp, which define `V` and include this file inside an anonymous
// namespace (and their target region). Not a standalone header: no includes, no include guard.
//
// Parallel layout shared by the two reductions (score and the |y| statistics): work items are
// (group, channel chunk, row block). A chunk's sums live in a small fp32 buffer on the thread's
// stack while the rows stream past, so each input byte is read once, by one thread, in long
// contiguous runs, and the output is touched once per item.

constexpr int64_t kMaxChunk = 1024;    // channels per work item: 3 sums * 4 KiB stay in L1/L2
constexpr int64_t kMinChunk = 128;     // below this the per-row runs get too short to stream
constexpr int64_t kRowsPerFlush = 256;  // rows summed before folding into the second-level sum

struct Plan {
  int64_t chunk;     // channels per item
  int64_t n_chunks;  // ceil(C / chunk)
  int64_t rows;      // rows per item
  int64_t n_rblocks;  // ceil(T / rows)
};

// Enough items for every thread (several each, so uneven padding evens out), without making
// chunks so narrow that the streams stop being long runs. Rows are split only as a last resort,
// because items sharing a chunk must then add into the output atomically.
static Plan make_plan(int64_t groups, int64_t T, int64_t C, int threads) {
  const int64_t want = 4 * static_cast<int64_t>(threads > 0 ? threads : 1);
  Plan p{};
  p.chunk = C < kMaxChunk ? C : kMaxChunk;
  if (p.chunk < 1) p.chunk = 1;
  p.n_chunks = (C + p.chunk - 1) / p.chunk;
  if (groups * p.n_chunks < want && C > kMinChunk) {
    const int64_t per_group = (want + groups - 1) / groups;
    int64_t chunk = (C + per_group - 1) / per_group;
    chunk = (chunk + 63) / 64 * 64;  // whole cache lines per row run
    p.chunk = chunk < kMinChunk ? kMinChunk : chunk;
    if (p.chunk > C) p.chunk = C;
    p.n_chunks = (C + p.chunk - 1) / p.chunk;
  }
  p.rows = T > 0 ? T : 1;
  p.n_rblocks = 1;
  const int64_t have = groups * p.n_chunks;
  if (have < want && T >= 128) {
    int64_t split = (want + have - 1) / have;
    if (split > T / 64) split = T / 64;  // keep at least 64 rows per item
    if (split > 1) {
      p.rows = (T + split - 1) / split;
      p.n_rblocks = (T + p.rows - 1) / p.rows;
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

// Sums NR rows (pointers pa[k], pg[k], k < NR) into the three chunk buffers at channel c.
// Loading the buffers once per NR rows rather than per row keeps the L1 traffic well below
// the DRAM stream, and NR independent row streams keep several cache misses in flight.
template <class S, int MODE, int NR>
static inline void score_rows(const S* const* pa, const S* const* pg, int64_t c, int lanes,
                              float* s0, float* s1, float* s2, typename V::reg alpha) {
  using reg = typename V::reg;
  const bool full = lanes == V::W;
  reg r0 = full ? V::load(s0 + c) : V::load_n(s0 + c, lanes);
  reg r1 = full ? V::load(s1 + c) : V::load_n(s1 + c, lanes);
  reg r2 = full ? V::load(s2 + c) : V::load_n(s2 + c, lanes);
  for (int k = 0; k < NR; ++k) {
    const reg va = V::abs(full ? V::load(pa[k] + c) : V::load_n(pa[k] + c, lanes));
    const reg vg = V::abs(full ? V::load(pg[k] + c) : V::load_n(pg[k] + c, lanes));
    if (MODE != kAlphaZero) r0 = V::fmadd(weight_of<MODE>(vg, alpha), va, r0);
    r1 = V::add(r1, va);
    r2 = V::add(r2, vg);
  }
  if (full) {
    if (MODE != kAlphaZero) V::store(s0 + c, r0);
    V::store(s1 + c, r1);
    V::store(s2 + c, r2);
  } else {
    if (MODE != kAlphaZero) V::store_n(s0 + c, r0, lanes);
    V::store_n(s1 + c, r1, lanes);
    V::store_n(s2 + c, r2, lanes);
  }
}

template <class S, int MODE, int NR>
static void score_group(const S* const* pa, const S* const* pg, int64_t n, float* s0, float* s1,
                        float* s2, typename V::reg alpha) {
  int64_t c = 0;
  for (; c + V::W <= n; c += V::W) score_rows<S, MODE, NR>(pa, pg, c, V::W, s0, s1, s2, alpha);
  if (c < n) score_rows<S, MODE, NR>(pa, pg, c, int(n - c), s0, s1, s2, alpha);
}

template <class S, int MODE>
static void score_item(const ScoreArgs& p, const Plan& plan, int64_t b, int64_t ci, int64_t rb) {
  const int64_t c0 = ci * plan.chunk;
  const int64_t n = (p.C - c0) < plan.chunk ? (p.C - c0) : plan.chunk;
  const int64_t t_begin = rb * plan.rows;
  const int64_t t_end = (t_begin + plan.rows) < p.T ? (t_begin + plan.rows) : p.T;
  const S* a = static_cast<const S*>(p.a) + b * p.a_sb + c0;
  const S* g = static_cast<const S*>(p.g) + b * p.g_sb + c0;
  const typename V::reg alpha = V::set1(p.alpha);

  // Two levels: `blk` sums at most kRowsPerFlush rows, `tot` sums the blocks, so a long
  // sequence never adds a small term to a large fp32 sum more than a few hundred times in a row.
  alignas(64) float blk[3][kMaxChunk];
  alignas(64) float tot[3][kMaxChunk];
  for (int k = 0; k < 3; ++k) zero_floats(tot[k], n);

  int64_t t = t_begin;
  while (t < t_end) {
    for (int k = 0; k < 3; ++k) zero_floats(blk[k], n);
    int64_t picked = 0;
    const S* pa[4];
    const S* pg[4];
    int used = 0;
    while (t < t_end && picked < kRowsPerFlush) {
      const bool keep = p.valid == nullptr || p.valid[b * p.v_sb + t * p.v_st] != 0;
      if (keep) {
        pa[used] = a + t * p.a_st;
        pg[used] = g + t * p.g_st;
        ++used;
        ++picked;
        if (used == 4) {
          score_group<S, MODE, 4>(pa, pg, n, blk[0], blk[1], blk[2], alpha);
          used = 0;
        }
      }
      ++t;
    }
    if (used == 3) score_group<S, MODE, 3>(pa, pg, n, blk[0], blk[1], blk[2], alpha);
    if (used == 2) score_group<S, MODE, 2>(pa, pg, n, blk[0], blk[1], blk[2], alpha);
    if (used == 1) score_group<S, MODE, 1>(pa, pg, n, blk[0], blk[1], blk[2], alpha);
    if (picked == 0) break;
    for (int k = 0; k < 3; ++k) add_into(tot[k], blk[k], n, false);
  }

  const bool atomic = plan.n_rblocks > 1;
  float* out = p.out + b * p.o_sb + c0;
  // With alpha = 0 the weighted sum is the |a| sum (|g|**0 = 1, also for g = 0, as in torch).
  add_into(out, MODE == kAlphaZero ? tot[1] : tot[0], n, atomic);
  add_into(out + p.o_sk, tot[1], n, atomic);
  add_into(out + 2 * p.o_sk, tot[2], n, atomic);
}

template <class S, int MODE>
static void score_typed(const ScoreArgs& p) {
  const Plan plan = make_plan(p.B, p.T, p.C, p.threads);
  const int64_t per_b = plan.n_chunks * plan.n_rblocks;
  const int64_t items = p.B * per_b;
  // Dynamic: items differ in cost when samples have different numbers of padding rows.
#pragma omp parallel for num_threads(p.threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / per_b;
    const int64_t ci = (it % per_b) / plan.n_rblocks;
    const int64_t rb = it % plan.n_rblocks;
    score_item<S, MODE>(p, plan, b, ci, rb);
  }
}

template <class S>
static void score_dtype(const ScoreArgs& p) {
  if (p.alpha == 0.0f) return score_typed<S, kAlphaZero>(p);
  if (p.alpha == 0.5f) return score_typed<S, kAlphaHalf>(p);
  if (p.alpha == 1.0f) return score_typed<S, kAlphaOne>(p);
  return score_typed<S, kAlphaAny>(p);
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
// masked_linear epilogue: bias, output mask and the |y| column sums in one pass over y.

template <class S>
static inline void epilogue_vec(S* row, const float* bias, const float* mask, float* st, int64_t c,
                                int lanes) {
  const bool full = lanes == V::W;
  typename V::reg v = full ? V::load(row + c) : V::load_n(row + c, lanes);
  if (bias) v = V::add(v, full ? V::load(bias + c) : V::load_n(bias + c, lanes));
  if (mask) v = V::mul(v, full ? V::load(mask + c) : V::load_n(mask + c, lanes));
  if (full) {
    V::store(row + c, v);
  } else {
    V::store_n(row + c, v, lanes);
  }
  if (st) {
    // Sum what was stored (rounded to the storage type), as the reference sums y itself.
    const typename V::reg stored = full ? V::load(row + c) : V::load_n(row + c, lanes);
    const typename V::reg acc = full ? V::load(st + c) : V::load_n(st + c, lanes);
    if (full) {
      V::store(st + c, V::add(acc, V::abs(stored)));
    } else {
      V::store_n(st + c, V::add(acc, V::abs(stored)), lanes);
    }
  }
}

template <class S>
static void epilogue_typed(const EpilogueArgs& p) {
  const Plan plan = make_plan(1, p.R, p.N, p.threads);
  const int64_t items = plan.n_chunks * plan.n_rblocks;
  const int64_t rows_per_mask = p.mask ? p.R / p.M : 1;
#pragma omp parallel for num_threads(p.threads) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t c0 = (it / plan.n_rblocks) * plan.chunk;
    const int64_t n = (p.N - c0) < plan.chunk ? (p.N - c0) : plan.chunk;
    const int64_t r_begin = (it % plan.n_rblocks) * plan.rows;
    const int64_t r_end = (r_begin + plan.rows) < p.R ? (r_begin + plan.rows) : p.R;
    alignas(64) float blk[kMaxChunk];
    alignas(64) float tot[kMaxChunk];
    float* st = p.stats ? blk : nullptr;
    if (st) zero_floats(tot, n);
    const float* bias = p.bias ? p.bias + c0 : nullptr;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowsPerFlush) {
      const int64_t r1 = (r0 + kRowsPerFlush) < r_end ? (r0 + kRowsPerFlush) : r_end;
      if (st) zero_floats(blk, n);
      for (int64_t r = r0; r < r1; ++r) {
        S* row = static_cast<S*>(p.y) + r * p.y_rs + c0;
        const float* mask = p.mask ? p.mask + (r / rows_per_mask) * p.mask_rs + c0 : nullptr;
        int64_t c = 0;
        for (; c + V::W <= n; c += V::W) epilogue_vec<S>(row, bias, mask, st, c, V::W);
        if (c < n) epilogue_vec<S>(row, bias, mask, st, c, int(n - c));
      }
      if (st) add_into(tot, blk, n, false);
    }
    if (st) add_into(p.stats + c0, tot, n, plan.n_rblocks > 1);
  }
}

static void epilogue_kernel(const EpilogueArgs& p) {
  if (p.R == 0 || p.N == 0) return;
  switch (p.dtype) {
    case DType::f32: return epilogue_typed<float>(p);
    case DType::bf16: return epilogue_typed<bf16>(p);
    case DType::f16: return epilogue_typed<f16>(p);
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
