// canfast._C: the pybind11 face of the CPU kernels.
//
// Python passes addresses (ints), sizes, element strides and a dtype code; nothing here knows
// torch. Every argument is checked before the GIL is released, and a bad one raises ValueError
// (std::invalid_argument) instead of reaching a kernel. What cannot be checked from here is that
// an address really spans the memory its sizes and strides describe: canfast.ops.cpp derives them
// from live tensors, and other callers must do the same.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "canfast.h"

namespace py = pybind11;

namespace canfast {
namespace {

// ------------------------------------------------------------------------------------------
// Instruction-set dispatch: chosen once from cpuid, overridable for tests and benchmarks.

bool cpu_has(const char* isa) {
  const std::string name(isa);
  if (name == "scalar") return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (name == "avx2") return avx2 && kernels_avx2() != nullptr;
  if (name == "avx512") {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           kernels_avx512() != nullptr;
  }
#endif
  return false;
}

const KernelTable* table_for(const std::string& name) {
  if (name == "avx512") return kernels_avx512();
  if (name == "avx2") return kernels_avx2();
  if (name == "scalar") return kernels_scalar();
  return nullptr;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"scalar", "avx2", "avx512"}) {
    if (cpu_has(name)) out.emplace_back(name);
  }
  return out;
}

const KernelTable* g_table = nullptr;

const KernelTable* best_table() {
  for (const char* name : {"avx512", "avx2"}) {
    if (cpu_has(name)) return table_for(name);
  }
  return kernels_scalar();
}

std::string set_isa(const std::string& name) {
  if (name == "auto") {
    g_table = best_table();
    return g_table->isa;
  }
  if (table_for(name) == nullptr && name != "scalar") {
    throw std::invalid_argument("unknown instruction set '" + name +
                                "'; choose auto, scalar, avx2 or avx512");
  }
  if (!cpu_has(name.c_str())) {
    throw std::invalid_argument("this CPU (or build) cannot run the '" + name + "' kernels");
  }
  g_table = table_for(name);
  return g_table->isa;
}

// ------------------------------------------------------------------------------------------
// Argument checks.

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

