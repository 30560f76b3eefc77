// CPU kernels for GGUF block-quantized weights (Q4_0, Q4_1, Q8_0), read straight from the file's blocks.
//
// y = x @ W^T with x (M, K) and W stored as ggml blocks of 32 weights:
//   Q4_0: [d f16][16 bytes of nibbles]          w = d * (q - 8)
//   Q4_1: [d f16][m f16][16 bytes of nibbles]   w = d * q + m
//   Q8_0: [d f16][32 x int8]                    w = d * q
// Nibble byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits).
// or as K-quant super-blocks of 256 weights in 8 groups of 32 (what Q4_K_M files are made of):
//   Q4_K: [d f16][dmin f16][12 bytes: 8 6-bit scales, 8 6-bit mins][128 bytes of nibbles]
//         w = (d * sc_g) * q - (dmin * m_g); group g holds the low (g even) or high (g odd) nibbles of
//         bytes 32 * (g / 2) .. + 31
//   Q5_K: as Q4_K with [32 bytes qh] before the nibbles: bit g of qh byte l is the fifth bit of weight l of group g
//   Q6_K: [128 bytes ql][64 bytes qh][16 x int8 scales][d f16]
//         w = (d * sc_i) * (q - 32) for 16-weight sub-blocks i; the 6-bit q = 4 bits of ql | 2 bits of qh << 4
// All three reduce to the 32-weight form above with per-group scales (two per group for Q6_K).
//
// Two strategies, chosen by the number of rows M:
//  * few rows (decoding): one pass over the weight blocks, each block dotted with up to 4 rows of x. Decoding
//    is bound by the weight stream, so the per-block work must stay below the memory time: x is coded as
//    int16 per block of 32 (x ~= sx * xq, sx = max|x| / 32767, error <= sx / 2 per element) and each block's
//    sum q * xq is an exact integer (vpmaddwd), scaled once per block in float32. That is 1.6x fewer
//    instructions than widening the codes to float; the activation error (<= 1.5e-5 of the block's largest
//    |x|) is 500x below bfloat16's and 128x below llama.cpp's int8 activations. The offset term m * sum(x)
//    uses the exact float32 block sums.
//  * many rows (prefill): dequantize a slab of W rows to float32 in a reused scratch buffer, bit-identical to
//    gguf's dequantizer, and hand it to the BLAS GEMM (at::mm), which is compute-bound there and far faster
//    than any hand loop. Results equal F.linear(x, W) up to float32 summation order.
//
// Built just in time by llama3/quant/native.py with -mavx2 -mfma -mf16c; used only when the CPU has AVX2.

#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// gguf.GGMLQuantizationType values.
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;
constexpr int64_t kBlock = 32;

template <int64_t QT>
constexpr bool is_k() {
  return QT == kQ4_K || QT == kQ5_K || QT == kQ6_K;
}

// Weights per block (what a row's length must be a multiple of) and bytes per block, as compile-time constants.
using llama3_quant::block_bytes_of;
using llama3_quant::block_weights_of;
using llama3_quant::hsum;

template <int64_t QT>
constexpr int64_t block_weights() {
  return block_weights_of(QT);
}

template <int64_t QT>
constexpr int64_t block_bytes() {
  return block_bytes_of(QT);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------------------
// Few-rows path.

// x rows coded per block: xq (int16 codes, row-major like x) and per block {sx, sum(x), 0, 0}.
struct CodedRows {
  std::vector<int16_t> q;
  std::vector<float> scale;  // 4 floats per block
};

void code_rows(const float* x, int64_t M, int64_t K, CodedRows& c) {
  const int64_t blocks = M * K / kBlock;  // rows are whole blocks, so blocks tile x exactly
  c.q.resize(M * K);
  c.scale.assign(4 * blocks, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < blocks; ++i) {
    const float* p = x + i * kBlock;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(p + 8 * j);
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
    const __m256 amax4 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float amax = hmax(amax4);
    // Below 1e-30 (where 32767 / amax could overflow) a block's codes are zero: it then contributes
    // nothing instead of < 32e-30 * max|w|. Its exact sum still enters the Q4 offset term.
    const __m256 inv = _mm256_set1_ps(amax >= 1e-30f ? 32767.f / amax : 0.f);
    // x * inv <= 32767 (1 + 2^-24) rounds to at most 32767: the saturating pack never clips.
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
    // packs works per 128-bit lane; the permute restores element order.
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.q.data() + i * kBlock), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.q.data() + i * kBlock + 16), hi);
    c.scale[4 * i] = amax / 32767.f;
    c.scale[4 * i + 1] = hsum(sum);
  }
}

