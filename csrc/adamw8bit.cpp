// SPDX-License-Identifier: Apache-2.0
//
// lowmem::adamw8bit — one in-place AdamW step with 8-bit block-wise quantized moments, on CPU.
//
// Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization". The semantics (dynamic
// maps, block size 256, nearest-code rule, NaN rule, the fp32 op order) are defined by the
// PyTorch reference in lowmem/kernels/blockwise_quant.py and lowmem/kernels/adamw8bit.py; this
// kernel reproduces them bit for bit. Built on first use by lowmem/kernels/_cpp.py with
// -O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno (and -mtune-ctrl=use_gather
// under GCC):
//   -ffp-contract=off  the reference rounds every product and sum; a fused multiply-add would
//                      round once and move values that sit on a quantization midpoint;
//   -fno-math-errno    lets std::sqrt compile to the vector instruction (same IEEE result);
//   use_gather         GCC's generic tuning emulates vector gathers with scalar loads, and the
//                      table lookups here are gathers.
//
// Layout: param/grad contiguous, fp32 / bf16 / fp16 (same dtype); codes uint8 [numel];
// absmax fp32 [ceil(numel / 256)]. One block of 256 elements is the unit of work: OpenMP
// threads (at::parallel_for) take contiguous ranges of blocks. Two implementations, chosen at
// compile time by what -march=native offers:
//
// AVX-512 (F, BW, DQ, VL and VBMI; namespace avx512), written with intrinsics. Per element the
// step needs two divisions and a square root (the divider's work, which bounds
// torch.optim.AdamW(fused=True) as well), two table lookups to dequantize and two searches to
// quantize. What keeps it close to that bound:
//   - dequantization looks the 256-entry maps up in registers, 64 codes at a time (vpermi2b on
//     the maps' byte planes), instead of gathering from memory;
//   - quantization multiplies by 1 / absmax instead of dividing, and checks that this cannot
//     have moved a code (see avx512::Plan): a block where it could is quantized again with the
//     division, so codes stay exactly the reference's;
//   - the code search is one gather from a search table built by lowmem/kernels/adamw8bit_cpu.py
//     plus one add, which also yields the distance to the nearest midpoint for that check;
//   - block b is updated (divider-bound) in the same loop that quantizes block b - 1 (gathers and
//     integer work), so the out-of-order core overlaps the two.
//
// Portable (anything else): two loops per block that GCC vectorizes, over a 1 KiB stack buffer
// per moment that stays in L1:
//   1. dequantize m and v, AdamW update, write param, keep the new m and v, reduce each block's
//      max |m| and |v| (as an integer max of the fp32 bit patterns: for non-negative floats bit
//      order is value order, and integer max reductions vectorize without fast-math); a block
//      whose max is NaN or inf (rare) recomputes it over its finite values;
//   2. quantize: y = x / absmax, and one read of a lookup table indexed by the top 16 bits of an
//      order-preserving integer key of y, holding the candidate code and the one midpoint the
//      bucket may contain (the Python side checks that no bucket holds two when it builds it).
//
// Two ops: adamw8bit (one tensor) and adamw8bit_multi (lists of tensors, one parallel region for
// all their blocks). Their schemas below are their one definition; the Python launchers
// (kernels/adamw8bit_cpu.py) pass the tables and the per-step scalars that every backend derives
// the same way. A build can be forced onto the portable path with -DLOWMEM_ADAMW8BIT_PORTABLE.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;
// Must equal LUT_KEY_OFFSET / LUT_SIZE in lowmem/kernels/blockwise_quant.py.
constexpr int32_t kLutKeyOffset = 0x3F81;
constexpr int64_t kLutSize = 2 * kLutKeyOffset;
// The search tables of the AVX-512 path (lowmem/kernels/adamw8bit_cpu.py: search_table): the
// shift and the guard, then one entry per bucket -kLutKeyOffset .. kLutKeyOffset.
constexpr int64_t kSearchSize = 2 * kLutKeyOffset + 3;
// Keys of slack around each midpoint in the AVX-512 quantization (see avx512::Plan); must equal
// SEARCH_GUARD in lowmem/kernels/adamw8bit_cpu.py, which the op checks against the tables.
constexpr int32_t kGuard = 5;
constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;  // |x| bits below this: finite
// Blocks per OpenMP task: 64 blocks = 16K elements, below which a thread costs more than it saves.
constexpr int64_t kGrainBlocks = 64;

// Bit casts (__builtin_bit_cast: GCC >= 11, clang >= 9; std::bit_cast would need C++20).
inline uint32_t bits_of(float x) { return __builtin_bit_cast(uint32_t, x); }
inline float float_of(uint32_t u) { return __builtin_bit_cast(float, u); }

// Element access in fp32. bf16 is the top half of an fp32, and rounding to it is done in integer
// arithmetic (round to nearest even, NaN stays NaN) so the loops vectorize; fp16 goes through
// c10::Half (F16C instructions under -march=native), both exactly as torch's .to(dtype) rounds.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  return float_of(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(c10::BFloat16* p, int64_t i, float x) {
  const uint32_t u = bits_of(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = (u & kAbsMask) > kInfBits ? uint16_t{0x7fc0} : uint16_t(rounded);
}
inline void store(c10::Half* p, int64_t i, float x) { p[i] = c10::Half(x); }

