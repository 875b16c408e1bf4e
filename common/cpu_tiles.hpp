// Tile micro-kernels for the CPU tiers of the FlashAttention stages: one register-blocked matrix product for
// every tile matmul (Q_i K_j^T, P_ij V_j and the backward's five), the softmax pieces on a tile, and packing.
// Infrastructure only: the algorithms' loops (which blocks, in which order, the online softmax) stay in the stages.
#pragma once

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/simd.hpp"

namespace attn::tiles {

using simd::batch;
using simd::lanes;

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// A read-only matrix of floats: element (row, col) is data[row * row_stride + col * col_stride]. Lets one
/// product read a tile transposed (P^T, dS^T) without copying it.
struct MatrixView {
  const float* data = nullptr;
  std::int64_t row_stride = 0;
  std::int64_t col_stride = 1;
  float at(std::int64_t row, std::int64_t col) const { return data[row * row_stride + col * col_stride]; }
};

/// Transposed view of a row-major matrix with row stride `ld`.
inline MatrixView transposed(const float* data, std::int64_t ld) { return MatrixView{data, 1, ld}; }

enum class Update { overwrite, accumulate };

// ---- the register-blocked micro-kernel ---------------------------------------------------------------------
//
// C[MR x (NV * lanes)] (+)= A[MR x K] * B[K x (NV * lanes)]. The MR x NV accumulators live in vector registers
// for the whole K loop: each step broadcasts MR elements of A and loads NV vectors of one row of B, then does
// MR * NV fused multiply-adds. With AVX2 (16 registers of 8 floats) MR = 6, NV = 2 uses 12 accumulators + 2 B
// vectors + 1 broadcast: 12 FMAs for 8 loads, which keeps both FMA units of a Zen 3 core busy. AVX-512 has 32
// registers of 16 floats: there MR = 6, NV = 4 holds 24 accumulators, and each broadcast of A feeds 4 FMAs
// instead of 2 (24 FMAs for 10 loads).
inline constexpr int kMR = 6;
inline constexpr int kNV = lanes >= 16 ? 4 : 2;

template <int MR, int NV>
inline void micro_kernel(std::int64_t K, const MatrixView& A, const float* B, std::int64_t ldb, float* C, std::int64_t ldc,
                         Update update) {
  batch acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = update == Update::accumulate ? batch::load_unaligned(C + r * ldc + v * lanes) : batch(0.0f);
  const float* a = A.data;
  for (std::int64_t k = 0; k < K; ++k) {
    batch b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = batch::load_unaligned(B + k * ldb + v * lanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const batch a_rk(a[r * A.row_stride + k * A.col_stride]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = xsimd::fma(a_rk, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v].store_unaligned(C + r * ldc + v * lanes);
}

// Rows that do not fill a whole kMR block: one instantiation per row count.
template <int NV>
inline void micro_kernel_rows(int rows, std::int64_t K, const MatrixView& A, const float* B, std::int64_t ldb, float* C,
                              std::int64_t ldc, Update update) {
  switch (rows) {
    case 1: micro_kernel<1, NV>(K, A, B, ldb, C, ldc, update); break;
    case 2: micro_kernel<2, NV>(K, A, B, ldb, C, ldc, update); break;
    case 3: micro_kernel<3, NV>(K, A, B, ldb, C, ldc, update); break;
    case 4: micro_kernel<4, NV>(K, A, B, ldb, C, ldc, update); break;
    case 5: micro_kernel<5, NV>(K, A, B, ldb, C, ldc, update); break;
    default: micro_kernel<kMR, NV>(K, A, B, ldb, C, ldc, update); break;
  }
}

/// The columns [col, N) of C (+)= A B in panels of NV vectors, as far as whole panels go; returns the first
/// column left over. Each panel of B (K x NV * lanes) is walked once while A's rows stream past it: it stays in L1.
template <int NV>
inline std::int64_t matmul_panels(Update update, std::int64_t M, std::int64_t N, std::int64_t K, const MatrixView& A,
                                  const float* B, std::int64_t ldb, float* C, std::int64_t ldc, std::int64_t col) {
  for (; col + NV * lanes <= N; col += NV * lanes)
    for (std::int64_t row = 0, rows = 0; row < M; row += rows) {
      rows = std::min<std::int64_t>(kMR, M - row);
      // No thin block of 1 or 2 rows at the end (128 = 21 x 6 + 2): the last 7 or 8 rows go as two halves.
      if (M - row > kMR && M - row <= kMR + 2) rows = (M - row) / 2;
      const MatrixView a{A.data + row * A.row_stride, A.row_stride, A.col_stride};
      micro_kernel_rows<NV>(static_cast<int>(rows), K, a, B + col, ldb, C + row * ldc + col, ldc, update);
    }
  return col;
}

/// C (M x N, row stride ldc) = A (M x K) * B (K x N, row stride ldb), or C += A * B with Update::accumulate.
/// A is read element by element (any strides); B's rows and C's rows must be contiguous.
inline void matmul(Update update, std::int64_t M, std::int64_t N, std::int64_t K, const MatrixView& A, const float* B,
                   std::int64_t ldb, float* C, std::int64_t ldc) {
  std::int64_t col = matmul_panels<kNV>(update, M, N, K, A, B, ldb, C, ldc, 0);
  if constexpr (kNV > 2) col = matmul_panels<2>(update, M, N, K, A, B, ldb, C, ldc, col);
  col = matmul_panels<1>(update, M, N, K, A, B, ldb, C, ldc, col);
  // Fewer than `lanes` columns left: plain loops.
  for (std::int64_t row = 0; row < M; ++row)
    for (std::int64_t c = col; c < N; ++c) {
      float sum = update == Update::accumulate ? C[row * ldc + c] : 0.0f;
      for (std::int64_t k = 0; k < K; ++k) sum += A.at(row, k) * B[k * ldb + c];
      C[row * ldc + c] = sum;
    }
}

// ---- packing -----------------------------------------------------------------------------------------------

/// dst (cols x padded_rows, row stride dst_ld >= padded_rows) = scale * src^T, for src rows x cols with row
/// stride src_ld; columns rows..padded_rows of dst are zero. Makes K_j^T (or Q_i^T) the contiguous B operand.
inline void pack_transposed(const float* src, std::int64_t rows, std::int64_t cols, std::int64_t src_ld, float scale,
                            float* dst, std::int64_t padded_rows, std::int64_t dst_ld) {
  for (std::int64_t c = 0; c < cols; ++c) {
    float* out = dst + c * dst_ld;
    for (std::int64_t r = 0; r < rows; ++r) out[r] = scale * src[r * src_ld + c];
    for (std::int64_t r = rows; r < padded_rows; ++r) out[r] = 0.0f;
  }
}

/// dst (rows x cols, row stride dst_ld) = src (row stride src_ld).
inline void copy_rows(const float* src, std::int64_t rows, std::int64_t cols, std::int64_t src_ld, float* dst,
                      std::int64_t dst_ld) {
  for (std::int64_t r = 0; r < rows; ++r) std::copy(src + r * src_ld, src + r * src_ld + cols, dst + r * dst_ld);
}

/// Rounds n up to a multiple of the SIMD width.
inline std::int64_t round_up_to_lanes(std::int64_t n) { return (n + lanes - 1) / lanes * lanes; }

// ---- softmax pieces on a query-major tile (row = query, column = key) ---------------------------------------

/// x[i] = exp(x[i] - shift). With shift = -inf the row saw no key: every x[i] is -inf and becomes 0.
inline void exp_shifted(float* x, float shift, std::int64_t n) {
  if (shift == kNegInf) {
    std::fill(x, x + n, 0.0f);
    return;
  }
  const batch s(shift);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) simd::exp_of_nonpositive(batch::load_unaligned(x + i) - s).store_unaligned(x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i] - shift);
}

/// The softmax backward on one row: ds[i] = scale * p[i] * (dp[i] - row_term), written over dp.
inline void softmax_gradient_row(const float* p, float* dp, float row_term, float scale, std::int64_t n) {
  const batch t(row_term), s(scale);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    (s * batch::load_unaligned(p + i) * (batch::load_unaligned(dp + i) - t)).store_unaligned(dp + i);
  for (; i < n; ++i) dp[i] = scale * p[i] * (dp[i] - row_term);
}

// ---- softmax pieces on a key-major tile (row = key, column = query) ------------------------------------------
// Storing S_ij transposed makes each query a column, so that its max and sum over keys are vertical SIMD
// operations (no horizontal reductions) and per-query scalars (m_i, l_i) are vectors. `queries` must be a
// multiple of the SIMD width (pad the tile).

// Both passes walk the tile a key (a row) at a time, each row read contiguously, for a block of query vectors
// whose running max (or shift and sum) stays in registers: kQueryVectors vectors, 128 queries with AVX-512 (32
// registers), 32 with AVX2 (16 registers). Walking a query column down the keys instead would touch a new cache
// line per key, and a 128 x 128 tile (64 KiB) does not fit in L1.
inline constexpr int kQueryVectors = lanes >= 16 ? 8 : 4;

template <int QV>
inline void max_over_keys_block(const float* S, std::int64_t keys, std::int64_t ld, float* row_max) {
  batch m[QV];
#pragma GCC unroll 8
  for (int v = 0; v < QV; ++v) m[v] = batch::load_unaligned(row_max + v * lanes);
  for (std::int64_t k = 0; k < keys; ++k)
#pragma GCC unroll 8
    for (int v = 0; v < QV; ++v) m[v] = xsimd::max(m[v], batch::load_unaligned(S + k * ld + v * lanes));
#pragma GCC unroll 8
  for (int v = 0; v < QV; ++v) m[v].store_unaligned(row_max + v * lanes);
}

/// row_max[q] = max(row_max[q], max over keys k of S[k][q]).
inline void max_over_keys(const float* S, std::int64_t keys, std::int64_t queries, std::int64_t ld, float* row_max) {
  std::int64_t q = 0;
  for (; q + kQueryVectors * lanes <= queries; q += kQueryVectors * lanes)
    max_over_keys_block<kQueryVectors>(S + q, keys, ld, row_max + q);
  for (; q < queries; q += lanes) max_over_keys_block<1>(S + q, keys, ld, row_max + q);
}

template <bool Base2, int QV>
inline void exp_over_keys_block(float* S, std::int64_t keys, std::int64_t ld, const float* shift, float* row_sum) {
  batch s[QV], sum[QV];
#pragma GCC unroll 8
  for (int v = 0; v < QV; ++v) {
    s[v] = batch::load_unaligned(shift + v * lanes);
    sum[v] = batch(0.0f);
  }
  for (std::int64_t k = 0; k < keys; ++k)
#pragma GCC unroll 8
    for (int v = 0; v < QV; ++v) {
      float* x = S + k * ld + v * lanes;
      const batch t = batch::load_unaligned(x) - s[v];
      const batch e = Base2 ? simd::exp2_of_nonpositive(t) : simd::exp_of_nonpositive(t);
      e.store_unaligned(x);
      sum[v] += e;
    }
#pragma GCC unroll 8
  for (int v = 0; v < QV; ++v) (batch::load_unaligned(row_sum + v * lanes) + sum[v]).store_unaligned(row_sum + v * lanes);
}

/// S[k][q] = exp(S[k][q] - shift[q]) (exp2 with Base2, for scores already in base-2 units); row_sum[q] += sum over
/// keys of the new S[k][q]. shift must be finite.
template <bool Base2 = false>
inline void exp_over_keys(float* S, std::int64_t keys, std::int64_t queries, std::int64_t ld, const float* shift,
                          float* row_sum) {
  std::int64_t q = 0;
  for (; q + kQueryVectors * lanes <= queries; q += kQueryVectors * lanes)
    exp_over_keys_block<Base2, kQueryVectors>(S + q, keys, ld, shift + q, row_sum + q);
  for (; q < queries; q += lanes) exp_over_keys_block<Base2, 1>(S + q, keys, ld, shift + q, row_sum + q);
}

/// Row r of the rows x cols matrix X (row stride ld) times factor[r].
inline void scale_rows(float* X, std::int64_t rows, std::int64_t cols, std::int64_t ld, const float* factor) {
  for (std::int64_t r = 0; r < rows; ++r) simd::scale(factor[r], X + r * ld, cols);
}

}  // namespace attn::tiles
