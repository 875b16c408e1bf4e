// paged, CPU tier: the block manager (fork, copy-on-write, free, exhaustion, preemption, and a randomized run
// checking ownership and contents after every operation), the input rules, and decode through block tables
// against the previous stage run on the same sequences laid out contiguously, and against the fp64 oracle.
#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "paged/paged.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::paged;
using namespace attn::testing;

namespace {

// Paged and contiguous decode are both fp32 with max subtraction; they differ only in summation order
// (per cache block, per partition). Rounding is ~6e-8 per operation, growing with sqrt(context); 1e-5 still
// catches any wrong block, offset or head (those give errors near 1).
constexpr double kTolerance = 1e-5;

// Against the previous stage of the ladder, whatever it is: paged's own bound plus the previous stage's distance
// from the oracle on the same inputs (a stage that rounds P to bf16, as flash_v3's CPU tier does by default, is
// 1e-3 from the oracle; an fp32 one 1e-7), so that the comparison checks paged, not the neighbour's precision.
double bound_against(const StageRun& previous, const oracle::Result& exact, bool lse) {
  const Errors e = compare_with_oracle(previous, exact);
  return kTolerance + (lse ? e.lse.rel_frobenius : e.o.rel_frobenius);
}

/// Checks the manager's books from the outside: every block's reference count equals the number of block
/// tables holding it, the free list holds exactly the blocks with count 0, once each, and every table has
/// ceil(length / block_size) entries.
void check_ownership(const BlockManager& m) {
  std::vector<int> holders(static_cast<std::size_t>(m.num_blocks()), 0);
  for (SequenceId id : m.sequences()) {
    const auto& table = m.block_table(id);
    REQUIRE(static_cast<std::int64_t>(table.size()) == (m.length(id) + m.block_size() - 1) / m.block_size());
    std::set<BlockId> distinct(table.begin(), table.end());
    REQUIRE(distinct.size() == table.size());  // a sequence never holds one block twice
    for (BlockId b : table) ++holders[b];
  }
  std::vector<int> on_free_list(static_cast<std::size_t>(m.num_blocks()), 0);
  for (BlockId b : m.free_list()) ++on_free_list[b];
  for (BlockId b = 0; b < m.num_blocks(); ++b) {
    INFO("block " << b);
    REQUIRE(m.ref_count(b) == holders[b]);
    REQUIRE(on_free_list[b] == (holders[b] == 0 ? 1 : 0));  // not leaked, not free while owned, not listed twice
  }
}

}  // namespace

// ---- block manager ----------------------------------------------------------------------------------------

TEST_CASE("paged: appending takes a new block each time the last one fills, slot = block * size + offset", "[paged][blocks]") {
  BlockManager m(8, 4);
  const SequenceId s = m.add_sequence();
  const AppendResult first = m.append(s, 6);
  REQUIRE(m.block_table(s) == std::vector<BlockId>{0, 1});
  REQUIRE(first.slots == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5});
  REQUIRE(first.copies.empty());
  const AppendResult second = m.append(s, 3);  // fills block 1 (slots 6, 7), then block 2 (slot 8)
  REQUIRE(second.slots == std::vector<std::int64_t>{6, 7, 8});
  REQUIRE(m.free_block_count() == 5);
  REQUIRE(m.length(s) == 9);
  check_ownership(m);
}

TEST_CASE("paged: fork shares every block, takes none, and raises reference counts", "[paged][blocks]") {
  BlockManager m(8, 4);
  const SequenceId parent = m.add_sequence();
  m.append(parent, 10);
  const SequenceId child = m.fork(parent);
  REQUIRE(m.block_table(child) == m.block_table(parent));
  REQUIRE(m.free_block_count() == 5);
  for (BlockId b : m.block_table(parent)) REQUIRE(m.ref_count(b) == 2);
  check_ownership(m);
}

