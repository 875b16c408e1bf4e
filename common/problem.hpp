// The attention problem every stage solves, and how its tensors are laid out in memory.
// O = softmax(scale * Q K^T + mask) V for each (batch, query head); K and V are shared by groups of query heads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

namespace attn {

/// Element type of Q, K, V, O and the gradients. Accumulation is always fp32 (fp64 in the oracle).
enum class DType { f32, bf16, f16 };

/// Where a stage's code runs: the CPU tier (OpenMP + xsimd) or the GPU tier (CUDA).
enum class Tier { cpu, gpu };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* tier_name(Tier tier);
/// Parses "f32", "bf16", "f16" (also "fp32", "fp16"); throws std::invalid_argument otherwise.
DType parse_dtype(std::string_view text);
/// Parses "cpu" or "gpu"; throws std::invalid_argument otherwise.
Tier parse_tier(std::string_view text);

/// Element strides of a [batch, heads, seq, dim] tensor whose last dimension (dim) is contiguous.
struct Strides {
  std::int64_t batch = 0;
  std::int64_t head = 0;
  std::int64_t seq = 0;
};

/// The two layouts in common use: [B, H, N, D] (the default here) and [B, N, H, D] (PyTorch's "packed" one).
enum class Layout { bhnd, bnhd };
Strides make_strides(Layout layout, std::int64_t heads, std::int64_t seq, std::int64_t dim);
const char* layout_name(Layout layout);
/// Parses "bhnd" or "bnhd"; throws std::invalid_argument otherwise.
Layout parse_layout(std::string_view text);

/// Shapes and flags of one attention call.
///
/// Q is [batch, q_heads, seq_q, head_dim]; K and V are [batch, kv_heads, seq_k, head_dim]; q_heads is a
/// multiple of kv_heads (MHA when equal, MQA when kv_heads = 1, GQA otherwise), and query head h reads KV
/// head h / (q_heads / kv_heads).
///
/// Causal masking with seq_q != seq_k is aligned to the bottom-right corner, as FlashAttention >= 2.1 does:
/// query i sees key j iff j <= i + seq_k - seq_q. A query row that sees no key yields O = 0 and LSE = -inf.
struct AttentionProblem {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t seq_q = 1;
  std::int64_t seq_k = 1;
  std::int64_t head_dim = 64;
  double scale = 0.0;  ///< softmax scale; 0 means the default 1 / sqrt(head_dim)
  bool causal = false;

  /// The scale actually applied to Q K^T.
  float softmax_scale() const;
  /// Query heads per KV head.
  std::int64_t group_size() const { return q_heads / kv_heads; }
  /// The KV head that query head `q_head` reads.
  std::int64_t kv_head_of(std::int64_t q_head) const { return q_head / group_size(); }
  /// Number of keys query row i sees: it sees keys [0, visible_keys(i)).
  std::int64_t visible_keys(std::int64_t i) const;
  /// Sum of visible_keys(i) over the rows of one (batch, head): the number of scores that matter.
  double visible_pairs() const;
  /// FLOPs of the forward pass: two matmuls of 2 * D FLOPs per visible (query, key) pair.
  double forward_flops() const;
  /// FLOPs of the backward pass, counted as 2.5x the forward (five matmuls instead of two), as the
  /// FlashAttention papers do.
  double backward_flops() const;

  std::int64_t q_elements() const { return batch * q_heads * seq_q * head_dim; }
  std::int64_t kv_elements() const { return batch * kv_heads * seq_k * head_dim; }
  std::int64_t lse_elements() const { return batch * q_heads * seq_q; }

  /// "B=2 Hq=8 Hkv=8 Nq=1024 Nk=1024 D=64 causal", for tables and messages.
  std::string describe() const;
};

/// The tensors of one call. Pointers are host memory for the CPU tier and device memory for the GPU tier.
///
/// Forward reads q, k, v and writes o and lse. Backward reads q, k, v, o, lse, d_o and writes dq, dk, dv
/// (dk, dv summed over the query heads of a group). Q-shaped tensors (q, o, d_o, dq) share q_strides and
/// K-shaped ones (k, v, dk, dv) share kv_strides. lse is fp32, [batch, q_heads, seq_q] contiguous, natural log.
struct AttentionTensors {
  DType dtype = DType::f32;
  Strides q_strides;
  Strides kv_strides;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  const void* d_o = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

/// Stage-specific knobs (chunk sizes, SRAM bytes, block sizes...) by name, plus counters a stage may report
/// back (bytes moved, blocks skipped...). Each tier declares the names it reads (TierEntry::option_names) and
/// the harness refuses any other.
struct StageOptions {
  std::map<std::string, std::int64_t> values;
  std::map<std::string, double> counters;

  std::int64_t get(const std::string& name, std::int64_t fallback) const {
    auto it = values.find(name);
    return it == values.end() ? fallback : it->second;
  }
};

/// Row n of (batch b, head h) of a tensor with the given strides.
template <class T>
inline T* row_pointer(T* base, const Strides& s, std::int64_t b, std::int64_t h, std::int64_t n) {
  return base + b * s.batch + h * s.head + n * s.seq;
}

}  // namespace attn
