// sparse, GPU tier: forward and backward against the fp64 oracle with the call's explicit mask (ReferenceMask,
// written plainly from sparsity.hpp), against sparse's CPU tier (the same masks and buckets from the same seed),
// and against dense flash_v2/gpu where sparsity is degenerate (nothing dropped, one bucket); awkward shapes, many
// tiles, GQA, rows and buckets that see nothing, very uneven buckets, the caller's index lists, the input rules.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "common/numeric.hpp"
#include "flash_v2/flash_v2.hpp"
#include "sparse/sparse.hpp"
#include "sparse/sparsity.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

struct Tolerance {
  double output, lse, gradient;
};

// The bounds of flash_v2/gpu's tests, for the same reasons (u = 2^-11 f16, 2^-8 bf16): P~, P and dS are rounded
// to the dtype to enter the tensor cores and O, dQ, dK, dV are stored in it, a relative Frobenius error of 1-2 u;
// the bounds (about 4 u f16, 2.5 u bf16) sit far below what a wrong mask, a wrong permutation or a missed tile
// gives (errors near 1, or NaN from the poisoned outputs). The mask changes which pairs are summed, not how.
Tolerance tolerance(DType dtype) { return dtype == DType::f16 ? Tolerance{2e-3, 1e-4, 3e-3} : Tolerance{1e-2, 1e-4, 1e-2}; }

const DType kDtypes[] = {DType::bf16, DType::f16};

bool gpu_takes(const AttentionProblem& p) {
  for (int d : sparse::gpu_caps().head_dims)
    if (d == p.head_dim) return true;
  return false;
}

StageOptions qk_options(int drop_q_permille, int drop_k_permille, std::uint64_t seed = 1) {
  StageOptions options;
  options.values = {{"mode", 0}, {"drop_q_permille", drop_q_permille}, {"drop_k_permille", drop_k_permille},
                    {"seed", static_cast<std::int64_t>(seed)}};
  return options;
}
StageOptions hash_options(int buckets, std::uint64_t seed = 1) {
  StageOptions options;
  options.values = {{"mode", 1}, {"buckets", buckets}, {"seed", static_cast<std::int64_t>(seed)}};
  return options;
}
std::string describe_options(const StageOptions& options) {
  std::string text;
  for (const auto& [name, value] : options.values) text += name + "=" + std::to_string(value) + " ";
  return text;
}

RunSettings settings_of(const StageOptions& options, bool backward) {
  RunSettings settings;
  settings.backward = backward;
  settings.options = options;
  return settings;
}

/// The oracle over the pairs the call keeps. With ATTN_SPARSE_TEST_BAD_FIXTURE=1 in the environment the mask is
/// drawn with another seed (a wrong fixture), which every comparison with the oracle must then fail.
oracle::Result masked_oracle(const ProblemData& data, const StageOptions& options, bool backward,
                             const sparse::KeepLists* lists = nullptr) {
  sparse::Settings settings = sparse::read_settings(options);
  if (const char* bad = std::getenv("ATTN_SPARSE_TEST_BAD_FIXTURE"); bad != nullptr && std::string(bad) == "1")
    settings.seed += 1;
  const sparse::ReferenceMask mask(data.problem, data.q.data(), data.q_strides(), data.k.data(), data.kv_strides(),
                                   settings, lists);
  return oracle::attention(data, backward,
                           [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) { return mask(b, h, i, j); });
}

std::string summary(const Errors& e) {
  return "O " + std::to_string(e.o.rel_frobenius) + " LSE " + std::to_string(e.lse.rel_frobenius) + " dQ " +
         std::to_string(e.dq.rel_frobenius) + " dK " + std::to_string(e.dk.rel_frobenius) + " dV " +
         std::to_string(e.dv.rel_frobenius);
}

