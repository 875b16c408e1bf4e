// Input validation, in one place, for every stage and tier. Each rule throws std::invalid_argument whose
// message names the argument and the rule, e.g. "head_dim: 300 exceeds the limit 256 of flash_v2/gpu".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/problem.hpp"

namespace attn {

/// What one tier of one stage accepts.
struct TierCaps {
  std::vector<DType> dtypes{DType::f32};
  int max_head_dim = 256;
  std::vector<int> head_dims;        ///< if not empty, only these head dims
  bool has_backward = true;
  std::size_t pointer_alignment = 0;  ///< required alignment of every pointer in bytes (0: the element size)
  std::int64_t max_seq_q = 0;         ///< if > 0, at most this many query rows (decode kernels: 1)
  std::int64_t max_seq = 0;           ///< if > 0, seq_q and seq_k at most this (32-bit row indices in kernels)
  std::int64_t stride_multiple = 1;   ///< every stride a multiple of this many elements (16-byte row copies: 8)
};

/// The largest element count of any tensor, and of the B x Hq x Nq x Nk scores: 2^58, so that a count times
/// an element size (up to 8 bytes), and every offset, fits a signed 64-bit integer with room to spare.
inline constexpr std::int64_t kMaxElements = std::int64_t{1} << 58;

/// Shape rules that hold for every stage: all sizes >= 1, q_heads a multiple of kv_heads, a scale finite in
/// fp32, and every size product (Q, K/V, the scores) at most kMaxElements, so that no count wraps.
void validate_problem(const AttentionProblem& problem);

/// Problem rules plus the tier's limits (dtype, head dim). `who` names the stage and tier in messages.
void validate_problem_for(const AttentionProblem& problem, DType dtype, const TierCaps& caps, const std::string& who);

/// Everything above plus the tensors: non-null, aligned pointers; strides that are positive and do not make
/// rows overlap. `backward` also checks o, lse, d_o, dq, dk, dv.
void validate_call(const AttentionProblem& problem, const AttentionTensors& tensors, const TierCaps& caps,
                   const std::string& who, bool backward);

}  // namespace attn
