// The pieces of FlashAttention-2's GPU kernels that more than one stage runs unchanged (flash_v2, sparse): the
// padded shared-memory row, the online-softmax update of a warp's rows (FA2 Alg. 1 lines 8-10), and the two
// element-wise kernels around the backward (FA2 Alg. 2 line 4's D_i; dQ from its fp32 accumulator).
#pragma once

#include <limits>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
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

// Pre-pass (FA2 Alg. 2 line 4): D_i = rowsum(dO_i * O_i) for every row in its original place; dq_accum is cleared
// separately, by cudaMemsetAsync. Params: cuda::AttentionParams plus float* delta; a stage whose Params also
// carry float* lse_log2 gets L_i in log2 units there too (lse_to_log2).
template <class T, int HeadDim, class Params>
__global__ void backward_prepare_kernel(const Params p, long long rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = static_cast<int>(row % p.seq_q);
  const long long bh = row / p.seq_q;
  const int head = static_cast<int>(bh % p.q_heads), batch = static_cast<int>(bh / p.q_heads);
  const long long offset = batch * p.q_batch + head * p.q_head + i * p.q_seq;
  const T* o = static_cast<const T*>(p.o) + offset;
  const T* d_o = static_cast<const T*>(p.d_o) + offset;
  float sum = 0.0f;
  for (int d = lane; d < HeadDim; d += 32) sum += cuda::to_float(o[d]) * cuda::to_float(d_o[d]);
#pragma unroll
  for (int step = 16; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  if (lane == 0) {
    p.delta[row] = sum;
    if constexpr (requires { p.lse_log2; }) p.lse_log2[row] = lse_to_log2(p.lse[row]);
  }
}

/// dQ = scale * dq_accum, rounded to T, in dQ's layout. Params: cuda::AttentionParams plus float* dq_accum
/// ([batch, q_heads, seq_q, head_dim], contiguous).
template <class T, int HeadDim, class Params>
__global__ void store_dq_kernel(const Params p, long long elements) {
  const long long index = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= elements) return;
  const int d = static_cast<int>(index % HeadDim);
  const long long row = index / HeadDim;
  const long long i = row % p.seq_q, bh = row / p.seq_q;
  const long long head = bh % p.q_heads, batch = bh / p.q_heads;
  static_cast<T*>(p.dq)[batch * p.q_batch + head * p.q_head + i * p.q_seq + d] =
      cuda::from_float<T>(p.dq_accum[index] * p.scale);
}

}  // namespace attn::flash
