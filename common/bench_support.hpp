// Google Benchmark glue shared by the bench_<stage> programs: one benchmark per (problem, tier, pass), timed
// per pass (CUDA events on the GPU, manual time), with FLOP/s, bytes and extra-memory counters.
#pragma once

#include <string>
#include <vector>

#include "common/harness.hpp"

namespace attn::bench {

/// A square self-attention problem (MHA, seq_q = seq_k) for the benchmark tables: batch, heads, N, head dim, causal.
AttentionProblem problem(std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t head_dim, bool causal);

struct Case {
  AttentionProblem problem;
  DType gpu_dtype = DType::bf16;  ///< the CPU tier always runs fp32
  StageOptions options;
  std::string label;              ///< shown after the problem in the benchmark name
};

/// Registers forward (and backward, where the tier has one) benchmarks of every tier of `stage` for each case.
/// Counters: TFLOPS (model FLOPs over time), extra_bytes (peak scratch), and io_bytes (the minimum bytes of
/// Q, K, V, O moved), so that bandwidth-bound runs can be judged too.
void register_stage(const Stage& stage, const std::vector<Case>& cases, const std::vector<Tier>& tiers = {Tier::cpu, Tier::gpu});

}  // namespace attn::bench
