// flash_v1 (FlashAttention, Algorithms 1 and 4), CPU tier: checked against the previous stage and the fp64
// oracle on the awkward shapes at several block sizes, its IO counter against the count the algorithm implies,
// and its option rules.
#include <cmath>
#include <stdexcept>
#include <string>

#include "flash_v1/flash_v1.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// fp32 with the online softmax: each K/V block rescales O_i by exp(m_old - m_new) and l_new / l_old, a few
// more roundings per element than standard attention's single pass; observed errors are ~3e-7. 1e-5 still
// catches any indexing or masking mistake (those give errors near 1).
constexpr double kForwardTolerance = 1e-5;
// The backward multiplies more rounded terms and cancels in dP - D_i: 1e-4, as for naive.
constexpr double kBackwardTolerance = 1e-4;
// Against the previous stage both sides carry rounding error: twice the oracle tolerances.
constexpr double kForwardVsPrevious = 2 * kForwardTolerance;
constexpr double kBackwardVsPrevious = 2 * kBackwardTolerance;

StageOptions blocks(std::int64_t Br, std::int64_t Bc) {
  StageOptions options;
  options.values["block_rows"] = Br;
  options.values["block_cols"] = Bc;
  return options;
}

void check_against_oracle(const StageRun& run, const ProblemData& data, bool backward) {
  const Errors e = compare_with_oracle(run, oracle::attention(data, backward));
  CHECK(e.o.bad_values == 0);
  CHECK(e.lse.bad_values == 0);
  CHECK(e.o.rel_frobenius < kForwardTolerance);
  CHECK(e.lse.rel_frobenius < kForwardTolerance);
  if (backward) {
    CHECK(e.dq.bad_values + e.dk.bad_values + e.dv.bad_values == 0);
    CHECK(e.worst_gradient() < kBackwardTolerance);
  }
}

// A plain find rather than a Catch matcher: the string matchers differ between Catch2 2.13 and 3.x.
void check_mentions(const std::string& message, const std::string& part) {
  INFO("message: " << message);
  CHECK(message.find(part) != std::string::npos);
}

}  // namespace

TEST_CASE("flash_v1/cpu matches the previous stage and the fp64 oracle on awkward shapes", "[flash_v1][cpu]") {
  const Stage& stage = find_stage("flash_v1");
  const Stage* previous = previous_stage("flash_v1", Tier::cpu);
  REQUIRE(previous != nullptr);
  RunSettings settings;
  settings.backward = true;
  std::uint64_t seed = 300;
  for (const Shape& shape : awkward_shapes()) {
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      INFO(label(shape) << " layout " << layout_name(layout) << ", previous stage " << previous->name);
      const ProblemData data = make_problem_data(shape.problem, DType::f32, layout, ++seed);
      const StageRun run = run_stage(stage, Tier::cpu, data, settings);
      check_against_oracle(run, data, true);
      const Errors e = compare_runs(run, run_stage(*previous, Tier::cpu, data, settings));
      CHECK(e.o.rel_frobenius < kForwardVsPrevious);
      CHECK(e.lse.rel_frobenius < kForwardVsPrevious);
      CHECK(e.worst_gradient() < kBackwardVsPrevious);
    }
  }
}

// The same shapes and layouts against the oracle alone: the course lab's grade, which must not depend on
// another stage (a blank memory_efficient cannot fail it).
TEST_CASE("flash_v1/cpu matches the fp64 oracle on awkward shapes (oracle only)", "[flash_v1][cpu][lab]") {
  const Stage& stage = find_stage("flash_v1");
  RunSettings settings;
  settings.backward = true;
  std::uint64_t seed = 350;
  for (const Shape& shape : awkward_shapes()) {
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      INFO(label(shape) << " layout " << layout_name(layout));
      const ProblemData data = make_problem_data(shape.problem, DType::f32, layout, ++seed);
      check_against_oracle(run_stage(stage, Tier::cpu, data, settings), data, true);
    }
  }
}

TEST_CASE("flash_v1/cpu gives the same answer for any block sizes, including Br = 1 and blocks larger than N",
          "[flash_v1][cpu][blocks]") {
  const Stage& stage = find_stage("flash_v1");
  const std::pair<std::int64_t, std::int64_t> sizes[] = {{1, 1}, {1, 16}, {7, 5}, {16, 64}, {64, 13}, {1000, 1000}};
  const std::vector<Shape> shapes = awkward_shapes();
  std::uint64_t seed = 400;
  for (const Shape& shape : shapes) {
    // The shapes with rows that see no key, Nq != Nk, GQA and D = 256 exercise every edge of the tiling.
    if (shape.problem.seq_q * shape.problem.seq_k > 10000) continue;
    for (auto [Br, Bc] : sizes) {
      INFO(label(shape) << " Br " << Br << " Bc " << Bc);
      const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
      RunSettings settings;
      settings.backward = true;
      settings.options = blocks(Br, Bc);
      check_against_oracle(run_stage(stage, Tier::cpu, data, settings), data, true);
    }
  }
}

TEST_CASE("flash_v1/cpu: logits near 1e3 do not overflow", "[flash_v1][cpu]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 150;
  p.head_dim = 64;
  p.causal = true;
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 11, 40.0f);  // logits up to ~1e3
  RunSettings settings;
  settings.backward = true;
  settings.options = blocks(16, 32);  // several K/V blocks, so that the running max really moves
  const StageRun run = run_stage(find_stage("flash_v1"), Tier::cpu, data, settings);
  const Errors e = compare_with_oracle(run, oracle::attention(data, true));
  CHECK(e.o.bad_values == 0);
  CHECK(e.o.rel_frobenius < kForwardTolerance);
  // The gradients of a near one-hot softmax are dominated by few terms: same tolerance as above.
  CHECK(e.worst_gradient() < kBackwardTolerance);
}

