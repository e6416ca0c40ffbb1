// SPDX-License-Identifier: Apache-2.0
//
// lowmem::sparse_support_mm and friends — the sparse products of SLTrain's factorized linear on CPU.
//
// SLTrain (Han et al. 2024) writes a weight as W = scale * B @ A + S, S (out x in) sparse on a
// fixed support of nnz positions. Multiplying by W without building it (lowmem/kernels/
// sparse_low_rank_cpu.py) needs three sparse products over a (tokens x features) activation:
//
//   Y  += X S^T       out[t, o] += sum_{k in row o}    values[k] * X[t, col_k]       (forward)
//   dX += dY S        out[t, i] += sum_{k in column i} values[k] * dY[t, row_k]      (backward)
//   dS  = SDDMM       ds[k]      = sum_t dY[t, row_k] * X[t, col_k]                  (backward)
//
// The first two are one op (sparse_support_mm) run on the support grouped by output row (CSR) or
// by input column (CSC); the grouping is the caller's: ``ptr`` (rows + 1, int64) delimits each
// output's entries; entry k of output row o reads input feature ``src[k] - o * stride`` (``src``
// int32 or int64, nnz) with value ``vals[k]``, all in that grouped order. stride = in_features
// lets the row grouping pass the layer's own sorted row-major flat ``index`` as src (no copy of
// it is kept); the column grouping passes the rows with stride 0. The caller builds the groupings
// once per support and keeps them (lowmem/kernels/sparse_support.py).
//
// Layout: the token axis is made the fast axis, in blocks of TB tokens (16 or 64): a
// (tokens x F) activation becomes ``blocks`` (ceil(tokens / TB) x F x TB), zero-padded past the
// last token (op sparse_support_blocks). Then one sparse entry is a vectorized multiply-add of a
// contiguous TB-vector (TB * 4 bytes: whole cache lines) into an accumulator held in registers,
// and one token block of the input (F * TB * 4 bytes: 512 KiB at F = 2048, TB = 64) stays in L2
// while every output row of a thread's share reads it. An output tile of 16 rows x TB tokens is
// accumulated in registers / a stack buffer and added, transposed, to the row-major output once.
// On the 2-core Sapphire Rapids dev box (fp32, 2048 x 2048, density 3%, 2048 tokens, a shared
// machine, 2 threads) each product runs at 45-65 GFLOP/s and the SDDMM at 40-70 (8-12 ms each,
// next to 70-90 ms for one dense 2048^3 GEMM); torch's CSR matmul (MKL) ran at ~15 GFLOP/s and
// needed transposed copies and a CSC conversion per call.
//
// Threads (at::parallel_for) split the output rows into as many contiguous ranges as there are
// threads, with equal numbers of entries (ranges aligned to 16 rows, so no two threads write one
// cache line of a row-major output with 16-aligned rows); each thread walks every token block over
// its own rows, so no two threads write the same output and no reduction is needed.
//
// Arithmetic: products accumulate in the input dtype (fp32 or fp64), with fused multiply-adds
// (-ffp-contract=off in the build flags forbids the compiler from contracting on its own, so the
// kernels ask for them explicitly), summed in token-vector lanes; the order of the sum differs from
// a dense GEMM's, so results agree with the reference to rounding, not bitwise.
//
// Vector width: AVX-512 (16 floats / 8 doubles), else AVX2 + FMA (8 / 4), else scalar loops;
// chosen at compile time by -march=native. -DLOWMEM_SPARSE_SUPPORT_PORTABLE forces the scalar path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if !defined(LOWMEM_SPARSE_SUPPORT_PORTABLE) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowTile = 16;  // output rows accumulated per tile (one 64-byte line of fp32)

// One SIMD register of T and the few operations the kernels need.
template <typename T>
struct Simd {  // portable: one lane
  using Reg = T;
  static constexpr int kLanes = 1;
  static Reg zero() { return T(0); }
  static Reg load(const T* p) { return *p; }
  static void store(T* p, Reg v) { *p = v; }
  static Reg set1(T x) { return x; }
  static Reg fma(Reg a, Reg b, Reg c) { return std::fma(a, b, c); }
  static Reg add(Reg a, Reg b) { return a + b; }
  static void add_column(T* row, const T* col, int64_t stride, int64_t n) {
    for (int64_t j = 0; j < n; ++j) row[j] += col[j * stride];
  }
  static T sum(Reg v) { return v; }
};

