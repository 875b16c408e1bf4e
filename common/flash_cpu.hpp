// The steps of FlashAttention-2 on one CPU tile, shared by the stages that run FA2's loops over different rows:
// flash_v2 (the rows as they are) and sparse (compacted or bucket-sorted rows). The loops themselves (which
// blocks, which masks, where results go) stay in the stages; these are the steps inside them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>  // the course labs' stubs (scripts/lab) throw std::logic_error

#include "common/cpu_tiles.hpp"
#include "common/memory.hpp"
#include "common/problem.hpp"

namespace attn::flash_cpu {

using tiles::kNegInf;
using tiles::MatrixView;
using tiles::Update;

// ---- forward (FA2 Alg. 1) ------------------------------------------------------------------------------------

/// What FA2 keeps on chip for Q block i (FA2 Alg. 1 lines 4-5). S is stored key-major (row = key, column =
/// query; see common/cpu_tiles.hpp) so that m_i and l_i are updated with vertical SIMD operations.
struct QueryBlock {
  QueryBlock(std::int64_t Br, std::int64_t Bc, std::int64_t D)
      : padded(tiles::round_up_to_lanes(Br)), Qt(D * padded), S(Bc * padded), O(Br * D), m(padded), l(padded),
        m_new(padded), shift(padded), alpha(padded) {}
  std::int64_t padded;          ///< Br rounded up to the SIMD width: the column count (and row stride) of Q_i^T and S
  std::int64_t row0 = 0, rows = 0;
  HostBuffer<float> Qt;         ///< D x padded: scale * Q_i^T (the softmax scale folded into Q once)
  HostBuffer<float> S;          ///< Bc x padded: S_ij^T, overwritten by P~_ij^T
  HostBuffer<float> O;          ///< Br x D: the unnormalised output O_i^(j)
  HostBuffer<float> m, l;       ///< m_i^(j), l_i^(j), one per query
  HostBuffer<float> m_new, shift, alpha;
};

/// FA2 Alg. 1 lines 4-5: load Q_i (rows [row0, row0 + rows) of q_rows), set O_i = 0, l_i = 0, m_i = -inf.
inline void start_query_block(const float* q_rows, std::int64_t q_seq_stride, std::int64_t row0, std::int64_t rows,
                              std::int64_t D, float scale, QueryBlock& block) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 4-5: load Q_i; O_i = 0, m_i = -inf, l_i = 0
  block.row0 = row0;
  block.rows = rows;
  tiles::pack_transposed(q_rows + row0 * q_seq_stride, rows, D, q_seq_stride, scale, block.Qt.data(), block.padded,
                         block.padded);
  std::fill(block.O.begin(), block.O.begin() + rows * D, 0.0f);
  std::fill(block.m.begin(), block.m.end(), kNegInf);
  std::fill(block.l.begin(), block.l.end(), 0.0f);
  // LAB END flash-v2-forward
}

/// FA2 Alg. 1 line 8 for the keys [key0, key0 + keys) of k_rows: S_ij^T = K_j (scale Q_i^T), keys x padded.
/// A stage masks entries of block.S (to -inf) between this and softmax_update.
inline void score_tile(QueryBlock& block, const float* k_rows, std::int64_t kv_seq_stride, std::int64_t key0,
                       std::int64_t keys, std::int64_t D) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 line 8: S_ij^T = K_j (scale Q_i^T)
  tiles::matmul(Update::overwrite, keys, block.padded, D, MatrixView{k_rows + key0 * kv_seq_stride, kv_seq_stride, 1},
                block.Qt.data(), block.padded, block.S.data(), block.padded);
  // LAB END flash-v2-forward
}