struct Tables {
  const float* qmap;      // [256] sorted map values
  const int32_t* lut;     // [kLutSize] candidate code << 16 | low bits of the midpoint's key (portable)
  const int32_t* search;  // [kSearchSize] the AVX-512 path's search table
};

struct Scalars {
  float grad_sign, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

template <typename scalar_t>
struct Job {
  scalar_t* param;
  const scalar_t* grad;
  uint8_t* m_codes;
  float* m_absmax;
  uint8_t* v_codes;
  float* v_absmax;
  Tables signed_t;
  Tables unsigned_t;
  int64_t n;
  Scalars s;
};

// ===== portable ===============================================================================

// codes[i] = number of midpoints below y = x[i] / absmax; non-finite x[i] get the code of 0.
// y's order-preserving key (its bits, all but the sign flipped when negative) has top 16 bits
// that pick a table entry packing the code of the bucket's smallest value (high half) and the low
// 16 bits of the key of the midpoint inside the bucket, or 0xFFFF (low half): comparing the low
// 16 bits is comparing y with that midpoint. See lut_search in lowmem/kernels/blockwise_quant.py.
// |y| <= 1 (x is finite and |x| <= absmax, and IEEE division is monotonic), so the index stays
// inside the table. kAllFinite: the block has no NaN/inf, so no element needs masking.
template <bool kAllFinite>
inline void quantize_block(const float* __restrict__ x, int64_t len, float absmax, const Tables& t,
                           uint8_t* __restrict__ codes) {
  // absmax == 0 means every finite x is +-0, which divided by 1 stays +-0: the code of 0.
  const float scale = absmax > 0.0f ? absmax : 1.0f;
  const int32_t* __restrict__ lut = t.lut;
  for (int64_t i = 0; i < len; ++i) {
    const float xi = x[i];
    uint32_t b = bits_of(xi / scale);
    if (!kAllFinite) {
      // y = +0 for non-finite x, as a bit mask rather than a select: GCC turns a select here
      // into a choice between two table addresses, which it cannot gather from.
      b &= 0u - static_cast<uint32_t>((bits_of(xi) & kAbsMask) < kInfBits);
    }
    const int32_t key = static_cast<int32_t>(b) ^ ((static_cast<int32_t>(b) >> 31) & 0x7fffffff);
    const uint32_t entry = static_cast<uint32_t>(lut[(key >> 16) + kLutKeyOffset]);
    const uint32_t past = (static_cast<uint32_t>(key) & 0xffffu) > (entry & 0xffffu) ? 1u : 0u;
    codes[i] = static_cast<uint8_t>((entry >> 16) + past);
  }
}

// max |x| over the finite elements, as fp32 bits (the rare path: a block holding NaN or inf).
inline uint32_t finite_max_bits(const float* __restrict__ x, int64_t len) {
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t xb = bits_of(x[i]) & kAbsMask;
    // Masked with bit operations: written as a select, GCC makes the reduction conditional and
    // stops vectorizing the loop.
    max_bits = std::max(max_bits, xb & (0u - static_cast<uint32_t>(xb < kInfBits)));
  }
  return max_bits;
}

// Quantizes one block of one moment; raw_max_bits is max |x| over all elements (as fp32 bits,
// so NaN and inf compare above every finite value). Returns the block's absmax.
inline float quantize_moment(const float* x, int64_t len, uint32_t raw_max_bits, const Tables& t,
                             uint8_t* codes) {
  if (raw_max_bits < kInfBits) {  // the common case: every element finite
    quantize_block<true>(x, len, float_of(raw_max_bits), t, codes);
    return float_of(raw_max_bits);
  }
  const float absmax = float_of(finite_max_bits(x, len));
  quantize_block<false>(x, len, absmax, t, codes);
  return absmax;
}

// Pass 1 over one block: dequantize, update, write param; the new moments go to m_new / v_new
// and max |m|, max |v| over all elements (non-finite ones included) come back as fp32 bits.
template <typename scalar_t>
inline void update_block(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad,
                         const uint8_t* __restrict__ m_codes, const uint8_t* __restrict__ v_codes,
                         const float* __restrict__ m_map, const float* __restrict__ v_map, float m_scale,
                         float v_scale, int64_t len, const Scalars s, float* __restrict__ m_new,
                         float* __restrict__ v_new, uint32_t& m_max_out, uint32_t& v_max_out) {
  // Codes widened to int32 first: GCC gathers with 32-bit indices but emulates a gather indexed
  // by bytes with scalar loads (measured: the update loop took twice as long).
  alignas(64) int32_t m_index[kBlock];
  alignas(64) int32_t v_index[kBlock];
  for (int64_t i = 0; i < len; ++i) {
    m_index[i] = m_codes[i];
    v_index[i] = v_codes[i];
  }
  uint32_t m_max = 0;
  uint32_t v_max = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float g = load(grad, i) * s.grad_sign;
    float p = load(param, i) * s.decay_factor;
    float m = m_map[m_index[i]] * m_scale;
    float v = v_map[v_index[i]] * v_scale;
    m = m * s.beta1 + g * s.one_minus_beta1;
    v = v * s.beta2 + (g * g) * s.one_minus_beta2;
    const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    p = p - (m / denom) * s.step_size;
    store(param, i, p);
    m_new[i] = m;
    v_new[i] = v;
    // |m| and |v| as bits: NaN and inf sort above every finite value, so a block that holds
    // one is seen here and takes the slower, masking path in quantize_moment.
    m_max = std::max(m_max, bits_of(m) & kAbsMask);
    v_max = std::max(v_max, bits_of(v) & kAbsMask);
  }
  m_max_out = m_max;
  v_max_out = v_max;
}

