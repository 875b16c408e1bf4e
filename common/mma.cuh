// Named wrappers for the PTX instructions the tensor-core attention kernels use (sm_80 and later): ldmatrix,
// mma.sync m16n8k16 with fp32 accumulators, cp.async with commit/wait groups, ex2. Each wrapper states the
// fragment layout it assumes, so that a kernel written with them can be checked against the PTX manual.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/tile_layout.hpp"

namespace attn::mma {

// ---- Fragment layout of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16") --------------------
// A warp's 32 lanes form 8 groups of 4: group = lane / 4 (0..7), thread_in_group = lane % 4 (0..3).
//   A (16 x 16, row-major), four 32-bit registers of two 16-bit elements each:
//     a[0] = A[group    ][2t, 2t+1]     a[1] = A[group + 8][2t, 2t+1]
//     a[2] = A[group    ][2t+8, 2t+9]   a[3] = A[group + 8][2t+8, 2t+9]          (t = thread_in_group)
//   B (16 x 8, K x N, "col" = each column contiguous), two registers:
//     b[0] = B[2t, 2t+1][group]         b[1] = B[2t+8, 2t+9][group]
//   C and D (16 x 8, fp32), four floats:
//     c[0], c[1] = C[group][2t, 2t+1]   c[2], c[3] = C[group + 8][2t, 2t+1]
// The lower-indexed element of a pair sits in the low 16 bits of its register.

/// Lane's group (row within an 8-row slice of a fragment) and thread-in-group (column pair).
__device__ __forceinline__ int lane_group() { return static_cast<int>(threadIdx.x % 32) / 4; }
__device__ __forceinline__ int lane_in_group() { return static_cast<int>(threadIdx.x % 32) % 4; }

/// Converts a shared-memory pointer to the 32-bit address the PTX shared-state-space instructions take.
__device__ __forceinline__ std::uint32_t shared_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit elements from shared memory.
/// Lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (each row 16 contiguous, 16-byte-aligned bytes).
/// Afterwards lane l holds, in r[i], row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i: exactly the
/// layout of one A or B register of mma.m16n8k16 above.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
}

/// ldmatrix ... .trans: the same four 8 x 8 matrices, each transposed on the way: lane l holds in r[i] the
/// elements (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1, column l / 4) of matrix i as stored. This
/// turns a row-major [k][n] tile in shared memory into B registers (and a [k][m] tile into A registers).
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
}

/// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d += a * b for one 16 x 8 x 16 tile, with
/// A, B and D in the register layouts above. T is __nv_bfloat16 or __half.
template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const std::uint32_t (&a)[4],
                                                            std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                     std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats rounded to T (round to nearest even) and packed into one register, `low` in the low half: the
/// element order of every fragment register above.
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float low, float high);

template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

/// This thread's 16-bit pairs of a 16 x 16 block held in the accumulator layout (r[0]: rows 0-7 of columns 0-7,
/// r[1]: rows 8-15 of them, r[2], r[3]: the same rows of columns 8-15; lane l holds row l / 4, columns 2 (l % 4)
/// and + 1 of each) into a row-major 16-bit tile at (row0, col0), `stride` elements per row. On sm_90 one
/// stmatrix.x4 (the inverse of ldmatrix_x4: lanes 8i..8i+7 give the row addresses of block i); before it, four
/// 4-byte stores (the same bytes, four instructions).
template <class T>
__device__ __forceinline__ void store_accumulator_block(T* tile, int stride, int row0, int col0,
                                                        const std::uint32_t (&r)[4]) {
  const int lane = static_cast<int>(threadIdx.x % 32);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kStmatrix = true;
#else
  constexpr bool kStmatrix = false;  // (stmatrix is sm_90's)
#endif
  if constexpr (kStmatrix) {
    const T* row_address = tile + (row0 + lane % 8 + 8 * ((lane / 8) % 2)) * stride + col0 + 8 * (lane / 16);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     shared_address(row_address)),
                 "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      *reinterpret_cast<std::uint32_t*>(tile + (row0 + lane / 4 + 8 * (i % 2)) * stride + col0 + 8 * (i / 2) +
                                        2 * (lane % 4)) = r[i];
  }
}

