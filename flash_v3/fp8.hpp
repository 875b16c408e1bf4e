// flash_v3 in FP8 (e4m3): FA3 Section 3.3. Q, K and V go into e4m3 with one fp32 scale per block of rows (block
// quantization), optionally after incoherent processing (Q and K times one random orthogonal matrix M, which
// leaves Q K^T unchanged and spreads outliers over the head dimension), and the forward multiplies e4m3 by e4m3
// into fp32, with P brought into e4m3's range before O += P V. This header is the CPU side, which emulates the
// e4m3 rounding exactly (common/e4m3.hpp) so that the error study of the paper's Table 3 runs without a GPU.
// Tensors here are contiguous [batch, heads, seq, head_dim] (the bhnd layout) in fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "common/e4m3.hpp"
#include "common/problem.hpp"

namespace attn::flash_v3::fp8 {

/// Rows of Q per quantization block and per tile of the CPU forward, and keys per K/V block (the GPU kernel's B_c).
/// The GPU kernel's tiles hold two (d = 256) or three (d = 128) consumer warpgroups of 64 rows; each warpgroup's
/// rows lie in one Q block.
inline constexpr std::int64_t kBlockRows = 128;
inline constexpr std::int64_t kBlockCols = 128;
/// Rows that share one v_ref (forward_cpu): a consumer warpgroup's of the GPU kernel.
inline constexpr std::int64_t kVRefRows = 64;
/// P~ = exp2(x - m + kPExponent) lies in (0, 2^8]: well inside e4m3's range (448), and its small values stay
/// out of the subnormals down to 2^-14 of the row max (FA3 Section 3.3).
inline constexpr int kPExponent = 8;

/// How a block's scale follows from its largest magnitude amax. `amax`: amax / 448, the block's largest value
/// becomes e4m3's largest. `power_of_two`: the smallest power of two >= amax / 448, so the largest value lands in
/// [224, 448]: the same relative precision (e4m3 is floating point: every binade has 3 mantissa bits) and the
/// ratio of two scales is a power of two, which the forward uses for V (forward_cpu: the V scale goes into P).
enum class ScaleRule { amax, power_of_two };

/// The scale of a block whose largest magnitude is amax, and its reciprocal used to encode (1 and 1 for an
/// all-zero block). Host and device: the quantization kernel calls this very function.
struct BlockScale {
  float scale, inverse;
};
ATTN_HOST_DEVICE inline BlockScale block_scale(float amax, ScaleRule rule) {
  if (amax == 0.0f) return {1.0f, 1.0f};
  const float scale = amax / e4m3::kMax;
  if (rule == ScaleRule::amax) return {scale, e4m3::kMax / amax};
  int exponent = 0;
  const float mantissa = frexpf(scale, &exponent);  // scale = mantissa x 2^exponent, mantissa in [0.5, 1)
  const float power = mantissa == 0.5f ? scale : ldexpf(1.0f, exponent);
  return {power, 1.0f / power};  // exact: a power of two
}

/// x <- x H in place, H the unnormalised d x d Walsh-Hadamard matrix (H H = d I), d = x.size() a power of two:
/// log2(d) butterfly passes, O(d log d) additions.
void walsh_hadamard(std::span<float> x);

/// The d random signs s of M = diag(s) H / sqrt(d), from a seed (the same seed gives the same M everywhere).
std::vector<float> random_signs(int head_dim, std::uint64_t seed);

/// Incoherent processing: each of the `rows` rows x (head_dim contiguous floats) becomes x M, M = diag(signs) H /
/// sqrt(d). M is orthogonal, so (Q M)(K M)^T = Q M M^T K^T = Q K^T (FA3 Section 3.3).
void rotate_rows(std::span<float> x, int head_dim, std::span<const float> signs);

/// A tensor in e4m3: codes in the tensor's layout, and one fp32 scale per block of `block_rows` consecutive rows
/// of one (batch, head), blocks numbered (batch * heads + head) * ceil(seq / block_rows) + block; or one scale
/// for the whole tensor when per_tensor. Element = e4m3::to_float(code) * scale.
struct Quantized {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales;
  std::int64_t seq = 0;
  std::int64_t block_rows = 0;
  bool per_tensor = false;
  float scale_of(std::int64_t batch_head, std::int64_t row) const {
    return per_tensor ? scales[0] : scales[batch_head * ((seq + block_rows - 1) / block_rows) + row / block_rows];
  }
};

/// Block quantization: scale = block_scale(amax over the block, rule), code = e4m3(x * inverse), rounded to
/// nearest even. `batch_heads` tensors of `seq` rows x head_dim. per_tensor: one amax over everything (the
/// baseline of the paper's Table 3). The GPU's quantization kernel computes exactly this (Q and K with
/// ScaleRule::amax, V with ScaleRule::power_of_two).
Quantized quantize(std::span<const float> x, std::int64_t batch_heads, std::int64_t seq, int head_dim,
                   std::int64_t block_rows, bool per_tensor = false, ScaleRule rule = ScaleRule::amax);

/// The forward in FP8 on the CPU, the GPU kernel's arithmetic on a simple tiled loop: per Q block (B_r = q's
/// block_rows) and K/V block (B_c = k's block_rows, equal to v's), S = Q8 K8^T exactly in fp32 times the two
/// scales, online softmax in base 2, P~ = exp2(x - m + 8) x v_j / v_ref rounded to e4m3 (v_j: block j's V scale,
/// v_ref: the largest V scale of the blocks that the row's group of kVRefRows rows sees), O += P8 V8 in fp32, so that O stays in units of
/// v_ref and is rescaled only when a row's max grows; O v_ref / l at the end. With power-of-two V scales the
/// factor v_j / v_ref is a power of two and P8 is the same e4m3 value as without it. o (fp32, q's shape) and lse (natural log, -inf for a
/// row that sees no key). q, k, v from quantize (with the same per_tensor for k and v).
void forward_cpu(const AttentionProblem& problem, const Quantized& q, const Quantized& k, const Quantized& v,
                 std::span<float> o, std::span<float> lse);

/// The whole FP8 path on fp32 inputs (contiguous bhnd, K and V [batch, kv_heads, seq_k, head_dim]): with
/// `incoherent`, Q and K rotated by M (random_signs(head_dim, seed)); Q, K, V quantized with block scales
/// (kBlockRows, kBlockCols) or, without `block_scales`, one scale per tensor; forward_cpu; O rounded to bf16, as the
/// GPU kernel writes it.
std::vector<float> attention_cpu(const AttentionProblem& problem, std::span<const float> q, std::span<const float> k,
                                 std::span<const float> v, bool block_scales, bool incoherent, std::uint64_t seed);

}  // namespace attn::flash_v3::fp8
