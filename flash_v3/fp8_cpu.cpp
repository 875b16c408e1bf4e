// flash_v3 FP8, CPU side: the Walsh-Hadamard rotation of incoherent processing, block quantization to e4m3, and
// the FP8 forward with e4m3 rounding emulated (FA3 Section 3.3). The forward is a plain tiled loop, not the CPU
// tier's threaded pipeline: what it must reproduce is the GPU kernel's arithmetic, step for step.
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <numbers>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_tiles.hpp"
#include "common/e4m3.hpp"
#include "common/numeric.hpp"
#include "common/validate.hpp"
#include "flash_v3/fp8.hpp"

namespace attn::flash_v3::fp8 {

void walsh_hadamard(std::span<float> x) {
  const std::size_t d = x.size();
  if (!std::has_single_bit(d))
    throw std::invalid_argument("head_dim: " + std::to_string(d) + " is not a power of two (Walsh-Hadamard)");
  // Pass h combines elements h apart: (a, b) -> (a + b, a - b). After log2(d) passes x holds x H.
  for (std::size_t h = 1; h < d; h *= 2)
    for (std::size_t start = 0; start < d; start += 2 * h)
      for (std::size_t i = start; i < start + h; ++i) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
}

std::vector<float> random_signs(int head_dim, std::uint64_t seed) {
  std::vector<float> signs(static_cast<std::size_t>(head_dim));
  fill_normal(signs, seed);
  for (float& s : signs) s = s >= 0.0f ? 1.0f : -1.0f;
  return signs;
}

void rotate_rows(std::span<float> x, int head_dim, std::span<const float> signs) {
  if (signs.size() != static_cast<std::size_t>(head_dim) || x.size() % signs.size() != 0)
    throw std::invalid_argument("signs: need one per head-dim column, and whole rows of x");
  const float norm = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const std::int64_t rows = static_cast<std::int64_t>(x.size()) / head_dim;
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::span<float> row = x.subspan(static_cast<std::size_t>(r * head_dim), static_cast<std::size_t>(head_dim));
    for (int c = 0; c < head_dim; ++c) row[c] *= signs[c];  // x diag(s)
    walsh_hadamard(row);                                   // ... H
    for (float& value : row) value *= norm;                // ... / sqrt(d)
  }
}

namespace {

float amax_of(std::span<const float> x) {
  float amax = 0.0f;
  for (float value : x) amax = std::max(amax, std::fabs(value));
  return amax;
}

}  // namespace

Quantized quantize(std::span<const float> x, std::int64_t batch_heads, std::int64_t seq, int head_dim,
                   std::int64_t block_rows, bool per_tensor, ScaleRule rule) {
  if (block_rows < 1) throw std::invalid_argument("block_rows: must be >= 1");
  if (static_cast<std::int64_t>(x.size()) != batch_heads * seq * head_dim)
    throw std::invalid_argument("x: size is not batch_heads x seq x head_dim");
  Quantized out;
  out.codes.resize(x.size());
  out.seq = seq;
  out.block_rows = block_rows;
  out.per_tensor = per_tensor;
  const std::int64_t blocks = (seq + block_rows - 1) / block_rows;
  if (per_tensor) {
    const BlockScale s = block_scale(amax_of(x), rule);
    out.scales = {s.scale};
    for (std::size_t i = 0; i < x.size(); ++i) out.codes[i] = e4m3::from_float(x[i] * s.inverse);
    return out;
  }
  out.scales.resize(static_cast<std::size_t>(batch_heads * blocks));
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < batch_heads * blocks; ++b) {
    const std::int64_t bh = b / blocks, row0 = b % blocks * block_rows;
    const std::int64_t rows = std::min(block_rows, seq - row0);
    const std::size_t first = static_cast<std::size_t>((bh * seq + row0) * head_dim);
    const std::span<const float> block = x.subspan(first, static_cast<std::size_t>(rows * head_dim));
    const BlockScale s = block_scale(amax_of(block), rule);
    out.scales[static_cast<std::size_t>(b)] = s.scale;
    for (std::size_t i = 0; i < block.size(); ++i) out.codes[first + i] = e4m3::from_float(block[i] * s.inverse);
  }
  return out;
}

