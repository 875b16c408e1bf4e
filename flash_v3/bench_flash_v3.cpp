// Benchmarks of flash_v3: the GPU tier on FlashAttention's sweep (gpu_cases(), read by scripts/peers.py) and the
// ablation of the chapter (each schedule at the FlashAttention-3 paper's Table 2 shape); the CPU tier (the
// threaded pipeline, there for reading) on small problems next to flash_v2's CPU tier.
#include <benchmark/benchmark.h>

#include <utility>
#include <vector>

#include "common/bench_support.hpp"

using namespace attn;

namespace {

using bench::problem;

// FlashAttention's sweep: batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim), bf16; then the
// ablation: D = 128, N = 8448, B = 4, H = 16, non-causal, each schedule (labelled, so peers.py leaves them out of
// its sweep table and prints them in the ablation table).
std::vector<bench::Case> gpu_cases() {
  std::vector<bench::Case> cases;
  for (bool causal : {false, true})
    for (std::int64_t head_dim : {64, 128, 256})
      for (std::int64_t seq = 512; seq <= 16384; seq *= 2)
        cases.push_back({problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {}, ""});
  for (int schedule = 0; schedule <= 3; ++schedule)
    for (DType dtype : {DType::bf16, DType::f16}) {
      bench::Case ablation{problem(4, 16, 8448, 128, false), dtype, {}, "schedule=" + std::to_string(schedule)};
      ablation.options.values["schedule"] = schedule;
      cases.push_back(ablation);
    }
  // Key-block sizes of the README's log (schedule 3): 192 and 128 at D = 64, 176 at D = 128, against the defaults
  // above (at D = 64 the default is 192 from N = 4096 on).
  for (bool causal : {false, true})
    for (std::int64_t seq : {2048, 4096, 8192, 16384}) {
      bench::Case narrow{problem(16384 / seq, 32, seq, 64, causal), DType::bf16, {}, "block_cols=128"};
      narrow.options.values["block_cols"] = 128;
      cases.push_back(narrow);
      for (auto [head_dim, block_cols] : {std::pair<std::int64_t, std::int64_t>{64, 192}, {128, 176}}) {
        bench::Case wide{problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {},
                         "block_cols=" + std::to_string(block_cols)};
        wide.options.values["block_cols"] = block_cols;
        cases.push_back(wide);
      }
    }
  // The persistent grid (schedule 3, one thread block per SM) against one thread block per tile.
  for (bool causal : {false, true})
    for (std::int64_t head_dim : {64, 128, 256})
      for (std::int64_t seq : {2048, 8192, 16384}) {
        bench::Case persistent{problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {}, "persistent=1"};
        persistent.options.values["persistent"] = 1;
        cases.push_back(persistent);
      }
  return cases;
}

std::vector<bench::Case> cpu_cases() {
  std::vector<bench::Case> cases;
  for (std::int64_t seq : {512, 2048}) cases.push_back({problem(1, 8, seq, 64, false), DType::bf16, {}, ""});
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const Stage& stage = find_stage("flash_v3");
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
