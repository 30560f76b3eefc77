// One decoding step (one new token per row) through every layer in a single call: the CPU fast path for
// models whose matrices are Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks.
//
// Why: a decode step of a small model is dominated by dispatch, not arithmetic. As PyTorch ops each layer is
// ~40 calls (norms, RoPE, cache writes, attention, SwiGLU) of a few microseconds each, more than the
// quantized matrix products themselves. This op computes exactly what model.TransformerBlock computes,
// layer after layer, in float32, with the matrices through kernels.cpp's few-rows kernel. Every stage is per
// row, so a row's result does not depend on which other rows share the call (seeded sampling in the server
// relies on that).
//
// Per layer, for batch row b at cache row rows[b] and position positions[b]:
//   x = rmsnorm(h) * attn_norm
//   q, k, v = x wq^T, x wk^T, x wv^T; q and k rotated by rope[positions[b]] (interleaved pairs)
//   k_cache[rows[b], :, positions[b]] = k; v_cache likewise
//   a = softmax(q k^T / sqrt(D)) v over cache positions 0..positions[b]; query head i reads kv head i / (H / KV)
//   h += a wo^T
//   x = rmsnorm(h) * ffn_norm
//   h += (silu(x w1^T) * x w3^T) w2^T

#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using llama3_quant::block_bytes_of;
using llama3_quant::block_weights_of;
using llama3_quant::hsum;
using llama3_quant::Part;

// Per layer: attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2 (tensors) and the ggml types of the 7 matrices.
constexpr int64_t kTensorsPerLayer = 9;
constexpr int64_t kMatricesPerLayer = 7;
enum Tensor_ { kAttnNorm, kWq, kWk, kWv, kWo, kFfnNorm, kW1, kW3, kW2 };

// n is a multiple of 8 (model dims are multiples of 32, head_dim of 8: checked by the caller).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

// exp of 8 floats: Cody-Waite reduction x = n ln2 + r, then the classic Cephes expf polynomial in r (within
// 2 ulp of std::exp). Inputs are clamped to [-87.3, 88.3], where 2^n stays a normal float: exp(-87.3) is
// 1e-38, which is 0 for every use here (softmax weights, silu's denominator). The constant is the first
// operand of max/min, which return their second operand for a NaN: a NaN input stays NaN, as in std::exp.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// p[s] = exp(p[s] - max p) for s < n; returns the sum. The split into vectors and a scalar tail depends on n
// only, so a row's weights never depend on its batch.
float softmax_numerators(float* p, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) top = std::max(top, p[s]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), shift));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  for (; s < n; ++s) total += (p[s] = std::exp(p[s] - top));
  return total;
}

// out[s] = <q, keys[s]> * scale for s < n. Four keys at a time: four independent FMA chains instead of one
// latency-bound chain per key.
void scores(const float* q, const float* keys, int64_t n, int64_t D, float scale, float* out) {
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
    const float* k = keys + s * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + d), a3);
    }
    out[s] = hsum(a0) * scale;
    out[s + 1] = hsum(a1) * scale;
    out[s + 2] = hsum(a2) * scale;
    out[s + 3] = hsum(a3) * scale;
  }
  for (; s < n; ++s) out[s] = dot(q, keys + s * D, D) * scale;
}

// model.RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * r) * weight[i];
}

// model.apply_rope: pairs (2i, 2i+1) of each of `heads` heads of x rotate by table[i] = {cos, sin}.
void rope(float* x, int64_t heads, int64_t D, const float* table) {
  for (int64_t h = 0; h < heads; ++h) {
    float* p = x + h * D;
    for (int64_t i = 0; i < D / 2; ++i) {
      const float x0 = p[2 * i], x1 = p[2 * i + 1], c = table[2 * i], s = table[2 * i + 1];
      p[2 * i] = x0 * c - x1 * s;
      p[2 * i + 1] = x0 * s + x1 * c;
    }
  }
}

