// Named wrappers for the Hopper (sm_90a) instructions flash_v3 is built from: the Tensor Memory Accelerator
// (TMA: tensor maps, cp.async.bulk.tensor loads and stores), mbarriers (transaction-counting barriers in shared
// memory), wgmma (warpgroup matrix multiply-accumulate, asynchronous, operands described by shared-memory
// descriptors), setmaxnreg, named barriers and the async-proxy fence. No CUTLASS or CuTe: each wrapper is one
// PTX instruction (or a tiny loop around one), names the PTX ISA section it implements (PTX ISA 8.x, "Parallel
// Synchronization and Communication Instructions" and "Warpgroup Level Matrix Multiply-Accumulate Instructions")
// and states the layout it expects.
//
// The shared-memory tile layout used throughout ("panels"): a tile of R rows by C 16-bit columns is stored as
// C / 64 panels, each R rows of 64 elements = 128 bytes, one panel after the other. Inside a panel, rows are 128
// bytes apart and the 16-byte chunks of row r are permuted by the 128-byte swizzle: chunk c is stored at chunk
// c ^ (r % 8). TMA writes exactly this layout when the tensor map asks for CU_TENSOR_MAP_SWIZZLE_128B with a
// box 64 elements wide, and wgmma reads it when the descriptor says "128-byte swizzle". A panel must start at a
// 1024-byte boundary (8 rows x 128 bytes: one swizzle atom).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.hpp"
#include "common/mma.cuh"
#include "common/problem.hpp"

namespace attn::hopper {

constexpr int kWarpgroupThreads = 128;  // 4 consecutive warps issue one wgmma together
constexpr int kPanelColumns = 64;       // 16-bit elements per 128-byte swizzled row
constexpr int kPanelRowBytes = 128;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows of 128 bytes

// ============================================================================================================
// Host side: TMA tensor maps (CUDA driver API cuTensorMapEncodeTiled, reached through the runtime's entry-point
// query so that programs do not link libcuda and still start on machines without a driver).
// ============================================================================================================

/// A 4-D tensor map over a [batch][heads][seq][dim] tensor of 16-bit elements (bf16 or fp16: make_tensor_map) or
/// bytes (make_tensor_map_bytes) with the given element strides
/// (dim contiguous), read or written in boxes of `box_rows` rows by 128 bytes (64 16-bit elements) with the
/// 128-byte swizzle.
/// Coordinates, innermost first: (column, row, head, batch). Rows past `seq` read as zeros and are not
/// written (TMA clips at the tensor's bounds), which handles every tail tile.
inline CUtensorMap encode_tensor_map(const void* base, CUtensorMapDataType data_type, int element_bytes, std::int64_t batch,
                                     std::int64_t heads, std::int64_t seq, std::int64_t dim, const Strides& strides,
                                     int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    ATTN_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault,
                                                     &found));
    if (found != cudaDriverEntryPointSuccess || function == nullptr)
      throw std::runtime_error("cuTensorMapEncodeTiled: not provided by this CUDA driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  const cuuint64_t sizes[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(seq),
                               static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // Strides in bytes of dimensions 1..3 (dimension 0 is contiguous); each a multiple of 16.
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(strides.seq * element_bytes),
                                      static_cast<cuuint64_t>(strides.head * element_bytes),
                                      static_cast<cuuint64_t>(strides.batch * element_bytes)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kPanelRowBytes / element_bytes), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_steps[4] = {1, 1, 1, 1};
  CUtensorMap map{};
  const CUresult status = encode(
      &map, data_type, 4,
      const_cast<void*>(base), sizes, byte_strides, box, element_steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed (CUresult " + std::to_string(static_cast<int>(status)) +
                             ") for a " + std::to_string(batch) + "x" + std::to_string(heads) + "x" +
                             std::to_string(seq) + "x" + std::to_string(dim) + " tensor, box " +
                             std::to_string(box_rows) + " rows");
  return map;
}

inline CUtensorMap make_tensor_map(const void* base, DType dtype, std::int64_t batch, std::int64_t heads,
                                   std::int64_t seq, std::int64_t dim, const Strides& strides, int box_rows) {
  return encode_tensor_map(base, dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                           2, batch, heads, seq, dim, strides, box_rows);
}

/// The same over a tensor of 1-byte elements (FP8 e4m3 codes): boxes of `box_rows` rows by 128 columns, again 128
/// bytes wide with the 128-byte swizzle, so that the panel layout above holds with 128 elements per panel row.
inline CUtensorMap make_tensor_map_bytes(const void* base, std::int64_t batch, std::int64_t heads, std::int64_t seq,
                                         std::int64_t dim, const Strides& strides, int box_rows) {
  return encode_tensor_map(base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, batch, heads, seq, dim, strides, box_rows);
}

// ============================================================================================================
// Device side. Everything below is sm_90a only; the kernels that use it are compiled for that target alone.
// ============================================================================================================

/// 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ std::uint32_t smem_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