/// FA2 Alg. 1 lines 9-10 on the scored tile: the online softmax update of m_i and l_i, and
/// O_i = diag(exp(m_old - m_new)) O_i + P~ V_j. O_i stays unnormalised (FA2's first tweak).
inline void softmax_update(QueryBlock& block, const float* v_rows, std::int64_t kv_seq_stride, std::int64_t key0,
                           std::int64_t keys, std::int64_t D) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 9-10: the online softmax, O_i rescaled, O_i += P~ V_j
  const std::int64_t padded = block.padded;
  // Line 9: m_new = max(m_old, rowmax(S)); P~ = exp(S - m_new); l = exp(m_old - m_new) l + rowsum(P~).
  std::copy(block.m.begin(), block.m.end(), block.m_new.begin());
  tiles::max_over_keys(block.S.data(), keys, padded, padded, block.m_new.data());
  for (std::int64_t r = 0; r < padded; ++r) {
    // A query that has seen only masked keys keeps m = -inf; shifting by 0 then gives exp(-inf) = 0, not NaN.
    block.shift[r] = block.m_new[r] == kNegInf ? 0.0f : block.m_new[r];
    block.alpha[r] = std::exp(block.m[r] - block.shift[r]);
    block.l[r] *= block.alpha[r];
    block.m[r] = block.m_new[r];
  }
  tiles::exp_over_keys(block.S.data(), keys, padded, padded, block.shift.data(), block.l.data());
  // Line 10: O_i = diag(alpha) O_i + P~_ij V_j (P~ read transposed out of the key-major tile).
  tiles::scale_rows(block.O.data(), block.rows, D, D, block.alpha.data());
  tiles::matmul(Update::accumulate, block.rows, D, keys, tiles::transposed(block.S.data(), padded),
                v_rows + key0 * kv_seq_stride, kv_seq_stride, block.O.data(), D);
  // LAB END flash-v2-forward
}

/// FA2 Alg. 1 lines 12-13 for row r of the block: out = O_r / l_r; returns L_r = m_r + log(l_r). A row that saw
/// no key has l = 0: O = 0 and L = -inf.
inline float finish_row(const QueryBlock& block, std::int64_t r, std::int64_t D, float* out) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 12-13: O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i)
  const float l = block.l[r];
  const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
  for (std::int64_t d = 0; d < D; ++d) out[d] = inverse * block.O[r * D + d];
  return l > 0.0f ? block.m[r] + std::log(l) : kNegInf;
  // LAB END flash-v2-forward
}

// ---- backward (FA2 Alg. 2) -----------------------------------------------------------------------------------

/// One thread's on-chip tiles for K/V block j (FA2 Alg. 2 lines 6-7) and for the current Q block. Query-major:
/// K_j^T and V_j^T are packed once per K/V block and reused by every Q block of the inner loop. `ld` is Bc
/// rounded up to the SIMD width (the row stride of the key-indexed tiles).
struct KeyBlockTiles {
  KeyBlockTiles(std::int64_t Br, std::int64_t ld, std::int64_t D)
      : ld(ld), Qs(Br * D), Kt(D * ld), Vt(D * ld), dK(ld * D), dV(ld * D), P(Br * ld), dS(Br * ld), dQ(Br * D) {}
  std::int64_t ld;
  HostBuffer<float> Qs;      ///< Br x D: scale * Q_i, rounded as the forward's, for S = (scale Q_i) K_j^T
  HostBuffer<float> Kt, Vt;  ///< D x ld: K_j^T and V_j^T
  HostBuffer<float> dK, dV;  ///< ld x D: the accumulators of FA2 Alg. 2 line 7
  HostBuffer<float> P, dS;   ///< Br x ld: P_ij, and dP_ij overwritten by dS_ij (which includes the softmax scale)
  HostBuffer<float> dQ;      ///< Br x D: dS_ij K_j, for stages that add it somewhere else than in place
};

/// FA2 Alg. 2 lines 6-7: load K_j, V_j (keys rows from k_rows, v_rows; transposed, for S and dP); dK_j = dV_j = 0.
inline void start_key_block(const float* k_rows, const float* v_rows, std::int64_t kv_seq_stride, std::int64_t keys,
                            std::int64_t D, KeyBlockTiles& tile) {
  // LAB BEGIN flash-v2-backward: FA2 Alg. 2 lines 6-7: load K_j, V_j (transposed); dK_j = dV_j = 0
  tiles::pack_transposed(k_rows, keys, D, kv_seq_stride, 1.0f, tile.Kt.data(), tile.ld, tile.ld);
  tiles::pack_transposed(v_rows, keys, D, kv_seq_stride, 1.0f, tile.Vt.data(), tile.ld, tile.ld);
  std::fill_n(tile.dK.data(), keys * D, 0.0f);
  std::fill_n(tile.dV.data(), keys * D, 0.0f);
  // LAB END flash-v2-backward
}

