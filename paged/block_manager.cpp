// The block manager: a free list, reference counts and one block table per sequence. Every operation
// either succeeds completely or throws before changing anything.
#include "paged/block_manager.hpp"

#include <utility>

namespace attn::paged {
namespace {

// splitmix64: a tiny, portable generator, so that the shuffled pool is the same on every machine.
std::uint64_t next_random(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

BlockManager::BlockManager(std::int64_t num_blocks, std::int64_t block_size, std::uint64_t shuffle_seed)
    : block_size_(block_size) {
  if (num_blocks < 1 || num_blocks > INT32_MAX)
    throw std::invalid_argument("num_blocks: " + std::to_string(num_blocks) + " must be in [1, 2^31)");
  if (block_size < 1) throw std::invalid_argument("block_size: " + std::to_string(block_size) + " must be >= 1");
  ref_counts_.assign(static_cast<std::size_t>(num_blocks), 0);
  free_list_.reserve(static_cast<std::size_t>(num_blocks));
  // Blocks are taken from the back of the free list: put block 0 last, so that an unshuffled pool hands
  // out 0, 1, 2, ... in order.
  for (std::int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<BlockId>(b));
  if (shuffle_seed != 0) {
    std::uint64_t state = shuffle_seed;
    for (std::size_t i = free_list_.size() - 1; i > 0; --i)  // Fisher-Yates
      std::swap(free_list_[i], free_list_[next_random(state) % (i + 1)]);
  }
}

BlockManager::Sequence& BlockManager::find(SequenceId sequence, const char* who) {
  auto it = sequences_.find(sequence);
  if (it == sequences_.end())
    throw std::invalid_argument(std::string(who) + ": sequence " + std::to_string(sequence) + " does not exist");
  return it->second;
}

const BlockManager::Sequence& BlockManager::find(SequenceId sequence, const char* who) const {
  return const_cast<BlockManager*>(this)->find(sequence, who);
}

BlockId BlockManager::take_block() {
  // LAB BEGIN paged-blocks: allocate: a block off the free list
  const BlockId block = free_list_.back();
  free_list_.pop_back();
  ref_counts_[block] = 1;
  return block;
  // LAB END paged-blocks
}

void BlockManager::release_block(BlockId block) {
  // LAB BEGIN paged-blocks: drop a reference; free the block at zero
  if (--ref_counts_[block] == 0) free_list_.push_back(block);
  // LAB END paged-blocks
}

void BlockManager::release_all(Sequence& sequence) {
  // LAB BEGIN paged-blocks: free: release a sequence's blocks
  for (BlockId block : sequence.table) release_block(block);
  sequence.table.clear();
  sequence.length = 0;
  // LAB END paged-blocks
}

SequenceId BlockManager::add_sequence() {
  sequences_[next_id_] = Sequence{};
  return next_id_++;
}

std::int64_t BlockManager::blocks_needed(SequenceId id, std::int64_t tokens) const {
  const Sequence& s = find(id, "blocks_needed");
  if (tokens < 0) throw std::invalid_argument("tokens: " + std::to_string(tokens) + " must be >= 0");
  if (tokens == 0) return 0;
  const std::int64_t new_blocks = ceil_div(s.length + tokens, block_size_) - static_cast<std::int64_t>(s.table.size());
  // Writing into a partly filled last block that another sequence also holds needs a private copy of it.
  const bool last_block_has_room = s.length % block_size_ != 0;
  const bool copy_on_write = last_block_has_room && ref_counts_[s.table.back()] > 1;
  return new_blocks + (copy_on_write ? 1 : 0);
}

bool BlockManager::can_append(SequenceId id, std::int64_t tokens) const {
  return blocks_needed(id, tokens) <= free_block_count();
}

AppendResult BlockManager::append(SequenceId id, std::int64_t tokens) {
  const std::int64_t needed = blocks_needed(id, tokens);  // validates id and tokens
  if (needed > free_block_count())
    throw PoolExhausted("append: sequence " + std::to_string(id) + " needs " + std::to_string(needed) +
                        " free blocks for " + std::to_string(tokens) + " tokens, but only " +
                        std::to_string(free_block_count()) + " of " + std::to_string(num_blocks()) +
                        " are free (preempt or free a sequence first)");
  // LAB BEGIN paged-blocks: append: copy-on-write, then one slot per token
  Sequence& s = sequences_.at(id);
  AppendResult result;
  if (tokens > 0 && s.length % block_size_ != 0 && ref_counts_[s.table.back()] > 1) {
    const BlockId shared = s.table.back();
    const BlockId copy = take_block();
    release_block(shared);  // still held by the other sequences
    s.table.back() = copy;
    result.copies.push_back({shared, copy});
  }
  result.slots.reserve(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t, ++s.length) {
    const std::int64_t offset = s.length % block_size_;
    if (offset == 0) s.table.push_back(take_block());  // the last block is full (or there is none yet)
    result.slots.push_back(static_cast<std::int64_t>(s.table.back()) * block_size_ + offset);
  }
  return result;
  // LAB END paged-blocks
}

SequenceId BlockManager::fork(SequenceId parent) {
  // LAB BEGIN paged-blocks: fork: share every block of the parent
  const Sequence copy = find(parent, "fork");
  for (BlockId block : copy.table) ++ref_counts_[block];
  sequences_[next_id_] = copy;
  return next_id_++;
  // LAB END paged-blocks
}

void BlockManager::free(SequenceId id) {
  release_all(find(id, "free"));
  sequences_.erase(id);
}

Preempted BlockManager::preempt(SequenceId id) {
  Sequence& s = find(id, "preempt");
  const Preempted result{id, s.length};
  release_all(s);
  return result;
}

int BlockManager::ref_count(BlockId block) const {
  if (block < 0 || block >= num_blocks())
    throw std::invalid_argument("block: " + std::to_string(block) + " is outside the pool [0, " +
                                std::to_string(num_blocks()) + ")");
  return ref_counts_[block];
}

const std::vector<BlockId>& BlockManager::block_table(SequenceId id) const { return find(id, "block_table").table; }

std::int64_t BlockManager::length(SequenceId id) const { return find(id, "length").length; }

std::vector<SequenceId> BlockManager::sequences() const {
  std::vector<SequenceId> ids;
  for (const auto& entry : sequences_) ids.push_back(entry.first);
  return ids;
}

}  // namespace attn::paged
