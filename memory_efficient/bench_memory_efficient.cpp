// memory_efficient: Google Benchmark of both tiers, forward and backward, with the extra bytes each pass
// allocated (the stage's point). CPU: fp32, B=1 H=8 D=64 at N = 2048 and 4096, the paper's default chunks.
// GPU: bf16, B=4 H=16 N=4096 D=128 (the ladder's GPU problem) and a long B=1 H=16 N=16384.
#include <benchmark/benchmark.h>

#include "common/bench_support.hpp"
#include "memory_efficient/memory_efficient.hpp"

namespace {

using namespace attn;

AttentionProblem make(std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t head_dim) {
  AttentionProblem p;
  p.batch = batch;
  p.q_heads = p.kv_heads = heads;
  p.seq_q = p.seq_k = seq;
  p.head_dim = head_dim;
  return p;
}

std::vector<bench::Case> cpu_cases() {
  std::vector<bench::Case> cases;
  for (std::int64_t seq : {2048, 4096}) cases.push_back({make(1, 8, seq, 64), DType::f32, {}, ""});
  return cases;
}

std::vector<bench::Case> gpu_cases() {
  return {{make(4, 16, 4096, 128), DType::bf16, {}, ""}, {make(1, 16, 16384, 128), DType::bf16, {}, ""}};
}

}  // namespace

int main(int argc, char** argv) {
  const Stage stage = memory_efficient::describe();
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
