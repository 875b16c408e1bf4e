// The pieces of FlashAttention-2's GPU kernels that more than one stage runs unchanged (flash_v2, sparse): the
// padded shared-memory row, the online-softmax update of a warp's rows (FA2 Alg. 1 lines 8-10), and the two
// element-wise kernels around the backward (FA2 Alg. 2 line 4's D_i; dQ from its fp32 accumulator).
#pragma once

#include <limits>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/mma.cuh"

namespace attn::flash {

using cuda::kLog2e;
using mma::exp2_fast;
inline constexpr float kInf = std::numeric_limits<float>::infinity();

// Padded shared-memory rows: a row of D 16-bit elements plus 16 bytes, so the 8 rows one ldmatrix phase reads
// start 16 bytes apart modulo 128 and fall in 8 different 4-bank groups (no bank conflicts) for every D here.
constexpr __host__ __device__ int padded(int columns) { return columns + 8; }

/// FA2 Alg. 1 lines 8-10 for this thread's rows, on the scores s (raw Q K^T) of one K/V block: new running
/// max, rescale of O and of the running sum by exp(m_old - m_new), and s replaced by P~ = exp(scale s - m_new).
/// row_sum stays a per-thread partial sum (the 4 lanes of a row are summed once, at the end).
template <int MTiles, int NTiles, int DTiles>
__device__ __forceinline__ void online_softmax(float (&s)[MTiles][NTiles][4], float (&o)[MTiles][DTiles][4],
                                               float (&row_max)[MTiles][2], float (&row_sum)[MTiles][2],
                                               float scale_log2) {
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // accumulator rows `group` and `group + 8`
      float block_max = -kInf;
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt) block_max = fmaxf(block_max, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
      block_max = mma::group_max(block_max);
      const float m_new = fmaxf(row_max[mt][half], block_max);
      // A row that has seen only masked keys keeps m = -inf; subtracting 0 then keeps every term 0, not NaN.
      const float m_scaled = m_new == -kInf ? 0.0f : m_new * scale_log2;
      const float rescale = exp2_fast(row_max[mt][half] * scale_log2 - m_scaled);
      row_max[mt][half] = m_new;
      row_sum[mt][half] *= rescale;
#pragma unroll
      for (int dt = 0; dt < DTiles; ++dt) {
        o[mt][dt][2 * half] *= rescale;
        o[mt][dt][2 * half + 1] *= rescale;
      }
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[mt][nt][e] = exp2_fast(s[mt][nt][e] * scale_log2 - m_scaled);  // one FFMA + one MUFU.EX2
          sum += s[mt][nt][e];
        }
      }
      row_sum[mt][half] += sum;
    }
  }
}

/// L_i in log2 units, as exp2 takes it: +inf for a row that sees no key (L_i = -inf), so that exp2(s - L) is 0
/// there rather than inf. The backward kernels convert L_i this way as they load it (one multiply per row).
__device__ __forceinline__ float lse_to_log2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// The two element-wise kernels around the backward move memory and do almost no arithmetic, so they are written for
// the memory system: each query row is handled by a quad (4 adjacent lanes; a warp takes 8 rows) in 16-byte
// pieces, lane q of the quad taking pieces q, q + 4, q + 8, ... of its row, so that every load instruction reads
// whole 32-byte sectors; a row's place in Q's [batch, head, seq] layout (two 64-bit divisions) is worked out once
// per row, not once per element. launch_backward_prepare and launch_store_dq launch one quad per row; a larger
// 1-D grid of whole warps also works (its extra lanes do nothing).
inline constexpr int kLanesPerRow = 4;
inline constexpr int kRowThreads = 256;  // threads per thread block of the two kernels

/// The elements that one load or store of `Bytes` bytes moves (16: 8 bf16 / fp16 or 4 floats).
template <class T, int Bytes = 16>
struct alignas(Bytes) Piece {
  T values[Bytes / sizeof(T)];
};

