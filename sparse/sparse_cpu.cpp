// sparse, CPU tier: sparse causal flash attention (docs/papers/sparse.md) on FlashAttention-2's CPU steps
// (common/flash_cpu.hpp). Each pass plans (masks or buckets, stable sorts, tile extents: sparse_plan.cpp),
// gathers Q, K, V into the sorted order, runs FA2's loops over the sorted rows skipping every tile pair that
// cannot meet, and scatters the results back to the original positions. All of it is inside the timed pass.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/cpu_tiles.hpp"
#include "common/flash_cpu.hpp"
#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "sparse/sparse.hpp"
#include "sparse/sparse_plan.hpp"

namespace attn::sparse {
namespace {

using flash_cpu::KeyBlockTiles;
using flash_cpu::QueryBlock;
using tiles::kNegInf;
using tiles::MatrixView;
using tiles::Update;

// flash_v2's CPU defaults (its README, "Block sizes"): the tiles stay in L2 at d = 128.
constexpr std::int64_t kDefaultBr = 128;
constexpr std::int64_t kDefaultBc = 128;

struct Blocks {
  std::int64_t Br = 0, Bc = 0;
};

std::int64_t positive_option(const StageOptions& options, const char* name, std::int64_t fallback) {
  const std::int64_t value = options.get(name, fallback);
  if (value < 1)
    throw std::invalid_argument(std::string(name) + ": must be >= 1 (a block has at least one row), got " + std::to_string(value));
  return value;
}

Blocks read_blocks(const AttentionProblem& p, const StageOptions& options) {
  return {std::min(positive_option(options, "block_rows", kDefaultBr), p.seq_q),
          std::min(positive_option(options, "block_cols", kDefaultBc), p.seq_k)};
}

// Everything a pass checks before any work: the problem and tensors, the options, the caller's lists.
struct Checked {
  Settings settings;
  Blocks blocks;
};
Checked check_call(const AttentionProblem& p, const AttentionTensors& t, const StageOptions& options,
                   const KeepLists* lists, bool backward) {
  validate_call(p, t, cpu_caps(), "sparse/cpu", backward);
  if (p.seq_q > std::numeric_limits<std::int32_t>::max() || p.seq_k > std::numeric_limits<std::int32_t>::max())
    throw std::invalid_argument("seq_q, seq_k: sparse keeps original indices in 32 bits: at most 2^31 - 1 rows");
  Checked c{read_settings(options), read_blocks(p, options)};
  if (lists != nullptr) validate_keep_lists(p, *lists);
  return c;
}

// A tensor's rows of every (batch, head), gathered into the sorted order: row r of head x is the original row
// order.head(x).index[r]; rows are D floats, heads `capacity * D` apart (SCFA Alg. 1 line 2).
HostBuffer<float> gather(const float* base, const Strides& strides, std::int64_t heads_per_batch, const RowOrder& order,
                         std::int64_t D) {
  HostBuffer<float> out(order.heads * order.capacity * D);
#pragma omp parallel for schedule(static)
  for (std::int64_t x = 0; x < order.heads; ++x) {
    const HeadRows rows = order.head(x);
    const float* head = row_pointer(base, strides, x / heads_per_batch, x % heads_per_batch, 0);
    float* dst = out.data() + x * order.capacity * D;
    for (std::int64_t r = 0; r < rows.count; ++r) std::copy_n(head + rows.index[r] * strides.seq, D, dst + r * D);
  }
  return out;
}

// The original rows of a head that `rows` does not keep, each passed to `clear(row)`. Only QK-sparse drops rows,
// and its kept rows are in ascending order; hash-sparse keeps every row (in bucket order), so nothing is dropped.
template <class Clear>
void for_each_dropped_row(const HeadRows& rows, std::int64_t length, Clear clear) {
  if (rows.count == length) return;
  std::int64_t next_kept = 0;
  for (std::int64_t i = 0; i < length; ++i) {
    if (next_kept < rows.count && rows.index[next_kept] == i) {
      ++next_kept;
      continue;
    }
    clear(i);
  }
}

// The KV head (within B * Hkv) that query head x (within B * Hq) reads.
std::int64_t key_head_of(const AttentionProblem& p, std::int64_t x) {
  return (x / p.q_heads) * p.kv_heads + p.kv_head_of(x % p.q_heads);
}

// What the mask needs of a Q tile's rows (SCFA Alg. 1 line 10): each row's bucket and the first original key
// index it may not see (Nk when not causal), so that a pair's test is two integer comparisons.
struct QueryRowMasks {
  explicit QueryRowMasks(std::int64_t Br) : bucket(Br), limit(Br) {}
  HostBuffer<std::int32_t> bucket, limit;
  void load(const AttentionProblem& p, const HeadRows& q, std::int64_t row0, std::int64_t rows) {
    for (std::int64_t r = 0; r < rows; ++r) {
      bucket[r] = q.bucket[row0 + r];
      limit[r] = static_cast<std::int32_t>(p.causal ? p.visible_keys(q.index[row0 + r]) : p.seq_k);
    }
  }
};

// SCFA Alg. 1 line 10: hide the pairs of a tile that the masks do not keep: a key of another bucket, or (causal)
// at or past the query's limit on the original indices. S is key-major: entry (key c, query r) is S[c * padded + r].
void mask_hidden_pairs(QueryBlock& block, const QueryRowMasks& rows, const HeadRows& k, std::int64_t key0,
                       std::int64_t keys) {
  for (std::int64_t c = 0; c < keys; ++c) {
    const std::int32_t key_bucket = k.bucket[key0 + c], key_index = k.index[key0 + c];
    float* scores = block.S.data() + c * block.padded;
    for (std::int64_t r = 0; r < block.rows; ++r)
      if (rows.bucket[r] != key_bucket || key_index >= rows.limit[r]) scores[r] = kNegInf;
  }
}

void report(const AttentionProblem& p, const Plan& plan, StageOptions& options) {
  const double dense_pairs = static_cast<double>(p.batch * p.q_heads) * p.visible_pairs();
  options.counters["Tc"] = static_cast<double>(plan.Tc_max);
  options.counters["visible_pairs"] = plan.visible_pairs;
  options.counters["visible_fraction"] = dense_pairs > 0 ? plan.visible_pairs / dense_pairs : 0.0;
  options.counters["tiles_visited"] = plan.tiles_visited;
  options.counters["tiles_total"] = static_cast<double>(p.batch * p.q_heads * plan.Tr_max * plan.Tc_max);
}

}  // namespace

TierCaps cpu_caps() { return TierCaps{{DType::f32}, 256, {}, true, 0}; }

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options, const KeepLists* lists) {
  const Checked c = check_call(p, t, options, lists, false);
  const std::int64_t D = p.head_dim, Br = c.blocks.Br, Bc = c.blocks.Bc;
  const double start = omp_get_wtime();
  const Plan plan = make_plan(p, t, c.settings, lists, Br, Bc);  // SCFA Alg. 1 lines 1-3
  const HostBuffer<float> Q = gather(static_cast<const float*>(t.q), t.q_strides, p.q_heads, plan.queries, D);
  const HostBuffer<float> K = gather(static_cast<const float*>(t.k), t.kv_strides, p.kv_heads, plan.keys, D);
  const HostBuffer<float> V = gather(static_cast<const float*>(t.v), t.kv_strides, p.kv_heads, plan.keys, D);
  options.counters["plan_ms"] = 1e3 * (omp_get_wtime() - start);
  auto* o = static_cast<float*>(t.o);

  // The work items: (query head, Q tile of its sorted rows), as flash_v2's split-Q.
  std::vector<std::pair<std::int64_t, std::int64_t>> items;
  for (std::int64_t x = 0; x < p.batch * p.q_heads; ++x)
    for (std::int64_t i = 0; i < plan.query_tile_count(x); ++i) items.emplace_back(x, i);
  progress::expect(static_cast<double>(items.size()));
#pragma omp parallel
  {
    QueryBlock block(Br, Bc, D);
    QueryRowMasks masks(Br);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t item = 0; item < items.size(); ++item) {  // SCFA Alg. 1 line 4, in parallel
      progress::advance();
      const auto [x, i] = items[item];
      const std::int64_t kv = key_head_of(p, x), b = x / p.q_heads, h = x % p.q_heads;
      const HeadRows q = plan.queries.head(x), k = plan.keys.head(kv);
      const float* K_head = K.data() + kv * plan.keys.capacity * D;
      const float* V_head = V.data() + kv * plan.keys.capacity * D;
      const std::int64_t row0 = i * Br, rows = std::min(Br, q.count - row0);
      // Lines 5-6 (FA2 Alg. 1 lines 4-5): load Q_i; O_i = 0, l_i = 0, m_i = -inf.
      flash_cpu::start_query_block(Q.data() + x * plan.queries.capacity * D, D, row0, rows, D, p.softmax_scale(), block);
      const TileExtent& q_tile = plan.query_tile(x, i);
      masks.load(p, q, row0, rows);
      for (std::int64_t j = 0; j < plan.key_tile_count(kv); ++j) {  // line 7
        const TileExtent& k_tile = plan.key_tile(kv, j);
        if (!tiles_can_meet(p, q_tile, k_tile)) continue;  // line 8: the tile pair cannot meet
        const std::int64_t key0 = j * Bc, keys = std::min(Bc, k.count - key0);
        // Lines 9-10: S = tau Q_i K_j^T (K_j read in place from the gathered K), masked unless every pair is visible.
        flash_cpu::score_tile(block, K_head, D, key0, keys, D);
        if (!tiles_fully_visible(p, q_tile, k_tile)) mask_hidden_pairs(block, masks, k, key0, keys);
        flash_cpu::softmax_update(block, V_head, D, key0, keys, D);  // line 11 (FA2 Alg. 1 lines 9-10)
      }
      // Lines 13-14: O_i = O_i / l_i and L_i = m_i + log(l_i), written at the rows' original positions.
      float* lse = t.lse + x * p.seq_q;
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t original = q.index[row0 + r];
        lse[original] = flash_cpu::finish_row(block, r, D, row_pointer(o, t.q_strides, b, h, original));
      }
    }
    // Line 16: the queries not kept get O = 0 and L = -inf.
