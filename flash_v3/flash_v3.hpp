// Stage 5: FlashAttention-3 (Shah, Bikshandi, Zhang, Thakkar, Ramani, Dao 2024). The same algorithm as
// flash_v2 (Q blocks outer, online softmax, O normalised once), rebuilt around Hopper's asynchronous hardware:
// a producer warpgroup that streams K/V tiles with TMA into a ring of shared-memory stages, consumer
// warpgroups that multiply with wgmma, pingpong scheduling between consumers, and the two-step software
// pipeline of the paper's Algorithm 2 (the next S = Q K^T runs on the tensor cores while this block's softmax
// runs). Forward only; the backward is not implemented yet.
#pragma once

#include <string>

#include "common/registry.hpp"

namespace attn::flash_v3 {

/// CPU tier: the GPU tier's pipeline written with threads, for reading and stepping in a debugger: a producer
/// thread fills a ring of stage buffers guarded by full/empty barriers, two consumer threads take turns on the
/// "tensor cores" (a pingpong token) and overlap the next S = Q K^T with this block's softmax (Algorithm 2).
/// fp32 arithmetic with P rounded to bf16 before P V, as the GPU tier's bf16 path does.
/// Options: see flash_v3_cpu.cpp (and the stage README).
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps cpu_caps();

/// GPU tier (needs a Hopper GPU, sm_90a): TMA + wgmma kernels, bf16 and fp16, head dims 64, 128, 256.
/// Option "schedule" picks the build-up step of the chapter:
///   0 = one consumer warpgroup issuing its own TMA loads, no warp specialization;
///   1 = a producer warpgroup and two consumer warpgroups (setmaxnreg moves registers to the consumers);
///   2 = 1 plus pingpong scheduling of the two consumers' GEMMs (named barriers);
///   3 = 2 plus the intra-warpgroup overlap of Algorithm 2 (the default).
/// Throws std::invalid_argument naming the option or argument for anything the kernels cannot take, and
/// std::runtime_error("... needs a Hopper GPU (sm_90a) ...") on any other GPU.
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in flash_v3_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();
/// "sm_90a" when the GPU tier's kernels were compiled for Hopper, else a sentence saying they were not.
std::string gpu_build_target();

/// The registry entry.
Stage describe();

}  // namespace attn::flash_v3
