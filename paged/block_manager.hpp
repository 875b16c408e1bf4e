// The memory side of PagedAttention (vLLM Alg. 1 and 2, docs/papers/paged.md): a pool of fixed-size physical KV blocks, a block
// table per sequence, reference counts for shared (forked) blocks, copy-on-write and preemption. This file
// only does the bookkeeping of block numbers; paged.hpp owns the K/V bytes the numbers point into.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn::paged {

using SequenceId = std::int64_t;
using BlockId = std::int32_t;

/// Thrown when an append needs more free blocks than the pool has. The manager is left exactly as it was
/// before the call (strong guarantee), so a scheduler can preempt someone and retry.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A physical block to duplicate before a write: the sequence now owns `destination`, a fresh copy of the
/// shared `source` (copy-on-write, at block granularity).
struct BlockCopy {
  BlockId source = 0;
  BlockId destination = 0;
};

/// What appending tokens to a sequence produced: where each new token goes (its slot, block * block_size +
/// offset, the "slot mapping" of the reshape-and-cache step) and the block copies to make before writing.
struct AppendResult {
  std::vector<std::int64_t> slots;
  std::vector<BlockCopy> copies;
};

/// A sequence whose blocks were taken back: its tokens must be recomputed (prefilled again) before it runs on.
struct Preempted {
  SequenceId sequence = 0;
  std::int64_t tokens_to_recompute = 0;
};

/// Allocates the physical blocks of one KV pool to sequences, as vLLM's block manager does.
///
/// Every sequence has a block table: logical block i (its tokens i * block_size ... i * block_size +
/// block_size - 1) lives in physical block table[i]. A block's reference count is the number of tables
/// holding it; it returns to the free list when that count drops to 0. Forked sequences share their parent's
/// blocks; the first append into a shared, partly filled last block copies it first.
class BlockManager {
 public:
  /// A pool of num_blocks blocks of block_size tokens. With shuffle_seed != 0 the free list starts in a
  /// seeded random order, so that physical blocks are handed out scattered, as after a long serving run.
  BlockManager(std::int64_t num_blocks, std::int64_t block_size, std::uint64_t shuffle_seed = 0);

  /// A new, empty sequence.
  SequenceId add_sequence();
  /// Free blocks that append(sequence, tokens) would take (new blocks, plus one for a copy-on-write).
  std::int64_t blocks_needed(SequenceId sequence, std::int64_t tokens) const;
  bool can_append(SequenceId sequence, std::int64_t tokens) const;
  /// Appends `tokens` tokens, allocating blocks as the last one fills. Throws PoolExhausted (changing
  /// nothing) when the free list is too short, std::invalid_argument for an unknown sequence or tokens < 0.
  AppendResult append(SequenceId sequence, std::int64_t tokens);
  /// A new sequence sharing all of parent's blocks (parallel sampling, beam search). Takes no free block.
  SequenceId fork(SequenceId parent);
  /// Drops the sequence and its references; blocks nobody else holds return to the free list.
  void free(SequenceId sequence);
  /// Takes a sequence's blocks back (as free() does) but keeps the sequence, now empty: the caller must
  /// recompute its tokens (vLLM's default preemption, recomputation rather than swapping).
  Preempted preempt(SequenceId sequence);

  std::int64_t num_blocks() const { return static_cast<std::int64_t>(ref_counts_.size()); }
  std::int64_t block_size() const { return block_size_; }
  std::int64_t free_block_count() const { return static_cast<std::int64_t>(free_list_.size()); }
  /// The free list, next block to be handed out last.
  const std::vector<BlockId>& free_list() const { return free_list_; }
  /// Number of block tables holding `block` (0: free).
  int ref_count(BlockId block) const;
  /// Logical-to-physical map of a sequence (only the first ceil(length / block_size) entries exist).
  const std::vector<BlockId>& block_table(SequenceId sequence) const;
  /// Tokens stored for a sequence.
  std::int64_t length(SequenceId sequence) const;
  bool contains(SequenceId sequence) const { return sequences_.count(sequence) != 0; }
  /// Live sequences, in id order.
  std::vector<SequenceId> sequences() const;

 private:
  struct Sequence {
    std::vector<BlockId> table;
    std::int64_t length = 0;
  };
  Sequence& find(SequenceId sequence, const char* who);
  const Sequence& find(SequenceId sequence, const char* who) const;
  BlockId take_block();
  void release_block(BlockId block);
  void release_all(Sequence& sequence);

  std::int64_t block_size_ = 16;
  std::vector<int> ref_counts_;
  std::vector<BlockId> free_list_;
  std::map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

}  // namespace attn::paged