TEST_CASE("paged: copy-on-write copies a shared, partly filled last block before writing to it", "[paged][blocks]") {
  BlockManager m(8, 4);
  const SequenceId parent = m.add_sequence();
  m.append(parent, 6);  // blocks 0 (full), 1 (2 of 4 used)
  const SequenceId child = m.fork(parent);
  REQUIRE(m.blocks_needed(child, 1) == 1);
  const AppendResult r = m.append(child, 1);
  REQUIRE(r.copies.size() == 1);
  REQUIRE(r.copies[0].source == 1);
  const BlockId copy = r.copies[0].destination;
  REQUIRE(m.block_table(child) == std::vector<BlockId>{0, copy});
  REQUIRE(m.block_table(parent) == std::vector<BlockId>{0, 1});
  REQUIRE(r.slots == std::vector<std::int64_t>{copy * 4 + 2});  // the child's 7th token, in its own copy
  REQUIRE(m.ref_count(0) == 2);
  REQUIRE(m.ref_count(1) == 1);
  // The parent is now the only holder of block 1: its own append writes in place, no copy.
  REQUIRE(m.append(parent, 1).copies.empty());
  check_ownership(m);
}

TEST_CASE("paged: a shared last block that is full is not copied: the append opens a new block", "[paged][blocks]") {
  BlockManager m(8, 4);
  const SequenceId parent = m.add_sequence();
  m.append(parent, 8);
  const SequenceId child = m.fork(parent);
  const AppendResult r = m.append(child, 1);
  REQUIRE(r.copies.empty());
  REQUIRE(m.block_table(child).size() == 3);
  REQUIRE(m.ref_count(m.block_table(child)[2]) == 1);
  check_ownership(m);
}

TEST_CASE("paged: free returns only the blocks no other sequence holds", "[paged][blocks]") {
  BlockManager m(8, 4);
  const SequenceId parent = m.add_sequence();
  m.append(parent, 8);
  const SequenceId child = m.fork(parent);
  m.append(child, 4);  // one private block
  m.free(parent);
  REQUIRE(m.free_block_count() == 5);
  for (BlockId b : m.block_table(child)) REQUIRE(m.ref_count(b) == 1);
  m.free(child);
  REQUIRE(m.free_block_count() == 8);
  REQUIRE_THROWS_AS(m.free(child), std::invalid_argument);
  check_ownership(m);
}

TEST_CASE("paged: an exhausted pool throws PoolExhausted with the shortfall and changes nothing", "[paged][blocks]") {
  BlockManager m(4, 4);
  const SequenceId a = m.add_sequence();
  m.append(a, 13);  // 4 blocks: the pool is full
  const std::vector<BlockId> table = m.block_table(a);
  const SequenceId b = m.add_sequence();
  REQUIRE_FALSE(m.can_append(b, 1));
  try {
    m.append(b, 5);
    FAIL("no exception");
  } catch (const PoolExhausted& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("needs 2 free blocks") != std::string::npos);
    CHECK(message.find("0 of 4") != std::string::npos);
  }
  REQUIRE(m.length(b) == 0);
  REQUIRE(m.block_table(a) == table);
  // Filling the last block's free slots needs no new block.
  REQUIRE(m.append(a, 3).slots.size() == 3);
  REQUIRE_THROWS_AS(m.append(a, 1), PoolExhausted);
  check_ownership(m);
}

TEST_CASE("paged: copy-on-write counts against the pool: a fork cannot append into a full pool", "[paged][blocks]") {
  BlockManager m(2, 4);
  const SequenceId parent = m.add_sequence();
  m.append(parent, 6);
  const SequenceId child = m.fork(parent);
  REQUIRE(m.blocks_needed(child, 1) == 1);
  REQUIRE_THROWS_AS(m.append(child, 1), PoolExhausted);
  check_ownership(m);
}

TEST_CASE("paged: preemption frees a sequence's blocks and reports its tokens for recomputation", "[paged][blocks]") {
  BlockManager m(6, 4);
  const SequenceId a = m.add_sequence(), b = m.add_sequence();
  m.append(a, 10);
  m.append(b, 12);
  REQUIRE_FALSE(m.can_append(a, 3));
  const Preempted p = m.preempt(b);
  REQUIRE(p.sequence == b);
  REQUIRE(p.tokens_to_recompute == 12);
  REQUIRE(m.length(b) == 0);
  REQUIRE(m.block_table(b).empty());
  REQUIRE(m.append(a, 3).slots.size() == 3);
  REQUIRE(m.append(b, 4).slots.size() == 4);  // recomputation refills the preempted sequence
  check_ownership(m);
}

