// Benchmarks of sparse: speed-up over dense causal flash_v2 on the same tier in the same run, QK-sparse with
// 10-90% of queries and keys dropped and hash-sparse with nb = 2, 4, 8, 16 buckets, forward and forward +
// backward (on the GPU the backward on the forward's plan, keep_plan = 1). Counters: sparse_ms and dense_ms (the
// best of the passes, dense and sparse alternating: one forward, or forward + backward; plan_ms is the planning,
// sorting and gathering inside the best sparse pass, forward and backward),
// visible_fraction, speedup =
// dense / sparse, and efficiency = (dense time x visible fraction) / sparse time (1 = the sparse pass costs
// exactly its share of the dense one). register_sparse_cases(tier, ...) registers one tier's sweep.
//   bench_sparse --benchmark_filter='cpu/.*N=4096'      (names: sparse/<tier>/<fwd|fwd+bwd>/N=<n>/<setting>)
#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/bench_support.hpp"
#include "common/harness.hpp"

using namespace attn;

namespace {

struct SparseCase {
  AttentionProblem problem;
  DType gpu_dtype = DType::bf16;
  StageOptions options;  ///< the sparsity (the tier's block sizes are its defaults)
  std::string label;     ///< "qk-drop=50%", "hash-nb=8"
  bool backward = false; ///< time forward + backward instead of the forward alone
};

// One timed pass of `run`: the forward, or the forward then the backward; `plan_ms` (given) gets the planning's
// time of both (the "plan_ms" counter of each).
double pass_ms(PreparedRun& run, StageOptions& options, bool backward, double* plan_ms = nullptr) {
  const double forward = run.forward(options);
  if (plan_ms != nullptr) *plan_ms = options.counters["plan_ms"];
  if (!backward) return forward;
  const double total = forward + run.backward(options);
  if (plan_ms != nullptr) *plan_ms += options.counters["plan_ms"];
  return total;
}

void run_case(benchmark::State& state, Tier tier, SparseCase c) {
  try {
    const ProblemData data = make_problem_data(c.problem, tier == Tier::cpu ? DType::f32 : c.gpu_dtype);
    // Dense causal flash_v2 on the same data, timed in the same loop: each iteration runs one dense pass and
    // one sparse pass, so that both see the same machine (the dev machine is shared with other jobs).
    PreparedRun dense_run(find_stage("flash_v2"), tier, data, c.backward);
    PreparedRun run(find_stage("sparse"), tier, data, c.backward, c.options);
    StageOptions dense_options, options = c.options;
    pass_ms(dense_run, dense_options, c.backward);  // warm-up
    pass_ms(run, options, c.backward);
    double dense = 0, sparse = 0, plan_ms = 0;  // the best of each: the least disturbed
    for (auto _ : state) {
      const double dense_ms = pass_ms(dense_run, dense_options, c.backward);
      double pass_plan_ms = 0;
      const double ms = pass_ms(run, options, c.backward, &pass_plan_ms);
      state.SetIterationTime(ms / 1e3);
      if (dense == 0 || dense_ms < dense) dense = dense_ms;
      if (sparse == 0 || ms < sparse) {
        sparse = ms;
        plan_ms = pass_plan_ms;
      }
    }
    const double fraction = options.counters["visible_fraction"];
    state.counters["sparse_ms"] = sparse;
    state.counters["plan_ms"] = plan_ms;  // of the best pass (the forward's and the backward's, with fwd+bwd)
    state.counters["dense_ms"] = dense;
    state.counters["visible_fraction"] = fraction;
    state.counters["speedup"] = dense / sparse;
    state.counters["efficiency"] = dense * fraction / sparse;
    state.counters["tiles_visited_fraction"] = options.counters["tiles_visited"] / options.counters["tiles_total"];
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

/// Registers the sweep on `tier`: for each N in `seqs`, causal (batch, heads, N, head_dim), QK-sparse dropping
/// each of `drop_percents` of the queries and of the keys, and hash-sparse with 2, 4, 8, 16 buckets; forward,
/// and forward + backward. Each case times dense flash_v2 on the same data alongside. (Dropping 0% visits the
/// dense problem's tiles: its efficiency is the cost of a tile against flash_v2's.)
void register_sparse_cases(Tier tier, std::int64_t batch, std::int64_t heads, std::int64_t head_dim,
                           const std::vector<std::int64_t>& seqs, const std::vector<int>& drop_percents,
                           DType gpu_dtype = DType::bf16) {
  std::vector<SparseCase> cases;
  for (std::int64_t seq : seqs)
    for (bool backward : {false, true}) {
      const AttentionProblem p = bench::problem(batch, heads, seq, head_dim, true);
      for (int percent : drop_percents) {
        SparseCase c{p, gpu_dtype, {}, "qk-drop=" + std::to_string(percent) + "%", backward};
        c.options.values = {{"mode", 0}, {"drop_q_permille", 10 * percent}, {"drop_k_permille", 10 * percent}};
        cases.push_back(c);
      }
      for (int buckets : {2, 4, 8, 16}) {
        SparseCase c{p, gpu_dtype, {}, "hash-nb=" + std::to_string(buckets), backward};
        c.options.values = {{"mode", 1}, {"buckets", buckets}};
        cases.push_back(c);
      }
    }
  // The GPU tier's backward takes the forward's plan (the option keep_plan) instead of planning again.
  if (tier == Tier::gpu)
    for (SparseCase& c : cases)
      if (c.backward) c.options.values["keep_plan"] = 1;
  for (const SparseCase& c : cases) {
    const std::string name = std::string("sparse/") + tier_name(tier) + "/" + (c.backward ? "fwd+bwd" : "fwd") +
                             "/B=" + std::to_string(batch) + "/H=" + std::to_string(heads) + "/D=" +
                             std::to_string(head_dim) + "/N=" + std::to_string(c.problem.seq_q) + "/" + c.label;
    benchmark::RegisterBenchmark(name.c_str(), run_case, tier, c)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(tier == Tier::cpu ? 5 : 20);  // a fixed count: the CPU's long passes need no more
  }
}

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  // CPU: two heads (one per core of the 2-core dev machine), d = 64, fp32.
  register_sparse_cases(Tier::cpu, 1, 2, 64, {4096, 8192, 16384, 32768}, {10, 30, 50, 70, 90});
  // ===== the GPU tier's sweep (owned by the GPU tier's author) =====
  // GPU: one sequence of 16 heads, d = 64, bf16 (at N = 4k, 32 Q blocks per head: 512 blocks, two per SM on 132
  // SMs, about two waves for dense flash_v2).
  register_sparse_cases(Tier::gpu, 1, 16, 64, {4096, 8192, 16384, 32768}, {0, 10, 30, 50, 70, 90});
  // ===== end of the GPU tier's sweep =====
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
