// The warp layouts of FlashAttention-2's backward step for one (K/V block, Q block) pair, for a kernel that keeps
// dK_j, dV_j in registers over 8 warps with one layout per kind of product (flash_v2's and sparse's backward):
// each chosen so that a fragment read from shared memory feeds several mma tiles (common/mma.cuh's warp_mma).
//   S_ij^T, dP_ij^T (Bc keys x Br queries): 4 warps along the keys x 2 along the queries;
//   dV_j, dK_j     (Bc keys x D):          4 warps along the keys x 2 along d;
//   dQ_i           (Br queries x D):       kDqRowWarps along the queries x kDqDWarps along d.
// P_ij^T and dS_ij^T cross from the first layout to the other two through shared memory (bf16 / fp16, as the
// tensor cores take them).
#pragma once

#include "common/flash_blocks.cuh"

namespace attn::flash {

template <int HeadDim, int Br, int Bc>
struct BackwardLayouts {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStride = padded(HeadDim);
  static constexpr int kPStride = padded(Br);  // the P^T and dS^T tiles: [key][query]
  // S^T and dP^T: each warp kSKeys keys by kSQueries queries.
  static constexpr int kSKeys = Bc / 4, kSQueries = Br / 2;
  static constexpr int kSMTiles = kSKeys / 16, kSNTiles = kSQueries / 8;
  // dV and dK: each warp kKvKeys keys (the same keys as in S^T) by kKvColumns columns.
  static constexpr int kKvKeys = Bc / 4, kKvColumns = HeadDim / 2;
  static constexpr int kKvMTiles = kKvKeys / 16, kKvDTiles = kKvColumns / 8;
  // dQ: each warp kDqRows queries by kDqColumns columns.
  static constexpr int kDqDWarps = HeadDim >= 128 ? 4 : 2, kDqRowWarps = kWarps / kDqDWarps;
  static constexpr int kDqRows = Br / kDqRowWarps, kDqColumns = HeadDim / kDqDWarps;
  static constexpr int kDqMTiles = kDqRows / 16, kDqDTiles = kDqColumns / 8;
  static_assert(kSKeys % 16 == 0 && kSQueries % 16 == 0 && kKvColumns % 16 == 0 && kDqRows % 16 == 0 &&
                    kDqColumns % 16 == 0,
                "every warp's share is made of 16 x 16 blocks");
};

/// The step's tiles in a backward kernel's shared memory, from its start: K_j and V_j (Bc rows each), Stages of Q_i
/// and of dO_i (Br rows of QStride elements), P_ij^T and dS_ij^T (Bc rows of kPStride), then Stages of L_i and of D_i
/// (Br floats each); the kernel's own arrays may follow `end`.
template <class T, class Layouts, int Br, int Bc, int QStride, int Stages>
struct StepTiles {
  T *k, *v, *q, *d_o, *p, *ds;
  float *lse, *delta;
  __device__ __forceinline__ explicit StepTiles(unsigned char* base)
      : k(reinterpret_cast<T*>(base)),
        v(k + Bc * Layouts::kStride),
        q(v + Bc * Layouts::kStride),
        d_o(q + Stages * Br * QStride),
        p(d_o + Stages * Br * QStride),
        ds(p + Bc * Layouts::kPStride),
        lse(reinterpret_cast<float*>(ds + Bc * Layouts::kPStride)),
        delta(lse + Stages * Br) {}
  __device__ __forceinline__ unsigned char* end() const { return reinterpret_cast<unsigned char*>(delta + Stages * Br); }
};

}  // namespace attn::flash
