// memory_efficient, GPU tier: checked against the fp64 oracle, this stage's CPU tier and the previous stage's
// GPU tier (naive) in f32, bf16 and f16, forward and backward, over awkward shapes, both layouts and several
// chunk sizes; large logits, empty causal rows, the O(N) scratch, and the chunk-size rule.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "memory_efficient/memory_efficient.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// Tolerances (relative Frobenius), per dtype. Inputs are rounded to the dtype before any tier sees them, so
// the oracle and every tier compute on identical values; what differs is the rounding inside and at the output:
// - f32: fp32 accumulation everywhere, expf and the combine's rescale each round once: 1e-5 forward, 1e-4
//   backward (the dS = P (dP - delta) cancellation), as on the CPU.
// - bf16 (unit roundoff 2^-8 = 3.9e-3): O, dQ, dK, dV are stored in bf16, a relative error of at most 3.9e-3
//   per element (about 2.3e-3 in the Frobenius norm); delta = rowsum(dO * O) is computed from the bf16 O, which
//   the cancellation in dP - delta amplifies: 1e-2 forward, 2e-2 backward.
// - f16 (unit roundoff 2^-11 = 4.9e-4): the same reasoning, 8x smaller: 2e-3 forward, 4e-3 backward.
// The LSE is fp32 in every dtype and is computed from the same rounded inputs: 1e-5 always.
// Against naive's GPU tier both sides carry their own rounding (naive also rounds P to the dtype before P V):
// twice the bounds.
struct Tolerance {
  DType dtype;
  double forward, backward;
};
const Tolerance kTolerances[] = {{DType::f32, 1e-5, 1e-4}, {DType::bf16, 1e-2, 2e-2}, {DType::f16, 2e-3, 4e-3}};
constexpr double kLseTolerance = 1e-5;

const Stage& stage() {
  static const Stage s = memory_efficient::describe();
  return s;
}

struct ChunkCase {
  const char* name;
  std::int64_t query, key;
};

// 1 x 1 (every key its own summary, one launch pair per query row), odd sizes, GPU-tile-unaligned sizes (the
// kernels tile by 32), and the paper's defaults (larger than every N here: one chunk).
const std::vector<ChunkCase> kChunkCases = {
    {"chunks 1 x 1", 1, 1},
    {"chunks 7 x 13", 7, 13},
    {"chunks 45 x 70", 45, 70},
    {"paper default chunks 1024 x 4096", memory_efficient::kDefaultQueryChunk, memory_efficient::kDefaultKeyChunk},
};

RunSettings settings_for(const ChunkCase& chunks, bool backward) {
  RunSettings settings;
  settings.backward = backward;
  settings.options.values["query_chunk"] = chunks.query;
  settings.options.values["key_chunk"] = chunks.key;
  return settings;
}

// Largest error seen per dtype, printed at the end so that the tolerances above can be judged.
struct WorstSeen {
  double o = 0, lse = 0, gradient = 0;
  void add(const Errors& e) {
    o = std::max(o, e.o.rel_frobenius);
    lse = std::max(lse, e.lse.rel_frobenius);
    gradient = std::max(gradient, e.worst_gradient());
  }
};

}  // namespace