TEST_CASE("paged: a shuffled pool hands out blocks in a seeded, scattered order", "[paged][blocks]") {
  BlockManager plain(64, 16), shuffled(64, 16, 5), same(64, 16, 5), other(64, 16, 6);
  std::vector<std::vector<BlockId>> tables;
  for (BlockManager* m : {&plain, &shuffled, &same, &other}) {
    const SequenceId s = m->add_sequence();
    m->append(s, 64 * 16);
    tables.push_back(m->block_table(s));
  }
  std::vector<BlockId> ascending(64);
  for (BlockId b = 0; b < 64; ++b) ascending[b] = b;
  REQUIRE(tables[0] == ascending);
  REQUIRE(tables[1] != ascending);
  REQUIRE(tables[1] == tables[2]);
  REQUIRE(tables[1] != tables[3]);
  REQUIRE(std::is_permutation(tables[1].begin(), tables[1].end(), ascending.begin()));
}

TEST_CASE("paged: thousands of random operations never leak or double-own a block, and every token reads back",
          "[paged][blocks][random]") {
  // Each token's K row is (sequence tag, position, head, d) encoded as floats; V is its negative. After every
  // operation, each live sequence is read back through its block table and compared with its own history.
  const CacheGeometry g{48, 4, 2, 3};
  BlockManager m(g.num_blocks, g.block_size, 99);
  HostKVCache cache(g);
  std::map<SequenceId, std::vector<float>> expected;  // per sequence: token values, one per token
  std::mt19937_64 random(2024);
  float next_value = 1.0f;
  int exhausted = 0, copies = 0;

  auto write = [&](SequenceId s, std::int64_t tokens) {
    const AppendResult r = m.append(s, tokens);  // may throw PoolExhausted: then nothing changed
    copies += static_cast<int>(r.copies.size());
    copy_blocks_cpu(g, r.copies, cache.k(), cache.v());
    std::vector<float> k(static_cast<std::size_t>(tokens * g.kv_heads * g.head_dim)), v(k.size());
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t i = 0; i < g.kv_heads * g.head_dim; ++i) {
        k[t * g.kv_heads * g.head_dim + i] = next_value + 0.001f * static_cast<float>(i);
        v[t * g.kv_heads * g.head_dim + i] = -k[t * g.kv_heads * g.head_dim + i];
      }
      expected[s].push_back(next_value);
      next_value += 1.0f;
    }
    write_to_cache_cpu(g, NewTokens{tokens, k.data(), v.data(), g.kv_heads * g.head_dim, g.head_dim}, r.slots, cache.k(), cache.v());
  };
  auto check_contents = [&]() {
    for (const auto& [s, values] : expected) {
      REQUIRE(m.length(s) == static_cast<std::int64_t>(values.size()));
      const auto& table = m.block_table(s);
      for (std::size_t t = 0; t < values.size(); ++t) {
        const BlockId block = table[t / g.block_size];
        for (std::int64_t h = 0; h < g.kv_heads; ++h) {
          for (std::int64_t d = 0; d < g.head_dim; ++d) {
            const float want = values[t] + 0.001f * static_cast<float>(h * g.head_dim + d);
            const std::int64_t at = g.row(block, h, static_cast<std::int64_t>(t % g.block_size)) + d;
            if (cache.k()[at] != want || cache.v()[at] != -want) {
              FAIL("sequence " << s << " token " << t << " head " << h << " dim " << d << ": read " << cache.k()[at]
                               << ", wrote " << want);
            }
          }
        }
      }
    }
  };

  for (int op = 0; op < 4000; ++op) {
    INFO("operation " << op);
    std::vector<SequenceId> live = m.sequences();
    const int kind = static_cast<int>(random() % 10);
    const SequenceId any = live.empty() ? -1 : live[random() % live.size()];
    if (live.empty() || kind < 2) {
      expected[m.add_sequence()];
    } else if (kind < 6) {
      try {
        write(any, static_cast<std::int64_t>(random() % 7));
      } catch (const PoolExhausted&) {
        ++exhausted;
      }
    } else if (kind < 8) {
      if (live.size() < 12) expected[m.fork(any)] = expected[any];
    } else if (kind < 9) {
      m.free(any);
      expected.erase(any);
    } else {
      m.preempt(any);
      expected[any].clear();
    }
    check_ownership(m);
    check_contents();
  }
  INFO("exhausted " << exhausted << " copies " << copies);
  CHECK(exhausted > 0);  // the run did reach the pool's limit
  CHECK(copies > 0);     // and exercised copy-on-write
}