#if !defined(LOWMEM_SPARSE_SUPPORT_PORTABLE) && defined(__AVX512F__)
template <>
struct Simd<float> {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  // row[j] += col[j * stride] for j < n: one gather, one vector add when n is 16.
  static void add_column(float* row, const float* col, int64_t stride, int64_t n) {
    if (n == 16) {
      const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int>(stride)));
      _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), _mm512_i32gather_ps(idx, col, 4)));
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] += col[j * stride];
    }
  }
  static float sum(Reg v) { return _mm512_reduce_add_ps(v); }
};
template <>
struct Simd<double> {
  using Reg = __m512d;
  static constexpr int kLanes = 8;
  static Reg zero() { return _mm512_setzero_pd(); }
  static Reg load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, Reg v) { _mm512_storeu_pd(p, v); }
  static Reg set1(double x) { return _mm512_set1_pd(x); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_pd(a, b); }
  static void add_column(double* row, const double* col, int64_t stride, int64_t n) {
    if (n == 16) {
      const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm256_set1_epi32(static_cast<int>(stride)));
      _mm512_storeu_pd(row, _mm512_add_pd(_mm512_loadu_pd(row), _mm512_i32gather_pd(idx, col, 8)));
      _mm512_storeu_pd(row + 8, _mm512_add_pd(_mm512_loadu_pd(row + 8), _mm512_i32gather_pd(idx, col + 8 * stride, 8)));
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] += col[j * stride];
    }
  }
  static double sum(Reg v) { return _mm512_reduce_add_pd(v); }
};
#elif !defined(LOWMEM_SPARSE_SUPPORT_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
template <>
struct Simd<float> {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static void add_column(float* row, const float* col, int64_t stride, int64_t n) {
    for (int64_t j = 0; j < n; ++j) row[j] += col[j * stride];
  }
  static float sum(Reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
template <>
struct Simd<double> {
  using Reg = __m256d;
  static constexpr int kLanes = 4;
  static Reg zero() { return _mm256_setzero_pd(); }
  static Reg load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, Reg v) { _mm256_storeu_pd(p, v); }
  static Reg set1(double x) { return _mm256_set1_pd(x); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_pd(a, b); }
  static void add_column(double* row, const double* col, int64_t stride, int64_t n) {
    for (int64_t j = 0; j < n; ++j) row[j] += col[j * stride];
  }
  static double sum(Reg v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};
#endif

// Row ranges [bounds[p], bounds[p + 1]) of `rows` rows, one per part, with about equal
// `entries + rows` (an empty row still costs its tile's bookkeeping), aligned to kRowTile.
std::vector<int64_t> split_rows(const int64_t* ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  const int64_t total = ptr[rows] + rows;
  int64_t row = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    while (row < rows && ptr[row] + row < target) ++row;
    bounds[p] = std::min(rows, (row + kRowTile - 1) / kRowTile * kRowTile);
    bounds[p] = std::max(bounds[p], bounds[p - 1]);
  }
  return bounds;
}

// Runs fn(first_row, last_row) on one row range per thread.
template <typename Fn>
void for_row_ranges(const int64_t* ptr, int64_t rows, Fn&& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kRowTile + 1));
  const std::vector<int64_t> bounds = split_rows(ptr, rows, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (bounds[p] < bounds[p + 1]) fn(bounds[p], bounds[p + 1]);
    }
  });
}

