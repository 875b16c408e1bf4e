// naive (standard attention): Google Benchmark of both tiers, forward and backward.
// CPU: fp32, one batch of 8 heads. GPU: bf16, both versions of the GPU tier (hand-written GEMM kernel and
// cuBLAS), labelled "handwritten" and "cublas", up to the FlashAttention paper's sweep point N = 8192.
#include <benchmark/benchmark.h>

#include "common/bench_support.hpp"
#include "naive/naive.hpp"

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
  for (std::int64_t seq : {1024, 2048}) cases.push_back({make(1, 8, seq, 64), DType::f32, {}, ""});
  return cases;
}

// B=4 H=16 D=128 at N = 2048 and 4096 (S and P: 1.6 and 6.4 GB in bf16), and B=2 H=16 N=8192 (12.9 GB for the
// forward, 17.2 GB for the backward), which still fits an 80 GB H100.
std::vector<bench::Case> gpu_cases() {
  std::vector<bench::Case> cases;
  const AttentionProblem problems[] = {make(4, 16, 2048, 128), make(4, 16, 4096, 128), make(2, 16, 8192, 128)};
  for (const AttentionProblem& p : problems) {
    for (int handwritten : {0, 1}) {
      bench::Case c{p, DType::bf16, {}, handwritten ? "handwritten" : "cublas"};
      c.options.values["handwritten"] = handwritten;
      cases.push_back(c);
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  const Stage stage = naive::describe();
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