// ---- input rules ------------------------------------------------------------------------------------------

namespace {

DecodeBatch small_batch() {
  DecodeBatch batch;
  batch.cache = CacheGeometry{8, 4, 1, 16};
  batch.q_heads = 2;
  batch.context_lens = {5, 9};
  batch.max_blocks_per_sequence = 3;
  batch.block_tables = {0, 1, -1, 2, 3, 4};
  return batch;
}

void check_rejected(const DecodeBatch& batch, const std::string& argument) {
  try {
    validate_decode_batch(batch, "paged/cpu");
    FAIL("accepted an invalid batch; expected a complaint about " << argument);
  } catch (const std::invalid_argument& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).rfind(argument + ":", 0) == 0);
  }
}

}  // namespace

TEST_CASE("paged: out-of-range block-table entries and context lengths are rejected, naming the argument", "[paged][validate]") {
  REQUIRE_NOTHROW(validate_decode_batch(small_batch(), "paged/cpu"));  // the unused entry -1 is ignored
  DecodeBatch batch = small_batch();
  batch.block_tables[4] = 8;
  check_rejected(batch, "block_tables[1][1]");
  batch = small_batch();
  batch.block_tables[0] = -1;
  check_rejected(batch, "block_tables[0][0]");
  batch = small_batch();
  batch.context_lens[1] = 13;  // 3 blocks of 4 hold at most 12
  check_rejected(batch, "context_lens[1]");
  batch = small_batch();
  batch.context_lens[0] = -1;
  check_rejected(batch, "context_lens[0]");
  batch = small_batch();
  batch.q_heads = 3;
  batch.cache.kv_heads = 2;
  check_rejected(batch, "q_heads");
  batch = small_batch();
  batch.block_tables.pop_back();
  check_rejected(batch, "block_tables");
}

TEST_CASE("paged: slot mappings outside the pool, and bad registry options, are rejected", "[paged][validate]") {
  const CacheGeometry g{2, 4, 1, 4};
  HostKVCache cache(g);
  std::vector<float> k(4 * 4, 1.0f);
  const NewTokens tokens{4, k.data(), k.data(), 4, 4};
  const std::vector<std::int64_t> bad{0, 1, 8, 2};
  REQUIRE_THROWS_WITH(write_to_cache_cpu(g, tokens, bad, cache.k(), cache.v()), Catch::Matchers::StartsWith("slot_mapping[2]"));
  const std::vector<std::int64_t> padded{0, -1, 7, 2};  // -1 is a padding token, skipped
  REQUIRE_NOTHROW(write_to_cache_cpu(g, tokens, padded, cache.k(), cache.v()));

  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = 2;  // decode: one query token per sequence
  p.seq_k = 10;
  p.head_dim = 16;
  REQUIRE_THROWS_WITH(run_stage(paged::describe(), Tier::cpu, make_problem_data(p), RunSettings{}),
                      Catch::Matchers::StartsWith("seq_q"));
  p.seq_q = 1;
  RunSettings settings;
  settings.options.values["block_size"] = 0;
  REQUIRE_THROWS_WITH(run_stage(paged::describe(), Tier::cpu, make_problem_data(p), settings),
                      Catch::Matchers::StartsWith("block_size"));
  settings.options.values = {{"variant", 3}};
  REQUIRE_THROWS_WITH(run_stage(paged::describe(), Tier::cpu, make_problem_data(p), settings),
                      Catch::Matchers::StartsWith("variant"));
}

// ---- decode -----------------------------------------------------------------------------------------------