// compare_dq = false skips dQ: where every key row is the same vector k, dQ_i = sum_j dS_ij k = k sum_j dS_ij = 0
// exactly (sum_j P_ij (dP_ij - D_i) = D_i - D_i), so both dQs are rounding noise and their relative error says
// nothing.
void check_within(const Errors& e, const Tolerance& tol, bool backward, double factor = 1.0, bool compare_dq = true) {
  CHECK(e.o.rel_frobenius < factor * tol.output);
  CHECK(e.lse.rel_frobenius < factor * tol.lse);
  if (backward) {
    if (compare_dq) CHECK(e.dq.rel_frobenius < factor * tol.gradient);
    CHECK(e.dk.rel_frobenius < factor * tol.gradient);
    CHECK(e.dv.rel_frobenius < factor * tol.gradient);
  }
}

/// Runs the GPU tier on data and checks it against the masked oracle and, where `with_cpu`, the CPU tier (which
/// computes in fp32 on the same rounded inputs, within 1e-4 of the oracle, so the same bounds hold).
StageRun check_against_references(const ProblemData& data, const StageOptions& options, bool with_cpu = true,
                                  bool compare_dq = true) {
  const Stage stage = sparse::describe();
  const Tolerance tol = tolerance(data.dtype);
  INFO(data.problem.describe() << " " << dtype_name(data.dtype) << " " << layout_name(data.layout) << " "
                               << describe_options(options));
  StageRun gpu = run_stage(stage, Tier::gpu, data, settings_of(options, true));
  const Errors vs_oracle = compare_with_oracle(gpu, masked_oracle(data, options, true));
  INFO("vs oracle: " << summary(vs_oracle));
  check_within(vs_oracle, tol, true, 1.0, compare_dq);
  if (with_cpu) {
    const StageRun cpu = run_stage(stage, Tier::cpu, data, settings_of(options, true));
    const Errors vs_cpu = compare_runs(gpu, cpu);
    INFO("vs sparse/cpu: " << summary(vs_cpu));
    check_within(vs_cpu, tol, true, 1.0, compare_dq);
  }
  return gpu;
}

AttentionProblem problem(std::int64_t batch, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t seq_q,
                         std::int64_t seq_k, std::int64_t head_dim, bool causal) {
  return problem_of(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal);
}

}  // namespace

TEST_CASE("sparse/gpu matches the masked oracle and sparse/cpu on awkward shapes, QK-sparse and hash-sparse, "
          "forward and backward",
          "[sparse][gpu]") {
  std::uint64_t seed = 1200;
  for (const Shape& shape : awkward_shapes()) {
    if (!gpu_takes(shape.problem)) {
      WARN("not run (head dim outside sparse/gpu's 32, 64, 96, 128): " << label(shape));
      continue;
    }
    for (Layout layout : {Layout::bhnd, Layout::bnhd})
      for (DType dtype : kDtypes)
        for (const StageOptions& options : {qk_options(300, 500, seed), hash_options(4, seed)})
          check_against_references(make_problem_data(shape.problem, dtype, layout, ++seed), options);
  }
}

TEST_CASE("sparse/gpu is right across many tiles: causal or not, Nq != Nk both ways, GQA, MQA, drop rates from 0 "
          "to 0.95, 2 to 16 buckets",
          "[sparse][gpu]") {
  // Lengths that are no multiple of the tiles (Br = 128 forward, 128 or 64 backward; Bc = 64 or 128), many tiles long,
  // so that the tile skipping, the partial masks and the scattered writes all run many times.
  const AttentionProblem problems[] = {
      problem(1, 4, 2, 1030, 1030, 64, true), problem(1, 4, 2, 777, 777, 128, false),
      problem(2, 2, 1, 300, 1100, 64, true),  problem(1, 3, 1, 1100, 290, 96, true),
      problem(1, 2, 2, 600, 650, 32, true),
  };
  const StageOptions settings[] = {qk_options(0, 0), qk_options(500, 500), qk_options(900, 200),
                                   qk_options(100, 950), hash_options(2), hash_options(8), hash_options(16)};
  std::uint64_t seed = 2200;
  for (const AttentionProblem& p : problems)
    for (const StageOptions& options : settings) {
      ++seed;
      const DType dtype = kDtypes[seed % 2];
      // sparse/cpu on every third case (the oracle bounds the rest); its time dominates these sizes.
      check_against_references(make_problem_data(p, dtype, Layout::bhnd, seed), options, seed % 3 == 0);
    }
}

