// What decode.cpp uses from kernels.cpp: the few-rows block kernel, without the tensor wrapping.
#pragma once

#include <cstdint>

namespace llama3_quant {

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