TEST_CASE("memory_efficient/gpu matches the oracle, its CPU tier and naive/gpu in f32, bf16, f16",
          "[memory_efficient][gpu]") {
  const Stage* previous = previous_stage("memory_efficient", Tier::gpu);
  if (previous == nullptr) WARN("no previous stage with a GPU tier in this build: comparing with the oracle and CPU tier only");
  std::uint64_t seed = 300;
  for (const Tolerance& tol : kTolerances) {
    WorstSeen vs_oracle_worst, vs_cpu_worst, vs_previous_worst;
    for (const Shape& shape : awkward_shapes()) {
      for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
        const ProblemData data = make_problem_data(shape.problem, tol.dtype, layout, ++seed);
        const oracle::Result exact = oracle::attention(data, true);
        // This stage's CPU tier (fp32 on the same rounded inputs) and naive/gpu, once per problem.
        const StageRun cpu = run_stage(stage(), Tier::cpu, data, settings_for(kChunkCases.back(), true));
        StageRun naive_gpu;
        RunSettings naive_settings = settings_for(kChunkCases.back(), true);
        naive_settings.options = StageOptions{};  // naive takes no chunk options (and would refuse them)
        if (previous != nullptr) naive_gpu = run_stage(*previous, Tier::gpu, data, naive_settings);
        for (const ChunkCase& chunks : kChunkCases) {
          INFO(label(shape) << " " << dtype_name(tol.dtype) << " layout " << layout_name(layout) << ", " << chunks.name);
          const StageRun run = run_stage(stage(), Tier::gpu, data, settings_for(chunks, true));
          const Errors vs_oracle = compare_with_oracle(run, exact);
          vs_oracle_worst.add(vs_oracle);
          CHECK(vs_oracle.o.rel_frobenius < tol.forward);
          CHECK(vs_oracle.lse.rel_frobenius < kLseTolerance);
          CHECK(vs_oracle.worst_gradient() < tol.backward);
          const Errors vs_cpu = compare_runs(run, cpu);
          CHECK(vs_cpu.o.rel_frobenius < tol.forward);
          CHECK(vs_cpu.lse.rel_frobenius < kLseTolerance);
          if (shape.problem.seq_k == 1) {
            // Softmax over a single key: dQ and dK are exactly 0 (dS = P (dP - delta) with P = 1, delta = dP), and
            // each tier returns its own rounding noise (about 1e-7) for them, so their relative difference means
            // nothing. (The oracle's are exact zeros, against which the error above is absolute.) dV = dO still
            // compares relatively.
            CHECK(vs_cpu.dq.max_abs < 1e-4);
            CHECK(vs_cpu.dk.max_abs < 1e-4);
            CHECK(vs_cpu.dv.rel_frobenius < tol.backward);
          } else {
            vs_cpu_worst.add(vs_cpu);
            CHECK(vs_cpu.worst_gradient() < tol.backward);
          }
          if (previous != nullptr) {
            const Errors vs_previous = compare_runs(run, naive_gpu);
            vs_previous_worst.add(vs_previous);
            CHECK(vs_previous.o.rel_frobenius < 2 * tol.forward);
            CHECK(vs_previous.lse.rel_frobenius < 2 * kLseTolerance);
            CHECK(vs_previous.worst_gradient() < 2 * tol.backward);
          }
        }
      }
    }
    std::printf("memory_efficient/gpu %-4s worst rel. Frobenius error: vs fp64 oracle O %.2e LSE %.2e grad %.2e | "
                "vs CPU tier O %.2e grad %.2e | vs %s/gpu O %.2e grad %.2e\n",
                dtype_name(tol.dtype), vs_oracle_worst.o, vs_oracle_worst.lse, vs_oracle_worst.gradient, vs_cpu_worst.o,
                vs_cpu_worst.gradient, previous ? previous->name.c_str() : "-", vs_previous_worst.o,
                vs_previous_worst.gradient);
  }
}

TEST_CASE("memory_efficient/gpu: rows that see no key give zero output, -inf log-sum-exp and zero dQ",
          "[memory_efficient][gpu][small]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = 70;
  p.seq_k = 20;  // bottom-right aligned: rows 0..49 see nothing, row 50 sees key 0, ..., row 69 sees all
  p.head_dim = 32;
  p.causal = true;
  for (DType dtype : {DType::f32, DType::bf16}) {
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 7);
    for (const ChunkCase& chunks : {ChunkCase{"1 x 1", 1, 1}, ChunkCase{"40 x 7", 40, 7}, ChunkCase{"default", 1024, 4096}}) {
      INFO(dtype_name(dtype) << " chunks " << chunks.name);
      const StageRun run = run_stage(stage(), Tier::gpu, data, settings_for(chunks, true));
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        INFO("row " << i);
        if (i < 50) {
          CHECK(std::isinf(run.lse[i]));
          CHECK(run.lse[i] < 0);
          for (std::int64_t d = 0; d < p.head_dim; ++d) {
            CHECK(run.o[i * p.head_dim + d] == 0.0f);
            CHECK(run.dq[i * p.head_dim + d] == 0.0f);
          }
        } else {
          CHECK(std::isfinite(run.lse[i]));
        }
      }
      // Row 50 sees exactly one key: O equals V's first row (exactly representable in the dtype).
      for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(std::fabs(run.o[50 * p.head_dim + d] - data.v[d]) <= 1e-6f * std::fabs(data.v[d]));
    }
  }
}

