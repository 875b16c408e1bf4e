// The fp64 oracle: attention forward and backward as plain loops in double precision, the reference every
// stage is ultimately checked against. Deliberately simple; O(N^2) memory per row is avoided only by
// working one query row at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "common/harness.hpp"

namespace attn::oracle {

struct Result {
  std::vector<double> o, lse;      ///< o in the data's layout; lse [B, Hq, Nq], -inf for empty rows
  std::vector<double> dq, dk, dv;  ///< filled when backward was asked for
  /// With backward: the same sums as dq, dk, dv over the absolute values of their terms,
  ///   dq_mag_i = scale sum_j P_ij (|dP_ij| + |delta_i|) |k_j|,  dk_mag_j = scale sum_i P_ij (|dP_ij| + |delta_i|) |q_i|,
  ///   dv_mag_j = sum_i P_ij |dO_i|   (delta_i = sum_j P_ij dP_ij),
  /// the scale against which rounding in a gradient is measured (see gradient_error).
  std::vector<double> dq_mag, dk_mag, dv_mag;
};

/// Exact attention on data's (rounded) inputs, in fp64.
Result attention(const ProblemData& data, bool backward);

/// An explicit boolean mask: does query i of (batch b, query head h) attend to key j? Applied on top of the
/// problem's causal mask (a pair hidden by either is not attended).
using PairMask = std::function<bool(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j)>;

/// Exact attention over the pairs `mask` keeps, in fp64 (sparse attention's reference). A query row that keeps
/// no key gets O = 0, LSE = -inf and no gradient; a key no query keeps gets dK = dV = 0.
Result attention(const ProblemData& data, bool backward, const PairMask& mask);

/// Host bytes of a Result: o and lse, plus the gradients and their magnitudes with backward, all fp64.
inline std::size_t result_bytes(const AttentionProblem& p, bool backward) {
  return sizeof(double) * static_cast<std::size_t>(p.q_elements() + p.lse_elements() +
                                                   (backward ? 2 * (p.q_elements() + 2 * p.kv_elements()) : 0));
}

/// The error of a gradient, measured against the size of the terms it sums:
///   ||actual - reference||_F / ||magnitude||_F   (magnitude: Result::dq_mag, dk_mag or dv_mag).
/// Unlike ||actual - reference|| / ||reference||, it stays meaningful when the gradient is near zero through
/// cancellation: with large logits the softmax saturates, dS = P (dP - delta) cancels and the exact dQ and dK
/// tend to 0 while the terms (and any fp32 rounding in them) do not. A backward pass that is accurate to fp32
/// rounding gives about 1e-7 to 1e-6 here at any logit size. NaN or infinity in `actual` gives infinity.
double gradient_error(std::span<const float> actual, std::span<const double> reference, std::span<const double> magnitude);
double gradient_error(std::span<const float> actual, std::span<const float> reference, std::span<const double> magnitude);
/// The worst gradient_error over dQ, dK, dV of a run against the oracle's result (which has the magnitudes).
double worst_gradient_error(const StageRun& run, const Result& exact);
/// The same against another run's gradients, scaled by the oracle's magnitudes.
double worst_gradient_error(const StageRun& run, const StageRun& reference, const Result& exact);

/// Problems up to this many multiply-adds (B * Hq * Nq * Nk * D) are cheap enough for the oracle.
inline constexpr double kMaxMultiplyAdds = 3e8;
inline bool affordable(const AttentionProblem& p) {
  return static_cast<double>(p.batch * p.q_heads) * static_cast<double>(p.seq_q) * static_cast<double>(p.seq_k) *
             static_cast<double>(p.head_dim) <= kMaxMultiplyAdds;
}

}  // namespace attn::oracle
