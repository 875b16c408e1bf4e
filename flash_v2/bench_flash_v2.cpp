// Benchmarks of flash_v2: the CPU tier (fp32) against the machine's ceiling (OpenBLAS sgemm) and against
// standard attention written with OpenBLAS GEMMs; the GPU tier on FlashAttention's sweep (gpu_cases(), below).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <vector>

#include "common/bench_support.hpp"
#include "common/simd.hpp"

#ifdef ATTN_HAVE_CBLAS
#include <cblas.h>
#endif

using namespace attn;

namespace {

using bench::problem;

// CPU: B * H = 16 heads, fp32; N = 4096 is the size of the README's targets. Then the studies of the README: split-K against
// split-Q (forward; the backward ignores "split") and dQ by atomic adds against per-thread buffers (backward).
std::vector<bench::Case> cpu_cases() {
  std::vector<bench::Case> cases;
  for (std::int64_t head_dim : {64, 128})
    for (std::int64_t seq : {1024, 2048, 4096}) cases.push_back({problem(1, 16, seq, head_dim, false), DType::bf16, {}, ""});
  cases.push_back({problem(1, 16, 4096, 64, true), DType::bf16, {}, ""});
  // One head: only parallelism over the sequence can use the second core.
  cases.push_back({problem(1, 1, 8192, 64, false), DType::bf16, {}, ""});
  for (std::int64_t seq : {512, 2048}) {
    bench::Case split_key{problem(1, 16, seq, 64, false), DType::bf16, {}, "split-K"};
    split_key.options.values["split"] = 1;
    cases.push_back(split_key);
    bench::Case atomics{problem(1, 16, seq, 64, false), DType::bf16, {}, "dq-atomic"};
    atomics.options.values["dq_atomic"] = 1;
    cases.push_back(atomics);
  }
  cases.push_back({problem(1, 16, 512, 64, false), DType::bf16, {}, ""});
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
  // Block-size studies of the README's GPU log (named with a label, so scripts/peers.py leaves them out).
  for (bool causal : {false, true})
    for (std::int64_t seq : {2048, 8192}) {
      bench::Case narrow{problem(16384 / seq, 32, seq, 64, causal), DType::bf16, {}, "block_cols=64"};
      narrow.options.values["block_cols"] = 64;
      cases.push_back(narrow);
      bench::Case narrow128{problem(16384 / seq, 16, seq, 128, causal), DType::bf16, {}, "block_cols=32"};
      narrow128.options.values["block_cols"] = 32;
      cases.push_back(narrow128);
      for (std::int64_t head_dim : {64, 128}) {
        bench::Case backward{problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {}, "backward_block_cols=64"};
        backward.options.values["backward_block_cols"] = 64;
        cases.push_back(backward);
      }
    }
  return cases;
}
// ===== end of gpu_cases() =====

#ifdef ATTN_HAVE_CBLAS
// ===== CPU peers, built for this benchmark only ==============================================================

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The machine's single-precision GEMM rate (OpenBLAS, all its threads): the ceiling the CPU tier is judged by.
void peer_sgemm(benchmark::State& state, int M, int N, int K) {
  std::vector<float> a(static_cast<std::size_t>(M) * K, 0.5f), b(static_cast<std::size_t>(K) * N, 0.25f),
      c(static_cast<std::size_t>(M) * N);
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, a.data(), K, b.data(), N, 0.0f, c.data(), N);
    state.SetIterationTime(seconds_since(start));
  }
  state.counters["TFLOPS"] = benchmark::Counter(2.0 * M * N * K / 1e12, benchmark::Counter::kIsIterationInvariantRate);
}

// Standard attention as a CPU user would write it with a BLAS: per head, S = scale Q K^T and O = P V as sgemm
// calls, the softmax row by row in between (OpenMP over rows). S (and dP in the backward) are N x N per head.
struct BlasAttention {
  explicit BlasAttention(const AttentionProblem& problem)
      : p(problem), data(make_problem_data(problem)), o(p.q_elements()), lse(p.lse_elements()), dq(p.q_elements()),
        dk(p.kv_elements()), dv(p.kv_elements()), S(p.seq_q * p.seq_k), dP(p.seq_q * p.seq_k) {}
  AttentionProblem p;
  ProblemData data;
  std::vector<float> o, lse, dq, dk, dv, S, dP;