// The block's 32 weight codes as int16: c0 = weights 0..15, c1 = weights 16..31 (Q4: 0..15, Q8: -128..127).
template <int64_t QT>
inline void block_codes(const uint8_t* blk, __m256i& c0, __m256i& c1) {
  if constexpr (QT == kQ8_0) {
    c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (QT == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    c0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
    c1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
  }
}

// {d, c, 0, 0} for w = d * q + c: Q4_1 c = m, Q4_0 c = -8 d, Q8_0 c = 0.
template <int64_t QT>
inline __m128 block_scales(const uint8_t* blk) {
  if constexpr (QT == kQ4_1) {
    uint32_t dm;
    std::memcpy(&dm, blk, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));
  } else {
    uint16_t d;
    std::memcpy(&d, blk, 2);
    const __m128 dv = _mm_cvtph_ps(_mm_cvtsi32_si128(d));  // {d, 0, 0, 0}
    if constexpr (QT == kQ4_0) return _mm_mul_ps(_mm_shuffle_ps(dv, dv, 0), _mm_setr_ps(1.f, -8.f, 0.f, 0.f));
    return dv;
  }
}

// out[r * ldo] = <weight row w, x row r> for R consecutive coded rows (xq, scale as from code_rows).
// Per block and row: t = {d, c} * {sx, sum x} gives the integer dot's scale d * sx in lane 0 and the offset
// term c * sum(x) in lane 1, which accumulates in `off`; no scalar conversions in the loop.
template <int64_t QT, int R>
inline void dot_rows(const uint8_t* w, int64_t nb, const int16_t* xq, const float* scale, int64_t K,
                     float* out, int64_t ldo) {
  constexpr int64_t BS = block_bytes<QT>();
  // Two alternating accumulators overlap FMA latencies. Every R uses the same pair, so a row's result never
  // depends on how many rows share the call: batch-invariant logits keep seeded sampling reproducible.
  constexpr int A = 2;
  __m256 acc[R][A];
  __m128 off[R];
  for (int r = 0; r < R; ++r) {
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    off[r] = _mm_setzero_ps();
  }
  auto step = [&](int64_t b, int a) {
    const uint8_t* blk = w + b * BS;
    __m256i c0, c1;
    block_codes<QT>(blk, c0, c1);
    const __m128 dc = block_scales<QT>(blk);
    for (int r = 0; r < R; ++r) {
      const int16_t* xp = xq + r * K + b * kBlock;
      const __m256i p0 = _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
      const __m256i p1 = _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16)));
      const __m128 t = _mm_mul_ps(dc, _mm_loadu_ps(scale + 4 * (r * (K / kBlock) + b)));
      off[r] = _mm_add_ps(off[r], t);
      acc[r][a] = _mm256_fmadd_ps(_mm256_broadcastss_ps(t), _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), acc[r][a]);
    }
  };
  int64_t b = 0;
  if constexpr (A == 2) {
    for (; b + 2 <= nb; b += 2) {
      step(b, 0);
      step(b + 1, 1);
    }
  }
  for (; b < nb; ++b) step(b, 0);
  for (int r = 0; r < R; ++r) {
    __m256 a = acc[r][0];
    if constexpr (A == 2) a = _mm256_add_ps(a, acc[r][A - 1]);
    out[r * ldo] = hsum(a) + _mm_cvtss_f32(_mm_shuffle_ps(off[r], off[r], 1));
  }
}

// K-quants: per super-block scales, then the 32-weight groups as int16 codes.

