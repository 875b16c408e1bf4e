// The host planning of sparse attention's CPU tier: which rows each (batch, head) keeps and in which order the
// kernel reads them (QK-sparse: the kept rows, compacted stably; hash-sparse: every row, sorted stably by
// (bucket, original index)), the extent of every tile of those rows (for skipping tiles that cannot meet), and
// the count of visible (query, key) pairs: SCFA Alg. 1 lines 1-3, which the backward repeats (SCFA Alg. 2 line 1).
#pragma once

#include <cstdint>
#include <vector>

#include "common/memory.hpp"
#include "common/problem.hpp"
#include "sparse/sparse.hpp"

namespace attn::sparse {

/// The sorted rows of one (batch, head): original index and bucket of each (bucket 0 in QK-sparse).
struct HeadRows {
  const std::int32_t* index = nullptr;
  const std::int32_t* bucket = nullptr;
  std::int64_t count = 0;
};

/// The sorted rows of every (batch, head) of one side (queries or keys): head x keeps count[x] rows, stored at
/// [x * capacity, x * capacity + count[x]) of index and bucket. The permutation of "stable compaction".
struct RowOrder {
  RowOrder(std::int64_t heads, std::int64_t capacity);
  std::int64_t heads, capacity;
  HostBuffer<std::int32_t> index, bucket;
  std::vector<std::int64_t> count;
  HeadRows head(std::int64_t x) const { return {index.data() + x * capacity, bucket.data() + x * capacity, count[x]}; }
};

/// The extent of one tile of sorted rows: the least and greatest original index and bucket in it.
struct TileExtent {
  std::int32_t first_index, last_index;
  std::int32_t first_bucket, last_bucket;
};

/// Can some query of tile q see some key of tile k? Their bucket ranges overlap and, when causal, the
/// earliest key is visible from the latest query (SCFA Alg. 1 line 8). Conservative: true may still find nothing.
inline bool tiles_can_meet(const AttentionProblem& p, const TileExtent& q, const TileExtent& k) {
  return q.first_bucket <= k.last_bucket && k.first_bucket <= q.last_bucket &&
         (!p.causal || k.first_index < p.visible_keys(q.last_index));
}

/// Does every query of tile q see every key of tile k? One and the same bucket and, when causal, the latest
/// key visible from the earliest query: then no entry needs masking.
inline bool tiles_fully_visible(const AttentionProblem& p, const TileExtent& q, const TileExtent& k) {
  return q.first_bucket == q.last_bucket && k.first_bucket == k.last_bucket && q.first_bucket == k.first_bucket &&
         (!p.causal || k.last_index < p.visible_keys(q.first_index));
}

/// Everything the CPU tier's passes need to know before touching Q, K, V in tiles.
struct Plan {
  Plan(const AttentionProblem& p, std::int64_t Br, std::int64_t Bc);
  std::int64_t Br, Bc;
  RowOrder queries;  ///< B * Hq heads (b * Hq + h), capacity Nq
  RowOrder keys;     ///< B * Hkv heads (b * Hkv + h), capacity Nk
  std::int64_t Tr_max, Tc_max;                 ///< tiles per head of the dense problem: ceil(Nq / Br), ceil(Nk / Bc)
  HostBuffer<TileExtent> query_tiles;          ///< B * Hq x Tr_max (the first ceil(count / Br) of each head used)
  HostBuffer<TileExtent> key_tiles;            ///< B * Hkv x Tc_max
  double visible_pairs = 0;                    ///< (query, key) pairs attended, over every (batch, query head)
  double tiles_visited = 0;                    ///< (Q tile, K tile) pairs that can meet, over every (batch, query head)

  std::int64_t query_tile_count(std::int64_t x) const { return (queries.count[x] + Br - 1) / Br; }
  std::int64_t key_tile_count(std::int64_t x) const { return (keys.count[x] + Bc - 1) / Bc; }
  const TileExtent& query_tile(std::int64_t x, std::int64_t i) const { return query_tiles[x * Tr_max + i]; }
  const TileExtent& key_tile(std::int64_t x, std::int64_t j) const { return key_tiles[x * Tc_max + j]; }
};

/// Builds the plan of one call: QK-sparse masks (from `lists`, or drawn with keep_row) or hash-sparse buckets
/// (bucket_of with one projection for the call), the stable sorts, the tile extents and the counts. q and k
/// are the call's host inputs (read only for hashing). Settings and lists must have been validated.
Plan make_plan(const AttentionProblem& p, const AttentionTensors& t, const Settings& settings, const KeepLists* lists,
               std::int64_t Br, std::int64_t Bc);

/// Host bytes a plan holds (for the tier's extra_bytes estimate).
std::size_t plan_bytes(const AttentionProblem& p, std::int64_t Br, std::int64_t Bc);

}  // namespace attn::sparse
