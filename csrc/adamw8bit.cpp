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
// threads (at::parallel_for) take ranges of blocks, and within a block two loops that GCC
// vectorizes run over a 1 KiB stack buffer per moment that stays in L1:
//   1. dequantize m and v, AdamW update, write param, keep the new m and v, reduce each block's
//      max |m| and |v| (as an integer max of the fp32 bit patterns: for non-negative floats bit
//      order is value order, and integer max reductions vectorize without fast-math); a block
//      whose max is NaN or inf (rare) recomputes it over its finite values;
//   2. quantize: y = x / absmax, and one read of a lookup table indexed by the top 16 bits of an
//      order-preserving integer key of y, holding the candidate code and the one midpoint the
//      bucket may contain (the Python side checks that no bucket holds two when it builds it).
//
// The op's schema below is its one definition; the Python launcher (kernels/adamw8bit_cpu.py)
// passes the tables and the per-step scalars that every backend derives the same way.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 256;
// Must equal LUT_KEY_OFFSET / LUT_SIZE in lowmem/kernels/blockwise_quant.py.
constexpr int32_t kLutKeyOffset = 0x3F81;
constexpr int64_t kLutSize = 2 * kLutKeyOffset;
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
  const float* qmap;       // [256] sorted map values
  const int32_t* lut;      // [kLutSize] candidate code << 16 | low bits of the midpoint's key
};

struct Scalars {
  float grad_sign, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

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

template <typename scalar_t>
void adamw8bit_blocks(const Job<scalar_t>& job) {
  const int64_t blocks = (job.n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&job](int64_t first, int64_t last) { run_blocks(job, first, last); });
}

Tables tables_of(const at::Tensor& qmap, const at::Tensor& lut, const char* which) {
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256 && qmap.is_contiguous(),
              "adamw8bit: ", which, " map must be 256 contiguous float32 values");
  TORCH_CHECK(lut.scalar_type() == at::kInt && lut.numel() == kLutSize && lut.is_contiguous(),
              "adamw8bit: ", which, " lookup table must be ", kLutSize, " contiguous int32 values");
  return Tables{qmap.data_ptr<float>(), lut.data_ptr<int32_t>()};
}

void adamw8bit_cpu(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg_codes,
                   at::Tensor exp_avg_absmax, at::Tensor exp_avg_sq_codes, at::Tensor exp_avg_sq_absmax,
                   const at::Tensor& signed_map, const at::Tensor& signed_lut,
                   const at::Tensor& unsigned_map, const at::Tensor& unsigned_lut, double grad_sign,
                   double decay_factor, double beta1, double one_minus_beta1, double beta2,
                   double one_minus_beta2, double step_size, double bc2_sqrt, double eps) {
  const int64_t n = param.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "adamw8bit: param and grad must be contiguous");
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.numel() == n,
              "adamw8bit: grad must have param's dtype and numel");
  for (const at::Tensor* codes : {&exp_avg_codes, &exp_avg_sq_codes}) {
    TORCH_CHECK(codes->scalar_type() == at::kByte && codes->numel() == n && codes->is_contiguous(),
                "adamw8bit: codes must be contiguous uint8 with param's numel");
  }
  for (const at::Tensor* absmax : {&exp_avg_absmax, &exp_avg_sq_absmax}) {
    TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->numel() == blocks && absmax->is_contiguous(),
                "adamw8bit: absmax must be contiguous float32 with one entry per block of 256");
  }
  const Tables signed_t = tables_of(signed_map, signed_lut, "signed");
  const Tables unsigned_t = tables_of(unsigned_map, unsigned_lut, "unsigned");
  // Hyperparameters arrive as float64 and are rounded to fp32 once, as in the reference.
  const Scalars s{static_cast<float>(grad_sign),       static_cast<float>(decay_factor),
                  static_cast<float>(beta1),           static_cast<float>(one_minus_beta1),
                  static_cast<float>(beta2),           static_cast<float>(one_minus_beta2),
                  static_cast<float>(step_size),       static_cast<float>(bc2_sqrt),
                  static_cast<float>(eps)};
  uint8_t* mc = exp_avg_codes.data_ptr<uint8_t>();
  uint8_t* vc = exp_avg_sq_codes.data_ptr<uint8_t>();
  float* ma = exp_avg_absmax.data_ptr<float>();
  float* va = exp_avg_sq_absmax.data_ptr<float>();
  switch (param.scalar_type()) {
    case at::kFloat:
      adamw8bit_blocks(Job<float>{param.data_ptr<float>(), grad.data_ptr<float>(), mc, ma, vc, va, signed_t,
                                  unsigned_t, n, s});
      break;
    case at::kBFloat16:
      adamw8bit_blocks(Job<c10::BFloat16>{param.data_ptr<c10::BFloat16>(), grad.data_ptr<c10::BFloat16>(), mc,
                                          ma, vc, va, signed_t, unsigned_t, n, s});
      break;
    case at::kHalf:
      adamw8bit_blocks(Job<c10::Half>{param.data_ptr<c10::Half>(), grad.data_ptr<c10::Half>(), mc, ma, vc, va,
                                      signed_t, unsigned_t, n, s});
      break;
    default:
      TORCH_CHECK(false, "adamw8bit: param dtype ", param.scalar_type(), " is not float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowmem, m) {
  m.def(
      "adamw8bit(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg_codes, Tensor(c!) exp_avg_absmax, "
      "Tensor(d!) exp_avg_sq_codes, Tensor(e!) exp_avg_sq_absmax, Tensor signed_map, "
      "Tensor signed_lut, Tensor unsigned_map, Tensor unsigned_lut, float grad_sign, float decay_factor, float beta1, float one_minus_beta1, "
      "float beta2, float one_minus_beta2, float step_size, float bc2_sqrt, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(lowmem, CPU, m) { m.impl("adamw8bit", &adamw8bit_cpu); }