// Q4_K / Q5_K group g: d_g = d * sc_g and c_g = dmin * m_g (w = d_g q - c_g), as gguf's get_scale_min.
inline void q4k_scales(const uint8_t* blk, float dg[8], float cg[8]) {
  uint16_t h[2];
  std::memcpy(h, blk, 4);
  const float d = _cvtsh_ss(h[0]), dmin = _cvtsh_ss(h[1]);
  const uint8_t* s = blk + 4;
  int sc[8], m[8];
  // Split at j = 4 rather than branching per j: the two halves pack their 6 bits differently.
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
  for (int j = 0; j < 8; ++j) {
    dg[j] = d * static_cast<float>(sc[j]);
    cg[j] = dmin * static_cast<float>(m[j]);
  }
}

// Q6_K 16-weight sub-block i: d_i = d * sc_i.
inline void q6k_scales(const uint8_t* blk, float di[16]) {
  uint16_t h;
  std::memcpy(&h, blk + 208, 2);
  const float d = _cvtsh_ss(h);
  for (int i = 0; i < 16; ++i) di[i] = d * static_cast<float>(static_cast<int8_t>(blk[192 + i]));
}

// Group g's 32 codes as int16: c0 = weights 0..15, c1 = 16..31 (Q4_K 0..15, Q5_K 0..31, Q6_K q - 32 in -32..31).
template <int64_t QT>
inline void group_codes(const uint8_t* blk, int g, __m256i& c0, __m256i& c1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i q;
  if constexpr (QT == kQ4_K) {
    q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * (g >> 1)));
    if (g & 1) q = _mm256_srli_epi16(q, 4);
    q = _mm256_and_si256(q, low4);
  } else if constexpr (QT == kQ5_K) {
    q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 48 + 32 * (g >> 1)));
    if (g & 1) q = _mm256_srli_epi16(q, 4);
    __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    hb = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(g)), _mm256_set1_epi8(0x01));
    q = _mm256_or_si256(_mm256_and_si256(q, low4), _mm256_slli_epi16(hb, 4));
  } else {
    const int h = g >> 2, k = g & 3;
    __m256i lq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32 * (k & 1)));
    if (k >= 2) lq = _mm256_srli_epi16(lq, 4);
    __m256i hq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    // 16-bit shifts move bits across bytes; the masks keep each byte's own bits only.
    hq = _mm256_and_si256(_mm256_srl_epi16(hq, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(0x03));
    q = _mm256_or_si256(_mm256_and_si256(lq, low4), _mm256_slli_epi16(hq, 4));
  }
  c0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
  c1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
  if constexpr (QT == kQ6_K) {
    c0 = _mm256_sub_epi16(c0, _mm256_set1_epi16(32));
    c1 = _mm256_sub_epi16(c1, _mm256_set1_epi16(32));
  }
}

// dot_rows for K-quant rows: nsb super-blocks; x coded per 32 as for the other types. The accumulator used
// alternates by group parity, the same for every R (batch-invariant, as dot_rows).
template <int64_t QT, int R>
inline void dot_rows_k(const uint8_t* w, int64_t nsb, const int16_t* xq, const float* scale, int64_t K,
                       float* out, int64_t ldo) {
  constexpr int64_t BS = block_bytes<QT>();
  __m256 acc[R][2];
  float off[R][2];  // two chains, like acc: one serial chain of scalar adds would bound the loop
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    off[r][0] = off[r][1] = 0.f;
  }
  const int64_t nb = K / kBlock;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * BS;
    float ds[16], cs[8];
    if constexpr (QT != kQ6_K) q4k_scales(blk, ds, cs);
    else q6k_scales(blk, ds);
    for (int g = 0; g < 8; ++g) {
      const int64_t b = sb * 8 + g;
      __m256i c0, c1;
      group_codes<QT>(blk, g, c0, c1);
      for (int r = 0; r < R; ++r) {
        const int16_t* xp = xq + r * K + b * kBlock;
        const float* xs = scale + 4 * (r * nb + b);  // {sx, sum x}
        const __m256i p0 = _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
        const __m256i p1 = _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16)));
        __m256& a = acc[r][g & 1];
        if constexpr (QT != kQ6_K) {
          a = _mm256_fmadd_ps(_mm256_set1_ps(ds[g] * xs[0]), _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), a);
          off[r][g & 1] -= cs[g] * xs[1];
        } else {
          a = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * g] * xs[0]), _mm256_cvtepi32_ps(p0), a);
          a = _mm256_fmadd_ps(_mm256_set1_ps(ds[2 * g + 1] * xs[0]), _mm256_cvtepi32_ps(p1), a);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + (off[r][0] + off[r][1]);
}

