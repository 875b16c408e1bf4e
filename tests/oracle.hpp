// The fp64 oracle: attention forward and backward as plain loops in double precision, the reference every
// stage is ultimately checked against. Deliberately simple; O(N^2) memory per row is avoided only by
// working one query row at a time.
#pragma once

#include <cstddef>
#include <vector>

#include "common/harness.hpp"

namespace attn::oracle {

struct Result {
  std::vector<double> o, lse;      ///< o in the data's layout; lse [B, Hq, Nq], -inf for empty rows
  std::vector<double> dq, dk, dv;  ///< filled when backward was asked for
};

/// Exact attention on data's (rounded) inputs, in fp64.
Result attention(const ProblemData& data, bool backward);

/// Host bytes of a Result: o and lse, plus dq, dk, dv with backward, all fp64.
inline std::size_t result_bytes(const AttentionProblem& p, bool backward) {
  return sizeof(double) * static_cast<std::size_t>(p.q_elements() + p.lse_elements() +
                                                   (backward ? p.q_elements() + 2 * p.kv_elements() : 0));
}

/// Problems up to this many multiply-adds (B * Hq * Nq * Nk * D) are cheap enough for the oracle.
inline constexpr double kMaxMultiplyAdds = 3e8;
inline bool affordable(const AttentionProblem& p) {
  return static_cast<double>(p.batch * p.q_heads) * static_cast<double>(p.seq_q) * static_cast<double>(p.seq_k) *
             static_cast<double>(p.head_dim) <= kMaxMultiplyAdds;
}

}  // namespace attn::oracle
