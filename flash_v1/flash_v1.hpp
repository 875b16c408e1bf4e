// Stage 3: FlashAttention (Dao et al. 2022). Tiles of K/V (outer loop) and Q (inner loop) small enough for
// on-chip memory of M bytes; the softmax is computed incrementally and O, l, m are updated in main memory
// ("HBM") on every inner step; the backward recomputes S and P block by block instead of storing them.
#pragma once

#include <cstdint>

#include "common/registry.hpp"

namespace attn::flash_v1 {

/// Block sizes of FA1 Alg. 1 line 1: Bc = ceil(M / 4d), Br = min(Bc, d), for on-chip memory of `sram_bytes`
/// bytes (M = sram_bytes / 4 fp32 elements, as the paper counts M in elements).
struct BlockSizes {
  std::int64_t Br = 0;  ///< rows of a Q block
  std::int64_t Bc = 0;  ///< rows of a K/V block
};
BlockSizes block_sizes(std::int64_t sram_bytes, std::int64_t head_dim);

/// CPU tier. Options: "sram_bytes" (M in bytes; default: the core's L2 cache size), "block_rows" /
/// "block_cols" (override Br / Bc), "count_io" = 1 (count bytes moved between the "HBM" arrays and the tiles
/// into options.counters["hbm_bytes"]). Throws std::invalid_argument naming the option when a block size is
/// < 1, when sram_bytes cannot hold one row of Q_i, K_j, V_j and O_i, or when explicit blocks exceed an
/// explicit sram_bytes.
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
void backward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps cpu_caps();

/// GPU tier (tensor cores): one thread block per (batch, head), outer loop over K/V blocks, inner over Q blocks.
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in flash_v1_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The registry entry.
Stage describe();

}  // namespace attn::flash_v1