/// Where query row `row` (counted over batch, q_heads, seq_q in that order) starts in Q, O, dO and dQ, in elements.
__device__ __forceinline__ long long query_row_offset(const cuda::AttentionParams& p, long long row) {
  const long long i = row % p.seq_q, batch_head = row / p.seq_q;
  return batch_head / p.q_heads * p.q_batch + batch_head % p.q_heads * p.q_head + i * p.q_seq;
}

/// Whether query row `row` (counted over batch, q_heads, seq_q) takes part in the backward. Every row does, unless
/// the stage's Params say otherwise with `__device__ bool row_kept(long long row) const` (sparse: a dropped query,
/// whose dQ is 0). With such Params the two kernels below skip a dropped row's reads, backward_prepare_kernel clears
/// a kept row's dq_accum row (instead of a memset of the whole accumulator, whose dropped rows' share would be
/// written for nothing), and store_dq_kernel writes a dropped row's dQ as zeros.
template <class Params>
inline constexpr bool kDropsRows = requires(const Params& p) { p.row_kept(0LL); };

/// Thread blocks of a stage's own work that backward_prepare_kernel runs ahead of the rows' ones, when the stage's
/// Params have `__host__ __device__ int lead_blocks() const` and `__device__ void lead_block(int block) const`
/// (sparse: each K tile's run of queries, found before its backward thread block starts). Work that waits on memory
/// latency then overlaps this kernel's memory-bound pass over the rows, instead of being a launch of its own.
template <class Params>
inline constexpr bool kHasLeadBlocks = requires(const Params& p) {
  p.lead_blocks();
  p.lead_block(0);
};

