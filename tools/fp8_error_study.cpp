// attn fp8-error: the error study of FA3's Table 3 on the CPU. Inputs N(0,1), optionally with 0.1% outliers
// (N(0,1) + N(0, sigma^2) x Bernoulli(0.001), sigma = 10 by default: variance 100), in Q, K and V; RMSE of O
// against the fp64 oracle on the fp32 inputs for: standard attention with S and P stored in fp16 / bf16
// (emulated), the naive, flash_v2 and flash_v3 CPU tiers on inputs rounded to fp16 / bf16 (O rounded to the same
// type), and the FP8 forward (e4m3 emulated, O rounded to bf16) with per-tensor or block scales, with and
// without incoherent processing.
#include "tools/fp8_error_study.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "common/numeric.hpp"
#include "common/registry.hpp"
#include "flash_v3/fp8.hpp"
#include "tests/oracle.hpp"

namespace attn::tools {
namespace {

const char* kUsage =
    "usage: attn fp8-error [--heads N] [--seq N] [--head-dim N] [--seed N] [--outlier-std X]\n"
    "  RMSE of O against the fp64 oracle (FA3 Table 3), on N(0,1) inputs and on N(0,1) + 0.1% outliers\n"
    "  N(0, X^2) (X = 10 by default). Defaults: batch 1, 4 heads, seq 2048, head dim 128, seed 1.\n";

double rmse(std::span<const float> actual, std::span<const double> exact) {
  double sum = 0.0;
  for (std::size_t i = 0; i < actual.size(); ++i) sum += (actual[i] - exact[i]) * (actual[i] - exact[i]);
  return std::sqrt(sum / static_cast<double>(actual.size()));
}

/// x += N(0, outlier_std^2) x Bernoulli(0.001): an element is an outlier when an independent standard normal z
/// has |z| > 3.2905, which happens with probability 0.001.
void add_outliers(std::span<float> x, std::uint64_t seed, float outlier_std) {
  std::vector<float> pick(x.size()), size(x.size());
  fill_normal(pick, seed * 7919 + 1);
  fill_normal(size, seed * 7919 + 2, outlier_std);
  for (std::size_t i = 0; i < x.size(); ++i)
    if (std::fabs(pick[i]) > 3.2905f) x[i] += size[i];
}

/// Standard attention as a framework computes it in `dtype`: S = Q K^T (fp32 sums) stored in dtype, softmax in
/// fp32 on the stored S, P stored in dtype, O = P V (fp32 sums) stored in dtype.
std::vector<float> standard_attention(const ProblemData& data, DType dtype) {
  const AttentionProblem& p = data.problem;
  const std::int64_t D = p.head_dim;
  std::vector<float> o(static_cast<std::size_t>(p.q_elements()));
#pragma omp parallel
  {
    std::vector<float> s(static_cast<std::size_t>(p.seq_k)), acc(static_cast<std::size_t>(D));
#pragma omp for schedule(dynamic)
    for (std::int64_t row = 0; row < p.batch * p.q_heads * p.seq_q; ++row) {
      const std::int64_t bh = row / p.seq_q, i = row % p.seq_q, b = bh / p.q_heads, h = bh % p.q_heads;
      const float* q = data.q.data() + row * D;
      const float* k = data.k.data() + (b * p.kv_heads + p.kv_head_of(h)) * p.seq_k * D;
      const float* v = data.v.data() + (b * p.kv_heads + p.kv_head_of(h)) * p.seq_k * D;
      const std::int64_t visible = p.visible_keys(i);
      float max = -INFINITY, sum = 0.0f;
      for (std::int64_t j = 0; j < visible; ++j) {
        float dot = 0.0f;
        for (std::int64_t c = 0; c < D; ++c) dot += q[c] * k[j * D + c];
        s[j] = round_to_dtype(dot * p.softmax_scale(), dtype);
        max = std::max(max, s[j]);
      }
      for (std::int64_t j = 0; j < visible; ++j) sum += s[j] = std::exp(s[j] - max);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t j = 0; j < visible; ++j) {
        const float p_value = round_to_dtype(s[j] / sum, dtype);
        for (std::int64_t c = 0; c < D; ++c) acc[c] += p_value * v[j * D + c];
      }
      for (std::int64_t c = 0; c < D; ++c) o[row * D + c] = round_to_dtype(acc[c], dtype);
    }
  }
  return o;
}

/// data's inputs rounded to dtype, as a ProblemData of that dtype.
ProblemData rounded_copy(const ProblemData& data, DType dtype) {
  ProblemData copy = make_problem_data(data.problem, dtype, data.layout, 1);
  std::copy(data.q.begin(), data.q.end(), copy.q.begin());
  std::copy(data.k.begin(), data.k.end(), copy.k.begin());
  std::copy(data.v.begin(), data.v.end(), copy.v.begin());
  round_to_dtype(copy.q.span(), dtype);
  round_to_dtype(copy.k.span(), dtype);
  round_to_dtype(copy.v.span(), dtype);
  return copy;
}

void print_row(const char* inputs, const std::string& method, double error) {
  std::printf("%-9s %-62s %.2e\n", inputs, method.c_str(), error);
  std::fflush(stdout);
}

}  // namespace