// Blocks [first, last) of one tensor: everything a thread touches is a local or a restrict
// pointer, so the compiler need not reload scalars or fear aliasing inside the loops.
template <typename scalar_t>
__attribute__((noinline)) void run_blocks(const Job<scalar_t> job, int64_t first, int64_t last) {
  alignas(64) float m_new[kBlock];
  alignas(64) float v_new[kBlock];
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, job.n - start);
    uint32_t m_max = 0;
    uint32_t v_max = 0;
    update_block(job.param + start, job.grad + start, job.m_codes + start, job.v_codes + start,
                 job.signed_t.qmap, job.unsigned_t.qmap, job.m_absmax[b], job.v_absmax[b], len, job.s,
                 m_new, v_new, m_max, v_max);
    job.m_absmax[b] = quantize_moment(m_new, len, m_max, job.signed_t, job.m_codes + start);
    job.v_absmax[b] = quantize_moment(v_new, len, v_max, job.unsigned_t, job.v_codes + start);
  }
}

// ===== AVX-512 ================================================================================

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI__) && !defined(LOWMEM_ADAMW8BIT_PORTABLE)
#define LOWMEM_ADAMW8BIT_AVX512 1

namespace avx512 {

// The hot loop must be one function: GCC's inlining heuristics would otherwise call these from it.
#define LOWMEM_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;  // fp32 lanes of a zmm register
constexpr int64_t kGroup = 64;  // elements per inner step: 4 registers of fp32, one of codes

inline __mmask16 lanes16(int64_t left) {
  return left >= kLanes ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}
inline __mmask64 lanes64(int64_t left) { return left >= kGroup ? ~__mmask64{0} : (__mmask64{1} << left) - 1; }

inline __m512i abs_bits(__m512 x) {
  return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(kAbsMask));
}

// ----- param / grad, 16 lanes as fp32, converted exactly as the portable load() / store() ------

inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

inline void store16(float* p, __mmask16 k, __m512 x) { _mm512_mask_storeu_ps(p, k, x); }
// Round to nearest even in integer arithmetic, NaN to 0x7fc0, as torch does (the AVX512-BF16
// conversion flushes denormals and keeps NaN signs and payloads: measured).
inline void store16(c10::BFloat16* p, __mmask16 k, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs_bits(x), _mm512_set1_epi32(kInfBits));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm512_mask_cvtepi32_storeu_epi16(p, k, r);
}
// vcvtps2ph: the F16C conversion c10::Half uses too.
inline void store16(c10::Half* p, __mmask16 k, __m512 x) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// ----- dequantization: 64 lookups of a 256-entry map in registers -------------------------------

// A map as 4 byte planes (plane k: byte k of every value), each 256 bytes: 4 zmm registers' worth.
struct Planes {
  __m512i v[4][4];
};

inline Planes planes_of(const float* qmap) {
  alignas(64) uint8_t bytes[4][256];
  for (int i = 0; i < 256; ++i) {
    const uint32_t u = bits_of(qmap[i]);
    for (int k = 0; k < 4; ++k) bytes[k][i] = static_cast<uint8_t>(u >> (8 * k));
  }
  Planes planes;
  for (int k = 0; k < 4; ++k) {
    for (int j = 0; j < 4; ++j) planes.v[k][j] = _mm512_load_si512(bytes[k] + 64 * j);
  }
  return planes;
}

// out[j] = qmap[codes[16 j + i]], i < 16. vpermi2b looks 64 bytes up in a 128-byte table (two
// registers), so each byte plane takes two lookups (codes below 128, and from 128) and a blend;
// unpacking then interleaves the planes into fp32. Unpacks work within 128-bit lanes, so the
// codes' 4x4 dwords are transposed first to make the fp32 come out in element order. 22
// instructions for 64 values: cheaper here than 4 gathers from the map.
LOWMEM_INLINE void dequantize64(__m512i codes, const Planes& t, __m512 out[4]) {
  const __m512i transpose = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i c = _mm512_permutexvar_epi32(transpose, codes);
  const __mmask64 high = _mm512_movepi8_mask(c);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i lo = _mm512_permutex2var_epi8(t.v[k][0], c, t.v[k][1]);
    const __m512i hi = _mm512_permutex2var_epi8(t.v[k][2], c, t.v[k][3]);
    b[k] = _mm512_mask_blend_epi8(high, lo, hi);
  }
  const __m512i w0 = _mm512_unpacklo_epi8(b[0], b[1]), w1 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w2 = _mm512_unpacklo_epi8(b[2], b[3]), w3 = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w0, w2));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w0, w2));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w1, w3));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w1, w3));
}