TEST_CASE("sparse/gpu with more than 32 buckets, several tiles in some, and an R too large for shared memory",
          "[sparse][gpu]") {
  // The sort lists the tiles 32 buckets at a time and rank by rank: 34 and 40 buckets over 4500 rows (about 130
  // rows a bucket, so many buckets have two tiles and some three), nb / 2 odd (17: bucket_of) and a multiple of 4
  // (20: bucket_of_by_four), both with R in shared memory (up to 16 buckets R is a kernel argument instead).
  // The classification copies R to shared memory up to 40 KiB: with d = 128, 250 and 256 buckets (R of 125 and
  // 128 columns, 62.5 and 64 KiB) it reads R from global memory instead.
  struct Case {
    AttentionProblem problem;
    int buckets;
  };
  const Case cases[] = {{problem(1, 2, 1, 4500, 4500, 32, true), 34}, {problem(1, 2, 1, 4500, 4500, 32, true), 40},
                        {problem(1, 2, 1, 600, 600, 128, true), 250}, {problem(1, 2, 1, 600, 600, 128, false), 256}};
  std::uint64_t seed = 2800;
  for (const Case& c : cases) {
    ++seed;
    check_against_references(make_problem_data(c.problem, kDtypes[seed % 2], Layout::bhnd, seed),
                             hash_options(c.buckets, seed), false);
  }
}

TEST_CASE("sparse/gpu with nothing dropped, or one bucket, equals dense causal flash_v2/gpu within rounding",
          "[sparse][gpu]") {
  const AttentionProblem problems[] = {problem(2, 4, 2, 700, 700, 64, true), problem(1, 2, 1, 333, 513, 128, true),
                                       problem(1, 2, 2, 450, 300, 64, false)};
  std::uint64_t seed = 3200;
  for (const AttentionProblem& p : problems)
    for (DType dtype : kDtypes)
      for (const StageOptions& options : {qk_options(0, 0), hash_options(1)}) {
        const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, ++seed);
        INFO(p.describe() << " " << dtype_name(dtype) << " " << describe_options(options));
        const StageRun sparse_run = run_stage(sparse::describe(), Tier::gpu, data, settings_of(options, true));
        const StageRun dense = run_stage(flash_v2::describe(), Tier::gpu, data, settings_of({}, true));
        const Errors e = compare_runs(sparse_run, dense);
        INFO("vs flash_v2/gpu: " << summary(e));
        // Both are within the oracle bounds, so they differ by at most twice them.
        check_within(e, tolerance(dtype), true, 2.0);
      }
}

TEST_CASE("sparse/gpu: dropped queries give O = 0, LSE = -inf and dQ = 0, dropped keys dK = dV = 0",
          "[sparse][gpu][small]") {
  const AttentionProblem p = problem(1, 2, 1, 150, 90, 64, true);  // causal, Nq > Nk: rows 0..59 see nothing
  const StageOptions options = qk_options(400, 600, 7);
  const sparse::Settings settings = sparse::read_settings(options);
  for (DType dtype : kDtypes) {
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 11);
    const StageRun run = check_against_references(data, options, false);
    std::int64_t wrong = 0, dropped_queries = 0, dropped_keys = 0;
    for (std::int64_t h = 0; h < p.q_heads; ++h)
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        const std::int64_t row = h * p.seq_q + i;
        const bool kept = sparse::keep_row(settings.seed, sparse::query_stream(p.batch, p.q_heads, 0, h), i,
                                           settings.drop_q_permille);
        const bool sees_nothing = !kept || i < p.seq_q - p.seq_k;
        if (!sees_nothing) continue;
        dropped_queries += !kept;
        wrong += !(std::isinf(run.lse[row]) && run.lse[row] < 0);
        for (std::int64_t d = 0; d < p.head_dim; ++d)
          wrong += run.o[row * p.head_dim + d] != 0.0f || run.dq[row * p.head_dim + d] != 0.0f;
      }
    for (std::int64_t j = 0; j < p.seq_k; ++j) {
      if (sparse::keep_row(settings.seed, sparse::key_stream(p.batch, p.kv_heads, 0, 0), j, settings.drop_k_permille))
        continue;
      ++dropped_keys;
      for (std::int64_t d = 0; d < p.head_dim; ++d)
        wrong += run.dk[j * p.head_dim + d] != 0.0f || run.dv[j * p.head_dim + d] != 0.0f;
    }
    INFO(dtype_name(dtype) << ": " << dropped_queries << " dropped queries, " << dropped_keys << " dropped keys");
    CHECK(dropped_queries > 0);
    CHECK(dropped_keys > 0);
    CHECK(wrong == 0);
  }
}

