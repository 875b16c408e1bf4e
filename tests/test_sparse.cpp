// sparse (sparse causal flash attention), CPU tier: checked against the fp64 oracle under an explicit mask
// (sparse::ReferenceMask, each row's fate decided on its own from sparsity.hpp's rules, none of the tier's
// sorting or tiling), and against flash_v2 in the degenerate settings (nothing dropped, one bucket), on the
// awkward shapes; buckets all empty but one, very uneven buckets, rows that see nothing, drop rates 0 and 999
// per mille; the caller's index lists; the counters; every bad input.
#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "sparse/sparse.hpp"
#include "sparse/sparsity.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// As flash_v2's (the same fp32 steps on fewer pairs): observed ~3e-7 forward; 1e-5 catches any wrong mask (a
// pair attended that should not be, or the reverse, moves O by far more). The backward: 1e-4, as flash_v2's.
constexpr double kForwardTolerance = 1e-5;
constexpr double kBackwardTolerance = 1e-4;
// The degenerate settings run the same sums as flash_v2 in the same order: equal to ~1e-7; 1e-6 leaves room.
constexpr double kSameSumsTolerance = 1e-6;

StageOptions options_of(std::initializer_list<std::pair<const char*, std::int64_t>> values) {
  StageOptions options;
  for (const auto& [name, value] : values) options.values[name] = value;
  return options;
}

std::string describe(const StageOptions& options) {
  std::string text;
  for (const auto& [name, value] : options.values) text += name + "=" + std::to_string(value) + " ";
  return text;
}

// The sparsity settings every shape is tried with: QK-sparse at several rates, hash-sparse at several bucket
// counts, with tiles small enough that every shape spans several.
std::vector<StageOptions> sparsity_settings() {
  return {options_of({{"mode", 0}, {"drop_q_permille", 300}, {"drop_k_permille", 500}, {"block_rows", 16}, {"block_cols", 16}}),
          options_of({{"mode", 0}, {"drop_q_permille", 0}, {"drop_k_permille", 900}, {"block_rows", 8}, {"block_cols", 32}}),
          options_of({{"mode", 0}, {"drop_q_permille", 999}, {"drop_k_permille", 999}}),
          options_of({{"mode", 1}, {"buckets", 2}, {"block_rows", 16}, {"block_cols", 8}}),
          options_of({{"mode", 1}, {"buckets", 8}, {"block_rows", 16}, {"block_cols", 16}, {"seed", 7}}),
          options_of({{"mode", 1}, {"buckets", 64}})};
}

sparse::ReferenceMask reference_mask(const ProblemData& data, const StageOptions& options,
                                     const sparse::KeepLists* lists = nullptr) {
  return sparse::ReferenceMask(data.problem, data.q.data(), data.q_strides(), data.k.data(), data.kv_strides(),
                               sparse::read_settings(options), lists);
}

oracle::Result masked_oracle(const ProblemData& data, const StageOptions& options, bool backward,
                             const sparse::KeepLists* lists = nullptr) {
  const sparse::ReferenceMask mask = reference_mask(data, options, lists);
  return oracle::attention(data, backward, [&mask](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return mask(b, h, i, j);
  });
}

void check_against(const StageRun& run, const oracle::Result& exact, bool backward) {
  const Errors e = compare_with_oracle(run, exact);
  CHECK(e.o.bad_values == 0);
  CHECK(e.lse.bad_values == 0);  // -inf where the oracle has -inf, finite elsewhere
  CHECK(e.o.rel_frobenius < kForwardTolerance);
  CHECK(e.lse.rel_frobenius < kForwardTolerance);
  if (backward) {
    CHECK(e.dq.bad_values + e.dk.bad_values + e.dv.bad_values == 0);
    CHECK(e.worst_gradient() < kBackwardTolerance);
  }
}

StageRun run_sparse(const ProblemData& data, const StageOptions& options, bool backward) {
  RunSettings settings;
  settings.backward = backward;
  settings.options = options;
  return run_stage(find_stage("sparse"), Tier::cpu, data, settings);
}