// ----- quantization ---------------------------------------------------------------------------

// The search table of one map (lowmem/kernels/adamw8bit_cpu.py: search_table). Its buckets are
// 2^16 consecutive keys (key = the order-preserving integer of y, as in the portable path), but
// offset by a shift chosen so that every midpoint's key, and those of 0 and +-1, lies more than
// 2 kGuard keys from a bucket's ends. With index = (key + shift) >> 16, low = the low 16 bits of
// key + shift and threshold = those of the bucket's midpoint key (0xFFFF if it has none), the
// entry is such that sum = entry + key holds:
//   bits 16..23: the bucket's first code, plus one if low >= threshold - kGuard - 1;
//   bits 0..15:  low - threshold + kGuard + 1 (mod 2^16).
// So the code is right (one up exactly when y is above the midpoint) except when low - threshold
// is in [-kGuard - 1, 0], and the low 16 bits are below 2 kGuard exactly when low - threshold is
// in [-kGuard - 1, kGuard - 2]: the lanes "near" a midpoint, which include the wrong ones. (A
// bucket without a midpoint flags the keys at its very ends, which only costs time.)
struct Search {
  const int32_t* center;  // the entry of bucket 0
  __m512i shift;
};

inline Search search_of(const int32_t* table) {
  return Search{table + 2 + kLutKeyOffset, _mm512_set1_epi32(table[0])};
}

// One gather and two adds (and for kSigned the key's two instructions); *near keeps the running
// minimum of the low 16 bits of the sums (near_any tests it). kSigned false: every y is +0 or
// positive, and its key is its bits.
template <bool kSigned = true>
LOWMEM_INLINE __m512i search16(__m512 y, const Search& t, __m512i* near) {
  const __m512i b = _mm512_castps_si512(y);
  // key = b ^ ((b >> 31) & 0x7fffffff): ternary logic 0x78 is a ^ (b & c).
  const __m512i key =
      kSigned ? _mm512_ternarylogic_epi32(b, _mm512_srai_epi32(b, 31), _mm512_set1_epi32(kAbsMask), 0x78) : b;
  const __m512i index = _mm512_srai_epi32(_mm512_add_epi32(key, t.shift), 16);
  const __m512i entry = _mm512_i32gather_epi32(index, t.center, 4);
  const __m512i sum = _mm512_add_epi32(entry, key);
  *near = _mm512_min_epu16(*near, sum);
  return sum;
}

inline __m512i no_near() { return _mm512_set1_epi32(-1); }
inline bool near_any(__m512i near) {
  constexpr __mmask32 kLow = 0x55555555u;  // the low 16-bit half of each 32-bit lane
  return _mm512_mask_cmplt_epu16_mask(kLow, near, _mm512_set1_epi16(2 * kGuard)) != 0;
}

// The exact code (bits 16..23) from a search16 sum: the carries of the near lanes taken back
// where low - threshold is in [-kGuard - 1, 0], i.e. the low 16 bits are at most kGuard + 1.
inline __m512i exact_code(__m512i sum) {
  const __mmask16 early = _mm512_cmple_epu32_mask(_mm512_and_si512(sum, _mm512_set1_epi32(0xffff)),
                                                  _mm512_set1_epi32(kGuard + 1));
  return _mm512_mask_sub_epi32(sum, early, sum, _mm512_set1_epi32(0x10000));
}

// How a block of one moment is quantized. The reference divides: y = x / absmax. Multiplying by
// r = RN(1 / absmax) instead, for absmax and r normal, gives x * r = (x / absmax) * (1 + d) with
// |d| < 2^-24, so x * r and the quotient differ by less than one ulp of the quotient before they
// are rounded; rounding is monotonic, and an interval shorter than an ulp holds at most two
// floats, so the rounded values' keys are at most 3 apart (1 in practice). Their codes can only
// differ where a midpoint lies between them: within [-2, 3] keys of the product's, inside the
// near window of search16 for kGuard >= 5. A block with any near lane (a few in a hundred, with
// random data) is quantized again with the division. The codes equal the reference's exactly.
struct Plan {
  float absmax;
  __m512 r;
  bool fast;  // every element finite and 2^-126 <= absmax < 2^126: multiply, then check
};

inline Plan plan_of(uint32_t max_bits) {
  const float absmax = float_of(max_bits);
  const bool fast = max_bits >= 0x00800000u && max_bits < 0x7e800000u;
  return Plan{absmax, _mm512_set1_ps(fast ? 1.0f / absmax : 0.0f), fast};
}

// Bytes 2 of the lanes of 4 registers (the codes in search16 sums) -> 64 codes, stored where k says.
LOWMEM_INLINE void pack64(const __m512i code[4], uint8_t* codes, __mmask64 k) {
  const __m512i pick = _mm512_set_epi8(
      126, 122, 118, 114, 110, 106, 102, 98, 94, 90, 86, 82, 78, 74, 70, 66,  //
      62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,           //
      126, 122, 118, 114, 110, 106, 102, 98, 94, 90, 86, 82, 78, 74, 70, 66,  //
      62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2);
  const __m512i lo = _mm512_permutex2var_epi8(code[0], pick, code[1]);
  const __m512i hi = _mm512_permutex2var_epi8(code[2], pick, code[3]);
  _mm512_mask_storeu_epi8(codes, k, _mm512_mask_blend_epi64(0xf0, lo, hi));
}