TEST_CASE("sparse/gpu small cases for compute-sanitizer: QK-sparse and hash-sparse, GQA, causal and not",
          "[sparse][gpu][small]") {
  std::uint64_t seed = 4200;
  for (const AttentionProblem& p : {problem(1, 2, 1, 130, 200, 64, true), problem(2, 2, 2, 70, 70, 128, false)})
    for (const StageOptions& options : {qk_options(500, 300, seed), hash_options(4, seed)})
      check_against_references(make_problem_data(p, DType::bf16, Layout::bnhd, ++seed), options, false);
}

TEST_CASE("sparse/gpu: very uneven buckets (almost every row in one), buckets with no earlier key, every bucket "
          "empty but one",
          "[sparse][gpu][small]") {
  // Rows x = c + noise for one direction c: with noise_scale small, argmax [x R; -x R] is c's bucket for
  // almost every row (very uneven); with 0 noise every row lands there (every other bucket empty). The other
  // buckets' few rows are scattered, so many of their queries have no earlier key of their bucket.
  const AttentionProblem p = problem(1, 2, 1, 400, 400, 64, true);
  for (float noise_scale : {0.6f, 0.0f})
    for (DType dtype : kDtypes) {
      ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 77);
      for (std::span<float> x : {std::span<float>(data.q.data(), data.q.size()), std::span<float>(data.k.data(), data.k.size())}) {
        for (std::size_t e = 0; e < x.size(); ++e) {
          const float direction = (e % p.head_dim) % 3 == 0 ? 1.0f : -0.5f;
          x[e] = direction + noise_scale * x[e];
        }
        round_to_dtype(x, dtype);
      }
      INFO("noise " << noise_scale);
      check_against_references(data, hash_options(8, 5), true, noise_scale > 0.0f);
    }
}

TEST_CASE("sparse/gpu on the caller's index lists equals the masked oracle and sparse/cpu", "[sparse][gpu][small]") {
  const AttentionProblem p = problem(2, 2, 1, 140, 160, 64, true);
  const ProblemData data = make_problem_data(p, DType::f16, Layout::bhnd, 99);
  sparse::KeepLists lists;
  lists.query_offsets = {0};
  lists.key_offsets = {0};
  for (std::int64_t head = 0; head < p.batch * p.q_heads; ++head) {  // every third query, shifted per head
    for (std::int32_t i = static_cast<std::int32_t>(head); i < p.seq_q; i += 3) lists.query_indices.push_back(i);
    lists.query_offsets.push_back(static_cast<std::int64_t>(lists.query_indices.size()));
  }
  for (std::int64_t head = 0; head < p.batch * p.kv_heads; ++head) {  // keys 20..79 and every even one after
    for (std::int32_t j = 20; j < p.seq_k; j += j < 80 ? 1 : 2) lists.key_indices.push_back(j);
    lists.key_offsets.push_back(static_cast<std::int64_t>(lists.key_indices.size()));
  }
  // The tiers take lists through their functions, not the registry: wrap them as tier entries.
  Stage stage = sparse::describe();
  for (TierEntry& entry : stage.tiers) {
    const bool gpu = entry.tier == Tier::gpu;
    entry.forward = [&lists, gpu](const AttentionProblem& q, const AttentionTensors& t, StageOptions& o) {
      gpu ? sparse::forward_gpu(q, t, o, &lists) : sparse::forward_cpu(q, t, o, &lists);
    };
    entry.backward = [&lists, gpu](const AttentionProblem& q, const AttentionTensors& t, StageOptions& o) {
      gpu ? sparse::backward_gpu(q, t, o, &lists) : sparse::backward_cpu(q, t, o, &lists);
    };
  }
  const StageOptions options = qk_options(0, 0);
  const StageRun gpu = run_stage(stage, Tier::gpu, data, settings_of(options, true));
  const Errors vs_oracle = compare_with_oracle(gpu, masked_oracle(data, options, true, &lists));
  INFO("vs oracle: " << summary(vs_oracle));
  check_within(vs_oracle, tolerance(data.dtype), true);
  const StageRun cpu = run_stage(stage, Tier::cpu, data, settings_of(options, true));
  const Errors vs_cpu = compare_runs(gpu, cpu);
  INFO("vs sparse/cpu: " << summary(vs_cpu));
  check_within(vs_cpu, tolerance(data.dtype), true);
}