// The tier called directly with the caller's index lists (run_stage has no way to pass them): outputs
// poisoned with NaN first, as the harness does.
StageRun run_with_lists(const ProblemData& data, const sparse::KeepLists& lists, StageOptions options, bool backward) {
  const AttentionProblem& p = data.problem;
  StageRun run;
  run.o = HostBuffer<float>(p.q_elements());
  run.lse = HostBuffer<float>(p.lse_elements());
  std::fill(run.o.begin(), run.o.end(), NAN);
  std::fill(run.lse.begin(), run.lse.end(), NAN);
  AttentionTensors t;
  t.q_strides = data.q_strides();
  t.kv_strides = data.kv_strides();
  t.q = data.q.data();
  t.k = data.k.data();
  t.v = data.v.data();
  t.o = run.o.data();
  t.lse = run.lse.data();
  sparse::forward_cpu(p, t, options, &lists);
  if (backward) {
    run.dq = HostBuffer<float>(p.q_elements());
    run.dk = HostBuffer<float>(p.kv_elements());
    run.dv = HostBuffer<float>(p.kv_elements());
    std::fill(run.dq.begin(), run.dq.end(), NAN);
    std::fill(run.dk.begin(), run.dk.end(), NAN);
    std::fill(run.dv.begin(), run.dv.end(), NAN);
    t.d_o = data.d_o.data();
    t.dq = run.dq.data();
    t.dk = run.dk.data();
    t.dv = run.dv.data();
    sparse::backward_cpu(p, t, options, &lists);
  }
  return run;
}

// Random index lists: each (batch, head) keeps each row with probability `keep`, and head 0 keeps none.
sparse::KeepLists random_lists(const AttentionProblem& p, double keep, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution kept(keep);
  sparse::KeepLists lists;
  lists.query_offsets.push_back(0);
  for (std::int64_t x = 0; x < p.batch * p.q_heads; ++x) {
    for (std::int32_t i = 0; i < p.seq_q; ++i)
      if (x > 0 && kept(rng)) lists.query_indices.push_back(i);
    lists.query_offsets.push_back(static_cast<std::int64_t>(lists.query_indices.size()));
  }
  lists.key_offsets.push_back(0);
  for (std::int64_t x = 0; x < p.batch * p.kv_heads; ++x) {
    for (std::int32_t j = 0; j < p.seq_k; ++j)
      if (kept(rng)) lists.key_indices.push_back(j);
    lists.key_offsets.push_back(static_cast<std::int64_t>(lists.key_indices.size()));
  }
  return lists;
}

// Rows of Q and K (in data's layout) replaced by `direction` plus a little noise, where pick(row) says so: such
// rows all hash to one bucket (the argmax over [x R, -x R] of nearly the same vector).
template <class Pick>
void align_rows(ProblemData& data, std::uint64_t seed, Pick pick) {
  const AttentionProblem& p = data.problem;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> direction(p.head_dim);
  for (float& value : direction) value = normal(rng);
  auto align = [&](HostBuffer<float>& x, const Strides& s, std::int64_t heads, std::int64_t length) {
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t n = 0; n < length; ++n) {
          if (!pick(n)) continue;
          float* row = x.data() + b * s.batch + h * s.head + n * s.seq;
          for (std::int64_t d = 0; d < p.head_dim; ++d) row[d] = direction[d] + 0.01f * normal(rng);
        }
  };
  align(data.q, data.q_strides(), p.q_heads, p.seq_q);
  align(data.k, data.kv_strides(), p.kv_heads, p.seq_k);
}

void check_mentions(const std::string& message, const std::string& part) {
  INFO("message: " << message);
  CHECK(message.find(part) != std::string::npos);
}

}  // namespace

TEST_CASE("sparse/cpu matches the masked fp64 oracle on awkward shapes, QK-sparse and hash-sparse, forward and backward",
          "[sparse][cpu]") {
  std::uint64_t seed = 1200;
  for (const Shape& shape : awkward_shapes()) {
    const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
    for (const StageOptions& options : sparsity_settings()) {
      INFO(label(shape) << ", " << describe(options));
      check_against(run_sparse(data, options, true), masked_oracle(data, options, true), true);
    }
  }
}

