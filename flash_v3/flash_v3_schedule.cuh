// What flash_v3's two forward kernels share (bf16/fp16 in flash_v3_cuda.cu, e4m3 in fp8_cuda.cu): the ring
// positions of the K/V pipeline, which Q tile a thread block takes and which K/V blocks it visits, the mask of
// the blocks that need one, and the check that the GPU is Hopper.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/mma.cuh"
#include "flash_v3/flash_v3.hpp"

namespace attn::flash_v3::schedule {

/// Pipeline position of the it-th block a thread block visits: its ring slot and the parity of the slot's use.
struct Slot {
  int stage;
  std::uint32_t phase;
};
template <int Stages>
__device__ __forceinline__ Slot slot_of(int it) {  // it counts every block this thread block has loaded
  return {it % Stages, static_cast<std::uint32_t>((it / Stages) & 1)};
}

/// The Q tile of one thread block and the K/V blocks it visits. Blocks are visited in reverse, from the last
/// visible one down to 0 (order index it -> block j = blocks - 1 - it), so that the blocks that need a mask
/// (the causal diagonal, the end of the sequence) come first and the rest run without one.
struct Tile {
  int row0, q_block, head, kv_head, batch;
  int blocks;           // K/V blocks visited: those with at least one visible key for some row of the tile
  int masked_blocks;    // how many of them (the first visited) need the mask
  int first_block = 0;  // the lowest visited; above 0 only for a piece of a split tile (piece_of)
  /// The K/V block visited it-th: from the highest down to first_block.
  __device__ __forceinline__ int block_at(int it) const { return first_block + blocks - 1 - it; }
};

/// Tile number `index` of the grid's q_blocks x heads x batch tiles, Q blocks fastest (so that thread blocks
/// running at the same time share K and V in L2). Causal: within a head, the last Q blocks have the most K/V
/// blocks; starting them first shortens the tail.
template <int Br, int Bc>
__device__ __forceinline__ Tile tile_at(const cuda::AttentionParams& p, int index) {
  Tile tile;
  const int q_blocks = cuda::ceil_div(p.seq_q, Br);
  tile.q_block = p.causal ? q_blocks - 1 - index % q_blocks : index % q_blocks;
  tile.row0 = tile.q_block * Br;
  tile.head = index / q_blocks % p.q_heads;
  tile.batch = index / q_blocks / p.q_heads;
  tile.kv_head = tile.head / p.group_size;
  const int offset = p.seq_k - p.seq_q;  // bottom-right causal: row i sees keys j <= i + offset
  int blocks = cuda::ceil_div(p.seq_k, Bc);
  int unmasked = p.seq_k / Bc;  // blocks wholly inside the sequence
  if (p.causal) {
    const int last_visible = tile.row0 + Br - 1 + offset;  // by the tile's last row
    blocks = last_visible < 0 ? 0 : min(blocks, last_visible / Bc + 1);
    const int first_row_sees = tile.row0 + offset + 1;  // keys [0, first_row_sees) visible to every row
    unmasked = min(unmasked, max(first_row_sees, 0) / Bc);
  }
  tile.blocks = blocks;
  tile.masked_blocks = blocks - min(unmasked, blocks);
  return tile;
}

/// Piece `piece` of `pieces` of a tile split along its keys (FP8's tail split, fp8_cuda.cu): the contiguous range
/// [blocks x piece / pieces, blocks x (piece + 1) / pieces) of its visited blocks, still from the highest down, with
/// the masked ones (the highest) among them where they fall into the range. A piece may visit no block.
__device__ __forceinline__ Tile piece_of(Tile tile, int piece, int pieces) {
  const int lo = tile.blocks * piece / pieces, hi = tile.blocks * (piece + 1) / pieces;
  const int first_masked = tile.blocks - tile.masked_blocks;  // masked blocks: [first_masked, blocks)
  tile.masked_blocks = max(0, hi - max(lo, first_masked));
  tile.first_block = lo;
  tile.blocks = hi - lo;
  return tile;
}

/// Scores of keys a row cannot see set to -inf, on one block of a wgmma accumulator (this thread's rows
/// query0 + group and + 8, keys key0 + 8 i + 2 t (+1)): keys past the sequence, and (causal) past the diagonal.
template <int Bc>
__device__ __forceinline__ void mask_invisible(float (&s)[Bc / 2], const cuda::AttentionParams& p, int query0, int key0) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int group = mma::lane_group(), t = mma::lane_in_group();
#pragma unroll
  for (int i = 0; i < Bc / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query = query0 + group + 8 * (e / 2), key = key0 + 8 * i + 2 * t + e % 2;
      if (key >= p.seq_k || (p.causal && key > query + (p.seq_k - p.seq_q))) s[4 * i + e] = kNegInf;
    }
}

/// The kernels exist only for sm_90a; say so plainly on any other GPU (or build) instead of failing at launch.
/// `who` names the tier in the message.
inline void require_hopper(const std::string& who) {
#ifndef ATTN_FLASH_V3_SM90A
  throw std::runtime_error(who + ": " + gpu_build_target());
#else
  int device = 0, major = 0, minor = 0;
  ATTN_CUDA_CHECK(cudaGetDevice(&device));
  ATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  ATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0)
    throw std::runtime_error(who + ": needs a Hopper GPU (sm_90a); this device is sm_" + std::to_string(major) +
                             std::to_string(minor));
#endif
}

}  // namespace attn::flash_v3::schedule
