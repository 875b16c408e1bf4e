// SIMD building blocks for the CPU tiers (xsimd, for the instruction set the build targets). The stages'
// loops stay in their own files; only these vector inner loops are shared.
#pragma once

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace attn::simd {

using batch = xsimd::batch<float>;
inline constexpr std::int64_t lanes = static_cast<std::int64_t>(batch::size);

// Horizontal reductions, written out so that they work with xsimd 8 (Debian 12: hadd) and 12 (Ubuntu
// 24.04: reduce_add) alike; they run once per row, not in the inner loop.
inline float horizontal_sum(const batch& x) {
  alignas(64) float lane[batch::size];
  x.store_aligned(lane);
  float sum = 0.0f;
  for (float value : lane) sum += value;
  return sum;
}
inline float horizontal_max(const batch& x) {
  alignas(64) float lane[batch::size];
  x.store_aligned(lane);
  float result = lane[0];
  for (float value : lane) result = std::max(result, value);
  return result;
}

/// sum_i a[i] * b[i]
inline float dot(const float* a, const float* b, std::int64_t n) {
  batch acc0(0.0f), acc1(0.0f);
  std::int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
    acc1 = xsimd::fma(batch::load_unaligned(a + i + lanes), batch::load_unaligned(b + i + lanes), acc1);
  }
  for (; i + lanes <= n; i += lanes) acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
  float sum = horizontal_sum(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

/// y[i] += alpha * x[i]
inline void axpy(float alpha, const float* x, float* y, std::int64_t n) {
  const batch a(alpha);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) xsimd::fma(a, batch::load_unaligned(x + i), batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// y[i] *= alpha
inline void scale(float alpha, float* y, std::int64_t n) {
  const batch a(alpha);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) (a * batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

/// max_i x[i] (-inf for n = 0)
inline float max(const float* x, std::int64_t n) {
  float result = -INFINITY;
  std::int64_t i = 0;
  if (n >= lanes) {
    batch m = batch::load_unaligned(x);
    for (i = lanes; i + lanes <= n; i += lanes) m = xsimd::max(m, batch::load_unaligned(x + i));
    result = horizontal_max(m);
  }
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

/// x[i] = exp(x[i] - shift); returns sum_i x[i]. With shift = -inf (a row that sees nothing) callers must not
/// call this: exp(-inf - -inf) is NaN.
inline float exp_shifted_sum(float* x, float shift, std::int64_t n) {
  const batch s(shift);
  batch acc(0.0f);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const batch e = xsimd::exp(batch::load_unaligned(x + i) - s);
    e.store_unaligned(x + i);
    acc += e;
  }
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

}  // namespace attn::simd
