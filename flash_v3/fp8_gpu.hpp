// flash_v3 FP8, GPU tier (fp8_cuda.cu): the quantization kernel (block scales, optional incoherent processing) and
// the e4m3 forward kernel. Reached through flash_v3's GPU tier with the option fp8 = 1 (and incoherent = 1), or
// directly (the tests call the two steps separately).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.hpp"
#include "common/registry.hpp"

namespace attn::flash_v3::fp8 {

/// What the FP8 path takes: bf16 Q, K, V (any strides the validator accepts), head dim 128 or 256.
TierCaps gpu_caps();

/// Device scratch of one FP8 call: the e4m3 codes of Q, K, V (contiguous [batch, heads, seq, head_dim]), their
/// block scales (fp8.hpp: Quantized), and the head_dim random signs of incoherent processing.
struct Scratch {
  explicit Scratch(const AttentionProblem& problem);
  DeviceBuffer<std::uint8_t> codes;
  DeviceBuffer<float> floats;
  std::uint8_t *q = nullptr, *k = nullptr, *v = nullptr;
  float *q_scales = nullptr, *k_scales = nullptr, *v_scales = nullptr, *signs = nullptr;
};
/// Bytes of Scratch for a problem, and of the tail split's partial results (option tail_split, forward_gpu).
std::size_t scratch_bytes(const AttentionProblem& problem, std::int64_t tail_split = 0);

/// The quantization kernel on Q, K (both rotated by M = diag(random_signs(d, seed)) H / sqrt(d) with incoherent)
/// and V: codes and scales equal to fp8.hpp's quantize on the same (rotated) values. Head dims 64, 128, 256.
void quantize_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, bool incoherent, std::uint64_t seed,
                  Scratch& scratch);
/// The FP8 forward kernel on quantized Q, K, V: O (bf16, tensors.o with q_strides) and LSE. `deep`: K/V rings of 4
/// (D = 128) or 2 (D = 256: shared memory holds no more) stages; else 2. `transpose` = false skips the V
/// transposition: wrong O, a timing probe. `tail_split`: the option of forward_gpu.
void forward_quantized_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, const Scratch& scratch,
                           bool deep = true, bool transpose = true, std::int64_t tail_split = 0);
/// Both, after validation (gpu_caps); options "incoherent" = 0 or 1, "stages" = 0 (deep rings) or 2, "tail_split"
/// = 0 (the tiles of the grid's last, partial wave split along their keys when the cost rule says it pays, then
/// combined; never for causal problems), 1 (never) or 2..16 (the last wave's tiles in that many pieces).
void forward_gpu(const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& options);

}  // namespace attn::flash_v3::fp8
