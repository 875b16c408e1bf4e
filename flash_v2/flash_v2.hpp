// Stage 4: FlashAttention-2 (Dao 2023). The loops swapped (outer over Q blocks, inner over K/V blocks), the
// output kept unnormalised and divided by l once at the end, only L = m + log(l) saved, causal blocks above
// the diagonal skipped, and the work partitioned over (batch, head, Q block).
#pragma once

#include <cstdint>

#include "common/registry.hpp"

namespace attn::flash_v2 {

/// CPU tier (fp32, OpenMP + the register-blocked tiles of common/cpu_tiles.hpp). Options: "block_rows" /
/// "block_cols" (Br / Bc; default 128 / 128; each >= 1), "split" = 0 (split-Q, the
/// default: threads own Q blocks) or 1 (split-K: threads share each Q block's K/V blocks and merge partial
/// results; for the work-partitioning study), "dq_atomic" = 1 (backward: add into dQ with atomic adds instead
/// of per-thread buffers and a reduction). The backward reports counters["dq_reduction_ms"] (time in that
/// reduction). Throws std::invalid_argument naming the option for a value out of range.
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
void backward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps cpu_caps();

/// GPU tier: mma.sync tensor-core kernels, split-Q over 4 warps, cp.async double buffering.
/// Options: "deterministic" = 1 (dQ without atomics, by a second pass); "block_cols" = 64, 128 (forward Bc;
/// only for head_dim <= 64, the default there) or 32 (only for head_dim = 128); "backward_block_cols" = 64 or
/// 128 (keys per backward thread block; default 128).
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in flash_v2_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The registry entry.
Stage describe();

}  // namespace attn::flash_v2
