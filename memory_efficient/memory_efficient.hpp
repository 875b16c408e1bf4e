// Stage 2: memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory").
// Queries and keys are cut into chunks; each (query chunk, key chunk) is reduced to a small *summary*, and the
// summaries of all key chunks are combined through one global max. No N x N matrix is ever allocated.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/registry.hpp"

namespace attn::memory_efficient {

/// Chunk sizes, read from StageOptions "query_chunk" and "key_chunk" (the paper's JAX defaults 1024 and
/// 4096). Any value >= 1 is valid, also one larger than the sequence (then there is a single chunk).
struct Chunks {
  std::int64_t query = 1024;  ///< query rows per chunk (the paper's query_chunk_size)
  std::int64_t key = 4096;    ///< keys per chunk (the paper's key_chunk_size)
};

inline constexpr std::int64_t kDefaultQueryChunk = 1024;
inline constexpr std::int64_t kDefaultKeyChunk = 4096;

/// Throws std::invalid_argument naming the option when a chunk size is below 1 ("query_chunk: 0 must be >= 1").
void validate_chunks(const Chunks& chunks);
/// Reads the chunk sizes from the options (defaults where absent) and validates them.
Chunks read_chunks(const StageOptions& options);

/// CPU tier, forward: fp32, any head dim up to 256. For every (batch, head, query chunk), in parallel:
/// a summary per key chunk (chunk max m_c, weights sum sum_j exp(s_j - m_c), values sum
/// sum_j exp(s_j - m_c) v_j), then the combine through the global max; writes O and the log-sum-exp.
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, const Chunks& chunks);
/// CPU backward by recomputation (the paper's checkpointed summary function): the scores of each
/// (query chunk, key chunk) are recomputed and normalised with the saved log-sum-exp; nothing N x N is stored.
/// dQ is owned by query chunks, dK and dV by key chunks (summed over the query heads of their KV head), so no
/// two threads ever write the same row.
void backward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, const Chunks& chunks);

/// Extra bytes of the CPU tier (its scratch): per worker thread one query chunk's summaries, Cq x ceil(Nk/Ck)
/// x (D + 2) floats, one Cq x Ck score block and one D x Ck transposed key chunk. The backward: per worker two
/// Cq x Ck blocks (P, dS) and two D x Ck chunks (K, V transposed), plus one float per query row (rowsum(dO * O)).
std::size_t cpu_extra_bytes(const AttentionProblem& problem, const Chunks& chunks, bool backward);

/// GPU tier: forward with a summarise kernel (one thread block per (query tile, key chunk), writing the
/// summaries to a device scratch buffer) and a combine kernel, one query chunk after the other; fp32
/// accumulation; f32, bf16, f16; head dim up to 256. Backward by recomputation with simple kernels.
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, const Chunks& chunks);
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, const Chunks& chunks);

/// Extra device bytes of the GPU tier: the summaries of one query chunk for every (batch, head),
/// B x Hq x Cq x ceil(Nk/Ck) x (D + 2) floats; the backward needs B x Hq x Nq floats (rowsum(dO * O)).
std::size_t gpu_extra_bytes(const AttentionProblem& problem, const Chunks& chunks, bool backward);

TierCaps cpu_caps();
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in memory_efficient_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The registry entry. Options: "query_chunk" (default 1024), "key_chunk" (default 4096).
Stage describe();

}  // namespace attn::memory_efficient