TEST_CASE("sparse/cpu reads inputs and writes outputs in the bnhd layout too", "[sparse][cpu]") {
  const ProblemData data = make_problem_data(problem_of(2, 6, 2, 50, 83, 64, true), DType::f32, Layout::bnhd, 31);
  for (const StageOptions& options : sparsity_settings()) {
    INFO(describe(options));
    check_against(run_sparse(data, options, true), masked_oracle(data, options, true), true);
  }
}

TEST_CASE("sparse/cpu with nothing dropped, or with one bucket, equals dense flash_v2", "[sparse][cpu][degenerate]") {
  std::uint64_t seed = 1300;
  for (const Shape& shape : awkward_shapes()) {
    const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
    RunSettings dense;
    dense.backward = true;
    dense.options = options_of({{"block_rows", 16}, {"block_cols", 32}});
    const StageRun flash_v2 = run_stage(find_stage("flash_v2"), Tier::cpu, data, dense);
    for (const StageOptions& options : {options_of({{"mode", 0}, {"block_rows", 16}, {"block_cols", 32}}),
                                        options_of({{"mode", 1}, {"buckets", 1}, {"block_rows", 16}, {"block_cols", 32}})}) {
      INFO(label(shape) << ", " << describe(options));
      const StageRun run = run_sparse(data, options, true);
      const Errors e = compare_runs(run, flash_v2);
      CHECK(e.o.bad_values + e.lse.bad_values == 0);
      CHECK(e.o.rel_frobenius < kSameSumsTolerance);
      CHECK(e.lse.rel_frobenius < kSameSumsTolerance);
      CHECK(e.worst_gradient() < kSameSumsTolerance);
      CHECK(run.counters.at("visible_fraction") == 1.0);
    }
  }
}

TEST_CASE("sparse/cpu: every bucket empty but one gives dense attention", "[sparse][cpu][buckets]") {
  for (bool causal : {false, true}) {
    ProblemData data = make_problem_data(problem_of(1, 2, 1, 70, 90, 32, causal), DType::f32, Layout::bhnd, 41);
    align_rows(data, 42, [](std::int64_t) { return true; });
    const StageOptions options = options_of({{"mode", 1}, {"buckets", 16}, {"block_rows", 16}, {"block_cols", 16}});
    INFO("causal " << causal);
    const StageRun run = run_sparse(data, options, true);
    CHECK(run.counters.at("visible_fraction") == 1.0);  // one bucket holds every row
    check_against(run, masked_oracle(data, options, true), true);
    check_against(run, oracle::attention(data, true), true);  // the dense oracle: the same pairs
  }
}

TEST_CASE("sparse/cpu: very uneven buckets (nine rows in ten in one bucket)", "[sparse][cpu][buckets]") {
  ProblemData data = make_problem_data(problem_of(2, 2, 2, 200, 200, 64, true), DType::f32, Layout::bhnd, 51);
  align_rows(data, 52, [](std::int64_t n) { return n % 10 != 3; });
  for (std::int64_t buckets : {4, 16}) {
    const StageOptions options = options_of({{"mode", 1}, {"buckets", buckets}, {"block_rows", 32}, {"block_cols", 16}});
    INFO(describe(options));
    check_against(run_sparse(data, options, true), masked_oracle(data, options, true), true);
  }
}

