// Benchmarks of flash_v3: the GPU tier on FlashAttention's sweep (gpu_cases(), read by scripts/peers.py) and the
// ablation of the chapter (each schedule at the FlashAttention-3 paper's Table 2 shape); FP8 against bf16 on the
// same data in the same loop, next to the machine's GEMM ceilings in both precisions; the CPU tier (the threaded
// pipeline, there for reading) on small problems next to flash_v2's CPU tier.
//   bench_flash_v3 --benchmark_filter='ceiling|fp8'    (the FP8 chapter's table)
#include <benchmark/benchmark.h>

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/bench_support.hpp"
#include "common/harness.hpp"
#include "common/timer.hpp"

#ifdef ATTN_HAVE_CUDA
#include <cublasLt.h>

#include "common/cuda_utils.hpp"
#include "common/sm_clock.hpp"
#endif

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

#ifdef ATTN_HAVE_CUDA
// ----- The machine's GEMM ceilings and FP8 against bf16 -----------------------------------------------------------

/// TFLOP/s of the GEMM ceilings measured in this run, by input type ("bf16", "e4m3"): the FP8 cases below report
/// their kernels' share of them (the ceilings are registered first, so they run first).
std::map<std::string, double>& gemm_ceilings() {
  static std::map<std::string, double> ceilings;
  return ceilings;
}

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(call) + " failed: " + cublasLtGetStatusString(status));
}

/// Runs the destroy functions it was given, last first, when it goes out of scope.
class Destroyers {
 public:
  Destroyers() = default;
  Destroyers(const Destroyers&) = delete;
  Destroyers& operator=(const Destroyers&) = delete;
  ~Destroyers() {
    for (auto step = steps_.rbegin(); step != steps_.rend(); ++step) (*step)();
  }
  template <class Handle, class Destroy>
  void add(Handle handle, Destroy destroy) {
    steps_.push_back([handle, destroy] { destroy(handle); });
  }

 private:
  std::vector<std::function<void()>> steps_;
};

/// n random finite codes of e4m3 (magnitudes 2^-2 .. 2^3) or bf16 (2^-3 .. 2^2): a GEMM's power, and so its clock,
/// depends on how its inputs' bits toggle, so the ceiling is timed on random inputs as the kernels are.
std::vector<unsigned char> random_codes(std::size_t n, bool fp8) {
  std::vector<unsigned char> bytes(n * (fp8 ? 1 : 2));
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (std::size_t i = 0; i < n; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const unsigned r = static_cast<unsigned>(state >> 33);
    if (fp8) {  // sign, exponent field 5..10 (bias 7), 3 mantissa bits
      bytes[i] = static_cast<unsigned char>((r & 0x80u) | ((5u + (r >> 8) % 6u) << 3) | (r & 0x7u));
    } else {  // sign, exponent field 124..129 (bias 127), 7 mantissa bits; little-endian
      const unsigned code = ((r & 0x1u) << 15) | ((124u + (r >> 8) % 6u) << 7) | ((r >> 1) & 0x7Fu);
      bytes[2 * i] = static_cast<unsigned char>(code & 0xFFu);
      bytes[2 * i + 1] = static_cast<unsigned char>(code >> 8);
    }
  }
  return bytes;
}
#define ATTN_BENCH_CUBLAS(call) check_cublas((call), #call)