  void forward() {
    const int N = static_cast<int>(p.seq_q), D = static_cast<int>(p.head_dim);
    for (std::int64_t bh = 0; bh < p.batch * p.q_heads; ++bh) {
      const float* q = data.q.data() + bh * N * D;
      const float* k = data.k.data() + bh * N * D;
      const float* v = data.v.data() + bh * N * D;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, D, p.softmax_scale(), q, D, k, D, 0.0f, S.data(), N);
#pragma omp parallel for schedule(static)
      for (int i = 0; i < N; ++i) {
        float* row = S.data() + static_cast<std::int64_t>(i) * N;
        const float row_max = simd::max(row, N);
        const float sum = simd::exp_shifted_sum(row, row_max, N);
        simd::scale(1.0f / sum, row, N);
        lse[bh * N + i] = row_max + std::log(sum);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, D, N, 1.0f, S.data(), N, v, D, 0.0f, o.data() + bh * N * D, D);
    }
  }

  // The same five products as FlashAttention's backward, with P recomputed from the saved log-sum-exp.
  void backward() {
    const int N = static_cast<int>(p.seq_q), D = static_cast<int>(p.head_dim);
    const float scale = p.softmax_scale();
    for (std::int64_t bh = 0; bh < p.batch * p.q_heads; ++bh) {
      const std::int64_t offset = bh * N * D;
      const float *q = data.q.data() + offset, *k = data.k.data() + offset, *v = data.v.data() + offset;
      const float* d_o = data.d_o.data() + offset;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, D, scale, q, D, k, D, 0.0f, S.data(), N);
#pragma omp parallel for schedule(static)
      for (int i = 0; i < N; ++i) {
        float* row = S.data() + static_cast<std::int64_t>(i) * N;
        const float shift = lse[bh * N + i];
        for (int j = 0; j < N; ++j) row[j] -= shift;
        simd::exp_shifted_sum(row, 0.0f, N);
      }
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, D, N, 1.0f, S.data(), N, d_o, D, 0.0f, dv.data() + offset, D);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, D, 1.0f, d_o, D, v, D, 0.0f, dP.data(), N);
#pragma omp parallel for schedule(static)
      for (int i = 0; i < N; ++i) {
        const std::int64_t r = static_cast<std::int64_t>(i) * N;
        const float Di = simd::dot(d_o + static_cast<std::int64_t>(i) * D, o.data() + offset + static_cast<std::int64_t>(i) * D, D);
        for (int j = 0; j < N; ++j) dP[r + j] = scale * S[r + j] * (dP[r + j] - Di);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, D, N, 1.0f, dP.data(), N, k, D, 0.0f, dq.data() + offset, D);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, D, N, 1.0f, dP.data(), N, q, D, 0.0f, dk.data() + offset, D);
    }
  }
};

void peer_blas_attention(benchmark::State& state, AttentionProblem p, bool backward) {
  BlasAttention run(p);
  run.forward();
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    if (backward)
      run.backward();
    else
      run.forward();
    state.SetIterationTime(seconds_since(start));
  }
  const double flops = backward ? p.backward_flops() : p.forward_flops();
  state.counters["TFLOPS"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["extra_bytes"] = static_cast<double>((backward ? 2 : 1) * p.seq_q * p.seq_k * sizeof(float));
}

void register_peers() {
  for (int n : {2048}) benchmark::RegisterBenchmark(("peer/openblas_sgemm/" + std::to_string(n) + "^3").c_str(), peer_sgemm, n, n, n)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  for (int d : {64, 128}) {
    const std::string shape = "4096x4096x" + std::to_string(d);
    benchmark::RegisterBenchmark(("peer/openblas_sgemm/" + shape + "_(Q_K^T)").c_str(), peer_sgemm, 4096, 4096, d)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (const bench::Case& c : cpu_cases()) {
    // The BLAS peer computes every score: compare it on full attention, and once per problem.
    if (c.problem.causal || !c.label.empty() || c.problem.seq_q < 1024) continue;
    for (bool backward : {false, true}) {
      std::string name = std::string("peer/blas_attention/") + (backward ? "bwd" : "fwd") + "/f32/" + c.problem.describe();
      for (char& ch : name)
        if (ch == ' ') ch = '_';
      benchmark::RegisterBenchmark(name.c_str(), peer_blas_attention, c.problem, backward)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.5);
    }
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const Stage& stage = find_stage("flash_v2");
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
#ifdef ATTN_HAVE_CBLAS
  register_peers();
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