// The forward's counters are counted during the planning (spans_kernel), not by the forward kernel: with nothing
// dropped there is one bucket, the Q tiles are 128 sorted = original rows, and tile t's last query i sees keys
// [0, y) with y = min(Nk, max(0, i + Nk - Nq + 1)) (causal) or Nk: ceil(y / Bc) K/V tiles. With some queries and
// keys dropped the visible pairs are sparse/cpu's count of the same mask, exactly. With
// ATTN_SPARSE_TEST_BAD_FIXTURE=1 the expected tiles are counted with Q tiles of 64 rows and sparse/cpu runs with
// seed + 1 (wrong fixtures), and the checks must fail.
TEST_CASE("sparse/gpu counts the visible pairs and the tiles it visits before the forward kernel runs",
          "[sparse][gpu][small]") {
  const char* bad = std::getenv("ATTN_SPARSE_TEST_BAD_FIXTURE");
  const bool bad_fixture = bad != nullptr && std::string(bad) == "1";
  const std::int64_t query_tile = bad_fixture ? 64 : 128;
  const AttentionProblem problems[] = {problem(2, 4, 2, 700, 700, 64, true), problem(1, 2, 1, 333, 513, 64, true),
                                       problem(1, 2, 2, 450, 300, 64, true), problem(1, 2, 2, 450, 300, 64, false)};
  std::uint64_t seed = 3300;
  for (const AttentionProblem& p : problems)
    for (int block_cols : {64, 128}) {
      const ProblemData data = make_problem_data(p, DType::bf16, Layout::bhnd, ++seed);
      StageOptions options = qk_options(0, 0);
      options.values["block_cols"] = block_cols;
      INFO(p.describe() << " block_cols=" << block_cols);
      const StageRun run = run_stage(sparse::describe(), Tier::gpu, data, settings_of(options, false));
      double tiles = 0;
      for (std::int64_t row0 = 0; row0 < p.seq_q; row0 += query_tile) {
        const std::int64_t last = std::min(row0 + query_tile, p.seq_q) - 1;
        const std::int64_t y = p.causal ? std::clamp<std::int64_t>(last + p.seq_k - p.seq_q + 1, 0, p.seq_k) : p.seq_k;
        tiles += static_cast<double>((y + block_cols - 1) / block_cols);
      }
      const double heads = static_cast<double>(p.batch * p.q_heads);
      CHECK(run.counters.at("tiles_visited") == heads * tiles);
      CHECK(run.counters.at("visible_pairs") == heads * p.visible_pairs());
    }
  for (const AttentionProblem& p : {problem(2, 4, 2, 700, 700, 64, true), problem(1, 2, 1, 333, 513, 64, false)}) {
    const ProblemData data = make_problem_data(p, DType::bf16, Layout::bhnd, ++seed);
    const StageOptions options = qk_options(300, 500, seed);
    INFO(p.describe() << " " << describe_options(options));
    const StageRun gpu = run_stage(sparse::describe(), Tier::gpu, data, settings_of(options, false));
    const StageRun cpu = run_stage(sparse::describe(), Tier::cpu, data,
                                   settings_of(bad_fixture ? qk_options(300, 500, seed + 1) : options, false));
    CHECK(gpu.counters.at("visible_pairs") == cpu.counters.at("visible_pairs"));
    CHECK(gpu.counters.at("visible_pairs") > 0);
  }
}