TEST_CASE("sparse/cpu: queries that see no key (dropped, or no earlier key in their bucket) give O = 0, LSE = -inf, "
          "dQ = 0, and dropped keys give dK = dV = 0", "[sparse][cpu][empty]") {
  // Causal with Nq > Nk and many buckets: the first queries of each bucket have no earlier key in it.
  const ProblemData data = make_problem_data(problem_of(1, 2, 2, 90, 40, 16, true), DType::f32, Layout::bhnd, 61);
  for (const StageOptions& options : {options_of({{"mode", 1}, {"buckets", 32}, {"block_rows", 16}, {"block_cols", 16}}),
                                      options_of({{"mode", 0}, {"drop_q_permille", 500}, {"drop_k_permille", 700}})}) {
    INFO(describe(options));
    const StageRun run = run_sparse(data, options, true);
    const oracle::Result exact = masked_oracle(data, options, true);
    check_against(run, exact, true);
    const AttentionProblem& p = data.problem;
    std::int64_t empty_rows = 0, silent_keys = 0;
    for (std::int64_t row = 0; row < p.lse_elements(); ++row) {
      if (!std::isinf(exact.lse[row])) continue;
      ++empty_rows;
      CHECK(run.lse[row] == -INFINITY);
      for (std::int64_t d = 0; d < p.head_dim; ++d) {
        CHECK(run.o[row * p.head_dim + d] == 0.0f);
        CHECK(run.dq[row * p.head_dim + d] == 0.0f);
      }
    }
    const sparse::ReferenceMask mask = reference_mask(data, options);
    for (std::int64_t h = 0; h < p.kv_heads; ++h)
      for (std::int64_t j = 0; j < p.seq_k; ++j) {
        bool seen = false;
        for (std::int64_t i = 0; i < p.seq_q && !seen; ++i) seen = j < p.visible_keys(i) && mask(0, h, i, j);
        if (seen) continue;
        ++silent_keys;
        for (std::int64_t d = 0; d < p.head_dim; ++d) {
          CHECK(run.dk[(h * p.seq_k + j) * p.head_dim + d] == 0.0f);
          CHECK(run.dv[(h * p.seq_k + j) * p.head_dim + d] == 0.0f);
        }
      }
    CHECK(empty_rows > 0);   // the fixture really has such rows
    CHECK(silent_keys > 0);
  }
}

TEST_CASE("sparse/cpu with drop rate 999 per mille keeps about one row in a thousand, and 0 keeps all",
          "[sparse][cpu][rates]") {
  const ProblemData data = make_problem_data(problem_of(1, 4, 2, 3000, 3000, 16, false), DType::f32, Layout::bhnd, 71);
  const StageOptions sparse_options = options_of({{"mode", 0}, {"drop_q_permille", 999}, {"drop_k_permille", 999}});
  const StageRun run = run_sparse(data, sparse_options, true);
  check_against(run, masked_oracle(data, sparse_options, true), true);
  // Expected kept pairs: 4 heads x (3 of 3000 queries) x (3 of 3000 keys) = 36 at most a few times off.
  CHECK(run.counters.at("visible_pairs") < 400);
  const StageOptions keep_all = options_of({{"mode", 0}, {"drop_q_permille", 0}, {"drop_k_permille", 0}});
  CHECK(run_sparse(data, keep_all, false).counters.at("visible_fraction") == 1.0);
}

TEST_CASE("sparse/cpu counts visible pairs as the reference mask does, and skips tiles that cannot meet",
          "[sparse][cpu][counters]") {
  const ProblemData data = make_problem_data(problem_of(2, 4, 2, 300, 300, 32, true), DType::f32, Layout::bhnd, 81);
  const AttentionProblem& p = data.problem;
  for (const StageOptions& options : {options_of({{"mode", 1}, {"buckets", 8}, {"block_rows", 16}, {"block_cols", 16}}),
                                      options_of({{"mode", 0}, {"drop_q_permille", 500}, {"drop_k_permille", 500}})}) {
    INFO(describe(options));
    const StageRun run = run_sparse(data, options, false);
    const sparse::ReferenceMask mask = reference_mask(data, options);
    double pairs = 0;
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t h = 0; h < p.q_heads; ++h)
        for (std::int64_t i = 0; i < p.seq_q; ++i)
          for (std::int64_t j = 0; j < p.visible_keys(i); ++j) pairs += mask(b, h, i, j) ? 1 : 0;
    CHECK(run.counters.at("visible_pairs") == pairs);
    CHECK(run.counters.at("visible_fraction") == pairs / (p.batch * p.q_heads * p.visible_pairs()));
    CHECK(run.counters.at("tiles_visited") < run.counters.at("tiles_total"));
  }
}

