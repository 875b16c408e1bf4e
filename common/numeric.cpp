#include "common/numeric.hpp"

#include <bit>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace attn {

std::uint16_t float_to_bf16_bits(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // keep it a quiet NaN
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. Overflow rounds to inf.
  const std::uint32_t lowest_kept = (bits >> 16) & 1u;
  return static_cast<std::uint16_t>((bits + 0x7fffu + lowest_kept) >> 16);
}

float bf16_bits_to_float(std::uint16_t bits) { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }

std::uint16_t float_to_f16_bits(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (magnitude >= 65520.0f) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (magnitude < 6.103515625e-05f) {
    // Subnormal range: value = m * 2^-24 with integer m in [0, 1024]; nearbyint rounds half to even.
    const float m = std::nearbyint(magnitude * 16777216.0f);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(m));
  }
  // Normal range: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits, ties to even.
  const std::uint32_t abs_bits = bits & 0x7fffffffu;
  const std::uint32_t lowest_kept = (abs_bits >> 13) & 1u;
  const std::uint32_t rounded = abs_bits + 0x0fffu + lowest_kept;
  return static_cast<std::uint16_t>(sign | ((rounded >> 13) - ((127u - 15u) << 10)));
}

float f16_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 127u - 15u) << 23) | (mantissa << 13));
}

float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::f32: return value;
    case DType::bf16: return bf16_bits_to_float(float_to_bf16_bits(value));
    case DType::f16: return f16_bits_to_float(float_to_f16_bits(value));
  }
  return value;
}

void round_to_dtype(std::span<float> values, DType dtype) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = round_to_dtype(values[i], dtype);
}

void encode(std::span<const float> values, DType dtype, void* out) {
  if (dtype == DType::f32) {
    float* dst = static_cast<float*>(out);
    for (std::size_t i = 0; i < values.size(); ++i) dst[i] = values[i];
    return;
  }
  std::uint16_t* dst = static_cast<std::uint16_t*>(out);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < values.size(); ++i)
    dst[i] = dtype == DType::bf16 ? float_to_bf16_bits(values[i]) : float_to_f16_bits(values[i]);
}

void decode(const void* in, DType dtype, std::span<float> out) {
  if (dtype == DType::f32) {
    const float* src = static_cast<const float*>(in);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = src[i];
    return;
  }
  const std::uint16_t* src = static_cast<const std::uint16_t*>(in);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = dtype == DType::bf16 ? bf16_bits_to_float(src[i]) : f16_bits_to_float(src[i]);
}

namespace {

// SplitMix64 applied to (seed, index): element i's value does not depend on how the fill is split up.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double uniform_open01(std::uint64_t bits) {  // in (0, 1): never 0, so log() below is finite
  return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53;
}

}  // namespace

void fill_normal(std::span<float> values, std::uint64_t seed, float stddev) {
  const std::uint64_t stream = mix(seed ^ 0x5851f42d4c957f2dull);
  // Element i depends only on (seed, i), so the threads' split does not change the numbers.
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < values.size(); i += 2) {
    // Box-Muller: two uniforms give two independent normals.
    const double u1 = uniform_open01(mix(stream + 2 * i));
    const double u2 = uniform_open01(mix(stream + 2 * i + 1));
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586 * u2;
    values[i] = static_cast<float>(stddev * radius * std::cos(angle));
    if (i + 1 < values.size()) values[i + 1] = static_cast<float>(stddev * radius * std::sin(angle));
  }
}

namespace {

template <class Ref>
ErrorStats compare_impl(std::span<const float> actual, std::span<const Ref> reference) {
  if (actual.size() != reference.size())
    throw std::invalid_argument("compare: actual and reference differ in size");
  ErrorStats stats;
  double diff_sq = 0.0;
  double ref_sq = 0.0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i];
    const double r = static_cast<double>(reference[i]);
    if (std::isinf(a) && std::isinf(r) && (a > 0) == (r > 0)) continue;  // same infinity: exact
    if (!std::isfinite(a) || !std::isfinite(r)) {
      ++stats.bad_values;
      continue;
    }
    const double d = std::fabs(a - r);
    stats.max_abs = std::max(stats.max_abs, d);
    diff_sq += d * d;
    ref_sq += r * r;
  }
  if (stats.bad_values > 0) {
    stats.max_abs = std::numeric_limits<double>::infinity();
    stats.rel_frobenius = std::numeric_limits<double>::infinity();
  } else {
    stats.rel_frobenius = ref_sq > 0 ? std::sqrt(diff_sq / ref_sq) : std::sqrt(diff_sq);
  }
  return stats;
}

}  // namespace

ErrorStats compare(std::span<const float> actual, std::span<const float> reference) {
  return compare_impl(actual, reference);
}
ErrorStats compare(std::span<const float> actual, std::span<const double> reference) {
  return compare_impl(actual, reference);
}

}  // namespace attn