// Codes of 64 moments x (64-byte aligned; lanes past the block's end masked off by k) by the
// multiplication.
template <bool kSigned>
inline void quantize64(const float* x, __m512 r, const Search& t, uint8_t* codes, __mmask64 k,
                       __m512i* near) {
  __m512i code[4];
  for (int j = 0; j < 4; ++j) {
    code[j] = search16<kSigned>(_mm512_mul_ps(_mm512_load_ps(x + kLanes * j), r), t, near);
  }
  pack64(code, codes, k);
}

// The exact path (the portable quantize_block, 16 lanes at a time): absmax over the finite
// elements (returned), y = x / absmax, non-finite x coded as 0. For blocks with a NaN or inf, an
// absmax outside the fast range, or a lane near a midpoint.
inline float quantize_block_exact(const float* x, int64_t len, const Search& t, uint8_t* codes) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < len; i += kLanes) {
    const __m512i a = abs_bits(_mm512_load_ps(x + i));
    acc = _mm512_mask_max_epu32(acc, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(kInfBits)), acc, a);
  }
  const float absmax = float_of(_mm512_reduce_max_epu32(acc));
  // absmax == 0 means every finite x is +-0, which divided by 1 stays +-0: the code of 0.
  const __m512 scale = _mm512_set1_ps(absmax > 0.0f ? absmax : 1.0f);
  for (int64_t i = 0; i < len; i += kLanes) {
    __m512 xi = _mm512_load_ps(x + i);
    xi = _mm512_maskz_mov_ps(_mm512_cmplt_epu32_mask(abs_bits(xi), _mm512_set1_epi32(kInfBits)), xi);
    __m512i near = no_near();
    const __m512i code = exact_code(search16(_mm512_div_ps(xi, scale), t, &near));
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, lanes16(len - i), _mm512_srli_epi32(code, 16));
  }
  return absmax;
}

// ----- the step -------------------------------------------------------------------------------

struct Consts {
  __m512 grad_sign, decay, beta1, omb1, beta2, omb2, step_size, bc2, eps;
};

// Pass 1 over 64 elements: dequantize, update, write param; the new moments go to m_out / v_out
// (64-byte aligned) and into the running maxima. Lanes past the end (k) get zero moments (not the
// map value of code 0), which stay out of absmax. after(j) runs after vector j of 4: the caller's
// quantization of the previous block, interleaved so that the core has both kinds of work at once.
template <bool kNegate, typename scalar_t, typename After>
LOWMEM_INLINE void update64(scalar_t* param, const scalar_t* grad, const uint8_t* m_codes,
                            const uint8_t* v_codes, const Planes& m_planes, const Planes& v_planes,
                            __m512 m_scale, __m512 v_scale, const Consts& c, float* m_out, float* v_out,
                            __m512i& m_max, __m512i& v_max, __mmask64 k, After&& after) {
  // The hardware prefetchers alone leave these four streams a few percent slower.
  constexpr int64_t kAhead = 512;  // elements
  _mm_prefetch(reinterpret_cast<const char*>(m_codes + kAhead), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(v_codes + kAhead), _MM_HINT_T0);
  for (size_t j = 0; j < sizeof(scalar_t); ++j) {  // 64 elements: one cache line per byte
    _mm_prefetch(reinterpret_cast<const char*>(param + kAhead) + 64 * j, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(grad + kAhead) + 64 * j, _MM_HINT_T0);
  }
  __m512 m_map[4], v_map[4];
  dequantize64(_mm512_maskz_loadu_epi8(k, m_codes), m_planes, m_map);
  dequantize64(_mm512_maskz_loadu_epi8(k, v_codes), v_planes, v_map);
  for (int j = 0; j < 4; ++j) {
    const __mmask16 kj = static_cast<__mmask16>(k >> (kLanes * j));
    const int64_t o = kLanes * j;
    // g * 1 is g, and every use of g rounds again: only maximize multiplies.
    const __m512 g = kNegate ? _mm512_mul_ps(load16(grad + o, kj), c.grad_sign) : load16(grad + o, kj);
    __m512 p = _mm512_mul_ps(load16(param + o, kj), c.decay);
    __m512 m = _mm512_maskz_mul_ps(kj, m_map[j], m_scale);
    __m512 v = _mm512_maskz_mul_ps(kj, v_map[j], v_scale);
    m = _mm512_add_ps(_mm512_mul_ps(m, c.beta1), _mm512_mul_ps(g, c.omb1));
    v = _mm512_add_ps(_mm512_mul_ps(v, c.beta2), _mm512_mul_ps(_mm512_mul_ps(g, g), c.omb2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), c.bc2), c.eps);
    p = _mm512_sub_ps(p, _mm512_mul_ps(_mm512_div_ps(m, denom), c.step_size));
    store16(param + o, kj, p);
    _mm512_store_ps(m_out + o, m);
    _mm512_store_ps(v_out + o, v);
    // Bits of |m|; for v its bits as they are: v >= +0 is the fast path's condition, and -0,
    // negatives (hyperparameters outside [0, 1)) and NaNs with the sign bit sort above all of those.
    m_max = _mm512_max_epu32(m_max, abs_bits(m));
    v_max = _mm512_max_epu32(v_max, _mm512_castps_si512(v));
    after(j);
  }
}