/// The A registers of a 16 x 16 slice [rows 0..15, columns 16 kk .. 16 kk + 15] of a matrix held as fp32
/// accumulators, given the two 16 x 8 accumulator tiles `left` (columns 16 kk .. +7) and `right` (+8 .. +15).
/// An accumulator's (group, 2t) layout is the A layout's, so no data moves between lanes: P = softmax(S) goes
/// straight from the S = Q K^T accumulators into the P V product.
template <class T>
__device__ __forceinline__ void a_from_accumulators(std::uint32_t (&a)[4], const float (&left)[4],
                                                    const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// ---- Fragments from row-major shared-memory tiles ---------------------------------------------------------------
// `tile` points to a tile of 16-bit elements, `stride` elements from one row to the next (a multiple of 8,
// so that every row starts 16-byte aligned). Where its rows' 16-byte chunks sit is the tile's Layout
// (common/tile_layout.hpp: RowMajor, padded rows; Swizzled, unpadded rows with their chunks permuted).

/// A registers of the 16 x 16 block at (row0, col0) of a row-major [m][k] tile (Q in S = Q K^T).
/// Lanes 0-15 address rows row0..row0+15 at col0 (matrices 0, 1), lanes 16-31 the same rows at col0 + 8
/// (matrices 2, 3).
template <class Layout = RowMajor, class T>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const T* tile, int stride, int row0, int col0) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  ldmatrix_x4(a, tile + Layout::fragment_offset(stride, row0, lane % 16, col0, lane / 16));
}

/// A registers of the 16 x 16 block of a matrix M stored transposed, as a row-major [k][m] tile: rows
/// k0..k0+15 and columns m0..m0+15 of the tile are M's columns and rows. (dS from a [key][query] tile of dS^T.)
template <class Layout = RowMajor, class T>
__device__ __forceinline__ void load_a_transposed(std::uint32_t (&a)[4], const T* tile, int stride, int k0, int m0) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  ldmatrix_x4_trans(a, tile + Layout::fragment_offset(stride, k0, lane % 8 + (lane / 16) * 8, m0, (lane / 8) % 2));
}

/// B registers of two adjacent 16 x 8 tiles (n0..n0+7 in b[0], b[1]; n0+8..n0+15 in b[2], b[3]) at depth
/// k0..k0+15, from a row-major [n][k] tile: B's columns are the tile's rows (K in S = Q K^T).
template <class Layout = RowMajor, class T>
__device__ __forceinline__ void load_b_pair(std::uint32_t (&b)[4], const T* tile, int stride, int n0, int k0) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  ldmatrix_x4(b, tile + Layout::fragment_offset(stride, n0, lane % 8 + (lane / 16) * 8, k0, (lane / 8) % 2));
}

/// B registers of two adjacent 16 x 8 tiles (n0..n0+7 in b[0], b[1]; n0+8..n0+15 in b[2], b[3]) at depth
/// k0..k0+15, from a row-major [k][n] tile, transposed by ldmatrix (V in O = P V).
template <class Layout = RowMajor, class T>
__device__ __forceinline__ void load_b_pair_transposed(std::uint32_t (&b)[4], const T* tile, int stride, int k0,
                                                       int n0) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  ldmatrix_x4_trans(b, tile + Layout::fragment_offset(stride, k0, lane % 16, n0, lane / 16));
}

// ---- One warp's products over 16 rows ---------------------------------------------------------------------------
// The two shapes every mma.sync kernel here repeats: a product with B^T from shared memory, and a product whose A
// operand is still in accumulators (P or dS) times a tile from shared memory.

