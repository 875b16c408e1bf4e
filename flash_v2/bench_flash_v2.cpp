// Benchmarks of flash_v2: the CPU tier (fp32) against the machine's ceiling (OpenBLAS sgemm) and against
// standard attention written with OpenBLAS GEMMs; the GPU tier on FlashAttention's sweep (gpu_cases(), below).
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/bench_support.hpp"
#include "common/simd.hpp"
#include "common/timer.hpp"

#ifdef ATTN_HAVE_CBLAS
#include <cblas.h>

#include "tests/oracle.hpp"
#endif

using namespace attn;

namespace {

using bench::problem;

// CPU: B * H = 16 heads, fp32; N = 4096 is the size the README compares with the sgemm ceiling. Then the studies of the README: split-K against
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
// FlashAttention's sweep: batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim), bf16; and one
// grouped-query shape, 8 query heads per KV head, causal (B = 2, Hq = 32, Hkv = 4, N = 8192, D = 128).
std::vector<bench::Case> gpu_cases() {
  std::vector<bench::Case> cases;
  for (bool causal : {false, true})
    for (std::int64_t head_dim : {64, 128, 256})
      for (std::int64_t seq = 512; seq <= 16384; seq *= 2)
        cases.push_back({problem(16384 / seq, 2048 / head_dim, seq, head_dim, causal), DType::bf16, {}, ""});
  AttentionProblem grouped = problem(2, 32, 8192, 128, true);
  grouped.kv_heads = 4;
  cases.push_back({grouped, DType::bf16, {}, ""});
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
      // D = 64 with 64 query rows per backward step (128, the default there since log step 7, is the unlabelled case).
      bench::Case short_rows{problem(16384 / seq, 32, seq, 64, causal), DType::bf16, {}, "backward_block_rows=64"};
      short_rows.options.values["backward_block_rows"] = 64;
      cases.push_back(short_rows);
    }
  return cases;
}
// ===== end of gpu_cases() =====

#ifdef ATTN_HAVE_CBLAS
// ===== CPU peers, built for this benchmark only ==============================================================

// ---- Which OpenBLAS kernels run ----------------------------------------------------------------------------
// OpenBLAS picks its kernels when the library loads, from the CPU's vendor, family and model. A virtual machine
// that hides the model (lscpu: "Intel(R) Xeon(R) Processor") gets the generic "Prescott" (SSE3) kernels from
// Debian 12's OpenBLAS 0.3.21, several times below what the machine does: the ceiling and the BLAS peer would
// then flatter every CPU ratio. So this program, and only this program (tests and CI use the library as it
// comes), chooses the core from the instruction set when the library fell back to a generic one: it sets
// OPENBLAS_CORETYPE (read once, at load time) and runs itself again. A machine that sets OPENBLAS_CORETYPE
// itself (some do, because older OpenBLAS kernels compute wrong results on them) is left alone. Either way the
// peers are checked against the fp64 oracle before they are timed, and the core is printed with the results.

std::string scientific(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g", value);
  return text;
}

/// The OpenBLAS core matching this CPU's instruction set, or nullptr when no better one than generic applies.
const char* core_for_instruction_set() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return nullptr;
}

/// OpenBLAS's names for the cores it falls back to when it does not recognise the CPU model.
bool is_generic_core(std::string core) {
  std::transform(core.begin(), core.end(), core.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* generic : {"prescott", "core2", "penryn", "dunnington", "nehalem", "katmai", "coppermine",
                              "northwood", "banias", "atom"})
    if (core == generic) return true;
  return false;
}