TEST_CASE("sparse/cpu extra memory grows linearly with N and stays within the tier's estimate", "[sparse][cpu][memory]") {
  const TierEntry& cpu = *find_stage("sparse").find(Tier::cpu);
  for (const StageOptions& options : {options_of({{"mode", 0}, {"drop_q_permille", 500}, {"drop_k_permille", 500}}),
                                      options_of({{"mode", 1}, {"buckets", 8}})}) {
    auto extra = [&](std::int64_t n) {
      const ProblemData data = make_problem_data(problem_of(1, 2, 2, n, n, 32, true));
      const StageRun run = run_sparse(data, options, true);
      INFO(describe(options) << "N = " << n << ": forward " << run.forward_extra_bytes << " B, backward "
                             << run.backward_extra_bytes << " B");
      CHECK(run.forward_extra_bytes <= cpu.extra_bytes(data.problem, DType::f32, false, options));
      CHECK(run.backward_extra_bytes <= cpu.extra_bytes(data.problem, DType::f32, true, options));
      return std::pair<double, double>(static_cast<double>(run.forward_extra_bytes), static_cast<double>(run.backward_extra_bytes));
    };
    const auto [forward_small, backward_small] = extra(256);
    const auto [forward_large, backward_large] = extra(1024);
    // O(N) buffers (the plan, the gathered rows, dQ buffers) grow 4x with 4x N; an N x N matrix would grow 16x.
    CHECK(forward_large <= 4.0 * forward_small);
    CHECK(backward_large <= 4.0 * backward_small);
  }
}

TEST_CASE("sparse/cpu on the caller's index lists matches the masked oracle (empty lists included)",
          "[sparse][cpu][lists]") {
  std::uint64_t seed = 1400;
  for (const Shape& shape : awkward_shapes()) {
    const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
    for (double keep : {0.3, 1.0}) {
      INFO(label(shape) << ", keep " << keep);
      const sparse::KeepLists lists = random_lists(shape.problem, keep, seed);
      const StageOptions options = options_of({{"block_rows", 16}, {"block_cols", 16}, {"mode", 1}});  // mode ignored
      check_against(run_with_lists(data, lists, options, true), masked_oracle(data, options, true, &lists), true);
    }
  }
}

TEST_CASE("sparse rejects bad options, naming the option and the rule", "[sparse][cpu][validation]") {
  const ProblemData data = make_problem_data(problem_of(1, 1, 1, 40, 40, 64, true));
  auto message_of = [&](const std::string& name, std::int64_t value, bool backward) {
    return invalid_argument_message([&] {
      RunSettings settings;
      settings.backward = backward;
      settings.options.values[name] = value;
      run_stage(find_stage("sparse"), Tier::cpu, data, settings);
    });
  };
  check_mentions(message_of("mode", 2, false), "mode: must be 0 (QK-sparse) or 1 (hash-sparse), got 2");
  check_mentions(message_of("drop_q_permille", -1, false), "drop_q_permille: must be a drop rate in per mille in [0, 1000)");
  check_mentions(message_of("drop_q_permille", 1000, true), "drop_q_permille: must be a drop rate");
  check_mentions(message_of("drop_k_permille", 1000, false), "drop_k_permille: must be a drop rate");
  check_mentions(message_of("buckets", 0, false), "buckets: must be 1 or an even number of buckets up to 1024, got 0");
  check_mentions(message_of("buckets", 3, false), "buckets: must be 1 or even");
  check_mentions(message_of("buckets", 2048, true), "buckets: must be 1 or an even number");
  check_mentions(message_of("seed", -5, false), "seed: must be a non-negative integer");
  check_mentions(message_of("block_rows", 0, false), "block_rows: must be >= 1");
  check_mentions(message_of("block_cols", -1, true), "block_cols: must be >= 1");
  check_mentions(message_of("buckt", 8, false), "buckt");  // a misspelled option is refused by name
}

