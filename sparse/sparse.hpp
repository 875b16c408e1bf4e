// Stage 7: sparse causal flash attention (Pagliardini, Paliotta, Jaggi, Fleuret 2023). Two ways of attending
// to fewer (query, key) pairs while staying exact on the pairs kept:
//  - QK-sparse: per head, some queries and some keys are dropped (at random at a given rate, or from the
//    caller's index lists); the kept rows are compacted (stable, so order is kept) and attended causally on
//    their original indices.
//  - hash-sparse: per head, queries and keys are hashed into buckets (argmax over [x R; -x R] for a random
//    projection R), sorted by (bucket, position), and a query attends only to the keys of its bucket, causally
//    on original indices.
// Both run a flash_v2-style kernel over the compacted or sorted rows that skips every K/V tile whose index
// range (and bucket range) cannot meet the Q tile's, then scatter the results back to original positions.
//
// A dropped query, or a kept query that sees no key, gets O = 0 and LSE = -inf; its dQ is 0. A dropped key
// gets dK = dV = 0.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/registry.hpp"

namespace attn::sparse {

enum class Mode : int { qk = 0, hash = 1 };

/// The stage's options, read from StageOptions by read_settings:
///   "mode"            0 = QK-sparse (default), 1 = hash-sparse
///   "drop_q_permille" QK-sparse: queries dropped, per mille, in [0, 1000) (default 0)
///   "drop_k_permille" QK-sparse: keys dropped, per mille, in [0, 1000) (default 0)
///   "buckets"         hash-sparse: number of buckets nb, 1 or an even number up to kMaxBuckets (default 8)
///   "seed"            the seed of the masks and of the projection (default 1)
/// plus the tier's block sizes ("block_rows", "block_cols" on the CPU tier).
struct Settings {
  Mode mode = Mode::qk;
  int drop_q_permille = 0;
  int drop_k_permille = 0;
  int buckets = 8;
  std::uint64_t seed = 1;
};
/// Throws std::invalid_argument naming the option and its rule for a value out of range.
Settings read_settings(const StageOptions& options);

/// The caller's own QK-sparse masks, as index lists in CSR form: the kept query rows of (batch b, query head
/// h) are query_indices[query_offsets[b * Hq + h] .. query_offsets[b * Hq + h + 1]), and the kept keys of
/// (batch b, KV head h) are key_indices[key_offsets[b * Hkv + h] ..]. Each list strictly ascending (sorted, no
/// duplicates), every index in [0, seq_q) or [0, seq_k). Host memory on both tiers (the GPU tier uploads them).
struct KeepLists {
  std::vector<std::int64_t> query_offsets;  ///< B * Hq + 1 entries, non-decreasing, starting at 0
  std::vector<std::int32_t> query_indices;
  std::vector<std::int64_t> key_offsets;    ///< B * Hkv + 1 entries, non-decreasing, starting at 0
  std::vector<std::int32_t> key_indices;
};
/// Throws std::invalid_argument naming the list and the rule broken (wrong length, out of range, unsorted or
/// duplicated), before any work is done.
void validate_keep_lists(const AttentionProblem& problem, const KeepLists& lists);

/// CPU tier (fp32, OpenMP + the tiles of common/cpu_tiles.hpp). With `lists`, QK-sparse on the caller's masks
/// (the options' mode and drop rates are then not used).
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options,
                 const KeepLists* lists = nullptr);
void backward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options,
                  const KeepLists* lists = nullptr);
TierCaps cpu_caps();

/// The GPU tier's plan of one forward call, kept for the backward of the same call: both sides' sorted rows and
/// the queries' spans, on the device. SCFA Alg. 2 line 1 repeats Alg. 1 lines 1-3, whose result depends only on
/// the problem, the settings (or the index lists) and Q and K; handed over, the backward does not plan again.
/// forward_gpu fills one when given it (dropping what it held first); backward_gpu, given a filled one, checks
/// that it was made for the same problem, settings, index lists, dtype and Q and K tensors (pointers and
/// strides) and refuses it otherwise (std::invalid_argument naming "plan"). Q and K must not change between the
/// two calls: the forward's O and LSE would not match them either. Move-only; holds device memory until reset
/// or destroyed.
class SavedPlan {
 public:
  struct State;  ///< defined by the GPU tier
  SavedPlan();
  ~SavedPlan();
  SavedPlan(SavedPlan&&) noexcept;
  SavedPlan& operator=(SavedPlan&&) noexcept;
  bool empty() const { return state_ == nullptr; }
  void reset();
  const State* state() const { return state_.get(); }
  void set(std::unique_ptr<State> state);

 private:
  std::unique_ptr<State> state_;
};

/// GPU tier (mma.sync tensor cores, as flash_v2's). Masks, hashing, sorting and compaction run on the device.
/// `keep`: the forward's plan is kept there for the backward (SavedPlan); `plan`: the backward uses that plan
/// instead of planning again. Through the registry the same hand-over is the option "keep_plan" = 1: the forward
/// keeps its plan for the host thread's next sparse/gpu backward, which takes it (checked as above) when it is
/// also given keep_plan = 1; otherwise, or when no forward kept one, the backward plans itself.
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options,
                 const KeepLists* lists = nullptr, SavedPlan* keep = nullptr);
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options,
                  const KeepLists* lists = nullptr, const SavedPlan* plan = nullptr);
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in sparse_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The ladder's stated sparsity, on both tiers: hash-sparse with 8 buckets (about 1/8 of the pairs), seed 1.
inline std::map<std::string, std::int64_t> ladder_sparsity() { return {{"mode", 1}, {"buckets", 8}}; }

/// Which pairs a call attends to, written plainly from sparsity.hpp's rules (no sorting, no tiles, none of the
/// tiers' planning): the reference mask for the fp64 oracle in the tests and in `attn run` / `attn ladder`.
/// visible(b, h, i, j) is true when query i of (b, query head h) and key j of its KV head are both kept and share
/// a bucket; the causal mask is not included (the oracle applies it). q and k are host fp32 tensors.
class ReferenceMask {
 public:
  ReferenceMask(const AttentionProblem& problem, const float* q, const Strides& q_strides, const float* k,
                const Strides& kv_strides, const Settings& settings, const KeepLists* lists = nullptr);
  bool operator()(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const;

 private:
  AttentionProblem problem_;
  std::vector<std::int32_t> query_bucket_;  ///< [B * Hq][Nq]: the query's bucket, -1 when dropped
  std::vector<std::int32_t> key_bucket_;    ///< [B * Hkv][Nk]: the key's bucket, -2 when dropped
};

/// The registry entry.
Stage describe();

}  // namespace attn::sparse