/// FA2 Alg. 2 line 10: S = (scale Q_i) K_j^T into tile.P (rows x round_up(keys)). The scale goes on Q, as in
/// the forward, so that S is rounded the same way there and here and P = exp(S - L) stays <= 1. (Scaling K
/// instead shifts S by an ulp of S, which at logits near 1e4 is 1e-3.) The stage then applies line 11
/// (P = exp(S - L_i), with its mask).
inline void score_rows(const float* q_rows, std::int64_t q_seq_stride, std::int64_t rows, std::int64_t keys,
                       std::int64_t D, float scale, KeyBlockTiles& tile) {
  // LAB BEGIN flash-v2-backward: FA2 Alg. 2 line 10: S = (scale Q_i) K_j^T
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t d = 0; d < D; ++d) tile.Qs[r * D + d] = scale * q_rows[r * q_seq_stride + d];
  tiles::matmul(Update::overwrite, rows, tiles::round_up_to_lanes(keys), D, MatrixView{tile.Qs.data(), D, 1},
                tile.Kt.data(), tile.ld, tile.P.data(), tile.ld);
  // LAB END flash-v2-backward
}

/// FA2 Alg. 2 lines 12-14 on the Q block's rows, given P in tile.P: dV_j += P^T dO_i; dP = dO_i V_j^T;
/// dS = P * (dP - D_i), times the softmax scale that both dQ and dK need (into tile.dS).
inline void value_and_score_gradients(const float* do_rows, std::int64_t q_seq_stride, const float* Di,
                                      std::int64_t rows, std::int64_t keys, std::int64_t D, float scale,
                                      KeyBlockTiles& tile) {
  // LAB BEGIN flash-v2-backward: FA2 Alg. 2 lines 12-14: dV_j += P^T dO_i, dP = dO_i V_j^T, dS = P * (dP - D_i)
  const std::int64_t ld = tile.ld;
  tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.P.data(), ld), do_rows, q_seq_stride,
                tile.dV.data(), D);
  tiles::matmul(Update::overwrite, rows, keys, D, MatrixView{do_rows, q_seq_stride, 1}, tile.Vt.data(), ld,
                tile.dS.data(), ld);
  for (std::int64_t r = 0; r < rows; ++r)
    tiles::softmax_gradient_row(tile.P.data() + r * ld, tile.dS.data() + r * ld, Di[r], scale, keys);
  // LAB END flash-v2-backward
}

/// FA2 Alg. 2 line 16: dK_j += dS^T Q_i.
inline void key_gradient(const float* q_rows, std::int64_t q_seq_stride, std::int64_t rows, std::int64_t keys,
                         std::int64_t D, KeyBlockTiles& tile) {
  // LAB BEGIN flash-v2-backward: FA2 Alg. 2 line 16: dK_j += dS^T Q_i
  tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.dS.data(), tile.ld), q_rows, q_seq_stride,
                tile.dK.data(), D);
  // LAB END flash-v2-backward
}

// ---- where one head's rows start --------------------------------------------------------------------------------

/// Row 0 of one (batch, query head)'s Q, O and L, and of its KV head's K and V (GQA / MQA: query head h reads
/// KV head h / (Hq / Hkv)), in the forward's fp32 tensors.
struct Head {
  const float *q, *k, *v;
  float* o;
  float* lse;
};

inline Head head_pointers(const AttentionProblem& p, const AttentionTensors& t, std::int64_t b, std::int64_t h) {
  const std::int64_t kv_head = p.kv_head_of(h);
  return Head{row_pointer(static_cast<const float*>(t.q), t.q_strides, b, h, 0),
              row_pointer(static_cast<const float*>(t.k), t.kv_strides, b, kv_head, 0),
              row_pointer(static_cast<const float*>(t.v), t.kv_strides, b, kv_head, 0),
              row_pointer(static_cast<float*>(t.o), t.q_strides, b, h, 0), t.lse + (b * p.q_heads + h) * p.seq_q};
}

}  // namespace attn::flash_cpu