TEST_CASE("flash_v1 block sizes follow FA1 Alg. 1 line 1: Bc = ceil(M / 4d), Br = min(Bc, d)", "[flash_v1]") {
  // M in bytes; 4-byte floats: M = 64 KiB holds 16384 floats.
  CHECK(flash_v1::block_sizes(64 * 1024, 64).Bc == 64);
  CHECK(flash_v1::block_sizes(64 * 1024, 64).Br == 64);
  CHECK(flash_v1::block_sizes(64 * 1024, 128).Bc == 32);
  CHECK(flash_v1::block_sizes(64 * 1024, 128).Br == 32);
  CHECK(flash_v1::block_sizes(512 * 1024, 64).Bc == 512);
  CHECK(flash_v1::block_sizes(512 * 1024, 64).Br == 64);
  CHECK(flash_v1::block_sizes(1000, 16).Bc == 4);  // ceil(250 / 64)
  CHECK(flash_v1::block_sizes(1000, 16).Br == 4);
}

TEST_CASE("flash_v1/cpu IO counter: bytes between HBM and the tiles follow Algorithm 1 exactly", "[flash_v1][cpu][io]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = p.kv_heads = 3;
  p.seq_q = 50;
  p.seq_k = 70;
  p.head_dim = 32;
  const std::int64_t Br = 8, Bc = 16;
  const std::int64_t Tc = (p.seq_k + Bc - 1) / Bc;  // 5 K/V blocks
  RunSettings settings;
  settings.options = blocks(Br, Bc);
  settings.options.values["count_io"] = 1;
  const StageRun run = run_stage(find_stage("flash_v1"), Tier::cpu, make_problem_data(p), settings);
  // Per (batch, head), in floats: line 2 writes O, l, m (Nq (d + 2)); line 6 loads every K_j and V_j once
  // (2 Nk d); each of the Tc passes of the inner loop loads Q_i, O_i, l_i, m_i (line 8) and writes O_i, l_i,
  // m_i (lines 12-13): Nq (3d + 4); the final L = m + log(l) reads l, m and writes L (3 Nq).
  const double Nq = p.seq_q, Nk = p.seq_k, d = p.head_dim;
  const double per_head = Nq * (d + 2) + 2 * Nk * d + Tc * Nq * (3 * d + 4) + 3 * Nq;
  REQUIRE(run.counters.count("hbm_bytes") == 1);
  CHECK(run.counters.at("hbm_bytes") == 4.0 * p.batch * p.q_heads * per_head);
}

TEST_CASE("flash_v1/cpu IO falls as on-chip memory M grows (Theorem 2: Theta(N^2 d^2 / M))", "[flash_v1][cpu][io]") {
  AttentionProblem p;
  p.seq_q = p.seq_k = 512;
  p.head_dim = 32;
  const ProblemData data = make_problem_data(p);
  double previous_bytes = 0;
  for (std::int64_t M : {4096, 16384, 65536}) {
    RunSettings settings;
    settings.options.values["sram_bytes"] = M;
    settings.options.values["count_io"] = 1;
    const StageRun run = run_stage(find_stage("flash_v1"), Tier::cpu, data, settings);
    const double bytes = run.counters.at("hbm_bytes");
    INFO("M " << M << " bytes " << bytes << " previous " << previous_bytes);
    // 4x the memory: Bc grows 4x, so the dominant Tc N (3d + 4) term shrinks 4x; the O(N d) terms stay.
    if (previous_bytes > 0) CHECK(bytes < 0.5 * previous_bytes);
    previous_bytes = bytes;
  }
}

TEST_CASE("flash_v1/cpu counts nothing unless asked (count_io is off by default)", "[flash_v1][cpu][io]") {
  AttentionProblem p;
  p.seq_q = p.seq_k = 40;
  p.head_dim = 16;
  const StageRun run = run_stage(find_stage("flash_v1"), Tier::cpu, make_problem_data(p), RunSettings{});
  CHECK(run.counters.count("hbm_bytes") == 0);
}

TEST_CASE("flash_v1/cpu rejects bad block sizes and on-chip memory sizes, naming the option", "[flash_v1][cpu][validation]") {
  AttentionProblem p;
  p.seq_q = p.seq_k = 40;
  p.head_dim = 64;
  const ProblemData data = make_problem_data(p);
  auto message_of = [&](StageOptions options) -> std::string {
    RunSettings settings;
    settings.options = std::move(options);
    try {
      run_stage(find_stage("flash_v1"), Tier::cpu, data, settings);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "(no exception)";
  };
  StageOptions zero_rows = blocks(0, 16);
  check_mentions(message_of(zero_rows), "block_rows");
  StageOptions negative_cols = blocks(16, -3);
  check_mentions(message_of(negative_cols), "block_cols");
  StageOptions tiny_sram;
  tiny_sram.values["sram_bytes"] = 1000;  // below 4 rows of d = 64 floats (1024 bytes)
  check_mentions(message_of(tiny_sram), "sram_bytes");
  StageOptions zero_sram;
  zero_sram.values["sram_bytes"] = 0;
  check_mentions(message_of(zero_sram), "sram_bytes");
  StageOptions blocks_too_big = blocks(32, 32);
  blocks_too_big.values["sram_bytes"] = 16 * 1024;  // 2 (32 + 32) 64 floats = 32 KiB needed
  check_mentions(message_of(blocks_too_big), "sram_bytes");
  check_mentions(message_of(blocks_too_big), "block_rows");
}