using llama3_quant::Part;

// One weight row against R coded x rows (nb = K / 32 groups), for either block family.
template <int64_t QT, int R>
inline void dot(const uint8_t* w, int64_t nb, const int16_t* xq, const float* scale, int64_t K, float* out,
                int64_t ldo) {
  if constexpr (is_k<QT>()) dot_rows_k<QT, R>(w, nb / 8, xq, scale, K, out, ldo);
  else dot_rows<QT, R>(w, nb, xq, scale, K, out, ldo);
}

// The weight matrix as row-concatenated parts (several matrices sharing x, e.g. wq | wk | wv): one call,
// one parallel region and one coding of x for all of them. Rows never straddle parts. Output row r starts
// at out + r * ldo.
template <int64_t QT>
void fused_matmul(const float* x, int64_t M, int64_t K, const Part* parts, int64_t N, float* out, int64_t ldo) {
  const int64_t nb = K / kBlock, row_bytes = K / block_weights<QT>() * block_bytes<QT>();
  thread_local CodedRows coded;  // reused: no allocation per call once grown
  code_rows(x, M, K, coded);
  const int16_t* xq = coded.q.data();
  const float* sc = coded.scale.data();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    size_t p = 0;
    int64_t first = 0;  // global index of parts[p]'s first row
    for (int64_t n = n0; n < n1; ++n) {
      while (n - first >= parts[p].rows) first += parts[p++].rows;
      const uint8_t* wr = parts[p].w + (n - first) * row_bytes;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) dot<QT, 4>(wr, nb, xq + r * K, sc + 4 * r * nb, K, out + r * ldo + n, ldo);
      const int16_t* xr = xq + r * K;
      const float* sr = sc + 4 * r * nb;
      float* o = out + r * ldo + n;
      switch (M - r) {
        case 3: dot<QT, 3>(wr, nb, xr, sr, K, o, ldo); break;
        case 2: dot<QT, 2>(wr, nb, xr, sr, K, o, ldo); break;
        case 1: dot<QT, 1>(wr, nb, xr, sr, K, o, ldo); break;
        default: break;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Many-rows path and plain dequantization.

// The 32 integer codes of one block widened to 4 x 8 floats, in weight order.
template <int64_t QT>
inline void float_codes(const uint8_t* blk, __m256 q[4]) {
  if constexpr (QT == kQ8_0) {
    for (int i = 0; i < 4; ++i) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * i));
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (QT == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Rows [0, n) of W as float32 into out (n, K), bit-identical to gguf.quants.dequantize: the same float32
// operations (Q4_1 d * q + m, Q4_0 d * (q - 8), Q8_0 d * q), and d * q is exact (11 x 8 significant bits),
// so whether the compiler fuses the Q4_1 multiply-add or not cannot change the result.
// K-quant rows, bit-identical to gguf's numpy dequantizers: Q4_K/Q5_K (d * sc) * q - dmin * m, Q6_K (d * sc) * q,
// each product and difference rounded on its own (the build passes -ffp-contract=off, so no fused
// multiply-add merges them).
template <int64_t QT>
void dequantize_rows_k(const uint8_t* w, int64_t n, int64_t K, int64_t row_bytes, float* out) {
  constexpr int64_t BS = block_bytes<QT>();
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0; i < n1; ++i) {
      for (int64_t sb = 0; sb < K / 256; ++sb) {
        const uint8_t* blk = w + i * row_bytes + sb * BS;
        float ds[16], cs[8];
        if constexpr (QT != kQ6_K) q4k_scales(blk, ds, cs);
        else q6k_scales(blk, ds);
        for (int g = 0; g < 8; ++g) {
          __m256i c0, c1;
          group_codes<QT>(blk, g, c0, c1);
          const __m256 q[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(c0))),
                               _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(c0, 1))),
                               _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(c1))),
                               _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(c1, 1)))};
          float* o = out + i * K + sb * 256 + g * kBlock;
          for (int j = 0; j < 4; ++j) {
            if constexpr (QT != kQ6_K) {
              _mm256_storeu_ps(o + 8 * j, _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(ds[g]), q[j]),
                                                        _mm256_set1_ps(cs[g])));
            } else {
              _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(_mm256_set1_ps(ds[2 * g + j / 2]), q[j]));
            }
          }
        }
      }
    }
  });
}

