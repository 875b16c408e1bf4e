// Benchmarks of flash_v1: the CPU tier (fp32) at the sizes of flash_v2's CPU benchmark, so that the two can be
// compared, and the GPU tier on FlashAttention's sweep (gpu_cases(), below). IO counts: `attn run --io`.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "common/bench_support.hpp"

using namespace attn;

namespace {

using bench::problem;

// CPU: B * H = 16 heads, fp32, the size of flash_v2's CPU targets (N = 4096) and a shorter sweep below it.
std::vector<bench::Case> cpu_cases() {
  std::vector<bench::Case> cases;
  for (std::int64_t head_dim : {64, 128})
    for (std::int64_t seq : {1024, 2048, 4096}) cases.push_back({problem(1, 16, seq, head_dim, false), DType::bf16, {}, ""});
  cases.push_back({problem(1, 16, 4096, 64, true), DType::bf16, {}, ""});
  // One head: only parallelism over the sequence can use the second core.
  cases.push_back({problem(1, 1, 8192, 64, false), DType::bf16, {}, ""});
  return cases;
}

// ===== gpu_cases(): the GPU tier's benchmark cases (owned by the GPU tier's author; edit freely) =====
// FlashAttention's sweep: batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim), bf16.
std::vector<bench::Case> gpu_cases() {
  std::vector<bench::Case> cases;
  for (bool causal : {false, true})
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t seq = 512; seq <= 16384; seq *= 2)
        cases.push_back({problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {}, ""});
  // The forward with a fixed number of thread blocks per (batch, head) (the option splits; the sweep above lets
  // the tier choose): 1 is the paper's grid. `--benchmark_filter=splits`.
  for (std::int64_t head_dim : {64, 128})
    for (std::int64_t seq : {2048, 16384})
      for (std::int64_t splits : {1, 4, 16}) {
        bench::Case c{problem(16384 / seq, 2048 / head_dim, seq, head_dim, false), DType::bf16, {}, "splits=" + std::to_string(splits)};
        c.options.values["splits"] = splits;
        cases.push_back(c);
      }
  return cases;
}
// ===== end of gpu_cases() =====

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const Stage& stage = find_stage("flash_v1");
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
