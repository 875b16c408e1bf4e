// Host-side fp16 / bf16 conversion (round to nearest, ties to even), deterministic random fills and the
// error metrics every test and table uses.
#pragma once

#include <cstdint>
#include <span>

#include "common/problem.hpp"

namespace attn {

/// fp32 -> bf16 bits, rounding to nearest even; NaN stays NaN (quiet), infinities stay infinite.
std::uint16_t float_to_bf16_bits(float value);
float bf16_bits_to_float(std::uint16_t bits);
/// fp32 -> IEEE fp16 bits, rounding to nearest even, with subnormals; overflow goes to infinity.
std::uint16_t float_to_f16_bits(float value);
float f16_bits_to_float(std::uint16_t bits);

/// Rounds value to the nearest value representable in dtype (identity for f32).
float round_to_dtype(float value, DType dtype);
void round_to_dtype(std::span<float> values, DType dtype);

/// Encodes fp32 values as dtype elements into raw storage of dtype_size(dtype) * values.size() bytes.
void encode(std::span<const float> values, DType dtype, void* out);
/// Decodes count dtype elements from raw storage into fp32.
void decode(const void* in, DType dtype, std::span<float> out);

/// Fills values with independent normal(0, stddev) samples from a counter-based generator: the same seed
/// gives the same numbers on every machine and compiler.
void fill_normal(std::span<float> values, std::uint64_t seed, float stddev = 1.0f);

/// Error of `actual` against `reference`: max |a - r| and ||a - r||_F / ||r||_F.
/// Positions where both are the same infinity (LSE of an empty row) count as exact; NaN anywhere, or an
/// infinity on one side only, makes both errors infinite and counts in `bad_values`.
struct ErrorStats {
  double max_abs = 0.0;
  double rel_frobenius = 0.0;
  std::int64_t bad_values = 0;
};
ErrorStats compare(std::span<const float> actual, std::span<const float> reference);
ErrorStats compare(std::span<const float> actual, std::span<const double> reference);

}  // namespace attn