// x (tokens x features) -> blocks (ceil(tokens / TB) x features x TB), zeros past the last token.
// One job is 16 consecutive tokens (a group) across all features, moved as 16 x 16 tiles: it reads
// 16 rows of x front to back and writes whole 16-token segments of the block's rows, so it touches
// 16 source pages (a job of 64 tokens x 16 features touched 64 and ran 2.5-4x slower: TLB misses).
template <typename T>
void to_blocks(const T* x, T* blocks, int64_t tokens, int64_t features, int64_t tb) {
  constexpr int64_t kGroup = 16;  // divides both token block sizes
  const int64_t nblocks = (tokens + tb - 1) / tb;
  const int64_t groups = nblocks * tb / kGroup;
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    alignas(64) T tile[kGroup * kGroup];
    for (int64_t g = first; g < last; ++g) {
      const int64_t t0 = g * kGroup, b = t0 / tb, tin = t0 % tb;
      const int64_t tn = std::max<int64_t>(0, std::min(kGroup, tokens - t0));
      T* dst = blocks + b * features * tb + tin;
      for (int64_t f0 = 0; f0 < features; f0 += kGroup) {
        const int64_t fn = std::min(kGroup, features - f0);
        // tile[j][t] = x[t0 + t][f0 + j]; zeros past the last token.
        for (int64_t t = 0; t < tn; ++t) {
          const T* row = x + (t0 + t) * features + f0;
          for (int64_t j = 0; j < fn; ++j) tile[j * kGroup + t] = row[j];
        }
        for (int64_t t = tn; t < kGroup; ++t) {
          for (int64_t j = 0; j < fn; ++j) tile[j * kGroup + t] = T(0);
        }
        for (int64_t j = 0; j < fn; ++j) std::copy(tile + j * kGroup, tile + (j + 1) * kGroup, dst + (f0 + j) * tb);
      }
    }
  });
}

// out[t, o] += sum_k vals[k] * in[t, src[k] - o * stride] for o in [row_lo, row_hi), all tokens.
template <typename T, int TB, typename I>
void spmm_rows(T* out, int64_t tokens, int64_t out_dim, const T* blocks, int64_t in_dim, const int64_t* ptr,
               const I* src, int64_t stride, const T* vals, int64_t row_lo, int64_t row_hi) {
  using S = Simd<T>;
  constexpr int kRegs = TB / S::kLanes;
  alignas(64) T tile[kRowTile * TB];
  const int64_t nblocks = (tokens + TB - 1) / TB;
  for (int64_t b = 0; b < nblocks; ++b) {
    const T* block = blocks + b * in_dim * TB;
    const int64_t t0 = b * TB, tn = std::min<int64_t>(TB, tokens - t0);
    for (int64_t o0 = row_lo; o0 < row_hi; o0 += kRowTile) {
      const int64_t on = std::min(kRowTile, row_hi - o0);
      if (ptr[o0] == ptr[o0 + on]) continue;  // no entries in these rows: nothing to add
      // The transposed add below touches one line in each of TB output rows, 4 KiB+ apart (other
      // pages): no hardware prefetcher follows that, so ask for this tile's lines now, while the
      // multiply-adds run. Measured single-threaded, 2048 x 2048 at 3%, 2048 tokens: without it
      // the add took half the kernel's 16 ms; with it the kernel takes 6-12 ms (shared machine).
      // Prefetching the input rows of entries ahead as well measured no better, so it is not done.
      for (int64_t t = 0; t < tn; ++t) __builtin_prefetch(out + (t0 + t) * out_dim + o0, 1, 3);
      for (int64_t j = 0; j < on; ++j) {
        const int64_t base = -(o0 + j) * stride;  // src[k] - o * stride is the input feature
        // Two accumulator sets, even and odd entries: with one, each entry's multiply-adds wait
        // on the previous entry's (4-cycle latency); two halve that wait (measured 1.6x).
        typename S::Reg acc[kRegs], acc2[kRegs];
#pragma GCC unroll 16
        for (int q = 0; q < kRegs; ++q) acc[q] = acc2[q] = S::zero();
        const int64_t k_end = ptr[o0 + j + 1];
        int64_t k = ptr[o0 + j];
        for (; k + 1 < k_end; k += 2) {
          const typename S::Reg v = S::set1(vals[k]), v2 = S::set1(vals[k + 1]);
          const T* in = block + (base + static_cast<int64_t>(src[k])) * TB;
          const T* in2 = block + (base + static_cast<int64_t>(src[k + 1])) * TB;
#pragma GCC unroll 16
          for (int q = 0; q < kRegs; ++q) {
            acc[q] = S::fma(v, S::load(in + q * S::kLanes), acc[q]);
            acc2[q] = S::fma(v2, S::load(in2 + q * S::kLanes), acc2[q]);
          }
        }
        if (k < k_end) {
          const typename S::Reg v = S::set1(vals[k]);
          const T* in = block + (base + static_cast<int64_t>(src[k])) * TB;
#pragma GCC unroll 16
          for (int q = 0; q < kRegs; ++q) acc[q] = S::fma(v, S::load(in + q * S::kLanes), acc[q]);
        }
#pragma GCC unroll 16
        for (int q = 0; q < kRegs; ++q) S::store(tile + j * TB + q * S::kLanes, S::add(acc[q], acc2[q]));
      }
      // Transposed add: for each token, `on` consecutive outputs (one cache line for fp32),
      // gathered from the tile's column.
      T* dst = out + t0 * out_dim + o0;
      for (int64_t t = 0; t < tn; ++t) S::add_column(dst + t * out_dim, tile + t, TB, on);
    }
  }
}