template <int64_t QT>
void dequantize_rows(const uint8_t* w, int64_t n, int64_t K, int64_t row_bytes, float* out) {
  if constexpr (is_k<QT>()) {
    dequantize_rows_k<QT>(w, n, K, row_bytes, out);
    return;
  }
  constexpr int64_t BS = block_bytes<QT>();
  const int64_t nb = K / kBlock;
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0; i < n1; ++i) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + i * row_bytes + b * BS;
        __m256 q[4];
        float_codes<QT>(blk, q);
        const __m256 dv = _mm256_set1_ps(half_at(blk));
        float* o = out + i * K + b * kBlock;
        if constexpr (QT == kQ4_1) {
          const __m256 mv = _mm256_set1_ps(half_at(blk + 2));
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_mul_ps(dv, q[j]), mv));
        } else if constexpr (QT == kQ4_0) {
          const __m256 eight = _mm256_set1_ps(8.f);
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(dv, _mm256_sub_ps(q[j], eight)));
        } else {
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(dv, q[j]));
        }
      }
    }
  });
}

// out (M, N) = x (M, K) @ [parts]^T.
template <int64_t QT>
void matmul_impl(const at::Tensor& x, const std::vector<Part>& parts, int64_t K, int64_t fused_max_rows,
                 int64_t slab_bytes, at::Tensor& out) {
  const int64_t M = x.size(0), N = out.size(1), row_bytes = K / block_weights<QT>() * block_bytes<QT>();
  if (M == 0 || N == 0) return;
  if (M <= fused_max_rows) {
    fused_matmul<QT>(x.data_ptr<float>(), M, K, parts.data(), N, out.data_ptr<float>(), N);
    return;
  }
  // One scratch slab per calling thread, reused across layers and calls (no per-call allocation).
  thread_local at::Tensor scratch;
  const int64_t slab_rows = std::max<int64_t>(16, slab_bytes / (K * 4));
  const int64_t need = std::min(slab_rows, N) * K;
  if (!scratch.defined() || scratch.numel() < need) scratch = at::empty({need}, x.options());
  int64_t col = 0;
  for (const Part& part : parts) {
    for (int64_t n0 = 0; n0 < part.rows; n0 += slab_rows) {
      const int64_t rows = std::min(slab_rows, part.rows - n0);
      dequantize_rows<QT>(part.w + n0 * row_bytes, rows, K, row_bytes, scratch.data_ptr<float>());
      auto slab = scratch.narrow(0, 0, rows * K).view({rows, K});
      auto dst = out.narrow(1, col + n0, rows);  // row stride N: BLAS writes it in place (ldc = N)
      at::mm_out(dst, x, slab.t());
    }
    col += part.rows;
  }
}

void check_blocks(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llama3_quant: blocks must be a contiguous CPU uint8 tensor (rows, bytes_per_row)");
  const int64_t bs = block_bytes_of(qtype);
  TORCH_CHECK(bs > 0, "llama3_quant: unsupported ggml type ", qtype);
  const int64_t bw = block_weights_of(qtype);
  TORCH_CHECK(K > 0 && K % bw == 0, "llama3_quant: in_features must be a positive multiple of ", bw, ", got ", K);
  TORCH_CHECK(w.size(1) == K / bw * bs, "llama3_quant: rows hold ", w.size(1), " bytes, expected ", K / bw * bs,
              " for ", K, " weights");
}