int fp8_error_study(const std::vector<std::string>& args) {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 4;
  p.seq_q = p.seq_k = 2048;
  p.head_dim = 128;
  std::uint64_t seed = 1;
  float outlier_std = 10.0f;
  auto integer = [](const std::string& flag, const std::string& text) {  // the whole text, a non-negative integer
    std::size_t end = 0;
    long long value = -1;
    try {
      value = std::stoll(text, &end);
    } catch (const std::exception&) {
      end = 0;
    }
    if (end != text.size() || value < 0) throw std::invalid_argument(flag + ": '" + text + "' is not a non-negative integer");
    return value;
  };
  for (std::size_t i = 0; i < args.size(); i += 2) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (flag != "--heads" && flag != "--seq" && flag != "--head-dim" && flag != "--seed" && flag != "--outlier-std")
      throw std::invalid_argument(flag + ": unknown flag (attn fp8-error --help lists them)");
    if (i + 1 >= args.size()) throw std::invalid_argument(flag + ": needs a value");
    const std::string& value = args[i + 1];
    if (flag == "--heads") p.q_heads = p.kv_heads = integer(flag, value);
    if (flag == "--seq") p.seq_q = p.seq_k = integer(flag, value);
    if (flag == "--head-dim") p.head_dim = integer(flag, value);
    if (flag == "--seed") seed = static_cast<std::uint64_t>(integer(flag, value));
    if (flag == "--outlier-std") {
      char* end = nullptr;
      outlier_std = std::strtof(value.c_str(), &end);
      if (end == value.c_str() || *end != '\0' || !std::isfinite(outlier_std) || outlier_std < 0.0f)
        throw std::invalid_argument(flag + ": '" + value + "' is not a finite number >= 0");
    }
  }
  validate_problem(p);
  if (p.head_dim < 16 || (p.head_dim & (p.head_dim - 1)) != 0)
    throw std::invalid_argument("head_dim: " + std::to_string(p.head_dim) + " must be a power of two >= 16 (Hadamard)");
  std::printf("# attn fp8-error: %s, seed %llu, outliers N(0, %g^2) x Bernoulli(0.001); RMSE of O vs fp64\n",
              p.describe().c_str(), static_cast<unsigned long long>(seed), outlier_std);
  std::printf("%-9s %-62s %s\n", "inputs", "method", "RMSE");
  for (const bool outliers : {false, true}) {
    ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, seed);
    const char* inputs = outliers ? "outliers" : "N(0,1)";
    if (outliers) {
      add_outliers(data.q.span(), seed + 1, outlier_std);
      add_outliers(data.k.span(), seed + 2, outlier_std);
      add_outliers(data.v.span(), seed + 3, outlier_std);
    }
    const oracle::Result exact = oracle::attention(data, false);
    auto fp8 = [&](const ProblemData& in, bool block_scales, bool incoherent) {
      return flash_v3::fp8::attention_cpu(p, in.q.span(), in.k.span(), in.v.span(), block_scales, incoherent, seed);
    };
    for (const DType dtype : {DType::f16, DType::bf16}) {
      const ProblemData rounded = rounded_copy(data, dtype);
      const std::string type = dtype_name(dtype);
      print_row(inputs, type + " standard attention (S, P stored in " + type + ")",
                rmse(standard_attention(rounded, dtype), exact.o));
      for (const char* name : {"naive", "flash_v2", "flash_v3"}) {
        const Stage* stage = nullptr;
        for (const Stage& s : ladder())
          if (s.name == name) stage = &s;
        if (stage == nullptr || stage->find(Tier::cpu) == nullptr) continue;
        StageRun run = run_stage(*stage, Tier::cpu, rounded, RunSettings{});
        round_to_dtype(run.o.span(), dtype);
        print_row(inputs, type + " " + name + "/cpu (fp32 math" +
                              (std::string(name) == "flash_v3" ? ", P in bf16" : "") + ", O in " + type + ")",
                  rmse(run.o.span(), exact.o));
      }
    }
    print_row(inputs, "fp8 e4m3, per-tensor scales (baseline)", rmse(fp8(data, false, false), exact.o));
    print_row(inputs, "fp8 e4m3, per-tensor scales + incoherent processing", rmse(fp8(data, false, true), exact.o));
    print_row(inputs, "fp8 e4m3, block quantization", rmse(fp8(data, true, false), exact.o));
    print_row(inputs, "fp8 e4m3, block quantization + incoherent processing", rmse(fp8(data, true, true), exact.o));
  }
  return 0;
}

}  // namespace attn::tools