// ---- mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier") ---------------
// A 64-bit object in shared memory with a phase bit, an expected arrival count and a transaction count. A
// phase completes when `count` arrivals have been made and the transaction count (bytes announced with
// expect_tx and delivered by TMA with complete_tx) is back to zero; then the phase bit flips. Waiters name the
// parity of the phase they wait for: phase k has completed once try_wait.parity(k % 2) succeeds. A freshly
// initialised barrier is in phase 0, and waiting on parity 1 succeeds at once (the "previous" phase), which is
// how a producer's first wait on an empty slot passes.

__device__ __forceinline__ void mbarrier_init(std::uint64_t* barrier, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(count) : "memory");
}

/// Makes mbarrier initialisations visible to the other threads and to the async proxy (TMA); follow it with a
/// barrier of the whole block before anyone uses the mbarriers.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

/// One arrival (mbarrier.arrive).
__device__ __forceinline__ void mbarrier_arrive(std::uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(barrier)) : "memory");
}

/// One arrival that also announces `bytes` more bytes to come from TMA (mbarrier.arrive.expect_tx): the phase
/// cannot complete before they have landed.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(std::uint64_t* barrier, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(bytes)
               : "memory");
}

/// Spins until the phase of parity `parity` has completed (mbarrier.try_wait.parity, which itself suspends
/// the thread for a while before reporting "not yet").
__device__ __forceinline__ void mbarrier_wait(std::uint64_t* barrier, std::uint32_t parity) {
  const std::uint32_t address = smem_address(barrier);
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred complete;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
        "selp.u32 %0, 1, 0, complete;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (done == 0);
}

// ---- TMA (PTX ISA "Data Movement: cp.async.bulk.tensor") ----------------------------------------------------

/// Fetches the tensor map into the TMA unit's cache ahead of its first use (prefetch.tensormap). The map must be
/// a __grid_constant__ kernel parameter (or in global memory).
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

/// TMA load of one box (64 columns x box_rows rows, as the map says) at coordinates (column, row, head, batch)
/// into `destination` (1024-byte aligned, 128-byte swizzled panel). Completion is signalled on `barrier` as
/// complete_tx of the box's bytes; one thread issues it.
__device__ __forceinline__ void tma_load(void* destination, const CUtensorMap* map, std::uint64_t* barrier,
                                         int column, int row, int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_address(destination)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(smem_address(barrier)), "r"(column), "r"(row), "r"(head),
      "r"(batch)
      : "memory");
}

/// TMA store of one box from shared memory (a swizzled panel, 1024-byte aligned) to the tensor at (column, row,
/// head, batch); rows outside the tensor are not written. Tracked by the bulk async-group of the issuing thread.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* source, int column, int row, int head,
                                          int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<std::uint64_t>(map)),
      "r"(smem_address(source)), "r"(column), "r"(row), "r"(head), "r"(batch)
      : "memory");
}

/// Closes the bulk async-group of the TMA stores issued so far (cp.async.bulk.commit_group).
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

/// Waits until every committed store group has finished reading shared memory (cp.async.bulk.wait_group.read
/// 0), after which the source may be overwritten or the block may exit.
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

/// Orders this thread's ordinary shared-memory writes before later async-proxy accesses (TMA stores, wgmma
/// reads) of the same memory (fence.proxy.async.shared::cta). Each writing thread fences, then a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- named barriers (PTX ISA "bar, barrier") -------------------------------------------------------------
// Sixteen hardware barriers per block; id 0 is __syncthreads. bar.sync waits until `threads` threads (a
// multiple of 32) have arrived on `id`, counting itself; bar.arrive counts itself without waiting. Every
// thread using one id in one phase must name the same count.

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- setmaxnreg (PTX ISA "Miscellaneous Instructions: setmaxnreg") ------------------------------------------
// Changes the register budget of every thread of the warpgroup (all 128 must execute it). The kernel needs a
// register cap at entry (__launch_bounds__(threads, 1)), and each role must be one branch of an if/else, or
// ptxas ignores it (warning C7508). Counts are multiples of 8 in [24, 256].

template <int Registers>
__device__ __forceinline__ void setmaxnreg_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
}
template <int Registers>
__device__ __forceinline__ void setmaxnreg_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

// ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate") ----------------------------
// wgmma.mma_async.m64nNk16: the 128 threads of a warpgroup compute D (64 x N, fp32) += A (64 x 16) B (16 x N).
// B always comes from shared memory through a 64-bit descriptor; A either from shared memory (SS) or from
// registers (RS). The instruction only starts the product: wgmma.commit_group closes a group of them and
// wgmma.wait_group(n) waits until at most n groups are still running. Registers of D and of A must not be
// touched in between (ptxas otherwise serialises the wgmmas and says so, warnings C7509/C7515/C7517), and
// wgmma.fence must precede the first wgmma that reads registers written by ordinary instructions.
//
// Accumulator layout (PTX ISA "Register Fragments: wgmma .m64nNk16", fp32 D): warp w of the warpgroup owns rows
// 16w..16w+15. Within a warp, lane = 4 g + t (g = lane / 4, t = lane % 4); for each 8-column slice i of N:
//   d[4i + 0], d[4i + 1] = D[16w + g    ][8i + 2t], D[16w + g    ][8i + 2t + 1]
//   d[4i + 2], d[4i + 3] = D[16w + g + 8][8i + 2t], D[16w + g + 8][8i + 2t + 1]
// i.e. the layout of mma.sync.m16n8 (common/mma.cuh) repeated N / 8 times.
// A from registers (RS, 16-bit types): four 32-bit registers per thread, each two elements, low half first:
//   a[0] = A[16w + g][2t, 2t+1]   a[1] = A[16w + g + 8][2t, 2t+1]   a[2] = A[16w + g][2t+8, 2t+9]
//   a[3] = A[16w + g + 8][2t+8, 2t+9]
// which is exactly what two adjacent 8-column slices of an fp32 accumulator hold: an accumulator of one wgmma
// becomes the A operand of the next with a rounding and no data movement (to_a_operand below).

/// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address >> 4, bits
/// 16-29 leading-dimension byte offset >> 4, bits 32-45 stride-dimension byte offset >> 4, bits 62-63 the
/// swizzle mode (1 = 128-byte swizzle). For the panels of this file:
///  - K-major operand (the reduction dimension contiguous: Q and K rows, 16 elements of k are 32 bytes of one
///    row): 8-row groups are `stride_bytes` = 1024 apart; the leading offset is unused with 128-byte swizzle
///    (set to 1). Step k by 16 elements by adding 32 bytes to the start address.
///  - MN-major operand (the output dimension contiguous: V as B of P V, its rows are keys = the reduction
///    dimension): 8-key groups are `stride_bytes` = 1024 apart, and the next 64 output columns (the next
///    panel) `leading_bytes` away. Step k by 16 keys by adding 16 rows = 2048 bytes.
__device__ __forceinline__ std::uint64_t smem_descriptor(const void* start, std::uint32_t leading_bytes,
                                                         std::uint32_t stride_bytes) {
  const std::uint64_t address = smem_address(start);
  return ((address & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<std::uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

/// wgmma.fence.sync.aligned: orders earlier register writes before the wgmmas that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
/// wgmma.commit_group.sync.aligned: the wgmmas issued since the last commit form one group.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/// wgmma.wait_group.sync.aligned N: waits until at most `Pending` groups of this warpgroup are unfinished.
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}

/// Tells the compiler that the registers of `values` may have been written behind its back (by an asynchronous
/// wgmma), so that it neither reads them early nor keeps stale copies: an empty asm that "modifies" them.
template <int Count>
__device__ __forceinline__ void fence_registers(float (&values)[Count]) {
#pragma unroll
  for (int i = 0; i < Count; ++i) asm volatile("" : "+f"(values[i])::"memory");
}
template <int Count>
__device__ __forceinline__ void fence_registers(std::uint32_t (&values)[Count]) {
#pragma unroll
  for (int i = 0; i < Count; ++i) asm volatile("" : "+r"(values[i])::"memory");
}

/// D (64 x N) (+)= A (64 x 16) B (16 x N) with A and B in shared memory, both K-major (S = Q K^T: Q rows and K
/// rows both have the head dimension contiguous). `accumulate` = false overwrites D (scale-d = 0).
template <int N, class T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b,
                                         bool accumulate);

/// D (64 x N) (+)= A (64 x 16, registers) B (16 x N) with B MN-major in shared memory (transpose bit set: O += P V
/// reads V's rows, which are keys = the reduction dimension, with the head dimension contiguous).
template <int N, class T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                         bool accumulate);

#include "common/hopper_wgmma.inc"

/// The RS A operand for reduction step kk (columns 16 kk .. 16 kk + 15) of a 64 x N fp32 accumulator: slices 2 kk
/// and 2 kk + 1, rounded to T (see the layouts above).
template <class T, int Count>
__device__ __forceinline__ void to_a_operand(std::uint32_t (&a)[4], const float (&acc)[Count], int kk) {
  const float* left = acc + 8 * kk;  // slice 2 kk: 4 values
  const float* right = left + 4;     // slice 2 kk + 1
  a[0] = mma::pack2<T>(left[0], left[1]);
  a[1] = mma::pack2<T>(left[2], left[3]);
  a[2] = mma::pack2<T>(right[0], right[1]);
  a[3] = mma::pack2<T>(right[2], right[3]);
}

/// Byte offset of element (row, column) of a swizzled panel (column < 64; 16-bit elements): the 16-byte chunk
/// column / 8 of the row moves to chunk (column / 8) ^ (row % 8).
__device__ __forceinline__ std::uint32_t swizzled_offset(int row, int column) {
  return static_cast<std::uint32_t>(row * kPanelRowBytes + ((((column >> 3) ^ (row & 7)) << 4) | ((column & 7) << 1)));
}

}  // namespace attn::hopper
