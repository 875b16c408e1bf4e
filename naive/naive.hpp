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
/// GEMMs (the realistic baseline, like PyTorch's math path). Only the matrix products differ; the softmax
/// and dS kernels are shared.
enum class GpuKernels { handwritten, cublas };

/// GPU forward: S = scale Q K^T (GEMM), P = softmax(S) with LSE (row kernel), O = P V (GEMM), each a separate
/// launch with S and P in device memory. f32, bf16 or f16 tensors (device pointers), fp32 accumulation.
/// Extra memory: S in fp32 and P in the input dtype, B * Hq * Nq * Nk * (4 + element size) bytes.
/// Returns before the device finishes (work is queued on the default stream).
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, GpuKernels kernels = GpuKernels::cublas);
/// GPU backward: recomputes P = exp(S - LSE), then dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
/// dQ = scale dS K, dK = scale dS^T Q (dK, dV summed over each group's query heads in fp32).
/// Extra memory: S/dP in fp32, P and dS in the input dtype, and fp32 dK, dV accumulators.
void backward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, GpuKernels kernels = GpuKernels::cublas);

TierCaps cpu_caps();
/// f32, bf16, f16; head dim up to 256; every pointer must be device memory.
TierCaps gpu_caps();
/// The GPU tier's registry entry (defined in naive_cuda.cu; only in builds with CUDA).
TierEntry gpu_tier();

/// The registry entry. GPU option "handwritten" = 1 selects the hand-written kernels.
Stage describe();

}  // namespace attn::naive