// The backward on the forward's plan, handed over (SavedPlan through the functions, or the registry's option
// keep_plan = 1), against the backward that plans again: the plan is the same, so O, dK and dV are the same bits and
// dQ differs only in the order of its fp32 atomic additions (within rounding, far below what another mask gives).
// A plan made for another call is refused, naming what differs. With ATTN_SPARSE_TEST_BAD_FIXTURE=1 the backward
// that plans again draws its mask with seed + 1, and each refusal's fixture is wrong (the plan's own options and
// problem, no lists, another problem, a filled plan for the empty one): the comparisons and every refusal's check
// must then fail.
TEST_CASE("sparse/gpu's backward on the forward's saved plan gives the gradients of one that plans again, and a plan "
          "made for another call is refused",
          "[sparse][gpu][small]") {
  const char* bad = std::getenv("ATTN_SPARSE_TEST_BAD_FIXTURE");
  const bool bad_fixture = bad != nullptr && std::string(bad) == "1";
  const AttentionProblem p = problem(1, 2, 1, 300, 300, 64, true);
  std::uint64_t seed = 5100;
  for (const StageOptions& options : {qk_options(400, 300, seed), hash_options(4, seed)}) {
    const ProblemData data = make_problem_data(p, DType::bf16, Layout::bhnd, ++seed);
    INFO(describe_options(options));
    sparse::SavedPlan plan;
    Stage stage = sparse::describe();
    for (TierEntry& entry : stage.tiers) {
      if (entry.tier != Tier::gpu) continue;
      entry.forward = [&plan](const AttentionProblem& q, const AttentionTensors& t, StageOptions& o) {
        sparse::forward_gpu(q, t, o, nullptr, &plan);
      };
      entry.backward = [&plan](const AttentionProblem& q, const AttentionTensors& t, StageOptions& o) {
        sparse::backward_gpu(q, t, o, nullptr, &plan);
      };
    }
    const StageRun saved = run_stage(stage, Tier::gpu, data, settings_of(options, true));
    CHECK(!plan.empty());
    StageOptions keep = options;
    keep.values["keep_plan"] = 1;
    const StageRun registry = run_stage(sparse::describe(), Tier::gpu, data, settings_of(keep, true));
    StageOptions again = options;
    if (bad_fixture) again.values["seed"] += 1;
    const StageRun replanned = run_stage(sparse::describe(), Tier::gpu, data, settings_of(again, true));
    for (const StageRun* run : {&saved, &registry}) {
      const Errors e = compare_runs(*run, replanned);
      INFO((run == &saved ? "SavedPlan" : "keep_plan = 1") << " vs planned again: " << summary(e));
      CHECK(e.o.rel_frobenius < 1e-6);
      CHECK(e.dq.rel_frobenius < 1e-3);  // a few elements one bf16 step apart (about 4e-3 each) at most
      CHECK(e.dk.rel_frobenius < 1e-6);
      CHECK(e.dv.rel_frobenius < 1e-6);
    }

    // Refusals, before any work (the tensors are fakes): the plan is still the last forward's, of `p`.
    auto backward_message = [&](const AttentionProblem& q, const AttentionTensors& t, StageOptions o,
                                const sparse::KeepLists* lists, const sparse::SavedPlan& given) {
      return invalid_argument_message([&] { sparse::backward_gpu(q, t, o, lists, &given); });
    };
    const AttentionProblem longer_than_plan = problem(1, 2, 1, 301, 300, 64, true);
    const AttentionProblem longer = bad_fixture ? p : longer_than_plan;
    const std::string other_problem = backward_message(longer, fake_tensors(longer, DType::bf16), options, nullptr, plan);
    CHECK(other_problem.find("plan: made for another problem") != std::string::npos);
    StageOptions other_seed = options;
    if (!bad_fixture) other_seed.values["seed"] += 1;
    const std::string other_options = backward_message(p, fake_tensors(p, DType::bf16), other_seed, nullptr, plan);
    CHECK(other_options.find("plan: made with other options") != std::string::npos);
    const sparse::KeepLists lists{{0, 1, 2}, {0, 1}, {0, 1}, {0}};
    const std::string other_lists =
        backward_message(p, fake_tensors(p, DType::bf16), options, bad_fixture ? nullptr : &lists, plan);
    CHECK(other_lists.find("plan: made with other index lists") != std::string::npos);
    const AttentionProblem& same = bad_fixture ? longer_than_plan : p;
    const std::string other_tensors = backward_message(same, fake_tensors(same, DType::bf16), options, nullptr, plan);
    CHECK(other_tensors.find("plan: made from other Q or K tensors") != std::string::npos);
    const sparse::SavedPlan none;
    const std::string empty =
        backward_message(p, fake_tensors(p, DType::bf16), options, nullptr, bad_fixture ? plan : none);
    CHECK(empty.find("plan: empty") != std::string::npos);
    // Through the registry: a forward keeps its plan, and a backward with other options is refused.
    const Stage registry_stage = sparse::describe();
    PreparedRun run(registry_stage, Tier::gpu, data, true, keep);
    StageOptions forward_options = keep, backward_options = keep;
    if (!bad_fixture) backward_options.values["seed"] += 1;
    run.forward(forward_options);
    const std::string registry_message = invalid_argument_message([&] { run.backward(backward_options); });
    CHECK(registry_message.find("plan: made with other options") != std::string::npos);
  }
}