/// acc += A B^T for this warp's 16 rows of A (rows row0 .. row0 + 15 of a_tile) and the Br rows of B, over
/// HeadDim: acc is the 16 x Br product in the mma C layout, Br / 8 tiles of 16 x 8. (S_ij = Q_i K_j^T; in the
/// backward S^T = K_j Q_i^T and dP^T = V_j dO_i^T.)
template <class T, int HeadDim, int Br>
__device__ __forceinline__ void warp_rows_times_transposed(float (&acc)[Br / 8][4], const T* a_tile, const T* b_tile,
                                                           int stride, int row0) {
#pragma unroll
  for (int kk = 0; kk < HeadDim / 16; ++kk) {
    std::uint32_t a[4];
    load_a(a, a_tile, stride, row0, kk * 16);
#pragma unroll
    for (int np = 0; np < Br / 16; ++np) {
      std::uint32_t b[4];
      load_b_pair(b, b_tile, stride, np * 16, kk * 16);
      mma_m16n8k16<T>(acc[2 * np], a, b[0], b[1]);
      mma_m16n8k16<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

/// acc += X B for X the warp's 16 x Br product held in accumulators (rounded to T as the A operand) and B the Br x
/// HeadDim tile b_tile: acc is 16 x HeadDim, HeadDim / 8 tiles. (O_i += P~_ij V_j, dQ_i += dS_ij K_j, dV_j += P^T dO_i
/// and dK_j += dS^T Q_i.)
template <class T, int HeadDim, int Br>
__device__ __forceinline__ void accumulators_times(float (&acc)[HeadDim / 8][4], const float (&x)[Br / 8][4],
                                                   const T* b_tile, int stride) {
#pragma unroll
  for (int kk = 0; kk < Br / 16; ++kk) {
    std::uint32_t a[4];
    a_from_accumulators<T>(a, x[2 * kk], x[2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < HeadDim / 16; ++dp) {
      std::uint32_t b[4];
      load_b_pair_transposed(b, b_tile, stride, kk * 16, dp * 16);
      mma_m16n8k16<T>(acc[2 * dp], a, b[0], b[1]);
      mma_m16n8k16<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

/// How a warp_mma operand is stored in shared memory: its rows (A's m, B's n) as the tile's rows, the depth k
/// along them ([rows][depth], read by ldmatrix as is), or the other way round ([depth][rows], read by ldmatrix
/// with .trans).
enum class Stored { by_rows, by_depth };

/// One warp's share of kProducts products of the same shape, acc[n] += A_n B_n^T over kDepth: MTiles x 16 rows of
/// each A_n from a_row0, NTiles x 8 rows of each B_n (columns of the product) from b_row0, 16-bit tiles in shared
/// memory. Each A fragment read feeds NTiles mma and each pair of B fragments 2 MTiles. Two products (S and dP,
/// or dV and dK) go through one loop so that each k-step has twice the independent mma to hide the ldmatrix
/// and mma latencies behind (flash_v2/README.md's GPU log, step 6: S, then P, then dP as separate phases, with dQ moved
/// ahead of dV and dK, measured 6-7% slower). BLayout: how the B tiles are laid out (RowMajor or Swizzled).
template <Stored kA, Stored kB, int kDepth, class BLayout = RowMajor, class T, int kProducts, int MTiles, int NTiles>
__device__ __forceinline__ void warp_mma(float (&acc)[kProducts][MTiles][NTiles][4], const T* const (&a_tiles)[kProducts],
                                         int a_stride, int a_row0, const T* const (&b_tiles)[kProducts], int b_stride,
                                         int b_row0) {
  static_assert(kDepth % 16 == 0 && NTiles % 2 == 0, "16-deep steps, B fragments read in pairs");
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    std::uint32_t a[kProducts][MTiles][4];
#pragma unroll
    for (int n = 0; n < kProducts; ++n)
#pragma unroll
      for (int mt = 0; mt < MTiles; ++mt) {
        if constexpr (kA == Stored::by_rows)
          load_a(a[n][mt], a_tiles[n], a_stride, a_row0 + mt * 16, kk * 16);
        else
          load_a_transposed(a[n][mt], a_tiles[n], a_stride, kk * 16, a_row0 + mt * 16);
      }
#pragma unroll
    for (int np = 0; np < NTiles / 2; ++np) {
      std::uint32_t b[kProducts][4];
#pragma unroll
      for (int n = 0; n < kProducts; ++n) {
        if constexpr (kB == Stored::by_rows)
          load_b_pair<BLayout>(b[n], b_tiles[n], b_stride, b_row0 + np * 16, kk * 16);
        else
          load_b_pair_transposed<BLayout>(b[n], b_tiles[n], b_stride, kk * 16, b_row0 + np * 16);
      }
#pragma unroll
      for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
        for (int n = 0; n < kProducts; ++n) {
          mma_m16n8k16<T>(acc[n][mt][2 * np], a[n][mt], b[n][0], b[n][1]);
          mma_m16n8k16<T>(acc[n][mt][2 * np + 1], a[n][mt], b[n][2], b[n][3]);
        }
    }
  }
}

/// Adds four adjacent fp32 values in global memory atomically, 16-byte aligned: one vector atomic on sm_90
/// (red.global.add.v4.f32), four scalar ones before it. For dQ's accumulator rows in DqAccumulatorRow's order.
__device__ __forceinline__ void atomic_add_quad(float* address, float v0, float v1, float v2, float v3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(address), make_float4(v0, v1, v2, v3));
#else
  atomicAdd(address, v0);
  atomicAdd(address + 1, v1);
  atomicAdd(address + 2, v2);
  atomicAdd(address + 3, v3);
#endif
}

/// atomic_add_quad at `base` + kOffsetBytes, the offset an immediate of the instruction (red.global.add.v4.f32
/// [base + offset]): a run of these at constant distances from one pointer needs no address arithmetic between
/// them, and no register that an atomic issued before it still has to read. Relaxed, device scope: what
/// atomicAdd does.
template <int kOffsetBytes>
__device__ __forceinline__ void atomic_add_quad_at(float* base, float v0, float v1, float v2, float v3) {
  static_assert(kOffsetBytes % 16 == 0, "a run of four is 16-byte aligned");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0+%5], {%1, %2, %3, %4};" ::"l"(base), "f"(v0), "f"(v1), "f"(v2),
               "f"(v3), "n"(kOffsetBytes)
               : "memory");
#else
  atomic_add_quad(base + kOffsetBytes / 4, v0, v1, v2, v3);
#endif
}

/// Calls body.template operator()<I>() for I = 0, ..., N - 1 in order, each I a compile-time constant (where an
/// index must become an instruction's immediate, which an unrolled loop's counter is not, to C++).
template <int N, class Body>
__device__ __forceinline__ void static_for(Body&& body) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (body.template operator()<I>(), ...); }(std::make_integer_sequence<int, N>{});
}

// ---- Asynchronous copies global -> shared (cp.async, sm_80) -----------------------------------------------------

/// cp.async.cg.shared.global, 16 bytes: starts copying 16 bytes from global `source` to shared `destination`
/// (both 16-byte aligned) without passing through registers or L1. With `in_bounds` false it reads nothing
/// and writes 16 zero bytes (src-size 0), which is how tiles are padded past the end of a sequence.
__device__ __forceinline__ void cp_async_16(void* destination, const void* source, bool in_bounds) {
  const int source_bytes = in_bounds ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(destination)), "l"(source),
               "r"(source_bytes));
}