// A block whose new moments wait in a buffer to be quantized by the multiplication.
struct Pending {
  const float* m;
  const float* v;
  uint8_t* m_codes;
  uint8_t* v_codes;
  int64_t len;  // 0: none
  Plan m_plan, v_plan;
};

// Blocks [first, last) of one tensor. The update of block b (bound by the divider) runs in the
// same loop as the quantization of block b - 1 (gathers and integer work); each block's new
// moments wait one block in one of two pairs of 1 KiB buffers, which stay in L1.
template <bool kNegate, typename scalar_t>
__attribute__((noinline)) void run_blocks(const Job<scalar_t> job, int64_t first, int64_t last) {
  alignas(64) float buffers[2][2][kBlock];
  const Planes m_planes = planes_of(job.signed_t.qmap);
  const Planes v_planes = planes_of(job.unsigned_t.qmap);
  const Search m_search = search_of(job.signed_t.search);
  const Search v_search = search_of(job.unsigned_t.search);
  const Scalars& s = job.s;
  const Consts c{_mm512_set1_ps(s.grad_sign),       _mm512_set1_ps(s.decay_factor),
                 _mm512_set1_ps(s.beta1),           _mm512_set1_ps(s.one_minus_beta1),
                 _mm512_set1_ps(s.beta2),           _mm512_set1_ps(s.one_minus_beta2),
                 _mm512_set1_ps(s.step_size),       _mm512_set1_ps(s.bc2_sqrt),
                 _mm512_set1_ps(s.eps)};
  Pending q{};
  for (int64_t b = first; b <= last; ++b) {  // b == last: only the quantization of b - 1
    const int64_t start = b * kBlock;
    const int64_t len = b < last ? std::min(kBlock, job.n - start) : 0;
    scalar_t* param = job.param + start;
    const scalar_t* grad = job.grad + start;
    const uint8_t* m_codes = job.m_codes + start;
    const uint8_t* v_codes = job.v_codes + start;
    float* m_new = buffers[b & 1][0];
    float* v_new = buffers[b & 1][1];
    const __m512 m_scale = _mm512_set1_ps(len ? job.m_absmax[b] : 0.0f);
    const __m512 v_scale = _mm512_set1_ps(len ? job.v_absmax[b] : 0.0f);
    __m512i m_max = _mm512_setzero_si512(), v_max = _mm512_setzero_si512();
    __m512i m_near = no_near(), v_near = no_near();
    for (int64_t i = 0; i < std::max(len, q.len); i += kGroup) {
      if (i < len && i < q.len && q.m_plan.fast && q.v_plan.fast) {  // all but the ends and rare blocks
        __m512i m_code[4], v_code[4];
        update64<kNegate>(param + i, grad + i, m_codes + i, v_codes + i, m_planes, v_planes, m_scale, v_scale,
                          c, m_new + i, v_new + i, m_max, v_max, lanes64(len - i), [&](int j) {
                            const int64_t o = i + kLanes * j;
                            m_code[j] = search16(_mm512_mul_ps(_mm512_load_ps(q.m + o), q.m_plan.r), m_search,
                                                 &m_near);
                            v_code[j] = search16<false>(_mm512_mul_ps(_mm512_load_ps(q.v + o), q.v_plan.r),
                                                        v_search, &v_near);
                          });
        pack64(m_code, q.m_codes + i, lanes64(q.len - i));
        pack64(v_code, q.v_codes + i, lanes64(q.len - i));
        continue;
      }
      if (i < len) {
        update64<kNegate>(param + i, grad + i, m_codes + i, v_codes + i, m_planes, v_planes, m_scale, v_scale,
                          c, m_new + i, v_new + i, m_max, v_max, lanes64(len - i), [](int) {});
      }
      if (i < q.len) {
        const __mmask64 k = lanes64(q.len - i);
        if (q.m_plan.fast) quantize64<true>(q.m + i, q.m_plan.r, m_search, q.m_codes + i, k, &m_near);
        if (q.v_plan.fast) quantize64<false>(q.v + i, q.v_plan.r, v_search, q.v_codes + i, k, &v_near);
      }
    }
    if (q.len && q.m_plan.fast && near_any(m_near)) quantize_block_exact(q.m, q.len, m_search, q.m_codes);
    if (q.len && q.v_plan.fast && near_any(v_near)) quantize_block_exact(q.v, q.len, v_search, q.v_codes);
    q.len = 0;
    if (len) {
      Plan m_plan = plan_of(_mm512_reduce_max_epu32(m_max));
      Plan v_plan = plan_of(_mm512_reduce_max_epu32(v_max));
      uint8_t* m_out = job.m_codes + start;
      uint8_t* v_out = job.v_codes + start;
      // A moment that cannot take the fast path is quantized now, by the division.
      if (!m_plan.fast) m_plan.absmax = quantize_block_exact(m_new, len, m_search, m_out);
      if (!v_plan.fast) v_plan.absmax = quantize_block_exact(v_new, len, v_search, v_out);
      job.m_absmax[b] = m_plan.absmax;
      job.v_absmax[b] = v_plan.absmax;
      if (m_plan.fast || v_plan.fast) q = Pending{m_new, v_new, m_out, v_out, len, m_plan, v_plan};
    }
  }
}

