// The fp64 oracle: attention forward and backward as plain loops in double precision, the reference every
// stage is ultimately checked against. Deliberately simple; O(N^2) memory per row is avoided only by
// working one query row at a time.
#pragma once

#include <vector>

#include "common/harness.hpp"

namespace attn::oracle {

struct Result {
  std::vector<double> o, lse;      ///< o in the data's layout; lse [B, Hq, Nq], -inf for empty rows
  std::vector<double> dq, dk, dv;  ///< filled when backward was asked for
};

/// Exact attention on data's (rounded) inputs, in fp64.
Result attention(const ProblemData& data, bool backward);

/// Problems up to this many multiply-adds (B * Hq * Nq * Nk * D) are cheap enough for the oracle.
inline constexpr double kMaxMultiplyAdds = 3e8;
inline bool affordable(const AttentionProblem& p) {
  return static_cast<double>(p.batch * p.q_heads) * static_cast<double>(p.seq_q) * static_cast<double>(p.seq_k) *
             static_cast<double>(p.head_dim) <= kMaxMultiplyAdds;
}

}  // namespace attn::oracle
