// Which (query, key) pairs sparse attention keeps: the random dropping of QK-sparse and the bucket hash of
// hash-sparse, written once for both tiers. Every function here is exact integer or fp32-fma arithmetic in a
// fixed order, so the CPU tier, the GPU tier and the tests' oracle derive the same masks and buckets from the
// same seed, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_SPARSE_HD __host__ __device__
#else
#define ATTN_SPARSE_HD
#endif

namespace attn::sparse {

/// SplitMix64's finaliser: a bijection of 64-bit words whose outputs look independent for nearby inputs.
ATTN_SPARSE_HD inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// A random word for element `index` of stream `stream` under `seed` (counter-based: no state to carry).
ATTN_SPARSE_HD inline std::uint64_t random_word(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return mix64(mix64(seed ^ mix64(stream)) + index);
}

/// The streams of the masks: one per (batch, query head) for queries, one per (batch, KV head) for keys, so
/// that the query heads of a GQA group share their KV head's key mask.
ATTN_SPARSE_HD inline std::uint64_t query_stream(std::int64_t batch, std::int64_t q_heads, std::int64_t b, std::int64_t h) {
  (void)batch;
  return static_cast<std::uint64_t>(b * q_heads + h) * 2u;
}
ATTN_SPARSE_HD inline std::uint64_t key_stream(std::int64_t batch, std::int64_t kv_heads, std::int64_t b, std::int64_t h) {
  (void)batch;
  return static_cast<std::uint64_t>(b * kv_heads + h) * 2u + 1u;
}

/// QK-sparse: row `index` of `stream` is kept unless its random draw in [0, 1000) falls below the drop rate
/// in per-mille (drop_permille = 0 keeps every row; 999 keeps about one in a thousand).
ATTN_SPARSE_HD inline bool keep_row(std::uint64_t seed, std::uint64_t stream, std::int64_t index, int drop_permille) {
  return static_cast<int>(random_word(seed, stream, static_cast<std::uint64_t>(index)) % 1000u) >= drop_permille;
}

/// The most buckets hash-sparse takes (projection_entry numbers its entries with 16 bits per row).
inline constexpr int kMaxBuckets = 1024;

/// Hash-sparse's random projection R (head_dim x buckets/2, the same for Q and K and for every head): entry
/// (row, col) is an Irwin-Hall draw, the sum of twelve uniform integers in [0, 4096) (four 12-bit fields of
/// each of three random words), scaled by 1/4096, minus 6. It is close to N(0, 1), and it is exact in fp32
/// (an integer below 2^16 times a power of two), so every tier builds the same R.
ATTN_SPARSE_HD inline float projection_entry(std::uint64_t seed, int row, int col) {
  std::int32_t sum = 0;
  for (int w = 0; w < 3; ++w) {
    const std::uint64_t word = random_word(seed, 0xB0C4E7ull, static_cast<std::uint64_t>(row) * 65536u +
                                                                  static_cast<std::uint64_t>(col) * 3u + w);
    for (int k = 0; k < 4; ++k) sum += static_cast<std::int32_t>((word >> (12 * k)) & 4095u);
  }
  return static_cast<float>(sum - 6 * 4096) * (1.0f / 4096.0f);
}

/// One fused multiply-add, the same instruction on both tiers (a compiler may not contract it differently).
ATTN_SPARSE_HD inline float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

/// bucket_of's step for projection c with dot = x R_c: x R_c, then -x R_c, replace the best so far if larger.
ATTN_SPARSE_HD inline void consider_projection(int c, int half, float dot, int& best, float& best_value) {
  if (c == 0 || dot > best_value) { best = c; best_value = dot; }
  if (-dot > best_value) { best = c + half; best_value = -dot; }
}

/// Hash-sparse's bucket of one row x (head_dim floats, unit stride): argmax over the 2 * (buckets / 2) values
/// [x R, -x R] (of equal maxima, the first in the order x R_0, -x R_0, x R_1, -x R_1, ... wins). Each projection is a sequential fp32 fma over the head
/// dimension in index order, so both tiers get the same bucket. buckets = 1 puts every row in bucket 0.
/// `projection` is R row-major [head_dim][buckets / 2] (see projection_entry), built once per call.
ATTN_SPARSE_HD inline int bucket_of(const float* x, int head_dim, int buckets, const float* projection) {
  if (buckets <= 1) return 0;
  const int half = buckets / 2;
  int best = 0;
  float best_value = 0;
  for (int c = 0; c < half; ++c) {
    float dot = 0;
    for (int d = 0; d < head_dim; ++d) dot = fused_multiply_add(x[d], projection[d * half + c], dot);
    consider_projection(c, half, dot, best, best_value);
  }
  return best;
}

}  // namespace attn::sparse
