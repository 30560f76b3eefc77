// What decode.cpp uses from kernels.cpp: the few-rows block kernel, without the tensor wrapping.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace llama3_quant {

// Bytes per block of the ggml types the kernels implement (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K); 0 otherwise.
constexpr int64_t block_bytes_of(int64_t qtype) {
  return qtype == 2 ? 18 : qtype == 3 ? 20 : qtype == 8 ? 34 : qtype == 12 ? 144 : qtype == 13 ? 176 : qtype == 14 ? 210 : 0;
}

// Weights per block: 256 for the K-quants' super-blocks, 32 otherwise.
constexpr int64_t block_weights_of(int64_t qtype) {
  return qtype >= 12 && qtype <= 14 ? 256 : 32;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight matrix of a row-concatenation: ggml blocks, `rows` rows of K / 32 blocks each.
struct Part {
  const uint8_t* w;
  int64_t rows;
};

// out[r * ldo + n] = <x row r, W row n> for x (M, K) float32 and W the row-concatenation of parts, all of
// ggml type qtype (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K). Runs in one parallel region over W's rows.
void matmul_few_rows(const float* x, int64_t M, int64_t K, const Part* parts, int64_t n_parts, int64_t qtype,
                     float* out, int64_t ldo);

}  // namespace llama3_quant
