#include "common/problem.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace attn {

std::size_t dtype_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "?";
}

const char* tier_name(Tier tier) { return tier == Tier::cpu ? "cpu" : "gpu"; }

DType parse_dtype(std::string_view text) {
  if (text == "f32" || text == "fp32") return DType::f32;
  if (text == "bf16") return DType::bf16;
  if (text == "f16" || text == "fp16") return DType::f16;
  throw std::invalid_argument("dtype: '" + std::string(text) + "' is not one of f32, bf16, f16");
}

Tier parse_tier(std::string_view text) {
  if (text == "cpu") return Tier::cpu;
  if (text == "gpu") return Tier::gpu;
  throw std::invalid_argument("tier: '" + std::string(text) + "' is not one of cpu, gpu");
}

Strides make_strides(Layout layout, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
  if (layout == Layout::bhnd) return {heads * seq * dim, seq * dim, dim};
  return {seq * heads * dim, dim, heads * dim};
}

const char* layout_name(Layout layout) { return layout == Layout::bhnd ? "bhnd" : "bnhd"; }

Layout parse_layout(std::string_view text) {
  if (text == "bhnd") return Layout::bhnd;
  if (text == "bnhd") return Layout::bnhd;
  throw std::invalid_argument("layout: '" + std::string(text) + "' is not one of bhnd, bnhd");
}

float AttentionProblem::softmax_scale() const {
  return scale != 0.0 ? static_cast<float>(scale) : static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

std::int64_t AttentionProblem::visible_keys(std::int64_t i) const {
  if (!causal) return seq_k;
  return std::clamp<std::int64_t>(i + seq_k - seq_q + 1, 0, seq_k);
}

double AttentionProblem::visible_pairs() const {
  const double nq = static_cast<double>(seq_q), nk = static_cast<double>(seq_k);
  if (!causal) return nq * nk;
  // Row i sees min(nk, max(0, i + nk - nq + 1)) keys: a triangle of rows that see 1..min(nq, nk) keys, plus
  // (when nk > nq) a rectangle of nq rows that all see the first nk - nq keys. Closed form: no loop over rows.
  const double rows = std::min(nq, nk);
  return rows * (rows + 1) / 2 + (nk > nq ? nq * (nk - nq) : 0.0);
}

double AttentionProblem::forward_flops() const {
  return 4.0 * static_cast<double>(batch * q_heads) * static_cast<double>(head_dim) * visible_pairs();
}

double AttentionProblem::backward_flops() const { return 2.5 * forward_flops(); }

std::string AttentionProblem::describe() const {
  std::ostringstream out;
  out << "B=" << batch << " Hq=" << q_heads << " Hkv=" << kv_heads << " Nq=" << seq_q << " Nk=" << seq_k
      << " D=" << head_dim << (causal ? " causal" : "");
  if (scale != 0.0) out << " scale=" << scale;
  return out.str();
}

}  // namespace attn
