// Stage 5: PagedAttention (Kwon et al., SOSP 2023; docs/papers/paged.md). The KV cache lives in fixed-size
// physical blocks reached through per-sequence block tables; decode attention (one query token per sequence)
// follows the table while it reads K and V. v1: one work item per (sequence, KV head) over the whole
// context; v2: the context split into partitions, combined afterwards by their log-sum-exp.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/memory.hpp"
#include "common/registry.hpp"
#include "paged/block_manager.hpp"
#ifdef ATTN_HAVE_CUDA
#include "common/cuda_utils.hpp"
#endif

namespace attn::paged {

/// Shape of one layer's KV pool. K and V are each [num_blocks, kv_heads, block_size, head_dim]: the rows of
/// one block and one KV head are contiguous, so a block is read as one block_size x head_dim tile.
struct CacheGeometry {
  std::int64_t num_blocks = 1;
  std::int64_t block_size = 16;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 64;

  std::int64_t slots() const { return num_blocks * block_size; }
  std::int64_t pool_elements() const { return num_blocks * kv_heads * block_size * head_dim; }
  /// Element offset of token `offset` of `block`, KV head `kv_head`, in a pool.
  std::int64_t row(std::int64_t block, std::int64_t kv_head, std::int64_t offset) const {
    return ((block * kv_heads + kv_head) * block_size + offset) * head_dim;
  }
};

/// Host fp32 K and V pools, one preallocated pair per layer (the CPU tier's cache).
class HostKVCache {
 public:
  HostKVCache(const CacheGeometry& geometry, std::int64_t layers = 1);
  const CacheGeometry& geometry() const { return geometry_; }
  std::int64_t layers() const { return layers_; }
  float* k(std::int64_t layer = 0) { return k_.data() + layer * geometry_.pool_elements(); }
  float* v(std::int64_t layer = 0) { return v_.data() + layer * geometry_.pool_elements(); }
  const float* k(std::int64_t layer = 0) const { return k_.data() + layer * geometry_.pool_elements(); }
  const float* v(std::int64_t layer = 0) const { return v_.data() + layer * geometry_.pool_elements(); }

 private:
  CacheGeometry geometry_;
  std::int64_t layers_ = 1;
  HostBuffer<float> k_, v_;
};

/// The block tables and context lengths of one decode batch (host memory), plus the query heads.
struct DecodeBatch {
  CacheGeometry cache;
  std::int64_t q_heads = 1;
  double scale = 0.0;                       ///< softmax scale; 0 selects 1 / sqrt(head_dim)
  std::vector<std::int32_t> context_lens;   ///< keys each sequence attends to (0 gives O = 0, LSE = -inf)
  std::int64_t max_blocks_per_sequence = 1;
  std::vector<std::int32_t> block_tables;   ///< [sequences, max_blocks_per_sequence]; unused entries ignored

  std::int64_t sequences() const { return static_cast<std::int64_t>(context_lens.size()); }
  std::int64_t group_size() const { return q_heads / cache.kv_heads; }
  float softmax_scale() const;
  std::int64_t max_context() const;
  /// Bytes of K and V a decode reads: every sequence's context, all KV heads.
  double kv_bytes(DType dtype) const;
};

/// Decode batch of the given sequences of a block manager, in that order.
DecodeBatch make_decode_batch(const BlockManager& manager, const std::vector<SequenceId>& sequences,
                              const CacheGeometry& cache, std::int64_t q_heads, double scale = 0.0);

/// Rejects, with std::invalid_argument naming the argument: a bad geometry, q_heads not a multiple of
/// kv_heads, a block table of the wrong size, context_lens[b] < 0 or above max_blocks_per_sequence *
/// block_size, and any used entry block_tables[b][i] outside [0, num_blocks).
void validate_decode_batch(const DecodeBatch& batch, const std::string& who);

/// Query, output and log-sum-exp of a decode batch. q and o are [sequences, q_heads, head_dim] with the
/// given strides (Strides::seq unused); lse is [sequences, q_heads] contiguous, fp32, natural log. The caches
/// follow CacheGeometry. Host pointers (fp32) for the CPU tier, device pointers (bf16 / f16) for the GPU.
struct DecodeTensors {
  DType dtype = DType::f32;
  Strides q_strides;
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
};

/// Which decode kernel: 1 = one work item per (sequence, KV head) over the whole context; 2 = partitions of
/// partition_tokens keys in parallel, then a reduction by log-sum-exp; 0 = choose (see choose_variant).
struct DecodeOptions {
  int variant = 0;
  std::int64_t partition_tokens = 1024;  ///< vLLM uses 512; 1024 measured 1-2% faster on the H100 (README.md)
  /// GPU only: S = Q K^T and P V on the tensor cores, the group's query heads as the rows of the tiles
  /// (true), or on the CUDA cores, one FMA per head per element (false: the plain version, as vLLM's).
  bool tensor_cores = true;
};

/// The heuristic behind variant 0, from the measurements in README.md: v2 when the (sequence, KV head) pairs
/// are fewer than 2 x `parallel_units` (SMs or threads) and the longest context exceeds 4096 tokens.
int choose_variant(const DecodeBatch& batch, std::int64_t parallel_units);

/// New tokens' K and V rows: token t, KV head h starts at element t * token_stride + h * head_stride.
struct NewTokens {
  std::int64_t count = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
};

/// Rejects slot_mapping entries outside [-1, cache.slots()) (-1 marks a padding token that is skipped).
void validate_slot_mapping(const CacheGeometry& cache, std::span<const std::int64_t> slot_mapping, std::int64_t tokens);

// ---- CPU tier (fp32, OpenMP + xsimd) ----------------------------------------------------------------------

/// Reshape-and-cache: writes token t's K and V rows to slot slot_mapping[t] = block * block_size + offset.
void write_to_cache_cpu(const CacheGeometry& cache, const NewTokens& tokens, std::span<const std::int64_t> slot_mapping,
                        float* k_cache, float* v_cache);
/// Copy-on-write: duplicates each copy's source block into its destination block, K and V.
void copy_blocks_cpu(const CacheGeometry& cache, std::span<const BlockCopy> copies, float* k_cache, float* v_cache);
/// Decode attention through the block tables: o[b, h] = softmax(scale q[b, h] K_b^T) V_b over the first
/// context_lens[b] tokens of sequence b; lse[b, h] its log-sum-exp.
void decode_cpu(const DecodeBatch& batch, const DecodeTensors& tensors, const DecodeOptions& options = {});

// ---- GPU tier (bf16 / f16 cache, fp32 accumulation) -------------------------------------------------------
#ifdef ATTN_HAVE_CUDA
/// A validated DecodeBatch with its block tables and context lengths copied to the device once, so that
/// repeated decodes pay no upload.
class DeviceDecodeBatch {
 public:
  explicit DeviceDecodeBatch(const DecodeBatch& batch);
  const DecodeBatch& host() const { return host_; }
  const std::int32_t* block_tables() const { return block_tables_.data(); }
  const std::int32_t* context_lens() const { return context_lens_.data(); }