TEST_CASE("sparse rejects bad index lists before any work, naming the list and the rule", "[sparse][cpu][validation]") {
  const AttentionProblem p = problem_of(1, 2, 1, 10, 12, 16, true);
  // Fake tensors are never dereferenced: a rule broken must throw before the tier touches memory.
  const AttentionTensors fake = fake_tensors(p, DType::f32);
  auto good = [] {
    sparse::KeepLists lists;
    lists.query_offsets = {0, 2, 3};
    lists.query_indices = {1, 5, 9};
    lists.key_offsets = {0, 2};
    lists.key_indices = {0, 11};
    return lists;
  };
  auto message_of = [&](auto&& edit) {
    sparse::KeepLists lists = good();
    edit(lists);
    const std::string validated = invalid_argument_message([&] { sparse::validate_keep_lists(p, lists); });
    if (validated.empty()) return validated;  // good lists: the passes would run (on memory that is not there)
    StageOptions options;
    const std::string forward = invalid_argument_message([&] { sparse::forward_cpu(p, fake, options, &lists); });
    const std::string backward = invalid_argument_message([&] { sparse::backward_cpu(p, fake, options, &lists); });
    CHECK(forward == validated);
    CHECK(backward == validated);
    return validated;
  };
  CHECK(message_of([](sparse::KeepLists&) {}).empty());
  check_mentions(message_of([](sparse::KeepLists& l) { l.query_offsets = {0, 3}; }),
                 "query_offsets: must have B * Hq + 1 = 3 entries, got 2");
  check_mentions(message_of([](sparse::KeepLists& l) { l.key_offsets = {0, 1, 2}; }),
                 "key_offsets: must have B * Hkv + 1 = 2 entries, got 3");
  check_mentions(message_of([](sparse::KeepLists& l) { l.query_offsets = {1, 2, 3}; }), "query_offsets: must start at 0");
  check_mentions(message_of([](sparse::KeepLists& l) { l.query_offsets = {0, 3, 2}; }), "query_offsets: must be non-decreasing");
  check_mentions(message_of([](sparse::KeepLists& l) { l.key_offsets = {0, 1}; }),
                 "key_offsets: the last entry must equal the length of key_indices (2), got 1");
  check_mentions(message_of([](sparse::KeepLists& l) { l.query_indices[2] = 10; }),
                 "query_indices: entry 2 (list 1) is 10, out of range [0, seq_q = 10)");
  check_mentions(message_of([](sparse::KeepLists& l) { l.key_indices[0] = -1; }), "key_indices: entry 0 (list 0) is -1, out of range");
  check_mentions(message_of([](sparse::KeepLists& l) { l.query_indices = {5, 1, 9}; }),
                 "query_indices: list 0 must be strictly ascending (sorted, no duplicates), but entry 1 (1) follows 5");
  check_mentions(message_of([](sparse::KeepLists& l) { l.key_indices = {4, 4}; }),
                 "key_indices: list 0 must be strictly ascending (sorted, no duplicates), but entry 1 (4) follows 4");
}

TEST_CASE("sparse: the hash puts a row and a positive multiple of it in the same bucket, and uses every bucket",
          "[sparse][cpu][hash]") {
  const int D = 32, buckets = 16;
  std::vector<float> projection;
  for (int d = 0; d < D; ++d)
    for (int c = 0; c < buckets / 2; ++c) projection.push_back(sparse::projection_entry(3, d, c));
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int> used(buckets, 0);
  for (int row = 0; row < 2000; ++row) {
    std::vector<float> x(D), scaled(D);
    for (int d = 0; d < D; ++d) scaled[d] = 4.0f * (x[d] = normal(rng));
    const int bucket = sparse::bucket_of(x.data(), D, buckets, projection.data());
    REQUIRE(bucket >= 0);
    REQUIRE(bucket < buckets);
    CHECK(sparse::bucket_of(scaled.data(), D, buckets, projection.data()) == bucket);
    ++used[bucket];
  }
  for (int c = 0; c < buckets; ++c) CHECK(used[c] > 2000 / buckets / 4);  // roughly balanced on random rows
}