namespace {

// One query per sequence; context lengths that are not multiples of any block size or partition, and one of a
// single token.
std::vector<Shape> decode_shapes() {
  auto make = [](std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t nk, std::int64_t d) {
    AttentionProblem p;
    p.batch = b, p.q_heads = hq, p.kv_heads = hkv, p.seq_q = 1, p.seq_k = nk, p.head_dim = d;
    return p;
  };
  return {
      {"one key", make(1, 1, 1, 1, 64)},
      {"odd context, MHA", make(2, 2, 2, 77, 64)},
      {"GQA 8:2, D=128", make(2, 8, 2, 301, 128)},
      {"MQA 4:1, D=16", make(1, 4, 1, 150, 16)},
      {"D=256, GQA 6:3", make(1, 6, 3, 97, 256)},
      {"several partitions", make(3, 4, 2, 1100, 32)},
  };
}

}  // namespace

TEST_CASE("paged/cpu decode matches the previous stage and the oracle: block sizes 1-32, v1 and v2, GQA/MQA",
          "[paged][cpu][decode]") {
  const Stage stage = paged::describe();
  const Stage* previous = previous_stage("paged", Tier::cpu);
  REQUIRE(previous != nullptr);
  std::uint64_t seed = 500;
  for (const Shape& shape : decode_shapes()) {
    const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
    const StageRun reference = run_stage(*previous, Tier::cpu, data, RunSettings{});
    const oracle::Result exact = oracle::attention(data, false);
    const double o_bound = bound_against(reference, exact, false), lse_bound = bound_against(reference, exact, true);
    for (std::int64_t block_size : {1, 8, 16, 32}) {
      for (int variant : {1, 2}) {
        for (std::int64_t partition : {64, 512}) {
          if (variant == 1 && partition != 512) continue;  // v1 has no partitions
          INFO(label(shape) << " block_size " << block_size << " variant " << variant << " partition " << partition
                            << " (previous stage: " << previous->name << ")");
          RunSettings settings;
          settings.options.values = {{"block_size", block_size}, {"variant", variant}, {"partition", partition}};
          const StageRun run = run_stage(stage, Tier::cpu, data, settings);
          const Errors vs_previous = compare_runs(run, reference);
          CHECK(vs_previous.o.rel_frobenius < o_bound);
          CHECK(vs_previous.lse.rel_frobenius < lse_bound);
          const Errors vs_oracle = compare_with_oracle(run, exact);
          CHECK(vs_oracle.o.rel_frobenius < kTolerance);
          CHECK(vs_oracle.lse.rel_frobenius < kTolerance);
          CHECK(run.counters.count("decode_ms") == 1);
          CHECK(run.counters.count("kv_GBps") == 1);
        }
      }
    }
  }
}

namespace {

/// Sequences built through a BlockManager with forks (shared prefixes), each with its own query, and each
/// sequence's K and V also kept contiguously ([kv_heads, length, head_dim]) for the reference stage.
struct ForkedSequences {
  CacheGeometry g;
  std::int64_t q_heads;
  BlockManager manager;
  HostKVCache cache;
  std::vector<SequenceId> ids;
  std::map<SequenceId, std::vector<std::vector<float>>> k_rows, v_rows;  // per sequence, per token: [kv_heads * D]
  std::uint64_t seed = 900;

  ForkedSequences(const CacheGeometry& geometry, std::int64_t heads)
      : g(geometry), q_heads(heads), manager(geometry.num_blocks, geometry.block_size, 31), cache(geometry) {}