 private:
  DecodeBatch host_;
  DeviceBuffer<std::int32_t> block_tables_, context_lens_;
};

/// Head dims the GPU kernels are compiled for, and the block sizes they accept (powers of two up to 256).
TierCaps gpu_caps();
bool gpu_block_size_supported(std::int64_t block_size);
/// Reshape-and-cache on the device (tokens and caches are device pointers in `dtype`; slot_mapping is host).
void write_to_cache_gpu(const CacheGeometry& cache, DType dtype, const NewTokens& tokens,
                        std::span<const std::int64_t> slot_mapping, void* k_cache, void* v_cache);
/// Fills `count` device elements with deterministic pseudo-random values of mean 0 and variance about 1
/// (benchmark caches too large to generate on the host).
void fill_random_gpu(void* data, std::int64_t count, DType dtype, std::uint64_t seed);
/// Decode on the device; returns after launching (stream 0).
void decode_gpu(const DeviceDecodeBatch& batch, const DecodeTensors& tensors, const DecodeOptions& options = {});
/// The GPU tier's registry entry (defined in paged_cuda.cu).
TierEntry gpu_tier();
#endif

// ---- the ladder and the command line ----------------------------------------------------------------------

TierCaps cpu_caps();

/// How the registry entry pages an AttentionProblem: sequence b holds the seq_k keys of batch entry b,
/// appended through a BlockManager whose free list is shuffled by `seed`, so physical blocks are scattered.
struct PagedProblem {
  CacheGeometry geometry;
  BlockManager manager;
  std::vector<SequenceId> sequences;
  std::vector<std::vector<std::int64_t>> slots;  ///< each sequence's slot mapping
  DecodeBatch batch;

  PagedProblem(const AttentionProblem& problem, std::int64_t block_size, std::uint64_t seed);
  /// Batch entry b's contiguous K and V rows, as new tokens for the reshape-and-cache step.
  NewTokens tokens_of(const AttentionTensors& tensors, std::int64_t b, std::size_t element_size) const;
};
/// The largest "block_size" option: far above any serving system's (vLLM: 8 to 32), small enough that a
/// pool's size cannot wrap.
inline constexpr std::int64_t kMaxBlockSize = std::int64_t{1} << 20;
/// Rejects, naming seq_k, a problem whose paging would wrap a 32-bit count: seq_k above 2^31 - 1 (context
/// lengths) or batch x ceil(seq_k / block_size) above 2^31 - 1 (block ids).
void validate_paging(const AttentionProblem& problem, std::int64_t block_size);
/// Registry options: "block_size" (default 16, in [1, kMaxBlockSize]), "variant" and "partition".
std::int64_t block_size_option(const StageOptions& options);
DecodeOptions decode_options(const StageOptions& options);
/// Scratch of one registry pass with these options: the paged K and V pools, v2's partial results and the
/// block manager's tables.
std::size_t registry_extra_bytes(const AttentionProblem& problem, DType dtype, const StageOptions& options = {});

/// The registry entry. Its forward takes the contiguous K and V of the problem (seq_q must be 1), writes them
/// into a paged cache (options "block_size", default 16, physical blocks in a seeded shuffled order,
/// "shuffle_seed", default 1) and decodes with option "variant" (1, 2; default chosen), "partition"
/// (tokens per v2 partition, default 1024) and, on the GPU, "tensor_cores" (default 1). Counters: decode_ms
/// (the decode alone) and kv_GBps.
Stage describe();

/// `attn paged-sim [flags]`: the serving simulation (paged_sim.cpp). Returns the exit status; 2 on bad flags.
int sim_command(const std::vector<std::string>& args);

}  // namespace attn::paged