#pragma omp for schedule(static)
    for (std::int64_t x = 0; x < p.batch * p.q_heads; ++x)
      for_each_dropped_row(plan.queries.head(x), p.seq_q, [&](std::int64_t i) {
        std::fill_n(row_pointer(o, t.q_strides, x / p.q_heads, x % p.q_heads, i), D, 0.0f);
        t.lse[x * p.seq_q + i] = kNegInf;
      });
  }
  report(p, plan, options);
}

void backward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options, const KeepLists* lists) {
  const Checked c = check_call(p, t, options, lists, true);
  const std::int64_t D = p.head_dim, Br = c.blocks.Br, Bc = c.blocks.Bc, group = p.group_size();
  const float scale = p.softmax_scale();
  // SCFA Alg. 2 line 1: the same plan as the forward's (the same inputs and seed give the same masks and buckets).
  const double start = omp_get_wtime();
  const Plan plan = make_plan(p, t, c.settings, lists, Br, Bc);
  const std::int64_t Nq = plan.queries.capacity, Nk = plan.keys.capacity;
  // Line 2: Q, dO, L and D = rowsum(dO * O) in query order; K, V in key order.
  const HostBuffer<float> Q = gather(static_cast<const float*>(t.q), t.q_strides, p.q_heads, plan.queries, D);
  const HostBuffer<float> dO = gather(static_cast<const float*>(t.d_o), t.q_strides, p.q_heads, plan.queries, D);
  const HostBuffer<float> K = gather(static_cast<const float*>(t.k), t.kv_strides, p.kv_heads, plan.keys, D);
  const HostBuffer<float> V = gather(static_cast<const float*>(t.v), t.kv_strides, p.kv_heads, plan.keys, D);
  HostBuffer<float> L(p.batch * p.q_heads * Nq), Dsum(p.batch * p.q_heads * Nq);
  const auto* o = static_cast<const float*>(t.o);
  const auto* d_o = static_cast<const float*>(t.d_o);
#pragma omp parallel for schedule(static)
  for (std::int64_t x = 0; x < p.batch * p.q_heads; ++x) {
    const HeadRows q = plan.queries.head(x);
    for (std::int64_t r = 0; r < q.count; ++r) {
      const std::int64_t b = x / p.q_heads, h = x % p.q_heads, i = q.index[r];
      L[x * Nq + r] = t.lse[x * p.seq_q + i];
      Dsum[x * Nq + r] = simd::dot(row_pointer(d_o, t.q_strides, b, h, i), row_pointer(o, t.q_strides, b, h, i), D);
    }
  }
  options.counters["plan_ms"] = 1e3 * (omp_get_wtime() - start);
  auto* dq = static_cast<float*>(t.dq);
  auto* dk = static_cast<float*>(t.dk);
  auto* dv = static_cast<float*>(t.dv);
  const int threads = omp_get_max_threads();
  // Line 3: dQ = 0, in one buffer per thread for the query heads of the current KV head (summed after its loop,
  // as flash_v2's default), in the sorted order.
  HostBuffer<float> dq_buffers(threads * group * Nq * D);
  const std::int64_t ld = tiles::round_up_to_lanes(Bc);
  progress::expect(static_cast<double>(p.batch * p.kv_heads * plan.Tc_max));

  for (std::int64_t kv = 0; kv < p.batch * p.kv_heads; ++kv) {
    const std::int64_t b = kv / p.kv_heads, kv_head = kv % p.kv_heads, x0 = b * p.q_heads + kv_head * group;
    const HeadRows k = plan.keys.head(kv);
    const float* K_head = K.data() + kv * Nk * D;
    const float* V_head = V.data() + kv * Nk * D;
#pragma omp parallel num_threads(threads)
    {
      KeyBlockTiles tile(Br, ld, D);
      QueryRowMasks masks(Br);
      const int me = omp_get_thread_num(), team = omp_get_num_threads();
      float* my_dq = dq_buffers.data() + me * group * Nq * D;
      std::fill_n(my_dq, group * Nq * D, 0.0f);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t j = 0; j < plan.key_tile_count(kv); ++j) {  // line 4
        progress::advance();
        const std::int64_t key0 = j * Bc, keys = std::min(Bc, k.count - key0);
        const TileExtent& k_tile = plan.key_tile(kv, j);
        // Line 5 (FA2 Alg. 2 lines 6-7): load K_j, V_j; dK_j = dV_j = 0.
        flash_cpu::start_key_block(K_head + key0 * D, V_head + key0 * D, D, keys, D, tile);
        for (std::int64_t g = 0; g < group; ++g) {  // GQA: dK_j, dV_j sum over the group's query heads
          const std::int64_t x = x0 + g;
          const HeadRows q = plan.queries.head(x);
          const float* Q_head = Q.data() + x * Nq * D;
          const float* dO_head = dO.data() + x * Nq * D;
          for (std::int64_t i = 0; i < plan.query_tile_count(x); ++i) {  // line 6
            const TileExtent& q_tile = plan.query_tile(x, i);
            if (!tiles_can_meet(p, q_tile, k_tile)) continue;  // line 7
            const std::int64_t row0 = i * Br, rows = std::min(Br, q.count - row0);
            // Line 8: S = tau Q_i K_j^T; P = exp(S - L_i), 0 where the masks hide the pair.
            flash_cpu::score_rows(Q_head + row0 * D, D, rows, keys, D, scale, tile);
            const bool full = tiles_fully_visible(p, q_tile, k_tile);
            if (!full) masks.load(p, q, row0, rows);
            for (std::int64_t r = 0; r < rows; ++r) {
              float* p_row = tile.P.data() + r * ld;
              tiles::exp_shifted(p_row, L[x * Nq + row0 + r], keys);
              if (full) continue;
              const std::int32_t query_bucket = masks.bucket[r], limit = masks.limit[r];
              const std::int32_t* key_bucket = k.bucket + key0;
              const std::int32_t* key_index = k.index + key0;
              for (std::int64_t col = 0; col < keys; ++col)
                if (key_bucket[col] != query_bucket || key_index[col] >= limit) p_row[col] = 0.0f;
            }
            // Line 9: dV_j += P^T dO_i; dP = dO_i V_j^T; dS = P * (dP - D_i) (times tau).
            flash_cpu::value_and_score_gradients(dO_head + row0 * D, D, Dsum.data() + x * Nq + row0, rows, keys, D,
                                                 scale, tile);
            // Line 10: dQ_i += dS K_j, into this thread's buffer.
            tiles::matmul(Update::accumulate, rows, D, keys, MatrixView{tile.dS.data(), ld, 1}, K_head + key0 * D, D,
                          my_dq + (g * Nq + row0) * D, D);
            flash_cpu::key_gradient(Q_head + row0 * D, D, rows, keys, D, tile);  // line 11: dK_j += dS^T Q_i
          }
        }
        // Line 13: write dK_j, dV_j at the keys' original positions (this thread owns these keys: no race).
        for (std::int64_t col = 0; col < keys; ++col) {
          std::copy_n(tile.dK.data() + col * D, D, row_pointer(dk, t.kv_strides, b, kv_head, k.index[key0 + col]));
          std::copy_n(tile.dV.data() + col * D, D, row_pointer(dv, t.kv_strides, b, kv_head, k.index[key0 + col]));
        }
      }  // implicit barrier: every thread's dQ contributions are in its buffer
      // Line 15: dQ = the sum of the thread buffers, at the queries' original positions.
#pragma omp for schedule(static)
      for (std::int64_t row = 0; row < group * Nq; ++row) {
        const std::int64_t g = row / Nq, r = row % Nq;
        const HeadRows q = plan.queries.head(x0 + g);
        if (r >= q.count) continue;
        float* out = row_pointer(dq, t.q_strides, b, kv_head * group + g, q.index[r]);
        std::copy_n(dq_buffers.data() + row * D, D, out);
        for (int u = 1; u < team; ++u) simd::axpy(1.0f, dq_buffers.data() + u * group * Nq * D + row * D, out, D);
      }
      // Line 15: rows not kept get dQ = 0 (queries) and dK = dV = 0 (keys).
#pragma omp for schedule(static)
      for (std::int64_t g = 0; g < group; ++g)
        for_each_dropped_row(plan.queries.head(x0 + g), p.seq_q, [&](std::int64_t i) {
          std::fill_n(row_pointer(dq, t.q_strides, b, kv_head * group + g, i), D, 0.0f);
        });
#pragma omp single
      for_each_dropped_row(k, p.seq_k, [&](std::int64_t j) {
        std::fill_n(row_pointer(dk, t.kv_strides, b, kv_head, j), D, 0.0f);
        std::fill_n(row_pointer(dv, t.kv_strides, b, kv_head, j), D, 0.0f);
      });
    }
  }
  report(p, plan, options);
}