/// Runs the program again with OPENBLAS_CORETYPE set when the library chose a generic core on a CPU with AVX2
/// or AVX-512; returns (without re-running) otherwise. Returns what to print about the choice.
std::string choose_openblas_core(char** argv) {
  const std::string loaded = openblas_get_corename();
  if (const char* chosen_by = std::getenv("ATTN_OPENBLAS_DETECTED"))
    return loaded + " (OPENBLAS_CORETYPE set by this program from the instruction set; the library detected " +
           chosen_by + ")";
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return loaded + " (OPENBLAS_CORETYPE set by the environment)";
  const char* wanted = core_for_instruction_set();
  if (wanted == nullptr || !is_generic_core(loaded)) return loaded + " (detected by the library)";
  setenv("OPENBLAS_CORETYPE", wanted, 1);
  setenv("ATTN_OPENBLAS_DETECTED", loaded.c_str(), 1);
  execv("/proc/self/exe", argv);  // returns only on failure
  return loaded + " (detected by the library; running again with OPENBLAS_CORETYPE=" + wanted + " failed)";
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The machine's single-precision GEMM rate (OpenBLAS, all its threads): the ceiling the CPU tier is judged by.
// Random inputs; before timing, 256 entries of C are checked against fp64 dot products.
void peer_sgemm(benchmark::State& state, int M, int N, int K) {
  std::vector<float> a(static_cast<std::size_t>(M) * K), b(static_cast<std::size_t>(K) * N), c(static_cast<std::size_t>(M) * N);
  std::mt19937 random(7);
  std::normal_distribution<float> normal;
  for (float& x : a) x = normal(random);
  for (float& x : b) x = normal(random);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, a.data(), K, b.data(), N, 0.0f, c.data(), N);
  double worst = 0;
  for (int sample = 0; sample < 256; ++sample) {
    const int i = static_cast<int>(random() % M), j = static_cast<int>(random() % N);
    double exact = 0, magnitude = 0;
    for (int k = 0; k < K; ++k) {
      exact += static_cast<double>(a[static_cast<std::size_t>(i) * K + k]) * b[static_cast<std::size_t>(k) * N + j];
      magnitude += std::abs(static_cast<double>(a[static_cast<std::size_t>(i) * K + k]) * b[static_cast<std::size_t>(k) * N + j]);
    }
    worst = std::max(worst, std::abs(c[static_cast<std::size_t>(i) * N + j] - exact) / magnitude);
  }
  // fp32 accumulation of K products: each error is a few ulps of the sum of magnitudes, far below 1e-5.
  if (!(worst < 1e-5)) {
    state.SkipWithError(("sgemm disagrees with fp64 (worst error " + scientific(worst) + ")").c_str());
    return;
  }
  state.SetLabel(openblas_get_corename());
  state.counters["check_error"] = worst;
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

/// The first head of the BLAS peer's outputs against the fp64 oracle on that head alone: the worst of O's
/// relative Frobenius error and (after a backward) the gradients' errors as the tests measure them.
double error_against_oracle(const BlasAttention& run, bool backward) {
  AttentionProblem one_head = run.p;
  one_head.batch = one_head.q_heads = one_head.kv_heads = 1;
  ProblemData head = make_problem_data(one_head);
  const std::int64_t q_size = one_head.q_elements(), kv_size = one_head.kv_elements();
  std::copy_n(run.data.q.data(), q_size, head.q.data());
  std::copy_n(run.data.k.data(), kv_size, head.k.data());
  std::copy_n(run.data.v.data(), kv_size, head.v.data());
  std::copy_n(run.data.d_o.data(), q_size, head.d_o.data());
  const oracle::Result exact = oracle::attention(head, backward);
  double difference = 0, norm = 0;
  for (std::int64_t i = 0; i < q_size; ++i) {
    difference += (run.o[i] - exact.o[i]) * (run.o[i] - exact.o[i]);
    norm += exact.o[i] * exact.o[i];
  }
  double worst = std::sqrt(difference / norm);
  if (backward) {
    worst = std::max(worst, oracle::gradient_error({run.dq.data(), static_cast<std::size_t>(q_size)}, exact.dq, exact.dq_mag));
    worst = std::max(worst, oracle::gradient_error({run.dk.data(), static_cast<std::size_t>(kv_size)}, exact.dk, exact.dk_mag));
    worst = std::max(worst, oracle::gradient_error({run.dv.data(), static_cast<std::size_t>(kv_size)}, exact.dv, exact.dv_mag));
  }
  return worst;
}

void peer_blas_attention(benchmark::State& state, AttentionProblem p, bool backward) {
  BlasAttention run(p);
  run.forward();
  if (backward) run.backward();
  // Checked before it is timed: fp32 attention is within about 1e-6 of fp64 here; 1e-4 leaves room.
  const double error = error_against_oracle(run, backward);
  if (!(error < 1e-4)) {
    state.SkipWithError(("BLAS attention disagrees with the fp64 oracle (error " + scientific(error) + ")").c_str());
    return;
  }
  state.SetLabel(openblas_get_corename());
  state.counters["check_error"] = error;
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

/// The ceiling measured beside the kernel it judges. On a shared or virtual machine the sgemm's rate moves by a
/// quarter or more from one run to the next, and a ceiling measured minutes away from the flash_v2 case (or after
/// other OpenMP cases) can sit above or below what the machine did during that case. Here each iteration runs one
/// 2048^3 sgemm and one flash_v2 CPU forward on `p`, back to back (their order alternating), and the counters
/// give the median of each rate and the median of the per-pair ratios flash_v2 / sgemm.
void paired_with_sgemm(benchmark::State& state, AttentionProblem p) {
  constexpr int n = 2048;
  std::vector<float> a(static_cast<std::size_t>(n) * n), b(a.size()), c(a.size());
  std::mt19937 random(11);
  std::normal_distribution<float> normal;
  for (float& x : a) x = normal(random);
  for (float& x : b) x = normal(random);
  const ProblemData data = make_problem_data(p, DType::f32);
  PreparedRun flash(find_stage("flash_v2"), Tier::cpu, data, false);
  StageOptions options;
  const auto sgemm_ms = [&] {
    const auto start = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    return seconds_since(start) * 1e3;
  };
  sgemm_ms();  // warm-up of both
  flash.forward(options);
  std::vector<double> sgemm_rates, flash_rates, ratios;
  const double sgemm_flops = 2.0 * n * n * n, flash_flops = p.forward_flops();
  for (auto _ : state) {
    const bool sgemm_first = ratios.size() % 2 == 0;
    double sgemm = sgemm_first ? sgemm_ms() : 0.0;
    const double forward = flash.forward(options);
    if (!sgemm_first) sgemm = sgemm_ms();
    state.SetIterationTime((sgemm + forward) / 1e3);
    sgemm_rates.push_back(sgemm_flops / sgemm / 1e6);  // GFLOP/s
    flash_rates.push_back(flash_flops / forward / 1e6);
    ratios.push_back(flash_rates.back() / sgemm_rates.back());
  }
  state.SetLabel(openblas_get_corename());
  state.counters["flash_v2_gflops"] = median(flash_rates);
  state.counters["sgemm_gflops"] = median(sgemm_rates);
  state.counters["ratio"] = median(ratios);
  state.counters["ratio_min"] = *std::min_element(ratios.begin(), ratios.end());
  state.counters["ratio_max"] = *std::max_element(ratios.begin(), ratios.end());
}

// The ceilings first, before any OpenMP case has run (OpenMP's worker threads, still spinning after a case, would
// share the cores with OpenBLAS's); then, after flash_v2's own cases, the paired cases and the BLAS peer.
void register_ceilings() {
  for (int n : {2048}) benchmark::RegisterBenchmark(("peer/openblas_sgemm/" + std::to_string(n) + "^3").c_str(), peer_sgemm, n, n, n)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  for (int d : {64, 128}) {
    const std::string shape = "4096x4096x" + std::to_string(d);
    benchmark::RegisterBenchmark(("peer/openblas_sgemm/" + shape + "_(Q_K^T)").c_str(), peer_sgemm, 4096, 4096, d)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

void register_peers() {
  for (std::int64_t d : {64, 128}) {
    const AttentionProblem p = problem(1, 16, 4096, d, false);
    std::string name = "peer/paired_with_sgemm/fwd/f32/" + p.describe();
    for (char& ch : name)
      if (ch == ' ') ch = '_';
    benchmark::RegisterBenchmark(name.c_str(), paired_with_sgemm, p)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(12);
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
#ifdef ATTN_HAVE_CBLAS
  const std::string blas = std::string(openblas_get_config()) + ", core " + choose_openblas_core(argv);
  benchmark::AddCustomContext("blas", blas);
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#ifdef ATTN_HAVE_CBLAS
  register_ceilings();
#endif
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
