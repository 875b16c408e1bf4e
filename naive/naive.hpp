// Stage 1: standard attention, exactly as written in Section 2 of the FlashAttention paper.
// S = scale * Q K^T and P = softmax(S) are materialised in full ([B, Hq, Nq, Nk] each), O = P V.
#pragma once

#include "common/registry.hpp"

namespace attn::naive {

/// CPU tier: fp32, any head dim up to 256. Extra memory: S and P, 2 * B * Hq * Nq * Nk floats.
void forward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors);
/// CPU backward: recomputes P from Q, K and the saved log-sum-exp, then dV = P^T dO, dP = dO V^T,
/// dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q.
void backward_cpu(const AttentionProblem& problem, const AttentionTensors& tensors);

/// The GPU tier comes in two versions with the same function: hand-written kernels to read, and cuBLAS
/// GEMMs (the realistic baseline, like PyTorch's math path).
enum class GpuKernels { handwritten, cublas };

void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, GpuKernels kernels = GpuKernels::cublas);
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, GpuKernels kernels = GpuKernels::cublas);

TierCaps cpu_caps();
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in naive_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The registry entry. GPU option "handwritten" = 1 selects the hand-written kernels.
Stage describe();

}  // namespace attn::naive