Stage describe() {
  Stage stage;
  stage.name = "sparse";
  stage.paper = "Sparse causal flash attention (Pagliardini 2023)";
  stage.adds = "QK-sparse (rows dropped, compacted) and hash-sparse (bucketed) attention; tiles that cannot meet skipped";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) { forward_cpu(p, t, options); };
  cpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) { backward_cpu(p, t, options); };
  // The plan (two 32-bit words per row, one extent per tile), the gathered Q, K, V (and dO, L, D in the
  // backward), the per-thread tiles and, in the backward, the per-thread dQ buffers: all O(N).
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward, const StageOptions& options) {
    const std::int64_t threads = omp_get_max_threads(), D = p.head_dim;
    const Blocks blocks = read_blocks(p, options);
    const std::int64_t Br = blocks.Br, Bc = blocks.Bc, ld = tiles::round_up_to_lanes(Bc);
    const std::int64_t q_rows = p.batch * p.q_heads * p.seq_q, k_rows = p.batch * p.kv_heads * p.seq_k;
    const std::int64_t forward = (q_rows + 2 * k_rows) * D + threads * (D * Br + Bc * Br + Br * D + 5 * (Br + 8));
    const std::int64_t backward_floats = (2 * q_rows + 2 * k_rows) * D + 2 * q_rows + threads * p.group_size() * p.seq_q * D +
                                         threads * (4 * D * ld + 2 * Br * ld + 2 * Br * D);
    const std::size_t masks = static_cast<std::size_t>(threads * 2 * Br) * sizeof(std::int32_t);  // QueryRowMasks
    return plan_bytes(p, Br, Bc) + masks + static_cast<std::size_t>(backward ? backward_floats : forward) * sizeof(float);
  };
  cpu.option_names = {"mode", "drop_q_permille", "drop_k_permille", "buckets", "seed", "block_rows", "block_cols"};
  cpu.ladder_options = ladder_sparsity();
  stage.tiers.push_back(cpu);
#if defined(ATTN_HAVE_CUDA) && defined(ATTN_SPARSE_HAVE_GPU)
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::sparse