/// The machine's dense GEMM rate: D = A^T B, n x n x n, fp32 accumulation, through cuBLASLt's best algorithm for the
/// shape. fp8: e4m3 inputs, else bf16; D in bf16 either way. FP8 GEMMs take both operands K-major (the "TN" form),
/// as FP8 wgmma does; bf16 runs the same form.
void gpu_gemm_ceiling(benchmark::State& state, std::int64_t n, bool fp8) {
  try {
    const std::size_t elements = static_cast<std::size_t>(n * n), input_bytes = fp8 ? 1 : 2;
    DeviceBuffer<unsigned char> a(elements * input_bytes), b(elements * input_bytes), d(elements * 2);
    const std::vector<unsigned char> codes = random_codes(elements, fp8);
    ATTN_CUDA_CHECK(cudaMemcpy(a.data(), codes.data(), codes.size(), cudaMemcpyHostToDevice));
    ATTN_CUDA_CHECK(cudaMemcpy(b.data(), codes.data(), codes.size(), cudaMemcpyHostToDevice));
    const std::size_t workspace_bytes = std::size_t{64} << 20;
    DeviceBuffer<unsigned char> workspace(workspace_bytes);
    Destroyers destroyers;  // what cuBLASLt creates below, destroyed however this function leaves
    cublasLtHandle_t handle;
    ATTN_BENCH_CUBLAS(cublasLtCreate(&handle));
    destroyers.add(handle, cublasLtDestroy);
    const cudaDataType_t input_type = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
    cublasLtMatmulDesc_t op;
    ATTN_BENCH_CUBLAS(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    destroyers.add(op, cublasLtMatmulDescDestroy);
    const cublasOperation_t transposed = CUBLAS_OP_T, plain = CUBLAS_OP_N;
    ATTN_BENCH_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &transposed, sizeof(transposed)));
    ATTN_BENCH_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &plain, sizeof(plain)));
    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
    for (auto [layout, type] : {std::pair{&layout_a, input_type}, {&layout_b, input_type}, {&layout_d, CUDA_R_16BF}}) {
      ATTN_BENCH_CUBLAS(cublasLtMatrixLayoutCreate(layout, type, n, n, n));
      destroyers.add(*layout, cublasLtMatrixLayoutDestroy);
    }
    cublasLtMatmulPreference_t preference;
    ATTN_BENCH_CUBLAS(cublasLtMatmulPreferenceCreate(&preference));
    destroyers.add(preference, cublasLtMatmulPreferenceDestroy);
    ATTN_BENCH_CUBLAS(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &workspace_bytes, sizeof(workspace_bytes)));
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    ATTN_BENCH_CUBLAS(cublasLtMatmulAlgoGetHeuristic(handle, op, layout_a, layout_b, layout_d, layout_d, preference, 1,
                                                     &heuristic, &found));
    if (found == 0) throw std::runtime_error("cuBLASLt has no algorithm for this GEMM");
    const float one = 1.0f, zero = 0.0f;
    auto gemm = [&] {
      ATTN_BENCH_CUBLAS(cublasLtMatmul(handle, op, &one, a.data(), layout_a, b.data(), layout_b, &zero, d.data(),
                                       layout_d, d.data(), layout_d, &heuristic.algo, workspace.data(), workspace_bytes,
                                       nullptr));
    };
    gemm();  // warm-up
    CudaEventTimer timer;
    std::vector<double> ms, mhz;
    for (auto _ : state) {
      timer.start();
      gemm();
      ms.push_back(timer.stop_ms());
      mhz.push_back(cuda::sm_clock_mhz());  // the SM clock right after the GEMM (see gpu_fp8_vs_bf16)
      state.SetIterationTime(ms.back() / 1e3);
    }
    ATTN_CUDA_CHECK(cudaDeviceSynchronize());
    const double tflops = 2.0 * static_cast<double>(n) * n * n / (median(ms) * 1e-3) / 1e12;
    state.counters["TFLOPS"] = tflops;  // of the median pass
    state.counters["MHz"] = median(mhz);
    gemm_ceilings()[fp8 ? "e4m3" : "bf16"] = tflops;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