/// cp.async.cg.shared.global, 16 bytes, for a copy known to be in bounds: the same instruction without the
/// source-size operand (no zero-fill predicate in the SASS).
__device__ __forceinline__ void cp_async_16(void* destination, const void* source) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(destination)), "l"(source));
}

/// cp.async.ca.shared.global, 4 bytes: the same for one 32-bit word (a row's L_i or D_i), zero-filled when
/// `in_bounds` is false. (cp.async.cg takes only 16-byte copies.)
__device__ __forceinline__ void cp_async_4(void* destination, const void* source, bool in_bounds) {
  const int source_bytes = in_bounds ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(destination)), "l"(source),
               "r"(source_bytes));
}

/// cp.async.commit_group: closes the group of copies this thread has issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

/// cp.async.wait_group N: waits until at most N of this thread's committed groups are still in flight. Other
/// threads' copies become visible only after a barrier (__syncthreads) that follows the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- Special functions ------------------------------------------------------------------------------------------

/// ex2.approx.ftz.f32: 2^x in one MUFU instruction (relative error about 2^-22; exp2(-inf) = 0). The softmax
/// uses exp(x) = 2^(x log2 e) with log2 e folded into the softmax scale, so one FFMA and one ex2 per score.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// Butterfly max / sum over the 4 lanes of a group (the lanes that share an accumulator row).
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/// Copies a rows x Cols tile of 16-bit elements from global memory (row r at source + r * row_stride) into a
/// shared tile with `SmemStride` elements per row, 16 bytes per cp.async, spread over `Threads` threads.
/// Rows r >= valid_rows are zero-filled. Cols must be a multiple of 8.
template <int Rows, int Cols, int SmemStride, int Threads, class T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* source, long long row_stride, int valid_rows) {
  constexpr int kChunksPerRow = Cols / 8;
  static_assert(Cols % 8 == 0, "rows are copied in 16-byte chunks");
#pragma unroll
  for (int chunk = static_cast<int>(threadIdx.x); chunk < Rows * kChunksPerRow; chunk += Threads) {
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    const bool in_bounds = row < valid_rows;
    cp_async_16(tile + row * SmemStride + col, in_bounds ? source + row * row_stride + col : source, in_bounds);
  }
}