// x (M, K) times the row-concatenation of `count` matrices, into out (row stride ldo). Consecutive matrices
// of the same type share one kernel call: one parallel region and one coding of x.
void project(const float* x, int64_t M, int64_t K, const at::Tensor* mats, const int64_t* types, int count,
             float* out, int64_t ldo) {
  int64_t col = 0;
  for (int i = 0; i < count;) {
    Part parts[4];
    int n = 0;
    int64_t rows = 0;
    for (; i < count && (n == 0 || types[i] == types[i - 1]); ++i, ++n) {
      parts[n] = {mats[i].data_ptr<uint8_t>(), mats[i].size(0)};
      rows += mats[i].size(0);
    }
    llama3_quant::matmul_few_rows(x, M, K, parts, n, types[i - 1], out + col, ldo);
    col += rows;
  }
}

void check_matrix(const at::Tensor& w, int64_t qtype, int64_t rows, int64_t cols, const char* what) {
  const int64_t bs = block_bytes_of(qtype);
  TORCH_CHECK(bs > 0, "decode_layers: ", what, " has unsupported ggml type ", qtype);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(0) == rows && cols % block_weights_of(qtype) == 0 &&
                  w.size(1) == cols / block_weights_of(qtype) * bs,
              "decode_layers: ", what, " must be contiguous uint8 blocks encoding ", rows, " x ", cols);
}

void check_floats(const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape,
              "decode_layers: ", what, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ",
              t.sizes(), " ", t.scalar_type());
}