// ds[k] = sum_t dy[t, row(k)] * x[t, src[k]] for the entries of rows [row_lo, row_hi).
// Token blocks are taken kPair at a time (2 x 512 KiB of x at 2048 features, TB = 64, still in L2)
// so that each entry's horizontal sum, the costly part of a dot product this short, is paid once per
// kPair * TB tokens.
template <typename T, int TB, typename I>
void sddmm_rows(T* ds, int64_t tokens, const T* dy_blocks, int64_t out_dim, const T* x_blocks, int64_t in_dim,
                const int64_t* ptr, const I* src, int64_t stride, int64_t row_lo, int64_t row_hi) {
  using S = Simd<T>;
  constexpr int kRegs = TB / S::kLanes;
  constexpr int64_t kPair = 2;
  const int64_t nblocks = (tokens + TB - 1) / TB;
  std::fill(ds + ptr[row_lo], ds + ptr[row_hi], T(0));
  for (int64_t b0 = 0; b0 < nblocks; b0 += kPair) {
    const int64_t nb = std::min(kPair, nblocks - b0);
    for (int64_t o = row_lo; o < row_hi; ++o) {
      if (ptr[o] == ptr[o + 1]) continue;
      typename S::Reg g[kPair][kRegs];
      for (int64_t p = 0; p < nb; ++p) {
#pragma GCC unroll 16
        for (int q = 0; q < kRegs; ++q) g[p][q] = S::load(dy_blocks + ((b0 + p) * out_dim + o) * TB + q * S::kLanes);
      }
      for (int64_t k = ptr[o]; k < ptr[o + 1]; ++k) {
        // Two accumulators: the FMA chain of one would be latency-bound.
        typename S::Reg s0 = S::zero(), s1 = S::zero();
        for (int64_t p = 0; p < nb; ++p) {
          const T* in = x_blocks + ((b0 + p) * in_dim + static_cast<int64_t>(src[k]) - o * stride) * TB;
#pragma GCC unroll 16
          for (int q = 0; q + 1 < kRegs; q += 2) {
            s0 = S::fma(g[p][q], S::load(in + q * S::kLanes), s0);
            s1 = S::fma(g[p][q + 1], S::load(in + (q + 1) * S::kLanes), s1);
          }
          if (kRegs % 2) s0 = S::fma(g[p][kRegs - 1], S::load(in + (kRegs - 1) * S::kLanes), s0);
        }
        ds[k] += S::sum(S::add(s0, s1));
      }
    }
  }
}

void check_support(const at::Tensor& ptr, const at::Tensor& src, int64_t rows, const char* op) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.numel() == rows + 1 && ptr.is_contiguous(),
              op, ": ptr must be contiguous int64 with ", rows + 1, " entries");
  TORCH_CHECK((src.scalar_type() == at::kInt || src.scalar_type() == at::kLong) && src.dim() == 1 &&
                  src.is_contiguous(),
              op, ": src must be contiguous 1-D int32 or int64");
  const int64_t* p = ptr.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[rows] == src.numel(), op, ": ptr must start at 0 and end at src's length");
  for (int64_t o = 0; o < rows; ++o) TORCH_CHECK(p[o] <= p[o + 1], op, ": ptr must be non-decreasing");
}