// x (..., K) of any floating dtype -> (..., sum of rows) in x's dtype, computed in float32: x times the
// row-concatenation of the matrices in `blocks` (all of type qtype with K columns), transposed.
// Flattening and casting here rather than in Python saves microseconds per call, which matters when a
// decode step makes ~200 of these calls.
at::Tensor qmatmul_cat(const at::Tensor& x, at::TensorList blocks, int64_t qtype, int64_t K,
                       int64_t fused_max_rows, int64_t slab_bytes) {
  TORCH_CHECK(!blocks.empty(), "llama3_quant: no weight matrices given");
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == K,
              "llama3_quant: x must be a floating CPU tensor (..., ", K, ")");
  std::vector<Part> parts;
  int64_t N = 0;
  for (const auto& w : blocks) {
    check_blocks(w, qtype, K);
    parts.push_back({w.data_ptr<uint8_t>(), w.size(0)});
    N += w.size(0);
  }
  const bool is_float = x.scalar_type() == at::kFloat;
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = at::empty(sizes, x2.options());
  auto out2 = out.view({-1, N});
  switch (qtype) {
    case kQ4_0: matmul_impl<kQ4_0>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
    case kQ4_1: matmul_impl<kQ4_1>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
    case kQ4_K: matmul_impl<kQ4_K>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
    case kQ5_K: matmul_impl<kQ5_K>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
    case kQ6_K: matmul_impl<kQ6_K>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
    default: matmul_impl<kQ8_0>(x2, parts, K, fused_max_rows, slab_bytes, out2); break;
  }
  return is_float ? out : out.to(x.scalar_type());
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K, int64_t fused_max_rows,
                   int64_t slab_bytes) {
  return qmatmul_cat(x, {w}, qtype, K, fused_max_rows, slab_bytes);
}

at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K) {
  check_blocks(w, qtype, K);
  auto out = at::empty({w.size(0), K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  switch (qtype) {
    case kQ4_0: dequantize_rows<kQ4_0>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
    case kQ4_1: dequantize_rows<kQ4_1>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
    case kQ4_K: dequantize_rows<kQ4_K>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
    case kQ5_K: dequantize_rows<kQ5_K>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
    case kQ6_K: dequantize_rows<kQ6_K>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
    default: dequantize_rows<kQ8_0>(wp, w.size(0), K, w.size(1), out.data_ptr<float>()); break;
  }
  return out;
}

}  // namespace

void llama3_quant::matmul_few_rows(const float* x, int64_t M, int64_t K, const Part* parts, int64_t n_parts,
                                   int64_t qtype, float* out, int64_t ldo) {
  int64_t N = 0;
  for (int64_t i = 0; i < n_parts; ++i) N += parts[i].rows;
  if (M == 0 || N == 0) return;
  switch (qtype) {
    case kQ4_0: fused_matmul<kQ4_0>(x, M, K, parts, N, out, ldo); break;
    case kQ4_1: fused_matmul<kQ4_1>(x, M, K, parts, N, out, ldo); break;
    case kQ4_K: fused_matmul<kQ4_K>(x, M, K, parts, N, out, ldo); break;
    case kQ5_K: fused_matmul<kQ5_K>(x, M, K, parts, N, out, ldo); break;
    case kQ6_K: fused_matmul<kQ6_K>(x, M, K, parts, N, out, ldo); break;
    default: fused_matmul<kQ8_0>(x, M, K, parts, N, out, ldo); break;
  }
}

TORCH_LIBRARY(llama3_quant, m) {
  m.def("qmatmul(Tensor x, Tensor blocks, int qtype, int in_features, int fused_max_rows, int slab_bytes) -> Tensor");
  m.def("qmatmul_cat(Tensor x, Tensor[] blocks, int qtype, int in_features, int fused_max_rows, int slab_bytes) -> Tensor");
  m.def("dequantize(Tensor blocks, int qtype, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama3_quant, CPU, m) {
  m.impl("qmatmul", qmatmul);
  m.impl("qmatmul_cat", qmatmul_cat);
  m.impl("dequantize", dequantize);
}