template <typename scalar_t>
void run_blocks(const Job<scalar_t>& job, int64_t first, int64_t last) {
  if (job.s.grad_sign == 1.0f) {
    run_blocks<false>(job, first, last);
  } else {
    run_blocks<true>(job, first, last);
  }
}

#undef LOWMEM_INLINE

}  // namespace avx512
#endif  // AVX-512

// ===== the ops ================================================================================

// Blocks [first, last) of one tensor, on whichever path this build has.
template <typename scalar_t>
void run_range(const Job<scalar_t>& job, int64_t first, int64_t last) {
#ifdef LOWMEM_ADAMW8BIT_AVX512
  avx512::run_blocks(job, first, last);
#else
  run_blocks(job, first, last);
#endif
}

// One tensor's state, checked, with its dtype still open.
struct State {
  at::ScalarType dtype;
  void* param;
  const void* grad;
  uint8_t* m_codes;
  float* m_absmax;
  uint8_t* v_codes;
  float* v_absmax;
  int64_t n;
  int64_t blocks;
};

State state_of(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg_codes,
               const at::Tensor& exp_avg_absmax, const at::Tensor& exp_avg_sq_codes,
               const at::Tensor& exp_avg_sq_absmax) {
  const int64_t n = param.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const at::ScalarType dtype = param.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "adamw8bit: param dtype ",
              dtype, " is not float32, bfloat16 or float16");
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "adamw8bit: param and grad must be contiguous");
  TORCH_CHECK(grad.scalar_type() == dtype && grad.numel() == n,
              "adamw8bit: grad must have param's dtype and numel");
  for (const at::Tensor* codes : {&exp_avg_codes, &exp_avg_sq_codes}) {
    TORCH_CHECK(codes->scalar_type() == at::kByte && codes->numel() == n && codes->is_contiguous(),
                "adamw8bit: codes must be contiguous uint8 with param's numel");
  }
  for (const at::Tensor* absmax : {&exp_avg_absmax, &exp_avg_sq_absmax}) {
    TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->numel() == blocks && absmax->is_contiguous(),
                "adamw8bit: absmax must be contiguous float32 with one entry per block of 256");
  }
  return State{dtype,
               param.data_ptr(),
               grad.data_ptr(),
               exp_avg_codes.data_ptr<uint8_t>(),
               exp_avg_absmax.data_ptr<float>(),
               exp_avg_sq_codes.data_ptr<uint8_t>(),
               exp_avg_sq_absmax.data_ptr<float>(),
               n,
               blocks};
}

Tables tables_of(const at::Tensor& qmap, const at::Tensor& lut, const at::Tensor& search, const char* which) {
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256 && qmap.is_contiguous(),
              "adamw8bit: ", which, " map must be 256 contiguous float32 values");
  TORCH_CHECK(lut.scalar_type() == at::kInt && lut.numel() == kLutSize && lut.is_contiguous(),
              "adamw8bit: ", which, " lookup table must be ", kLutSize, " contiguous int32 values");
  TORCH_CHECK(search.scalar_type() == at::kInt && search.numel() == kSearchSize && search.is_contiguous(),
              "adamw8bit: ", which, " search table must be ", kSearchSize, " contiguous int32 values");
  const int32_t* s = search.data_ptr<int32_t>();
  TORCH_CHECK(s[0] >= 0 && s[0] <= 0xffff && s[1] == kGuard, "adamw8bit: ", which,
              " search table has shift ", s[0], " and guard ", s[1], "; this build expects guard ", kGuard);
  return Tables{qmap.data_ptr<float>(), lut.data_ptr<int32_t>(), s};
}

// Everything but the tensors' states.
struct Step {
  Tables signed_t, unsigned_t;
  Scalars s;
};

Step step_of(const at::Tensor& signed_map, const at::Tensor& signed_lut, const at::Tensor& unsigned_map,
             const at::Tensor& unsigned_lut, const at::Tensor& signed_search,
             const at::Tensor& unsigned_search, double grad_sign, double decay_factor, double beta1,
             double one_minus_beta1, double beta2, double one_minus_beta2, double step_size, double bc2_sqrt,
             double eps) {
  // Hyperparameters arrive as float64 and are rounded to fp32 once, as in the reference.
  const Scalars s{static_cast<float>(grad_sign),       static_cast<float>(decay_factor),
                  static_cast<float>(beta1),           static_cast<float>(one_minus_beta1),
                  static_cast<float>(beta2),           static_cast<float>(one_minus_beta2),
                  static_cast<float>(step_size),       static_cast<float>(bc2_sqrt),
                  static_cast<float>(eps)};
  return Step{tables_of(signed_map, signed_lut, signed_search, "signed"),
              tables_of(unsigned_map, unsigned_lut, unsigned_search, "unsigned"), s};
}