// fn(const int32_t*) or fn(const int64_t*), by src's dtype.
template <typename Fn>
void with_src(const at::Tensor& src, Fn&& fn) {
  if (src.scalar_type() == at::kInt) {
    fn(src.data_ptr<int32_t>());
  } else {
    fn(src.data_ptr<int64_t>());
  }
}

// Every entry must read a feature in [0, cols): one pass over the support (the products make
// ceil(tokens / TB) passes), so a malformed grouping is an error, not an out-of-bounds read.
void check_features(const at::Tensor& ptr, const at::Tensor& src, int64_t stride, int64_t cols, const char* op) {
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t rows = ptr.numel() - 1;
  bool ok = true;
  with_src(src, [&](const auto* s) {
    for (int64_t o = 0; o < rows; ++o) {
      for (int64_t k = p[o]; k < p[o + 1]; ++k) {
        const int64_t f = static_cast<int64_t>(s[k]) - o * stride;
        ok &= f >= 0 && f < cols;
      }
    }
  });
  TORCH_CHECK(ok, op, ": an entry of src reads a feature outside [0, ", cols, ")");
}

void check_blocks(const at::Tensor& blocks, int64_t tokens, int64_t features, const char* op) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.is_contiguous(), op, ": blocks must be contiguous 3-D");
  const int64_t tb = blocks.size(2);
  TORCH_CHECK(tb == 16 || tb == 64, op, ": the token block must be 16 or 64, got ", tb);
  TORCH_CHECK(blocks.size(0) == (tokens + tb - 1) / tb && blocks.size(1) == features, op,
              ": blocks have shape ", blocks.sizes(), ", expected (", (tokens + tb - 1) / tb, ", ", features,
              ", ", tb, ")");
}

template <typename Fn>
void with_block(int64_t tb, Fn&& fn) {
  switch (tb) {
    case 16:
      fn(std::integral_constant<int, 16>{});
      break;
    default:  // 64 (check_blocks)
      fn(std::integral_constant<int, 64>{});
  }
}

void sparse_support_blocks_cpu(const at::Tensor& x, at::Tensor blocks) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sparse_support_blocks: x must be contiguous 2-D");
  TORCH_CHECK(x.scalar_type() == blocks.scalar_type(), "sparse_support_blocks: x and blocks dtypes differ");
  check_blocks(blocks, x.size(0), x.size(1), "sparse_support_blocks");
  if (blocks.numel() == 0) return;
  if (x.scalar_type() == at::kFloat) {
    to_blocks(x.data_ptr<float>(), blocks.data_ptr<float>(), x.size(0), x.size(1), blocks.size(2));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "sparse_support_blocks: fp32 or fp64 only");
    to_blocks(x.data_ptr<double>(), blocks.data_ptr<double>(), x.size(0), x.size(1), blocks.size(2));
  }
}

void sparse_support_mm_cpu(at::Tensor out, const at::Tensor& blocks, const at::Tensor& ptr, const at::Tensor& src,
                           const at::Tensor& vals, int64_t stride) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "sparse_support_mm: out must be contiguous 2-D");
  const int64_t tokens = out.size(0), out_dim = out.size(1);
  TORCH_CHECK(blocks.dim() == 3, "sparse_support_mm: blocks must be 3-D");
  check_blocks(blocks, tokens, blocks.size(1), "sparse_support_mm");
  check_support(ptr, src, out_dim, "sparse_support_mm");
  TORCH_CHECK(vals.dim() == 1 && vals.is_contiguous() && vals.numel() == src.numel(),
              "sparse_support_mm: vals must be contiguous with src's length");
  TORCH_CHECK(out.scalar_type() == blocks.scalar_type() && vals.scalar_type() == out.scalar_type(),
              "sparse_support_mm: out, blocks and vals must share a dtype");
  const int64_t in_dim = blocks.size(1);
  check_features(ptr, src, stride, in_dim, "sparse_support_mm");
  if (tokens == 0 || src.numel() == 0) return;
  const int64_t* p = ptr.data_ptr<int64_t>();
  auto run = [&](auto* o, const auto* bl, const auto* v) {
    using T = std::remove_pointer_t<decltype(o)>;
    with_src(src, [&](const auto* s) {
      with_block(blocks.size(2), [&](auto tb) {
        for_row_ranges(p, out_dim, [&](int64_t lo, int64_t hi) {
          spmm_rows<T, decltype(tb)::value>(o, tokens, out_dim, bl, in_dim, p, s, stride, v, lo, hi);
        });
      });
    });
  };
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>(), blocks.data_ptr<float>(), vals.data_ptr<float>());
  } else {
    TORCH_CHECK(out.scalar_type() == at::kDouble, "sparse_support_mm: fp32 or fp64 only");
    run(out.data_ptr<double>(), blocks.data_ptr<double>(), vals.data_ptr<double>());
  }
}

