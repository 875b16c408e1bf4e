// FP8 e4m3 (the OCP "E4M3FN" format Hopper's tensor cores take): 1 sign bit, 4 exponent bits (bias 7), 3
// mantissa bits, no infinities, one NaN pattern per sign (0x7F, 0xFF). Largest finite value 448 = 1.75 x 2^8,
// smallest normal 2^-6, smallest subnormal 2^-9. The conversion here is the one the GPU's
// cvt.rn.satfinite.e4m3x2.f32 performs (and CUDA's __nv_cvt_float_to_fp8 with __NV_SATFINITE): round to nearest,
// ties to even; anything beyond 448 in magnitude, infinities included, saturates to +-448; NaN gives 0x7F.
// Usable on the host and in device code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ATTN_HOST_DEVICE __host__ __device__
#else
#define ATTN_HOST_DEVICE
#endif

namespace attn::e4m3 {

constexpr float kMax = 448.0f;        ///< largest finite e4m3 value
constexpr std::uint8_t kNaN = 0x7F;   ///< the NaN code the conversion produces
constexpr int kMantissaBits = 3;      ///< so rounding to nearest errs by at most 2^-4 relative (normal range)

/// fp32 -> e4m3 code, round to nearest even, saturating to +-448 (see the file comment).
ATTN_HOST_DEVICE inline std::uint8_t from_float(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const std::uint8_t sign = static_cast<std::uint8_t>((bits >> 24) & 0x80);
  const std::uint32_t magnitude_bits = bits & 0x7FFFFFFFu;
  if (magnitude_bits > 0x7F800000u) return kNaN;
  float magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  if (magnitude >= kMax) return sign | 0x7E;  // 448 and beyond (infinity too): the largest finite code
  if (magnitude < 0.015625f) {
    // Subnormal range (below 2^-6): steps of 2^-9; rintf rounds ties to even. 8 steps is 2^-6 = code 0x08,
    // which the same formula gives (exponent field 1, mantissa 0).
    return sign | static_cast<std::uint8_t>(rintf(magnitude * 512.0f));
  }
  // Normal range: keep fp32's exponent and the top 3 of its 23 mantissa bits, rounding the other 20 to nearest
  // even (a carry into the exponent is the right result), then rebias the exponent from 127 to 7.
  const std::uint32_t rounded = magnitude_bits + 0x7FFFFu + ((magnitude_bits >> 20) & 1u);
  const std::uint32_t code = (rounded >> 20) - ((127u - 7u) << kMantissaBits);
  return sign | static_cast<std::uint8_t>(code > 0x7Eu ? 0x7Eu : code);  // 448 < x < 464 rounds to 448 anyway
}

/// e4m3 code -> fp32 (exact: every e4m3 value is an fp32 value).
ATTN_HOST_DEVICE inline float to_float(std::uint8_t code) {
  const int exponent = (code >> 3) & 0xF, mantissa = code & 7;
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  if (exponent == 0xF && mantissa == 7) return NAN;
  if (exponent == 0) return sign * static_cast<float>(mantissa) * 0.001953125f;  // mantissa x 2^-9
  return sign * ldexpf(static_cast<float>(8 + mantissa), exponent - 10);         // 1.m x 2^(exponent - 7)
}

/// value rounded to the nearest e4m3 value (saturating), as fp32.
ATTN_HOST_DEVICE inline float round(float value) { return to_float(from_float(value)); }

}  // namespace attn::e4m3