DType dtype_of(int code) {
  if (code < 0 || code > 2) {
    bad("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

int64_t elem_size(DType d) { return d == DType::f32 ? 4 : 2; }

void nonneg(const char* name, int64_t v) {
  if (v < 0) bad(std::string(name) + " must be >= 0, got " + std::to_string(v));
}

int64_t product(std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > (int64_t(1) << 62) / d) bad("tensor sizes overflow 64-bit indexing");
    n *= d;
  }
  return n;
}

// A buffer the kernel will touch must have a real, aligned address.
void pointer(const char* name, uintptr_t p, int64_t align, int64_t numel) {
  if (numel == 0) return;
  if (p == 0) bad(std::string(name) + " is a null pointer");
  if (p % static_cast<uintptr_t>(align) != 0) {
    bad(std::string(name) + " is not aligned to its element size (" + std::to_string(align) + ")");
  }
}

// A written buffer's rows must not overlap within the channel run: `stride` >= the run length.
void row_stride(const char* name, int64_t stride, int64_t rows, int64_t run, bool written) {
  nonneg(name, stride);
  if (written && rows > 1 && stride < run) {
    bad(std::string(name) + " (" + std::to_string(stride) + ") is shorter than a row of " +
        std::to_string(run) + ": rows of an output would overlap");
  }
}

// A mask of M rows applies to R rows in M equal blocks.
void mask_blocks(int64_t R, int64_t M) {
  if (M < 1) bad("a mask needs M >= 1 blocks, got " + std::to_string(M));
  if (R % M != 0) bad(std::to_string(R) + " rows do not split into " + std::to_string(M) + " mask blocks");
}

int thread_count(int threads) {
  if (threads < 0) bad("threads must be >= 0 (0: OpenMP's default)");
#ifdef _OPENMP
  if (threads == 0) threads = omp_get_max_threads();
#else
  threads = 1;
#endif
  return threads < 1 ? 1 : threads;
}

// ------------------------------------------------------------------------------------------
// Entry points.

void score_accumulate(uintptr_t a, uintptr_t g, int dtype, int64_t B, int64_t T, int64_t C,
                      int64_t a_sb, int64_t a_st, int64_t g_sb, int64_t g_st, uintptr_t valid,
                      int64_t v_sb, int64_t v_st, uintptr_t out, int64_t o_sb, int64_t o_sk,
                      double alpha, int threads, uintptr_t g_mask, int64_t g_mask_M) {
  ScoreArgs p{};
  p.dtype = dtype_of(dtype);
  nonneg("B", B);
  nonneg("T", T);
  nonneg("C", C);
  const int64_t numel = product({B, T, C});
  const int64_t es = elem_size(p.dtype);
  pointer("a", a, es, numel);
  pointer("g", g, es, numel);
  pointer("out", out, 4, product({B, 3, C}));
  const std::pair<const char*, int64_t> strides[] = {
      {"a batch stride", a_sb}, {"a time stride", a_st},     {"g batch stride", g_sb},
      {"g time stride", g_st},  {"valid batch stride", v_sb}, {"valid time stride", v_st}};
  for (const auto& [name, s] : strides) nonneg(name, s);
  row_stride("out row stride", o_sk, 3, C, true);
  row_stride("out batch stride", o_sb, B, 3 * o_sk, true);
  if (!(alpha >= 0.0 && alpha <= 1.0)) bad("alpha must lie in [0, 1], got " + std::to_string(alpha));
  if (g_mask) {
    mask_blocks(B * T, g_mask_M);
    pointer("g_mask", g_mask, 4, product({g_mask_M, C}));
    // g is written: its rows must not overlap.
    row_stride("g time stride", g_st, T, C, true);
    row_stride("g batch stride", g_sb, B, T > 1 ? g_st * T : C, true);
  }
  p.g_mask = reinterpret_cast<const float*>(g_mask);
  p.g_mask_M = g_mask ? g_mask_M : 1;
  p.a = reinterpret_cast<const void*>(a);
  p.g = reinterpret_cast<const void*>(g);
  p.B = B;
  p.T = T;
  p.C = C;
  p.a_sb = a_sb;
  p.a_st = a_st;
  p.g_sb = g_sb;
  p.g_st = g_st;
  p.valid = reinterpret_cast<const uint8_t*>(valid);
  p.v_sb = v_sb;
  p.v_st = v_st;
  p.out = reinterpret_cast<float*>(out);
  p.o_sb = o_sb;
  p.o_sk = o_sk;
  p.alpha = static_cast<float>(alpha);
  p.threads = thread_count(threads);
  std::vector<float> scratch(static_cast<size_t>(p.threads * score_scratch_per_thread(C)));
  p.scratch = scratch.data();
  const KernelTable* k = g_table;
  py::gil_scoped_release release;
  k->score(p);
}

void row_mask(uintptr_t src, uintptr_t dst, int dtype, int64_t R, int64_t K, int64_t src_rs,
              int64_t dst_rs, uintptr_t mask, int64_t M, int64_t mask_rs, int threads) {
  RowMaskArgs p{};
  p.dtype = dtype_of(dtype);
  nonneg("R", R);
  nonneg("K", K);
  const int64_t numel = product({R, K});
  const int64_t es = elem_size(p.dtype);
  pointer("src", src, es, numel);
  pointer("dst", dst, es, numel);
  row_stride("src row stride", src_rs, R, K, false);
  row_stride("dst row stride", dst_rs, R, K, true);
  mask_blocks(R, M);
  row_stride("mask row stride", mask_rs, M, K, false);
  if (numel > 0) pointer("mask", mask, 4, product({M, K}));
  p.src = reinterpret_cast<const void*>(src);
  p.dst = reinterpret_cast<void*>(dst);
  p.R = R;
  p.K = K;
  p.src_rs = src_rs;
  p.dst_rs = dst_rs;
  p.mask = reinterpret_cast<const float*>(mask);
  p.M = M;
  p.mask_rs = mask_rs;
  p.threads = thread_count(threads);
  const KernelTable* k = g_table;
  py::gil_scoped_release release;
  k->row_mask(p);
}

void ablate_expand(uintptr_t y, uintptr_t out, int dtype, int64_t R, int64_t N, int64_t y_rs,
                   int64_t n, uintptr_t neurons, uintptr_t mid_cols, uintptr_t w_rows, int threads) {
  AblateArgs p{};
  p.dtype = dtype_of(dtype);
  nonneg("R", R);
  nonneg("N", N);
  nonneg("n", n);
  const int64_t es = elem_size(p.dtype);
  const int64_t rows = product({R, N});
  pointer("y", y, es, rows);
  pointer("out", out, es, product({n, R, N}));
  row_stride("y row stride", y_rs, R, N, false);
  const bool unit_out = neurons != 0;
  if (unit_out == (mid_cols != 0 || w_rows != 0)) {
    bad("give either neurons (unit out) or mid_cols and w_rows (unit mid), not both or neither");
  }
  if (unit_out) {
    pointer("neurons", neurons, 8, n);
    const int64_t* idx = reinterpret_cast<const int64_t*>(neurons);
    for (int64_t i = 0; i < n; ++i) {
      if (idx[i] < 0 || idx[i] >= N) {
        bad("neuron " + std::to_string(idx[i]) + " is outside [0, " + std::to_string(N) + ")");
      }
    }
  } else {
    if (mid_cols == 0 || w_rows == 0) bad("unit mid needs both mid_cols and w_rows");
    pointer("mid_cols", mid_cols, 4, product({R, n}));
    pointer("w_rows", w_rows, 4, product({n, N}));
  }
  p.y = reinterpret_cast<const void*>(y);
  p.out = reinterpret_cast<void*>(out);
  p.R = R;
  p.N = N;
  p.y_rs = y_rs;
  p.n = n;
  p.neurons = reinterpret_cast<const int64_t*>(neurons);
  p.mid_cols = reinterpret_cast<const float*>(mid_cols);
  p.w_rows = reinterpret_cast<const float*>(w_rows);
  p.threads = thread_count(threads);
  const KernelTable* k = g_table;
  py::gil_scoped_release release;
  k->ablate(p);
}

}  // namespace
}  // namespace canfast