// Pre-pass (FA2 Alg. 2 line 4): D_i = rowsum(dO_i * O_i) for every row in its original place; dq_accum is cleared
// separately, by cudaMemsetAsync (with kDropsRows here, for the kept rows only). Params: cuda::AttentionParams plus
// float* delta; a stage whose Params also carry float* lse_log2 gets L_i in log2 units there too (lse_to_log2).
// Rows start 16-byte aligned.
template <class T, int HeadDim, class Params>
__global__ void backward_prepare_kernel(const Params p, long long rows) {
  using Row = Piece<T>;
  constexpr int kPerPiece = sizeof(Row) / sizeof(T);
  constexpr int kPieces = HeadDim / kPerPiece / kLanesPerRow;  // 16-byte pieces per lane
  static_assert(kPieces * kLanesPerRow * kPerPiece == HeadDim, "a row is whole pieces for each lane");
  const int lane = threadIdx.x % 32, quad_lane = lane % kLanesPerRow;
  long long block = blockIdx.x;
  if constexpr (kHasLeadBlocks<Params>) {
    if (block < p.lead_blocks()) return p.lead_block(static_cast<int>(block));
    block -= p.lead_blocks();
  }
  const long long thread = block * blockDim.x + threadIdx.x;
  if ((thread - lane) / kLanesPerRow >= rows) return;  // the whole warp: the others reach the shuffles together
  const long long row = thread / kLanesPerRow;
  bool kept = row < rows;
  if constexpr (kDropsRows<Params>) kept = kept && p.row_kept(row);
  float sum = 0.0f;
  if (kept) {
    const long long offset = query_row_offset(p, row);
    const Row* o = reinterpret_cast<const Row*>(static_cast<const T*>(p.o) + offset) + quad_lane;
    const Row* d_o = reinterpret_cast<const Row*>(static_cast<const T*>(p.d_o) + offset) + quad_lane;
    Row o_pieces[kPieces], d_o_pieces[kPieces];
#pragma unroll
    for (int k = 0; k < kPieces; ++k) {  // every load issued before the first use
      o_pieces[k] = o[k * kLanesPerRow];
      d_o_pieces[k] = d_o[k * kLanesPerRow];
    }
#pragma unroll
    for (int k = 0; k < kPieces; ++k)
#pragma unroll
      for (int e = 0; e < kPerPiece; ++e)
        sum += cuda::to_float(o_pieces[k].values[e]) * cuda::to_float(d_o_pieces[k].values[e]);
  }
#pragma unroll
  for (int step = kLanesPerRow / 2; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  if (kept && quad_lane == 0) {
    p.delta[row] = sum;
    if constexpr (requires { p.lse_log2; }) p.lse_log2[row] = lse_to_log2(p.lse[row]);
  }
  if constexpr (kDropsRows<Params>) {
    if (kept) {  // dq_accum's row cleared: lane q of the quad takes its 16-byte pieces q, q + 4, ...
      auto* accum = reinterpret_cast<Piece<float>*>(p.dq_accum + row * HeadDim) + quad_lane;
#pragma unroll
      for (int k = 0; k < HeadDim / 4 / kLanesPerRow; ++k) accum[k * kLanesPerRow] = Piece<float>{};
    }
  }
}

/// dQ = scale * dq_accum, rounded to T, in dQ's layout. Params: cuda::AttentionParams plus float* dq_accum
/// ([batch, q_heads, seq_q, head_dim], contiguous, each row's columns in mma::DqAccumulatorRow's order);
/// `elements` = rows x HeadDim. Each piece is 16 bytes of dq_accum, four floats: lane q of the quad takes the
/// pieces at 16 g + 4 q of its row, which hold columns 16 g + 2 q, + 1 and 16 g + 8 + 2 q, + 1 (the positions that
/// DqAccumulatorRow gives them), written as two pairs of T; the quad's lanes together write each 16 columns whole.
template <class T, int HeadDim, class Params>
__global__ void store_dq_kernel(const Params p, long long elements) {
  using Accumulators = Piece<float>;
  using Pair = Piece<T, 2 * sizeof(T)>;
  constexpr int kPieces = HeadDim / 4 / kLanesPerRow;  // pieces per lane
  static_assert(kPieces * kLanesPerRow * 4 == HeadDim, "a row is whole pieces for each lane");
  static_assert(kLanesPerRow == 4, "a quad: lane q holds pair q of each 8-column tile, as in the mma fragments");
  const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanesPerRow;
  if (row >= elements / HeadDim) return;
  const int quad_lane = threadIdx.x % kLanesPerRow;
  const Accumulators* accum = reinterpret_cast<const Accumulators*>(p.dq_accum + row * HeadDim) + quad_lane;
  T* dq = static_cast<T*>(p.dq) + query_row_offset(p, row) + 2 * quad_lane;
  if constexpr (kDropsRows<Params>) {
    if (!p.row_kept(row)) {  // a dropped row: dQ = 0, and its dq_accum row was never cleared nor written
#pragma unroll
      for (int k = 0; k < kPieces; ++k)
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) *reinterpret_cast<Pair*>(dq + 16 * k + 8 * tile) = Pair{};
      return;
    }
  }
  Accumulators pieces[kPieces];
#pragma unroll
  for (int k = 0; k < kPieces; ++k) pieces[k] = accum[k * kLanesPerRow];  // every load issued before the stores
#pragma unroll
  for (int k = 0; k < kPieces; ++k)
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {  // columns 16 k + 8 tile + 2 q and the one after it
      Pair out;
      out.values[0] = cuda::from_float<T>(pieces[k].values[2 * tile] * p.scale);
      out.values[1] = cuda::from_float<T>(pieces[k].values[2 * tile + 1] * p.scale);
      *reinterpret_cast<Pair*>(dq + 16 * k + 8 * tile) = out;
    }
}

/// backward_prepare_kernel on the default stream, one quad of lanes per row (after the lead blocks, if any).
template <class T, int HeadDim, class Params>
void launch_backward_prepare(const Params& p, long long rows) {
  long long blocks = cuda::ceil_div(rows * kLanesPerRow, kRowThreads);
  if constexpr (kHasLeadBlocks<Params>) blocks += p.lead_blocks();
  backward_prepare_kernel<T, HeadDim><<<blocks, kRowThreads>>>(p, rows);
  ATTN_CUDA_CHECK_LAUNCH();
}

/// store_dq_kernel on the default stream, one quad of lanes per row.
template <class T, int HeadDim, class Params>
void launch_store_dq(const Params& p, long long rows) {
  store_dq_kernel<T, HeadDim><<<cuda::ceil_div(rows * kLanesPerRow, kRowThreads), kRowThreads>>>(p, rows * HeadDim);
  ATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace attn::flash
