// The stage's options and index lists checked, and the host planning of the CPU tier (sparse_plan.hpp): masks
// or buckets, the stable sorts, the tile extents and the counts.
#include "sparse/sparse_plan.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/simd.hpp"
#include "sparse/sparsity.hpp"

namespace attn::sparse {

// ---- options and index lists -----------------------------------------------------------------------------------

namespace {

std::int64_t option_in_range(const StageOptions& options, const char* name, std::int64_t fallback, std::int64_t low,
                             std::int64_t high, const char* rule) {
  const std::int64_t value = options.get(name, fallback);
  if (value < low || value > high)
    throw std::invalid_argument(std::string(name) + ": must be " + rule + ", got " + std::to_string(value));
  return value;
}

}  // namespace

Settings read_settings(const StageOptions& options) {
  Settings s;
  s.mode = static_cast<Mode>(option_in_range(options, "mode", 0, 0, 1, "0 (QK-sparse) or 1 (hash-sparse)"));
  s.drop_q_permille = static_cast<int>(
      option_in_range(options, "drop_q_permille", 0, 0, 999, "a drop rate in per mille in [0, 1000), i.e. [0, 1)"));
  s.drop_k_permille = static_cast<int>(
      option_in_range(options, "drop_k_permille", 0, 0, 999, "a drop rate in per mille in [0, 1000), i.e. [0, 1)"));
  s.buckets = static_cast<int>(option_in_range(options, "buckets", 8, 1, kMaxBuckets,
                                               ("1 or an even number of buckets up to " + std::to_string(kMaxBuckets)).c_str()));
  if (s.buckets != 1 && s.buckets % 2 != 0)
    throw std::invalid_argument("buckets: must be 1 or even (the hash is an argmax over [x R, -x R]), got " +
                                std::to_string(s.buckets));
  s.seed = static_cast<std::uint64_t>(
      option_in_range(options, "seed", 1, 0, std::numeric_limits<std::int64_t>::max(), "a non-negative integer"));
  return s;
}

namespace {

// One side's CSR lists: offsets (heads + 1 entries, from 0, non-decreasing, ending at the index count) and
// every list strictly ascending within [0, length).
void validate_side(const char* offsets_name, const std::vector<std::int64_t>& offsets, const char* indices_name,
                   const std::vector<std::int32_t>& indices, std::int64_t heads, const char* heads_text,
                   std::int64_t length, const char* length_name) {
  const std::string offsets_text(offsets_name), indices_text(indices_name);
  if (static_cast<std::int64_t>(offsets.size()) != heads + 1)
    throw std::invalid_argument(offsets_text + ": must have " + heads_text + " + 1 = " + std::to_string(heads + 1) +
                                " entries, got " + std::to_string(offsets.size()));
  if (offsets.front() != 0)
    throw std::invalid_argument(offsets_text + ": must start at 0, got " + std::to_string(offsets.front()));
  for (std::int64_t x = 0; x < heads; ++x)
    if (offsets[x + 1] < offsets[x])
      throw std::invalid_argument(offsets_text + ": must be non-decreasing, but entry " + std::to_string(x + 1) + " (" +
                                  std::to_string(offsets[x + 1]) + ") < entry " + std::to_string(x) + " (" +
                                  std::to_string(offsets[x]) + ")");
  if (offsets.back() != static_cast<std::int64_t>(indices.size()))
    throw std::invalid_argument(offsets_text + ": the last entry must equal the length of " + indices_text + " (" +
                                std::to_string(indices.size()) + "), got " + std::to_string(offsets.back()));
  for (std::int64_t x = 0; x < heads; ++x)
    for (std::int64_t e = offsets[x]; e < offsets[x + 1]; ++e) {
      const std::int32_t index = indices[e];
      if (index < 0 || index >= length)
        throw std::invalid_argument(indices_text + ": entry " + std::to_string(e) + " (list " + std::to_string(x) +
                                    ") is " + std::to_string(index) + ", out of range [0, " + length_name + " = " +
                                    std::to_string(length) + ")");
      if (e > offsets[x] && index <= indices[e - 1])
        throw std::invalid_argument(indices_text + ": list " + std::to_string(x) + " must be strictly ascending (sorted, " +
                                    "no duplicates), but entry " + std::to_string(e) + " (" + std::to_string(index) +
                                    ") follows " + std::to_string(indices[e - 1]));
    }
}

}  // namespace

void validate_keep_lists(const AttentionProblem& p, const KeepLists& lists) {
  validate_side("query_offsets", lists.query_offsets, "query_indices", lists.query_indices, p.batch * p.q_heads,
                "B * Hq", p.seq_q, "seq_q");
  validate_side("key_offsets", lists.key_offsets, "key_indices", lists.key_indices, p.batch * p.kv_heads, "B * Hkv",
                p.seq_k, "seq_k");
}

// ---- the plan ------------------------------------------------------------------------------------------------

RowOrder::RowOrder(std::int64_t heads, std::int64_t capacity)
    : heads(heads), capacity(capacity), index(heads * capacity), bucket(heads * capacity), count(heads, 0) {}

Plan::Plan(const AttentionProblem& p, std::int64_t Br, std::int64_t Bc)
    : Br(Br), Bc(Bc), queries(p.batch * p.q_heads, p.seq_q), keys(p.batch * p.kv_heads, p.seq_k),
      Tr_max((p.seq_q + Br - 1) / Br), Tc_max((p.seq_k + Bc - 1) / Bc), query_tiles(p.batch * p.q_heads * Tr_max),
      key_tiles(p.batch * p.kv_heads * Tc_max) {}

namespace {

// QK-sparse, SCFA Alg. 1 lines 1-2: the kept rows of head x, in ascending original index (a stable compaction:
// the order of the kept rows is their original order, which the causal mask needs).
void keep_rows(RowOrder& order, std::int64_t x, std::int64_t length, const std::vector<std::int64_t>* offsets,
               const std::vector<std::int32_t>* indices, std::uint64_t seed, std::uint64_t stream, int drop_permille) {
  std::int32_t* index = order.index.data() + x * order.capacity;
  std::int32_t* bucket = order.bucket.data() + x * order.capacity;
  std::int64_t kept = 0;
  if (offsets != nullptr) {
    for (std::int64_t e = (*offsets)[x]; e < (*offsets)[x + 1]; ++e) index[kept++] = (*indices)[e];
  } else {
    for (std::int64_t i = 0; i < length; ++i)
      if (keep_row(seed, stream, i, drop_permille)) index[kept++] = static_cast<std::int32_t>(i);
  }
  std::fill(bucket, bucket + kept, 0);
  order.count[x] = kept;
}

// bucket_of (sparsity.hpp) for `count` rows, bit for bit: the same sequential fma over the head dimension for
// each projection, and the same argmax order. Only the loops are reordered: a SIMD width of rows at a time,
// transposed, so that one fused multiply-add instruction advances the same projection of all those rows (lanes
// are rows, each lane's sum in bucket_of's order; a vector fma rounds as the scalar one) instead of one sum
// waiting on its previous fma.
void buckets_of_rows(const float* rows, std::int64_t stride, std::int64_t count, std::int64_t D, int buckets,
                     const float* projection, std::int32_t* out) {
  if (buckets <= 1) {
    std::fill(out, out + count, 0);
    return;
  }
  constexpr std::int64_t kRows = simd::lanes;
  const int half = buckets / 2;
  std::vector<float> xt(static_cast<std::size_t>(D * kRows)), dots(static_cast<std::size_t>(half * kRows));
  for (std::int64_t row0 = 0; row0 < count; row0 += kRows) {
    const std::int64_t n = std::min(kRows, count - row0);
    for (std::int64_t d = 0; d < D; ++d)  // xt[d][r] = row r's element d (rows past the end: 0, unused)
      for (std::int64_t r = 0; r < kRows; ++r) xt[d * kRows + r] = r < n ? rows[(row0 + r) * stride + d] : 0.0f;
    std::fill(dots.begin(), dots.end(), 0.0f);
    for (std::int64_t d = 0; d < D; ++d)
      for (int c = 0; c < half; ++c) {
        float* dot = dots.data() + c * kRows;
        const simd::batch x = simd::batch::load_unaligned(xt.data() + d * kRows);
        xsimd::fma(x, simd::batch(projection[d * half + c]), simd::batch::load_unaligned(dot)).store_unaligned(dot);
      }
    for (std::int64_t r = 0; r < n; ++r) {  // bucket_of's argmax over [x R_0, -x R_0, x R_1, -x R_1, ...]
      int best = 0;
      float best_value = 0;
      for (int c = 0; c < half; ++c) {
        const float dot = dots[c * kRows + r];
        if (c == 0 || dot > best_value) { best = c; best_value = dot; }
        if (-dot > best_value) { best = c + half; best_value = -dot; }
      }
      out[row0 + r] = best;
    }
  }
}

// Hash-sparse, SCFA Alg. 1 lines 1-2: every row of head x (rows of `rows`, `stride` apart) hashed into its
// bucket, then sorted stably by (bucket, original index) with one counting sort over the buckets.
void hash_rows(RowOrder& order, std::int64_t x, const float* rows, std::int64_t stride, std::int64_t length,
               std::int64_t D, int buckets, const float* projection, std::vector<std::int32_t>& row_bucket,
               std::vector<std::int64_t>& start) {
  row_bucket.resize(length);
  buckets_of_rows(rows, stride, length, D, buckets, projection, row_bucket.data());
  start.assign(buckets + 1, 0);
  for (std::int64_t i = 0; i < length; ++i) ++start[row_bucket[i] + 1];
  for (int c = 0; c < buckets; ++c) start[c + 1] += start[c];
  std::int32_t* index = order.index.data() + x * order.capacity;
  std::int32_t* bucket = order.bucket.data() + x * order.capacity;
  for (std::int64_t i = 0; i < length; ++i) {  // ascending i: stable within each bucket
    const std::int64_t slot = start[row_bucket[i]]++;
    index[slot] = static_cast<std::int32_t>(i);
    bucket[slot] = row_bucket[i];
  }
  order.count[x] = length;
}

// SCFA Alg. 1 line 3: the extent (least and greatest index and bucket) of every tile of head x's sorted rows.
void tile_extents(const HeadRows& rows, std::int64_t block, TileExtent* tiles) {
  for (std::int64_t row0 = 0, tile = 0; row0 < rows.count; row0 += block, ++tile) {
    const std::int64_t end = std::min(row0 + block, rows.count);
    TileExtent e{rows.index[row0], rows.index[row0], rows.bucket[row0], rows.bucket[end - 1]};  // sorted by bucket
    for (std::int64_t r = row0 + 1; r < end; ++r) {  // indices are sorted only within a bucket
      e.first_index = std::min(e.first_index, rows.index[r]);
      e.last_index = std::max(e.last_index, rows.index[r]);
    }
    tiles[tile] = e;
  }
}

// The pairs query head (b, h) attends to: for each kept query, the keys of its bucket that it may see. The keys
// of one bucket are contiguous in the sorted order and ascending in index, so a binary search counts them.
double count_visible_pairs(const AttentionProblem& p, const HeadRows& q, const HeadRows& k) {
  double pairs = 0;
  std::int64_t bucket_begin = 0, bucket_end = 0;
  std::int32_t current = -1;
  for (std::int64_t r = 0; r < q.count; ++r) {
    if (q.bucket[r] != current) {  // queries are sorted by bucket too: find the keys of the new bucket
      current = q.bucket[r];
      bucket_begin = std::lower_bound(k.bucket, k.bucket + k.count, current) - k.bucket;
      bucket_end = std::upper_bound(k.bucket, k.bucket + k.count, current) - k.bucket;
    }
    if (!p.causal) {
      pairs += static_cast<double>(bucket_end - bucket_begin);
      continue;
    }
    const std::int64_t limit = p.visible_keys(q.index[r]);  // keys with index < limit are visible
    pairs += static_cast<double>(std::lower_bound(k.index + bucket_begin, k.index + bucket_end, limit) -
                                 (k.index + bucket_begin));
  }
  return pairs;
}

}  // namespace

Plan make_plan(const AttentionProblem& p, const AttentionTensors& t, const Settings& s, const KeepLists* lists,
               std::int64_t Br, std::int64_t Bc) {
  Plan plan(p, Br, Bc);
  const bool hash = lists == nullptr && s.mode == Mode::hash;
  // Hash-sparse: one projection R for the whole call (head_dim x buckets / 2), the same for Q and K.
  std::vector<float> projection;
  if (hash) {
    const int half = s.buckets / 2;
    projection.resize(static_cast<std::size_t>(p.head_dim * half));
    for (int d = 0; d < p.head_dim; ++d)
      for (int c = 0; c < half; ++c) projection[d * half + c] = projection_entry(s.seed, d, c);
  }
  const auto* q = static_cast<const float*>(t.q);
  const auto* k = static_cast<const float*>(t.k);
  const std::int64_t query_heads = p.batch * p.q_heads, key_heads = p.batch * p.kv_heads;
  double visible_pairs = 0, tiles_visited = 0;
#pragma omp parallel
  {
    std::vector<std::int32_t> row_bucket;
    std::vector<std::int64_t> start;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t x = 0; x < query_heads + key_heads; ++x) {
      const bool query_side = x < query_heads;
      const std::int64_t y = query_side ? x : x - query_heads;  // the head within its side
      const std::int64_t b = y / (query_side ? p.q_heads : p.kv_heads), h = y % (query_side ? p.q_heads : p.kv_heads);
      RowOrder& order = query_side ? plan.queries : plan.keys;
      if (hash) {
        const float* rows = query_side ? row_pointer(q, t.q_strides, b, h, 0) : row_pointer(k, t.kv_strides, b, h, 0);
        hash_rows(order, y, rows, query_side ? t.q_strides.seq : t.kv_strides.seq, query_side ? p.seq_q : p.seq_k,
                  p.head_dim, s.buckets, projection.data(), row_bucket, start);
      } else if (query_side) {
        keep_rows(order, y, p.seq_q, lists ? &lists->query_offsets : nullptr, lists ? &lists->query_indices : nullptr,
                  s.seed, query_stream(p.batch, p.q_heads, b, h), s.drop_q_permille);
      } else {
        keep_rows(order, y, p.seq_k, lists ? &lists->key_offsets : nullptr, lists ? &lists->key_indices : nullptr,
                  s.seed, key_stream(p.batch, p.kv_heads, b, h), s.drop_k_permille);
      }
      tile_extents(order.head(y), query_side ? Br : Bc,
                   query_side ? plan.query_tiles.data() + y * plan.Tr_max : plan.key_tiles.data() + y * plan.Tc_max);
    }
    // The counts (implicit barrier above: every order is complete).
#pragma omp for schedule(dynamic, 1) reduction(+ : visible_pairs, tiles_visited)
    for (std::int64_t x = 0; x < query_heads; ++x) {
      const std::int64_t kv = (x / p.q_heads) * p.kv_heads + p.kv_head_of(x % p.q_heads);
      visible_pairs += count_visible_pairs(p, plan.queries.head(x), plan.keys.head(kv));
      for (std::int64_t i = 0; i < plan.query_tile_count(x); ++i)
        for (std::int64_t j = 0; j < plan.key_tile_count(kv); ++j)
          tiles_visited += tiles_can_meet(p, plan.query_tile(x, i), plan.key_tile(kv, j)) ? 1.0 : 0.0;
    }
  }
  plan.visible_pairs = visible_pairs;
  plan.tiles_visited = tiles_visited;
  return plan;
}

std::size_t plan_bytes(const AttentionProblem& p, std::int64_t Br, std::int64_t Bc) {
  const std::int64_t rows = p.batch * (p.q_heads * p.seq_q + p.kv_heads * p.seq_k);
  const std::int64_t tiles = p.batch * (p.q_heads * ((p.seq_q + Br - 1) / Br) + p.kv_heads * ((p.seq_k + Bc - 1) / Bc));
  return static_cast<std::size_t>(rows) * 2 * sizeof(std::int32_t) + static_cast<std::size_t>(tiles) * sizeof(TileExtent);
}

}  // namespace attn::sparse