/// The same copies as load_tile_async, as straight-line code where the tile's 16-byte chunks divide evenly among
/// the threads (Threads a multiple of the chunks per row, Rows a multiple of the rows one pass covers): each thread
/// copies the same column of rows r, r + Threads / (Cols / 8), ..., at constant offsets from its first, with no
/// loop and no branch. (load_tile_async's loop starts at threadIdx.x, so its trip count is unknown to the compiler:
/// it becomes a rolled loop with a remainder, about 100 instructions of branches and address arithmetic for 4
/// copies.) Other shapes fall back to load_tile_async. Every thread of the block calls it, threadIdx.x < Threads.
template <int Rows, int Cols, int SmemStride, int Threads, class Layout = RowMajor, class T>
__device__ __forceinline__ void load_tile_async_unrolled(T* tile, const T* source, long long row_stride,
                                                         int valid_rows) {
  constexpr int kChunksPerRow = Cols / 8;
  static_assert(Cols % 8 == 0, "rows are copied in 16-byte chunks");
  constexpr bool kEven = Threads % kChunksPerRow == 0 && Rows % (Threads / kChunksPerRow) == 0;
  static_assert(std::is_same_v<Layout, RowMajor> ||
                    (kEven && SmemStride == Cols && Cols % 64 == 0 && Threads / kChunksPerRow % 8 == 0),
                "a Swizzled tile: 128-byte rows, unpadded, copied 8 rows at a time or more");
  if constexpr (!kEven) {
    load_tile_async<Rows, Cols, SmemStride, Threads>(tile, source, row_stride, valid_rows);
  } else {
    constexpr int kRowsPerPass = Threads / kChunksPerRow;
    const int row = static_cast<int>(threadIdx.x) / kChunksPerRow;
    const int col = (static_cast<int>(threadIdx.x) % kChunksPerRow) * 8;
    // (Swizzled: row + pass * kRowsPerPass has row's residue mod 8, so each pass is a constant offset away.)
    T* destination = tile + Layout::offset(SmemStride, row, col);
    const T* first = source + row * row_stride + col;
#pragma unroll
    for (int pass = 0; pass < Rows / kRowsPerPass; ++pass) {
      const bool in_bounds = row + pass * kRowsPerPass < valid_rows;
      cp_async_16(destination + pass * kRowsPerPass * SmemStride,
                  in_bounds ? first + pass * kRowsPerPass * row_stride : source, in_bounds);
    }
  }
}

}  // namespace attn::mma