void forward_cpu(const AttentionProblem& p, const Quantized& q, const Quantized& k, const Quantized& v,
                 std::span<float> o, std::span<float> lse) {
  validate_problem(p);
  if (k.block_rows != v.block_rows || k.per_tensor != v.per_tensor)
    throw std::invalid_argument("k, v: need the same quantization blocks");
  if (q.codes.size() != static_cast<std::size_t>(p.q_elements()) || o.size() != q.codes.size() ||
      k.codes.size() != static_cast<std::size_t>(p.kv_elements()) || v.codes.size() != k.codes.size() ||
      lse.size() != static_cast<std::size_t>(p.lse_elements()))
    throw std::invalid_argument("q, k, v, o, lse: sizes do not match the problem");
  const std::int64_t D = p.head_dim;
  const std::int64_t Br = q.per_tensor ? kBlockRows : q.block_rows, Bc = k.per_tensor ? kBlockCols : k.block_rows;
  const std::int64_t Tr = (p.seq_q + Br - 1) / Br, Tc = (p.seq_k + Bc - 1) / Bc;
  const std::int64_t offset = p.seq_k - p.seq_q;  // bottom-right causal: row i sees keys j <= i + offset
  const float scale_log2 = p.softmax_scale() * std::numbers::log2e_v<float>;
  const std::int64_t padded_Bc = tiles::round_up_to_lanes(Bc);

#pragma omp parallel
  {
    std::vector<float> q_tile(Br * D), k_t(D * padded_Bc), v_tile(Bc * D), s(Br * padded_Bc), o_tile(Br * D);
    std::vector<float> m(Br), l(Br), factor(Br);
#pragma omp for schedule(dynamic)
    for (std::int64_t task = 0; task < p.batch * p.q_heads * Tr; ++task) {
      const std::int64_t bh = task / Tr, i = task % Tr, b = bh / p.q_heads, h = bh % p.q_heads;
      const std::int64_t kv_bh = b * p.kv_heads + p.kv_head_of(h);
      const std::int64_t row0 = i * Br, rows = std::min(Br, p.seq_q - row0);
      for (std::int64_t e = 0; e < rows * D; ++e) q_tile[e] = e4m3::to_float(q.codes[(bh * p.seq_q + row0) * D + e]);
      const float q_scale = q.scale_of(bh, row0);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(o_tile.begin(), o_tile.end(), 0.0f);
      // v_ref: per group of kVRefRows rows (a consumer warpgroup of the GPU kernel, whatever its tile's height),
      // the largest V scale among the K/V blocks the group's rows see (causal: up to the block its last row,
      // row0 + 64 (g + 1) - 1, sees, past seq_q or not). O holds sum P8 V8 in units of its group's v_ref.
      const std::int64_t groups = (Br + kVRefRows - 1) / kVRefRows;
      std::vector<float> v_ref(static_cast<std::size_t>(groups), 0.0f), log2_v_ref(v_ref.size());
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t last_visible = row0 + std::min(Br, kVRefRows * (g + 1)) - 1 + offset;
        const std::int64_t blocks = !p.causal ? Tc : last_visible < 0 ? 0 : std::min(Tc, last_visible / Bc + 1);
        for (std::int64_t j = 0; j < blocks; ++j) v_ref[g] = std::max(v_ref[g], v.scale_of(kv_bh, j * Bc));
        log2_v_ref[g] = std::log2(v_ref[g]);  // -inf for a group that sees no key (its rows stay empty)
      }
      for (std::int64_t j = 0; j < Tc; ++j) {
        const std::int64_t key0 = j * Bc, keys = std::min(Bc, p.seq_k - key0);
        if (p.causal && key0 > row0 + rows - 1 + offset) break;  // no row of the tile sees this block
        // S = Q8 K8^T in fp32 (products of e4m3 values are exact in fp32; the sums round as the tensor core's do).
        for (std::int64_t c = 0; c < D; ++c) {
          for (std::int64_t r = 0; r < keys; ++r) k_t[c * padded_Bc + r] = e4m3::to_float(k.codes[(kv_bh * p.seq_k + key0 + r) * D + c]);
          for (std::int64_t r = keys; r < padded_Bc; ++r) k_t[c * padded_Bc + r] = 0.0f;
        }
        for (std::int64_t e = 0; e < keys * D; ++e) v_tile[e] = e4m3::to_float(v.codes[(kv_bh * p.seq_k + key0) * D + e]);
        tiles::matmul(tiles::Update::overwrite, rows, padded_Bc, D, tiles::MatrixView{q_tile.data(), D, 1}, k_t.data(), padded_Bc,
                      s.data(), padded_Bc);
        // One factor takes the fp32 sums to base-2 logits: both block scales and softmax scale x log2(e).
        const float to_logits = q_scale * k.scale_of(kv_bh, key0) * scale_log2;
        // P~ carries this block's V scale relative to v_ref: exp2(x - m + offset), offset = 8 + log2(v_j / v_ref)
        // <= 8, so that sum P8 V8 is in units of v_ref whatever block V comes from; l sums exp2(x - m + 8).
        const float log2_v_j = std::log2(v.scale_of(kv_bh, key0));
        for (std::int64_t r = 0; r < rows; ++r) {
          const float p_offset = kPExponent + (log2_v_j - log2_v_ref[r / kVRefRows]);
          const float l_factor = std::exp2(kPExponent - p_offset);  // v_ref / v_j
          float* x = s.data() + r * padded_Bc;
          const std::int64_t visible = p.causal ? std::clamp<std::int64_t>(row0 + r + offset + 1 - key0, 0, keys) : keys;
          float block_max = -std::numeric_limits<float>::infinity();
          for (std::int64_t c = 0; c < visible; ++c) block_max = std::max(block_max, x[c] *= to_logits);
          const float m_new = std::max(m[r], block_max);
          if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing seen yet: P = 0, O stays 0
            std::fill(x, x + padded_Bc, 0.0f);
            factor[r] = 0.0f;
            continue;
          }
          // FA2 Alg. 1 l. 9-10, base 2: rescale by exp2(m_old - m_new) (1 when the max did not grow: the GPU
          // kernel then skips the multiplication); P~ in (0, 256].
          const float rescale = std::exp2(m[r] - m_new);
          float row_sum = 0.0f;
          for (std::int64_t c = 0; c < padded_Bc; ++c) {
            const float p_value = c < visible ? std::exp2(x[c] - m_new + p_offset) : 0.0f;
            row_sum += p_value;               // l sums P~ before rounding, as the kernel's fp32 registers do
            x[c] = e4m3::round(p_value);      // P8: P~ in e4m3, the A operand of O += P V
          }
          l[r] = l[r] * rescale + row_sum * l_factor;
          m[r] = m_new;
          factor[r] = rescale;
        }
        tiles::scale_rows(o_tile.data(), rows, D, D, factor.data());
        tiles::matmul(tiles::Update::accumulate, rows, D, keys, tiles::MatrixView{s.data(), padded_Bc, 1}, v_tile.data(), D,
                      o_tile.data(), D);
      }
      // Epilogue: O = (sum P8 V8) x v_ref / l; LSE = ln 2 x (m + log2 l - 8), undoing P~'s 2^8.
      for (std::int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == 0.0f;
        const float out_factor = empty ? 0.0f : v_ref[r / kVRefRows] / l[r];
        float* out = o.data() + (bh * p.seq_q + row0 + r) * D;
        for (std::int64_t c = 0; c < D; ++c) out[c] = o_tile[r * D + c] * out_factor;
        lse[bh * p.seq_q + row0 + r] = empty ? -std::numeric_limits<float>::infinity()
                                             : std::numbers::ln2_v<float> * (m[r] + std::log2(l[r]) - kPExponent);
      }
    }
  }
}

std::vector<float> attention_cpu(const AttentionProblem& p, std::span<const float> q, std::span<const float> k,
                                 std::span<const float> v, bool block_scales, bool incoherent, std::uint64_t seed) {
  const int d = static_cast<int>(p.head_dim);
  std::vector<float> q_in(q.begin(), q.end()), k_in(k.begin(), k.end());
  if (incoherent) {
    const std::vector<float> signs = random_signs(d, seed);
    rotate_rows(q_in, d, signs);
    rotate_rows(k_in, d, signs);
  }
  const Quantized q8 = quantize(q_in, p.batch * p.q_heads, p.seq_q, d, kBlockRows, !block_scales);
  const Quantized k8 = quantize(k_in, p.batch * p.kv_heads, p.seq_k, d, kBlockCols, !block_scales);
  const Quantized v8 = quantize(v, p.batch * p.kv_heads, p.seq_k, d, kBlockCols, !block_scales, ScaleRule::power_of_two);
  std::vector<float> o(static_cast<std::size_t>(p.q_elements())), lse(static_cast<std::size_t>(p.lse_elements()));
  forward_cpu(p, q8, k8, v8, o, lse);
  round_to_dtype(o, DType::bf16);
  return o;
}

}  // namespace attn::flash_v3::fp8