at::Tensor decode_layers(const at::Tensor& h_in, at::TensorList weights, at::IntArrayRef qtypes,
                         at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& rope_table,
                         const at::Tensor& positions, const at::Tensor& rows, int64_t n_heads, double eps_in) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(weights.size()) == kTensorsPerLayer * L &&
                  static_cast<int64_t>(qtypes.size()) == kMatricesPerLayer * L &&
                  static_cast<int64_t>(v_cache.size()) == L,
              "decode_layers: expected ", kTensorsPerLayer, " tensors and ", kMatricesPerLayer,
              " types per layer and one cache per layer");
  TORCH_CHECK(h_in.dim() == 2, "decode_layers: h must be (rows, dim)");
  const int64_t B = h_in.size(0), dim = h_in.size(1);
  check_floats(h_in, {B, dim}, "h");
  const at::Tensor& kc0 = k_cache[0];
  TORCH_CHECK(kc0.dim() == 4, "decode_layers: caches must be (rows, kv_heads, length, head_dim)");
  const int64_t cache_rows = kc0.size(0), KV = kc0.size(1), S = kc0.size(2), D = kc0.size(3);
  TORCH_CHECK(n_heads > 0 && KV > 0 && n_heads % KV == 0 && D % 8 == 0,
              "decode_layers: n_heads must be a multiple of kv_heads and head_dim of 8");
  const int64_t H = n_heads, n_rep = H / KV, q_dim = H * D, kv_dim = KV * D;
  const int64_t hidden = weights[kW1].size(0);
  check_floats(rope_table, {rope_table.size(0), D / 2, 2}, "rope");
  TORCH_CHECK(positions.scalar_type() == at::kLong && rows.scalar_type() == at::kLong && positions.is_contiguous() &&
                  rows.is_contiguous() && positions.numel() == B && rows.numel() == B,
              "decode_layers: positions and rows must be int64 (rows,)");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S && pos[b] < rope_table.size(0) && row[b] >= 0 && row[b] < cache_rows,
                "decode_layers: row ", b, " (cache row ", row[b], ", position ", pos[b], ") is outside the cache (",
                cache_rows, " x ", S, ")");
  }
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + kTensorsPerLayer * l;
    const int64_t* t = qtypes.data() + kMatricesPerLayer * l;
    check_floats(w[kAttnNorm], {dim}, "attn_norm");
    check_floats(w[kFfnNorm], {dim}, "ffn_norm");
    check_matrix(w[kWq], t[0], q_dim, dim, "wq");
    check_matrix(w[kWk], t[1], kv_dim, dim, "wk");
    check_matrix(w[kWv], t[2], kv_dim, dim, "wv");
    check_matrix(w[kWo], t[3], dim, q_dim, "wo");
    check_matrix(w[kW1], t[4], hidden, dim, "w1");
    check_matrix(w[kW3], t[5], hidden, dim, "w3");
    check_matrix(w[kW2], t[6], dim, hidden, "w2");
    check_floats(k_cache[l], {cache_rows, KV, S, D}, "k_cache");
    check_floats(v_cache[l], {cache_rows, KV, S, D}, "v_cache");
  }

  const float eps = static_cast<float>(eps_in);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  at::Tensor h_out = h_in.clone();
  float* h = h_out.data_ptr<float>();
  // Scratch for one layer, reused by every layer.
  std::vector<float> x(B * dim), qkv(B * qkv_dim), att(B * q_dim), delta(B * dim), gate(B * 2 * hidden),
      act(B * hidden);
  const float* table = rope_table.data_ptr<float>();

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + kTensorsPerLayer * l;
    const int64_t* t = qtypes.data() + kMatricesPerLayer * l;
    float* kc = k_cache[l].data_ptr<float>();
    float* vc = v_cache[l].data_ptr<float>();

    for (int64_t b = 0; b < B; ++b) rms_norm(h + b * dim, w[kAttnNorm].data_ptr<float>(), dim, eps, &x[b * dim]);
    project(x.data(), B, dim, w + kWq, t, 3, qkv.data(), qkv_dim);  // [q | k | v] per row
    for (int64_t b = 0; b < B; ++b) {
      float* q = &qkv[b * qkv_dim];
      const float* cs = table + pos[b] * D;  // (D/2, 2) cos, sin
      rope(q, H + KV, D, cs);                // q and k are adjacent: one pass rotates both
      for (int64_t j = 0; j < KV; ++j) {
        const int64_t slot = ((row[b] * KV + j) * S + pos[b]) * D;
        std::copy(q + q_dim + j * D, q + q_dim + (j + 1) * D, kc + slot);
        std::copy(q + q_dim + kv_dim + j * D, q + q_dim + kv_dim + (j + 1) * D, vc + slot);
      }
    }
    // Attention of each (row, query head) over its row's cache, with a numerically stable softmax. One task
    // per (row, kv head): its n_rep query heads read the same keys and values while they are in cache.
    at::parallel_for(0, B * KV, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> p;
      for (int64_t idx = lo; idx < hi; ++idx) {
        const int64_t b = idx / KV, j = idx % KV, n = pos[b] + 1;
        const float* keys = kc + (row[b] * KV + j) * S * D;
        const float* values = vc + (row[b] * KV + j) * S * D;
        p.resize(n);
        for (int64_t i = j * n_rep; i < (j + 1) * n_rep; ++i) {
          const float* q = &qkv[b * qkv_dim + i * D];
          scores(q, keys, n, D, scale, p.data());
          const float total = softmax_numerators(p.data(), n);
          float* o = &att[b * q_dim + i * D];
          std::fill(o, o + D, 0.f);
          for (int64_t s = 0; s < n; ++s) {
            const float ps = p[s];
            const float* v = values + s * D;
            for (int64_t d = 0; d < D; ++d) o[d] += ps * v[d];
          }
          const float inv = 1.f / total;
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        }
      }
    });
    project(att.data(), B, q_dim, w + kWo, t + 3, 1, delta.data(), dim);
    for (int64_t k = 0; k < B * dim; ++k) h[k] += delta[k];

    for (int64_t b = 0; b < B; ++b) rms_norm(h + b * dim, w[kFfnNorm].data_ptr<float>(), dim, eps, &x[b * dim]);
    project(x.data(), B, dim, w + kW1, t + 4, 2, gate.data(), 2 * hidden);  // [w1 x | w3 x] per row
    // silu(a) * g = a / (1 + exp(-a)) * g, as F.silu, 8 values at a time (hidden is a multiple of 32).
    const int64_t groups = hidden / 8;
    at::parallel_for(0, B * groups, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t b = k / groups, i = (k % groups) * 8;
        const __m256 a = _mm256_loadu_ps(&gate[b * 2 * hidden + i]);
        const __m256 g = _mm256_loadu_ps(&gate[b * 2 * hidden + hidden + i]);
        const __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), a)));
        _mm256_storeu_ps(&act[b * hidden + i], _mm256_mul_ps(_mm256_div_ps(a, denom), g));
      }
    });
    project(act.data(), B, hidden, w + kW2, t + 6, 1, delta.data(), dim);
    for (int64_t k = 0; k < B * dim; ++k) h[k] += delta[k];
  }
  return h_out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama3_quant, m) {
  m.def(
      "decode_layers(Tensor h, Tensor[] weights, int[] qtypes, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor rope, "
      "Tensor positions, Tensor rows, int n_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama3_quant, CPU, m) {
  m.impl("decode_layers", decode_layers);
}