/// The FP8 forward (`fp8_options`: fp8 = 1 and what else the case sets) against the bf16 forward of the same
/// kernel family on the same bf16 inputs. `alternate`: each iteration runs one bf16 pass and one FP8 pass, so that
/// both see the same machine state (the H200's figures move by several percent from one call to the next, less
/// within one); otherwise all the bf16 passes run first, then all the FP8 passes (the "blocks" cases, to see
/// whether the alternation itself moves either figure). After every pass the SM clock is measured on the device
/// (cuda::sm_clock_mhz, 100 us by default): bf16_MHz and fp8_MHz are their medians.
/// Counters, medians over the iterations: bf16_TFLOPS; FP8 kernel_TFLOPS (the attention kernel alone, with the
/// last wave's merge where it splits) and call_TFLOPS (with the quantization of Q, K, V); quantize_ms; their
/// ratios to bf16; and each kernel's share of its precision's GEMM ceiling where that ran in the same process.
void gpu_fp8_vs_bf16(benchmark::State& state, AttentionProblem problem, StageOptions fp8_options, bool alternate) {
  try {
    const ProblemData data = make_problem_data(problem, DType::bf16);
    const Stage& stage = find_stage("flash_v3");
    PreparedRun bf16_run(stage, Tier::gpu, data, false);
    PreparedRun fp8_run(stage, Tier::gpu, data, false, fp8_options);
    StageOptions bf16_options, fp8 = fp8_options;
    bf16_run.forward(bf16_options);  // warm-up
    fp8_run.forward(fp8);
    std::vector<double> bf16_ms, call_ms, kernel_ms, quantize_ms, bf16_mhz, fp8_mhz;
    auto bf16_pass = [&] {
      bf16_ms.push_back(bf16_run.forward(bf16_options));
      bf16_mhz.push_back(cuda::sm_clock_mhz());
    };
    if (!alternate)
      for (std::int64_t i = 0; i < state.max_iterations; ++i) bf16_pass();
    for (auto _ : state) {
      if (alternate) bf16_pass();
      call_ms.push_back(fp8_run.forward(fp8));
      fp8_mhz.push_back(cuda::sm_clock_mhz());
      kernel_ms.push_back(fp8.counters["attention_ms"]);
      quantize_ms.push_back(fp8.counters["quantize_ms"]);
      state.SetIterationTime(call_ms.back() / 1e3);
    }
    const double flops = problem.forward_flops();
    auto tflops = [&](const std::vector<double>& ms) { return flops / (median(ms) * 1e-3) / 1e12; };
    const double bf16 = tflops(bf16_ms), kernel = tflops(kernel_ms), call = tflops(call_ms);
    state.counters["bf16_TFLOPS"] = bf16;
    state.counters["kernel_TFLOPS"] = kernel;
    state.counters["call_TFLOPS"] = call;
    state.counters["quantize_ms"] = median(quantize_ms);
    state.counters["kernel_over_bf16"] = kernel / bf16;
    state.counters["call_over_bf16"] = call / bf16;
    state.counters["split_tiles"] = fp8.counters["split_tiles"];
    state.counters["bf16_MHz"] = median(bf16_mhz);
    state.counters["fp8_MHz"] = median(fp8_mhz);
    const auto& ceilings = gemm_ceilings();
    if (ceilings.count("bf16")) state.counters["bf16_of_gemm"] = bf16 / ceilings.at("bf16");
    if (ceilings.count("e4m3")) state.counters["kernel_of_gemm"] = kernel / ceilings.at("e4m3");
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

/// The GEMM ceilings (8192^3), then FP8 against bf16 at FA3's protocol shape (16k tokens, hidden 2048,
/// non-causal) at d = 128 and 256, N = 8192 and 16384, and causal at d = 128, N = 16384; incoherent processing
/// at N = 16384.
void register_fp8_cases() {
  if (!cuda::device_available()) return;
  for (bool fp8 : {false, true})
    benchmark::RegisterBenchmark(fp8 ? "ceiling/gpu/gemm/e4m3/n=8192" : "ceiling/gpu/gemm/bf16/n=8192",
                                 gpu_gemm_ceiling, std::int64_t{8192}, fp8)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(50);
  struct Fp8Case {
    std::int64_t head_dim, seq;
    bool causal, incoherent;
  };
  for (Fp8Case c : {Fp8Case{128, 8192, false, false}, Fp8Case{128, 16384, false, false}, Fp8Case{256, 8192, false, false},
                    Fp8Case{256, 16384, false, false}, Fp8Case{128, 16384, true, false}, Fp8Case{128, 16384, false, true},
                    Fp8Case{256, 16384, false, true}}) {
    StageOptions options;
    options.values["fp8"] = 1;
    if (c.incoherent) options.values["incoherent"] = 1;
    const std::string name = "flash_v3/gpu/fp8_vs_bf16/B=" + std::to_string(16384 / c.seq) + "_H=" +
                             std::to_string(2048 / c.head_dim) + "_N=" + std::to_string(c.seq) + "_D=" +
                             std::to_string(c.head_dim) + (c.causal ? "_causal" : "") + (c.incoherent ? "/incoherent=1" : "");
    benchmark::RegisterBenchmark(name.c_str(), gpu_fp8_vs_bf16, problem(16384 / c.seq, 2048 / c.head_dim, c.seq,
                                                                        c.head_dim, c.causal), options, true)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(20);
  }
  // The same at N = 16384 with the two precisions in blocks instead of alternating.
  for (std::int64_t head_dim : {128, 256}) {
    StageOptions options;
    options.values["fp8"] = 1;
    const std::string name = "flash_v3/gpu/fp8_vs_bf16_blocks/B=1_H=" + std::to_string(2048 / head_dim) +
                             "_N=16384_D=" + std::to_string(head_dim);
    benchmark::RegisterBenchmark(name.c_str(), gpu_fp8_vs_bf16, problem(1, 2048 / head_dim, 16384, head_dim, false),
                                 options, false)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(20);
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const Stage& stage = find_stage("flash_v3");
  bench::register_stage(stage, cpu_cases(), {Tier::cpu});
  bench::register_stage(stage, gpu_cases(), {Tier::gpu});
#ifdef ATTN_HAVE_CUDA
  register_fp8_cases();
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
