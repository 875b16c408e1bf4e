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

/// 2^t for the softmax's arguments: t <= 0 up to rounding (a score minus a maximum over the same scores), and
/// -inf for masked scores. Unlike a general exp2 it needs no overflow or NaN checks: t = n + f with n the nearest
/// integer and |f| <= 1/2; 2^f by the Taylor series of e^(f ln 2) to degree 7 (what it leaves out is below 1e-8
/// relative, a sixth of fp32's unit roundoff); 2^n put straight into the exponent bits. t is clamped at
/// -127, whose exponent field is 0: everything below about -126.5, -inf included, comes out as exactly 0.
inline batch exp2_of_nonpositive(const batch& t) {
  const batch clamped = xsimd::max(batch(-127.0f), t);  // the constant first: a NaN in t stays NaN
  const batch n = xsimd::nearbyint(clamped);
  const batch f = clamped - n;
  batch p(1.5252734e-5f);  // ln(2)^7 / 7!, then Horner's rule down to ln(2)^0 / 0! = 1
  p = xsimd::fma(p, f, batch(1.5403530e-4f));
  p = xsimd::fma(p, f, batch(1.3333558e-3f));
  p = xsimd::fma(p, f, batch(9.6181291e-3f));
  p = xsimd::fma(p, f, batch(5.5504109e-2f));
  p = xsimd::fma(p, f, batch(2.4022651e-1f));
  p = xsimd::fma(p, f, batch(6.9314718e-1f));
  p = xsimd::fma(p, f, batch(1.0f));
  return xsimd::ldexp(p, xsimd::to_int(n));
}

/// e^x for the same arguments (x <= 0 up to rounding, or -inf): 2^(x log2 e).
inline batch exp_of_nonpositive(const batch& x) { return exp2_of_nonpositive(x * batch(1.4426950408889634f)); }

/// x[i] = exp(x[i] - shift); returns sum_i x[i]. With shift = -inf (a row that sees nothing) callers must not
/// call this: exp(-inf - -inf) is NaN.
inline float exp_shifted_sum(float* x, float shift, std::int64_t n) {
  const batch s(shift);
  batch acc(0.0f);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const batch e = exp_of_nonpositive(batch::load_unaligned(x + i) - s);
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
