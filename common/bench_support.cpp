#include "common/bench_support.hpp"

#include <benchmark/benchmark.h>

#include <memory>

#ifdef ATTN_HAVE_CUDA
#include "common/cuda_utils.hpp"
#endif

namespace attn::bench {

AttentionProblem problem(std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t head_dim, bool causal) {
  AttentionProblem p;
  p.batch = batch;
  p.q_heads = p.kv_heads = heads;
  p.seq_q = p.seq_k = seq;
  p.head_dim = head_dim;
  p.causal = causal;
  return p;
}

namespace {

bool tier_usable(Tier tier) {
#ifdef ATTN_HAVE_CUDA
  return tier == Tier::cpu || cuda::device_available();
#else
  return tier == Tier::cpu;
#endif
}

void run_case(benchmark::State& state, const Stage* stage, Tier tier, Case c, bool backward) {
  try {
    ProblemData data = make_problem_data(c.problem, tier == Tier::cpu ? DType::f32 : c.gpu_dtype);
    PreparedRun run(*stage, tier, data, backward, c.options);
    StageOptions options = c.options;
    if (backward) run.forward(options);  // the backward pass needs this forward's O and LSE
    for (auto _ : state) {
      const double ms = backward ? run.backward(options) : run.forward(options);
      state.SetIterationTime(ms / 1e3);
    }
    const double flops = backward ? c.problem.backward_flops() : c.problem.forward_flops();
    const double io = static_cast<double>(dtype_size(data.dtype)) * (2.0 * c.problem.q_elements() + 2.0 * c.problem.kv_elements());
    state.counters["TFLOPS"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["io_bytes"] = benchmark::Counter(io, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
    state.counters["extra_bytes"] = static_cast<double>(backward ? run.backward_extra_bytes() : run.forward_extra_bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

void register_stage(const Stage& stage, const std::vector<Case>& cases, const std::vector<Tier>& tiers) {
  static std::vector<std::unique_ptr<Stage>> keep_alive;  // benchmarks outlive the caller's Stage value
  keep_alive.push_back(std::make_unique<Stage>(stage));
  const Stage* owned = keep_alive.back().get();
  for (Tier tier : tiers) {
    const TierEntry* entry = owned->find(tier);
    if (entry == nullptr || !tier_usable(tier)) continue;
    for (const Case& c : cases) {
      for (bool backward : {false, true}) {
        if (backward && !entry->backward) continue;
        const std::string dtype = tier == Tier::cpu ? "f32" : dtype_name(c.gpu_dtype);
        std::string name = owned->name + "/" + tier_name(tier) + "/" + (backward ? "bwd" : "fwd") + "/" + dtype + "/" +
                           c.problem.describe() + (c.label.empty() ? "" : " " + c.label);
        for (char& ch : name)
          if (ch == ' ') ch = '_';
        benchmark::RegisterBenchmark(name.c_str(), run_case, owned, tier, c, backward)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(tier == Tier::cpu ? 0.5 : 0.2);
      }
    }
  }
}

}  // namespace attn::bench