TEST_CASE("sparse/gpu refuses bad input with a message naming the argument, before any work", "[sparse][gpu]") {
  AttentionProblem p = problem(1, 2, 1, 64, 64, 64, true);
  const AttentionTensors tensors = fake_tensors(p, DType::bf16);
  auto forward_message = [&](const AttentionProblem& q, const AttentionTensors& t, StageOptions options,
                             const sparse::KeepLists* lists = nullptr) {
    return invalid_argument_message([&] { sparse::forward_gpu(q, t, options, lists); });
  };
  CHECK(forward_message(p, tensors, hash_options(3)).find("buckets") != std::string::npos);
  CHECK(forward_message(p, tensors, qk_options(1000, 0)).find("drop_q_permille") != std::string::npos);
  CHECK(forward_message(p, tensors, qk_options(0, -1)).find("drop_k_permille") != std::string::npos);
  StageOptions wide = qk_options(0, 0);
  wide.values["block_cols"] = 128;
  AttentionProblem d128 = problem(1, 2, 1, 64, 64, 128, true);
  CHECK(forward_message(d128, fake_tensors(d128, DType::bf16), wide).find("block_cols") != std::string::npos);
  AttentionProblem d256 = problem(1, 2, 1, 64, 64, 256, true);
  CHECK(forward_message(d256, fake_tensors(d256, DType::bf16), qk_options(0, 0)).find("head_dim") != std::string::npos);
  CHECK(forward_message(p, fake_tensors(p, DType::f32), qk_options(0, 0)).find("dtype") != std::string::npos);
  sparse::KeepLists unsorted{{0, 2, 2}, {5, 3}, {0, 1}, {4}};
  CHECK(forward_message(p, tensors, qk_options(0, 0), &unsorted).find("query_indices") != std::string::npos);
  sparse::KeepLists out_of_range{{0, 1, 1}, {3}, {0, 1}, {64}};
  CHECK(forward_message(p, tensors, qk_options(0, 0), &out_of_range).find("key_indices") != std::string::npos);
  StageOptions keep_two = qk_options(0, 0);
  keep_two.values["keep_plan"] = 2;
  CHECK(invalid_argument_message([&] {
          StageOptions o = keep_two;
          sparse::describe().find(Tier::gpu)->forward(p, tensors, o);
        }).find("keep_plan") != std::string::npos);
}