TEST_CASE("memory_efficient/gpu: logits near 1e3 do not overflow", "[memory_efficient][gpu][small]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = 100;
  p.seq_k = 130;
  p.head_dim = 64;
  for (DType dtype : {DType::f32, DType::bf16}) {
    // Q ~ N(0, 40^2): logits with standard deviation 40, chunk maxes hundreds apart (see the CPU test).
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 11, 40.0f);
    const oracle::Result exact = oracle::attention(data, false);
    for (const ChunkCase& chunks : {ChunkCase{"3 x 5", 3, 5}, ChunkCase{"default", 1024, 4096}}) {
      INFO(dtype_name(dtype) << " chunks " << chunks.name);
      const StageRun run = run_stage(stage(), Tier::gpu, data, settings_for(chunks, false));
      const Errors e = compare_with_oracle(run, exact);
      CHECK(e.o.bad_values == 0);
      CHECK(e.lse.bad_values == 0);
      CHECK(e.o.rel_frobenius < (dtype == DType::f32 ? 1e-5 : 1e-2));  // as in the table above
    }
  }
}

TEST_CASE("memory_efficient/gpu scratch is one query chunk's summaries: linear in N, far below naive",
          "[memory_efficient][gpu][memory]") {
  const memory_efficient::Chunks chunks{256, 512};
  auto problem_of = [](std::int64_t n) {
    AttentionProblem p;
    p.batch = 1;
    p.q_heads = p.kv_heads = 4;
    p.seq_q = p.seq_k = n;
    p.head_dim = 128;
    return p;
  };
  RunSettings settings;
  settings.backward = true;
  settings.options.values["query_chunk"] = chunks.query;
  settings.options.values["key_chunk"] = chunks.key;
  const AttentionProblem small = problem_of(2048), large = problem_of(8192);
  const StageRun run_small = run_stage(stage(), Tier::gpu, make_problem_data(small, DType::bf16), settings);
  const StageRun run_large = run_stage(stage(), Tier::gpu, make_problem_data(large, DType::bf16), settings);
  std::printf("memory_efficient/gpu extra bytes (chunks 256 x 512, B=1 H=4 D=128 bf16): N=2048 fwd %zu bwd %zu; "
              "N=8192 fwd %zu bwd %zu\n",
              run_small.forward_extra_bytes, run_small.backward_extra_bytes, run_large.forward_extra_bytes,
              run_large.backward_extra_bytes);
  CHECK(run_small.forward_extra_bytes == memory_efficient::gpu_extra_bytes(small, chunks, false));
  CHECK(run_large.forward_extra_bytes == memory_efficient::gpu_extra_bytes(large, chunks, false));
  CHECK(run_small.backward_extra_bytes == memory_efficient::gpu_extra_bytes(small, chunks, true));
  CHECK(run_large.backward_extra_bytes == memory_efficient::gpu_extra_bytes(large, chunks, true));
  // 4x the sequence: 4x the summaries (Nk / Ck key chunks per row of a query chunk), not 16x.
  CHECK(run_large.forward_extra_bytes == 4 * run_small.forward_extra_bytes);
  CHECK(run_large.backward_extra_bytes == 4 * run_small.backward_extra_bytes);
  // Naive's GPU tier keeps S (fp32) and P (bf16) whole: 6 bytes per score, 1.6 GB here; ours 8.5 MB.
  const double naive_bytes = 6.0 * 4 * 8192.0 * 8192.0;
  CHECK(static_cast<double>(run_large.forward_extra_bytes) < naive_bytes / 100);
}

TEST_CASE("memory_efficient/gpu rejects chunk sizes below 1, naming the option", "[memory_efficient][gpu][validation]") {
  AttentionProblem p;
  p.seq_q = p.seq_k = 8;
  p.head_dim = 16;
  const ProblemData data = make_problem_data(p, DType::bf16);
  for (const char* option : {"query_chunk", "key_chunk"}) {
    INFO(option);
    RunSettings settings;
    settings.options.values[option] = 0;
    std::string message;
    try {
      run_stage(stage(), Tier::gpu, data, settings);
    } catch (const std::invalid_argument& e) {
      message = e.what();
    }
    CHECK(message.find(option) != std::string::npos);
    CHECK(message.find("must be >= 1") != std::string::npos);
  }
}
