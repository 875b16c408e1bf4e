// flash_v1's step of FlashAttention's backward for a kernel keeping dK_j, dV_j in registers (flash_v2 and sparse
// run a three-layout step instead): one (K/V block, Q block) pair, each warp owning 16 keys of the K/V block.
// FA2 Alg. 2 lines 10-14 and 16 (FA1 Alg. 4 lines 11-13, 16-17, 20 and 22, without dropout); dQ (line 15) is
// left to the caller, whose warp layout for it differs, through dS^T in shared memory.
#pragma once

#include <cstdint>

#include "common/mma.cuh"

namespace attn::flash {

/// One Q block's share of dK_j and dV_j for this warp's 16 keys (rows warp_key0 .. warp_key0 + 15 of K_j, V_j),
/// and the block's dS^T for those keys written to shared memory:
///   S^T = K_j Q_i^T;  P^T = exp(scale S^T - L_i), 0 where hidden(query, key_row);  dV_j += P^T dO_i;
///   dP^T = V_j dO_i^T;  dS^T = P^T * (dP^T - D_i);  dK_j += dS^T Q_i  (times the scale, left to the caller).
/// Tiles: K_j, V_j, Q_i, dO_i row-major [row][d] in shared memory, `stride` elements per row (Q_i and dO_i Br
/// rows); lse_log2[query] = L_i in log2 units (+inf for a row that sees no key, so P = 0 there) and
/// delta[query] = D_i, for the Br queries; ds_tile [key][query], ds_stride elements per row. hidden(query,
/// key_row): the pair is masked (query 0..Br-1 of Q_i, key_row of K_j). acc_dk, acc_dv: the warp's dK_j, dV_j
/// accumulators in the mma C layout (common/mma.cuh), HeadDim / 8 tiles of 16 x 8.
template <class T, int HeadDim, int Br, class Hidden>
__device__ __forceinline__ void key_block_backward_step(const T* k_tile, const T* v_tile, const T* q_tile,
                                                        const T* do_tile, int stride, const float* lse_log2,
                                                        const float* delta, float scale_log2, int warp_key0,
                                                        Hidden&& hidden, float (&acc_dk)[HeadDim / 8][4],
                                                        float (&acc_dv)[HeadDim / 8][4], T* ds_tile,
                                                        int ds_stride) {
  constexpr int kQTiles = Br / 8;
  const int group = mma::lane_group(), t = mma::lane_in_group();
  // FA2 Alg. 2 line 10: S^T = K_j Q_i^T (keys in rows, the scale inside the exponential),
  float s[kQTiles][4] = {};
  mma::warp_rows_times_transposed<T, HeadDim, Br>(s, k_tile, q_tile, stride, warp_key0);
  // line 11: P^T = exp(S^T - L_i), 0 where the caller's mask hides the pair,
#pragma unroll
  for (int nt = 0; nt < kQTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query = nt * 8 + 2 * t + e % 2;
      const int key_row = warp_key0 + group + 8 * (e / 2);
      const float prob = mma::exp2_fast(s[nt][e] * scale_log2 - lse_log2[query]);
      s[nt][e] = hidden(query, key_row) ? 0.0f : prob;
    }
  // line 12: dV_j += P^T dO_i,
  mma::accumulators_times<T, HeadDim, Br>(acc_dv, s, do_tile, stride);
  // line 13: dP^T = V_j dO_i^T,
  float ds[kQTiles][4] = {};
  mma::warp_rows_times_transposed<T, HeadDim, Br>(ds, v_tile, do_tile, stride, warp_key0);
  // line 14: dS^T = P^T * (dP^T - D_i),
#pragma unroll
  for (int nt = 0; nt < kQTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) ds[nt][e] = s[nt][e] * (ds[nt][e] - delta[nt * 8 + 2 * t + e % 2]);
  // line 16: dK_j += dS^T Q_i.
  mma::accumulators_times<T, HeadDim, Br>(acc_dk, ds, q_tile, stride);
  // dS^T to shared memory (rounded to T, as the tensor cores take it), for the caller's dQ_i += dS K_j.
#pragma unroll
  for (int nt = 0; nt < kQTiles; ++nt) {
    T* ds_row = ds_tile + (warp_key0 + group) * ds_stride + nt * 8 + 2 * t;
    *reinterpret_cast<std::uint32_t*>(ds_row) = mma::pack2<T>(ds[nt][0], ds[nt][1]);
    *reinterpret_cast<std::uint32_t*>(ds_row + 8 * ds_stride) = mma::pack2<T>(ds[nt][2], ds[nt][3]);
  }
}

}  // namespace attn::flash