  void append(SequenceId s, std::int64_t tokens) {
    const AppendResult r = manager.append(s, tokens);
    copy_blocks_cpu(g, r.copies, cache.k(), cache.v());
    const std::int64_t row = g.kv_heads * g.head_dim;
    HostBuffer<float> k(static_cast<std::size_t>(tokens * row)), v(static_cast<std::size_t>(tokens * row));
    fill_normal(k.span(), ++seed);
    fill_normal(v.span(), ++seed);
    write_to_cache_cpu(g, NewTokens{tokens, k.data(), v.data(), row, g.head_dim}, r.slots, cache.k(), cache.v());
    for (std::int64_t t = 0; t < tokens; ++t) {
      k_rows[s].emplace_back(k.data() + t * row, k.data() + (t + 1) * row);
      v_rows[s].emplace_back(v.data() + t * row, v.data() + (t + 1) * row);
    }
  }
  SequenceId start(std::int64_t tokens) {
    ids.push_back(manager.add_sequence());
    k_rows[ids.back()], v_rows[ids.back()];
    append(ids.back(), tokens);
    return ids.back();
  }
  SequenceId fork(SequenceId parent, std::int64_t tokens) {
    ids.push_back(manager.fork(parent));
    k_rows[ids.back()] = k_rows[parent];
    v_rows[ids.back()] = v_rows[parent];
    append(ids.back(), tokens);
    return ids.back();
  }
  /// Sequence s alone as a contiguous problem (batch 1, one query), with query `q` ([q_heads, D]).
  ProblemData contiguous(SequenceId s, const float* q) const {
    const auto& ks = k_rows.at(s);
    ProblemData data;
    data.problem.q_heads = q_heads;
    data.problem.kv_heads = g.kv_heads;
    data.problem.seq_q = 1;
    data.problem.seq_k = static_cast<std::int64_t>(ks.size());
    data.problem.head_dim = g.head_dim;
    data.q = HostBuffer<float>(static_cast<std::size_t>(q_heads * g.head_dim));
    data.d_o = HostBuffer<float>(data.q.size(), 0.0f);
    std::copy(q, q + data.q.size(), data.q.data());
    data.k = HostBuffer<float>(static_cast<std::size_t>(data.problem.kv_elements()));
    data.v = HostBuffer<float>(data.k.size());
    for (std::int64_t h = 0; h < g.kv_heads; ++h)
      for (std::size_t n = 0; n < ks.size(); ++n)
        for (std::int64_t d = 0; d < g.head_dim; ++d) {
          const std::size_t at = (h * ks.size() + n) * g.head_dim + d;
          data.k[at] = ks[n][h * g.head_dim + d];
          data.v[at] = v_rows.at(s)[n][h * g.head_dim + d];
        }
    return data;
  }
};

}  // namespace

// The same shapes, block sizes and variants against the oracle alone: the course lab's grade, which must not
// depend on another stage.
TEST_CASE("paged/cpu decode matches the fp64 oracle: block sizes 1-32, v1 and v2, GQA/MQA (oracle only)",
          "[paged][cpu][decode][lab]") {
  const Stage stage = paged::describe();
  std::uint64_t seed = 600;
  for (const Shape& shape : decode_shapes()) {
    const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
    const oracle::Result exact = oracle::attention(data, false);
    for (std::int64_t block_size : {1, 8, 16, 32}) {
      for (int variant : {1, 2}) {
        for (std::int64_t partition : {64, 512}) {
          if (variant == 1 && partition != 512) continue;  // v1 has no partitions
          INFO(label(shape) << " block_size " << block_size << " variant " << variant << " partition " << partition);
          RunSettings settings;
          settings.options.values = {{"block_size", block_size}, {"variant", variant}, {"partition", partition}};
          const Errors e = compare_with_oracle(run_stage(stage, Tier::cpu, data, settings), exact);
          CHECK(e.o.bad_values + e.lse.bad_values == 0);
          CHECK(e.o.rel_frobenius < kTolerance);
          CHECK(e.lse.rel_frobenius < kTolerance);
        }
      }
    }
  }
}