void sparse_support_sddmm_cpu(at::Tensor ds, const at::Tensor& dy_blocks, const at::Tensor& x_blocks,
                              const at::Tensor& ptr, const at::Tensor& src, int64_t stride, int64_t tokens) {
  TORCH_CHECK(dy_blocks.dim() == 3 && x_blocks.dim() == 3, "sparse_support_sddmm: blocks must be 3-D");
  const int64_t out_dim = dy_blocks.size(1), in_dim = x_blocks.size(1);
  check_blocks(dy_blocks, tokens, out_dim, "sparse_support_sddmm");
  check_blocks(x_blocks, tokens, in_dim, "sparse_support_sddmm");
  TORCH_CHECK(dy_blocks.size(2) == x_blocks.size(2), "sparse_support_sddmm: token blocks differ");
  check_support(ptr, src, out_dim, "sparse_support_sddmm");
  TORCH_CHECK(ds.dim() == 1 && ds.is_contiguous() && ds.numel() == src.numel(),
              "sparse_support_sddmm: ds must be contiguous with src's length");
  TORCH_CHECK(ds.scalar_type() == dy_blocks.scalar_type() && ds.scalar_type() == x_blocks.scalar_type(),
              "sparse_support_sddmm: ds and the blocks must share a dtype");
  check_features(ptr, src, stride, in_dim, "sparse_support_sddmm");
  if (src.numel() == 0) return;
  const int64_t* p = ptr.data_ptr<int64_t>();
  auto run = [&](auto* d, const auto* dyb, const auto* xb) {
    using T = std::remove_pointer_t<decltype(d)>;
    with_src(src, [&](const auto* s) {
      with_block(x_blocks.size(2), [&](auto tb) {
        for_row_ranges(p, out_dim, [&](int64_t lo, int64_t hi) {
          sddmm_rows<T, decltype(tb)::value>(d, tokens, dyb, out_dim, xb, in_dim, p, s, stride, lo, hi);
        });
      });
    });
  };
  if (ds.scalar_type() == at::kFloat) {
    run(ds.data_ptr<float>(), dy_blocks.data_ptr<float>(), x_blocks.data_ptr<float>());
  } else {
    TORCH_CHECK(ds.scalar_type() == at::kDouble, "sparse_support_sddmm: fp32 or fp64 only");
    run(ds.data_ptr<double>(), dy_blocks.data_ptr<double>(), x_blocks.data_ptr<double>());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowmem, m) {
  m.def("sparse_support_blocks(Tensor x, Tensor(a!) blocks) -> ()");
  m.def(
      "sparse_support_mm(Tensor(a!) out, Tensor blocks, Tensor ptr, Tensor src, Tensor vals, int stride) -> ()");
  m.def(
      "sparse_support_sddmm(Tensor(a!) ds, Tensor dy_blocks, Tensor x_blocks, Tensor ptr, Tensor src, "
      "int stride, int tokens) -> ()");
}

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("sparse_support_blocks", &sparse_support_blocks_cpu);
  m.impl("sparse_support_mm", &sparse_support_mm_cpu);
  m.impl("sparse_support_sddmm", &sparse_support_sddmm_cpu);
}