// Blocks [first, last) of one tensor's state.
void run_state(const State& st, const Step& step, int64_t first, int64_t last) {
  auto job = [&](auto* param) {
    using scalar_t = std::remove_pointer_t<decltype(param)>;
    return Job<scalar_t>{param,       static_cast<const scalar_t*>(st.grad),
                         st.m_codes,  st.m_absmax,
                         st.v_codes,  st.v_absmax,
                         step.signed_t, step.unsigned_t,
                         st.n,        step.s};
  };
  switch (st.dtype) {
    case at::kFloat:
      run_range(job(static_cast<float*>(st.param)), first, last);
      break;
    case at::kBFloat16:
      run_range(job(static_cast<c10::BFloat16*>(st.param)), first, last);
      break;
    default:  // at::kHalf (state_of checked)
      run_range(job(static_cast<c10::Half*>(st.param)), first, last);
  }
}

void adamw8bit_cpu(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg_codes,
                   at::Tensor exp_avg_absmax, at::Tensor exp_avg_sq_codes, at::Tensor exp_avg_sq_absmax,
                   const at::Tensor& signed_map, const at::Tensor& signed_lut, const at::Tensor& unsigned_map,
                   const at::Tensor& unsigned_lut, const at::Tensor& signed_search,
                   const at::Tensor& unsigned_search, double grad_sign, double decay_factor, double beta1,
                   double one_minus_beta1, double beta2, double one_minus_beta2, double step_size,
                   double bc2_sqrt, double eps) {
  const State st = state_of(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax);
  const Step step =
      step_of(signed_map, signed_lut, unsigned_map, unsigned_lut, signed_search, unsigned_search, grad_sign,
              decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps);
  at::parallel_for(0, st.blocks, kGrainBlocks,
                   [&](int64_t first, int64_t last) { run_state(st, step, first, last); });
}

// The same step for a list of tensors in one parallel region: the threads split the blocks of all
// of them, so that small tensors do not each pay a parallel region (and the caller one op call).
void adamw8bit_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_absmax, const at::Tensor& signed_map,
                         const at::Tensor& signed_lut, const at::Tensor& unsigned_map,
                         const at::Tensor& unsigned_lut, const at::Tensor& signed_search,
                         const at::Tensor& unsigned_search, double grad_sign, double decay_factor,
                         double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
                         double step_size, double bc2_sqrt, double eps) {
  const size_t count = params.size();
  for (const at::TensorList* list :
       {&grads, &exp_avg_codes, &exp_avg_absmax, &exp_avg_sq_codes, &exp_avg_sq_absmax}) {
    TORCH_CHECK(list->size() == count, "adamw8bit_multi: every list must hold one tensor per param");
  }
  std::vector<State> states;
  std::vector<int64_t> starts{0};  // starts[t]: the first block of tensor t in the joint numbering
  states.reserve(count);
  starts.reserve(count + 1);
  for (size_t t = 0; t < count; ++t) {
    states.push_back(state_of(params[t], grads[t], exp_avg_codes[t], exp_avg_absmax[t], exp_avg_sq_codes[t],
                              exp_avg_sq_absmax[t]));
    starts.push_back(starts.back() + states.back().blocks);
  }
  const Step step =
      step_of(signed_map, signed_lut, unsigned_map, unsigned_lut, signed_search, unsigned_search, grad_sign,
              decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps);
  at::parallel_for(0, starts.back(), kGrainBlocks, [&](int64_t first, int64_t last) {
    // The tensors overlapping [first, last), each for its part of the range.
    size_t t = std::upper_bound(starts.begin(), starts.end(), first) - starts.begin() - 1;
    for (; t < count && starts[t] < last; ++t) {
      const int64_t lo = std::max(first, starts[t]), hi = std::min(last, starts[t + 1]);
      run_state(states[t], step, lo - starts[t], hi - starts[t]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowmem, m) {
  m.def(
      "adamw8bit(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg_codes, Tensor(c!) exp_avg_absmax, "
      "Tensor(d!) exp_avg_sq_codes, Tensor(e!) exp_avg_sq_absmax, Tensor signed_map, "
      "Tensor signed_lut, Tensor unsigned_map, Tensor unsigned_lut, Tensor signed_search, "
      "Tensor unsigned_search, float grad_sign, float decay_factor, float beta1, float one_minus_beta1, "
      "float beta2, float one_minus_beta2, float step_size, float bc2_sqrt, float eps) -> ()");
  m.def(
      "adamw8bit_multi(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, "
      "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, "
      "Tensor signed_map, Tensor signed_lut, Tensor unsigned_map, Tensor unsigned_lut, Tensor signed_search, "
      "Tensor unsigned_search, float grad_sign, float decay_factor, float beta1, float one_minus_beta1, "
      "float beta2, float one_minus_beta2, float step_size, float bc2_sqrt, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("adamw8bit", &adamw8bit_cpu);
  m.impl("adamw8bit_multi", &adamw8bit_multi_cpu);
}