TEST_CASE("paged/cpu decode: variable context lengths, forked (shared) prefixes, shuffled blocks, one batch",
          "[paged][cpu][decode]") {
  const Stage* previous = previous_stage("paged", Tier::cpu);
  REQUIRE(previous != nullptr);
  for (std::int64_t block_size : {1, 8, 16, 32}) {
    ForkedSequences s(CacheGeometry{2048 / block_size + 64, block_size, 2, 64}, 6);
    const SequenceId root = s.start(45);  // a prompt shared by three samples
    s.fork(root, 7);
    const SequenceId child = s.fork(root, 20);
    s.fork(child, 33);  // a fork of a fork (beam search)
    s.fork(root, 0);    // shares every block, its last one partly filled
    s.start(1);
    s.start(333);
    s.append(root, 3);  // the root writes after its forks: copy-on-write keeps their view intact
    const SequenceId empty = s.manager.add_sequence();
    s.ids.push_back(empty);
    s.k_rows[empty];
    s.v_rows[empty];

    const DecodeBatch batch = make_decode_batch(s.manager, s.ids, s.g, s.q_heads);
    const std::int64_t B = batch.sequences(), D = s.g.head_dim, Hq = s.q_heads;
    HostBuffer<float> q(static_cast<std::size_t>(B * Hq * D)), o(q.size()), lse(static_cast<std::size_t>(B * Hq));
    fill_normal(q.span(), 77);
    for (int variant : {1, 2}) {
      INFO("block_size " << block_size << " variant " << variant << " (previous stage: " << previous->name << ")");
      o.fill(NAN);
      lse.fill(NAN);
      decode_cpu(batch, DecodeTensors{DType::f32, Strides{Hq * D, D, 0}, q.data(), s.cache.k(), s.cache.v(), o.data(), lse.data()},
                 DecodeOptions{variant, 40});
      for (std::int64_t b = 0; b < B; ++b) {
        INFO("sequence " << b << " of context " << batch.context_lens[b]);
        const std::span<const float> o_b(o.data() + b * Hq * D, static_cast<std::size_t>(Hq * D));
        const std::span<const float> lse_b(lse.data() + b * Hq, static_cast<std::size_t>(Hq));
        if (batch.context_lens[b] == 0) {  // no keys: O = 0, LSE = -inf
          for (float x : o_b) CHECK(x == 0.0f);
          for (float x : lse_b) CHECK((std::isinf(x) && x < 0));
          continue;
        }
        const ProblemData data = s.contiguous(s.ids[b], q.data() + b * Hq * D);
        const StageRun reference = run_stage(*previous, Tier::cpu, data, RunSettings{});
        const oracle::Result exact = oracle::attention(data, false);
        CHECK(compare(o_b, reference.o.span()).rel_frobenius < bound_against(reference, exact, false));
        CHECK(compare(lse_b, reference.lse.span()).rel_frobenius < bound_against(reference, exact, true));
        CHECK(compare(o_b, std::span<const double>(exact.o)).rel_frobenius < kTolerance);
      }
    }
  }
}

TEST_CASE("paged/cpu decode honours a custom softmax scale and is identical for causal (one query sees every key)",
          "[paged][cpu][decode]") {
  AttentionProblem p;
  p.batch = 2, p.q_heads = 4, p.kv_heads = 2, p.seq_q = 1, p.seq_k = 70, p.head_dim = 32, p.scale = 0.3;
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bnhd, 41);
  const StageRun run = run_stage(paged::describe(), Tier::cpu, data, RunSettings{});
  CHECK(compare_with_oracle(run, oracle::attention(data, false)).o.rel_frobenius < kTolerance);
  p.causal = true;
  const ProblemData causal = make_problem_data(p, DType::f32, Layout::bnhd, 41);
  const StageRun causal_run = run_stage(paged::describe(), Tier::cpu, causal, RunSettings{});
  CHECK(compare_with_oracle(causal_run, oracle::attention(causal, false)).o.rel_frobenius < kTolerance);
}

TEST_CASE("paged-sim: rejects bad flags with status 2 and runs a small trace", "[paged][sim]") {
  CHECK(sim_command({"--requests", "x"}) == 2);
  CHECK(sim_command({"--bogus", "1"}) == 2);
  CHECK(sim_command({"--block-size"}) == 2);
  // Every request ends at 2050 tokens, but 2050 / 16 = 128 whole blocks hold only 2048: the pool can never
  // serve one, and the simulation says so instead of looping.
  CHECK(sim_command({"--requests", "3", "--pool-tokens", "2050", "--max-len", "2050", "--prompt-median", "5000",
                     "--output-median", "5000", "--sigma", "0"}) == 2);
  CHECK(sim_command({"--requests", "50", "--pool-tokens", "4096", "--max-len", "1024"}) == 0);
}