PYBIND11_MODULE(_C, m) {
  using namespace canfast;
  m.doc() =
      "canfast CPU kernels (OpenMP, AVX2 / AVX-512 chosen at run time). Pointer-based: called by "
      "canfast.ops.cpp, which derives every address, size and stride from live tensors.";

  g_table = best_table();
  const char* env = std::getenv("CANFAST_ISA");
  if (env != nullptr && *env != '\0') {
    // A wrong override must not make the import fail: the ops would silently fall back to torch.
    try {
      set_isa(env);
    } catch (const std::invalid_argument& e) {
      const std::string msg = std::string("CANFAST_ISA ignored: ") + e.what();
      PyErr_WarnEx(PyExc_RuntimeWarning, msg.c_str(), 1);
    }
  }

  m.def("isa", []() { return std::string(g_table->isa); },
        "The instruction set the kernels currently run with.");
  m.def("supported_isas", &supported_isas,
        "Instruction sets this CPU and build can run, slowest first.");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Run the kernels with 'scalar', 'avx2', 'avx512' or 'auto' (the best); returns the one set.");

  m.def("score_accumulate", &score_accumulate, py::arg("a"), py::arg("g"), py::arg("dtype"),
        py::arg("B"), py::arg("T"), py::arg("C"), py::arg("a_sb"), py::arg("a_st"),
        py::arg("g_sb"), py::arg("g_st"), py::arg("valid"), py::arg("v_sb"), py::arg("v_st"),
        py::arg("out"), py::arg("o_sb"), py::arg("o_sk"), py::arg("alpha"), py::arg("threads"),
        py::arg("g_mask") = 0, py::arg("g_mask_M") = 1,
        "out[b, k, c] += sums over valid t of |g|^alpha |a|, |a|, |g| (k = 0, 1, 2); with "
        "g_mask, g *= g_mask[row block] in place first (every row), and the masked g is scored.");
  m.def("row_mask", &row_mask, py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("R"),
        py::arg("K"), py::arg("src_rs"), py::arg("dst_rs"), py::arg("mask"), py::arg("M"),
        py::arg("mask_rs"), py::arg("threads"), "dst = src * mask[row block] (src may be dst).");
  m.def("ablate_expand", &ablate_expand, py::arg("y"), py::arg("out"), py::arg("dtype"),
        py::arg("R"), py::arg("N"), py::arg("y_rs"), py::arg("n"), py::arg("neurons"),
        py::arg("mid_cols"), py::arg("w_rows"), py::arg("threads"),
        "out[i] = y with neuron i removed: zeroed (unit out) or its rank-1 term subtracted (mid).");
}
