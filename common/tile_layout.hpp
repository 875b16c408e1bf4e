// The layouts of a tile of 16-bit elements in shared memory, `stride` elements from one row to the next: where
// element (row, col) sits, as the mma.sync kernels' fragment loaders and cp.async copies (common/mma.cuh) address
// it. Plain C++ on the host too, so that tests can check the layouts' properties (tests/test_common.cpp).
//
// - RowMajor: in order. Tiles here pad each row by 16 bytes (stride = columns + 8), so that the 8 rows one
//   ldmatrix reads at the same column fall in 8 different bank groups.
// - Swizzled: rows of exactly `stride` elements, a multiple of 64 (128 bytes, all 32 banks), and chunk c of row r
//   stored at chunk c ^ (r mod 8): the same 8 rows at the same column are again in 8 different bank groups,
//   with no padding. What padding costs is the cp.async that fills the tile: a warp's 16-byte copies of four
//   128-byte rows, contiguous in global memory, into rows 144 bytes apart took 10.5 shared-memory wavefronts per
//   instruction on the H200 (Nsight Compute), into 128-byte rows 4, and the zero-fill operand made no difference
//   (docs/measurements/2026-11-29-h200-cp-async-wavefronts.txt, which also shows a case of padded rows at 4:
//   sparse's backward, whose rows are gathered through a permutation).
//
// mma.cuh's fragment loaders take the layout as a template argument; a Swizzled tile needs each 16-row (or
// 8-row) block they address to start at a row that is a multiple of 8, which every caller's tiling gives.
#pragma once

#if defined(__CUDACC__)
#define ATTN_TILE_INLINE __host__ __device__ __forceinline__
#else
#define ATTN_TILE_INLINE inline
#endif

namespace attn::mma {

struct RowMajor {
  /// The element offset of (row, col).
  static ATTN_TILE_INLINE int offset(int stride, int row, int col) { return row * stride + col; }
  /// The offset of (row0 + lane_row, col0 + 8 lane_chunk) where row0 % 8 == 0 and col0 % 16 == 0: the form in
  /// which ldmatrix addresses come (lane_row, lane_chunk: the lane's own row and 8-column step).
  static ATTN_TILE_INLINE int fragment_offset(int stride, int row0, int lane_row, int col0, int lane_chunk) {
    return (row0 + lane_row) * stride + col0 + 8 * lane_chunk;
  }
};

struct Swizzled {
  static ATTN_TILE_INLINE int offset(int stride, int row, int col) {
    return row * stride + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
  // col0 / 8 is even and lane_chunk is 0 or 1, so col0 / 8 + lane_chunk = col0 / 8 ^ lane_chunk, and
  // (row0 + lane_row) % 8 = lane_row % 8: the lane's part of the swizzle is one constant per lane, and each
  // compile-time col0 costs one XOR.
  static ATTN_TILE_INLINE int fragment_offset(int stride, int row0, int lane_row, int col0, int lane_chunk) {
    return (row0 + lane_row) * stride + (((col0 >> 3) ^ (lane_chunk ^ (lane_row & 7))) << 3);
  }
};

/// The columns of one row of dQ's fp32 accumulator in global memory (the backward's dq_accum, one row per query),
/// in the order the dQ_i fragments of mma.sync hold them, so that each lane adds four adjacent floats with one
/// 16-byte atomic. A lane t of a quad holds columns 2t and 2t + 1 of each 8-column tile (mma.cuh); of a 16-column
/// group's two tiles, its four values are stored together at 4t .. 4t + 3:
///   column 16 g + 8 h + 2 t + e  (h: which tile, t: lane in quad, e: which of the pair)  ->  16 g + 4 t + 2 h + e.
/// Rows stay whole and in place (a permutation inside each 16-column group), so a run of rows is still one
/// contiguous block of memory. The kernel that rounds dQ to 16 bits reads it back through `column`.
struct DqAccumulatorRow {
  static ATTN_TILE_INLINE int position(int column) {
    return (column & ~15) + ((column & 7) >> 1) * 4 + ((column >> 3) & 1) * 2 + (column & 1);
  }
};

}  // namespace attn::mma
