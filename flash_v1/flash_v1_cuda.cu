// flash_v1, GPU tier: FlashAttention's Algorithm 1 (forward) and Algorithm 4 (backward) on tensor cores
// (mma.sync m16n8k16, fp32 accumulators), bf16 and fp16, keeping the paper's structure: K/V blocks in the outer
// loop, Q blocks in the inner loop, O / l / m read from and written back to global memory ("HBM") on every inner
// step; the forward shares each head's Q blocks among thread blocks (FlashAttention-1's split). flash_v2 swaps them.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/flash_blocks.cuh"
#include "common/key_block_backward.cuh"
#include "common/mma.cuh"
#include "common/validate.hpp"
#include "flash_v1/flash_v1.hpp"

namespace attn::flash_v1 {
namespace {

using mma::exp2_fast;
using mma::load_a_transposed;
using mma::load_b_pair_transposed;
using mma::load_tile_async;
using mma::mma_m16n8k16;

using cuda::kLog2e;
using cuda::masked;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The shared arguments (common/attention_params.cuh) plus this stage's scratch.
struct Params : cuda::AttentionParams {
  // The "HBM" arrays of Algorithm 1 (fp32 scratch, Tr Br rows per head): O [batch, q_heads, Tr Br, D] in
  // accumulator order, l and m [batch, q_heads, Tr Br].
  float* o_hbm = nullptr;
  float* l_hbm = nullptr;
  float* m_hbm = nullptr;
  int splits = 1;  // thread blocks per (batch, head), each taking every splits-th Q block
  // Backward scratch: dQ in fp32 (Alg. 4 keeps dQ in HBM), L_i in log2 units, D_i.
  float* dq_hbm = nullptr;
  float* lse_log2 = nullptr;
  float* delta = nullptr;
};

// Rows of 16-bit elements padded by 16 bytes: conflict-free ldmatrix (see flash_v2_cuda.cu).
constexpr int padded(int columns) { return columns + 8; }

// The blocks. FA1 Alg. 1 line 1 sizes them from the on-chip memory M (Bc = ceil(M / 4d), Br = min(Bc, d));
// on tensor cores the natural unit is a warp's 16-row mma tile, so Br = 16 rows x 8 warps, and Bc = 128 keys, as
// FlashAttention-1's own kernels used at d = 128: two stages each of K_j, V_j and Q_i take 209 KB of the 227 KB of
// shared memory at d = 128, inside the paper's bound.
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kBr = 16 * kWarps;  // rows of a Q block; warp w owns rows 16 w .. 16 w + 15 of every block
constexpr int kBc = 128;          // rows of a K/V block

template <int HeadDim>
constexpr int forward_smem_bytes() {
  return (2 * 2 * kBc + 2 * kBr) * padded(HeadDim) * 2;  // two stages of (K_j, V_j) and two of Q_i
}

// ============================================================================================================
// Forward: Algorithm 1.
// ============================================================================================================

/// Algorithm 1 for one (batch, head) and one share of its Q blocks. Thread block `split` of the p.splits that
/// share a head runs the whole outer loop over K/V blocks j, and in it the inner loop over its Q blocks
/// i = split, split + splits, split + 2 splits, ... (FlashAttention-1's CUDA code divides the Q blocks the same
/// way), so O_i, l_i and m_i still go through HBM at every (j, i) step. With p.splits = 1 this is the paper's
/// one thread block per (batch, head).
///
/// "HBM" O is fp32 and kept in the order the mma accumulators hold it ([Q block][warp][8-column tile][lane][4]):
/// each thread reads and writes its own 16 bytes per tile, and a warp's 32 lanes one contiguous 512 bytes.
template <class T, int HeadDim>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p) {
  // LAB BEGIN flash-v1-gpu: FA1 Alg. 1 for one (batch, head) with mma tiles
  constexpr int kStride = padded(HeadDim);
  constexpr int kNTiles = kBc / 8, kDTiles = HeadDim / 8;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* kv_tiles = reinterpret_cast<T*>(shared_bytes);  // stage s: K_j at kv_tiles + 2 s Bc rows, V_j Bc rows after
  T* q_tiles = kv_tiles + 4 * kBc * kStride;          // two stages: Q for the next step is fetched during this one

  const int split = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = mma::lane_group(), t = mma::lane_in_group();
  const int causal_offset = p.seq_k - p.seq_q;
  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch + head * p.q_head;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head;
  const int Tr = cuda::ceil_div(p.seq_q, kBr), Tc = cuda::ceil_div(p.seq_k, kBc);
  const long long head_index = static_cast<long long>(batch) * p.q_heads + head;
  // The scratch has Tr Br rows per head (whole blocks), so O, l and m need no bounds checks.
  float4* o_hbm = reinterpret_cast<float4*>(p.o_hbm) + head_index * Tr * kBr * HeadDim / 4;
  float* l_hbm = p.l_hbm + head_index * Tr * kBr;
  float* m_hbm = p.m_hbm + head_index * Tr * kBr;
  auto o_slot = [&](int i, int dt) { return o_hbm + ((i * kWarps + warp) * kDTiles + dt) * 32 + lane; };
  auto row_of = [&](int i, int half) { return i * kBr + warp * 16 + group + 8 * half; };
  T* o_out = static_cast<T*>(p.o_out) + batch * p.q_batch + head * p.q_head;
  float* lse = p.lse + head_index * p.seq_q;

  // Causal (Algorithm 2): the Q blocks whose rows all lie above K/V block j's first key are skipped, so block j
  // is seen by blocks first_row_block(j) .. Tr - 1; first_block(j) is the first of them that is this thread
  // block's, Tr if none (then none is at any later j either).
  auto first_row_block = [&](int j) { return p.causal ? max(0, j * kBc - causal_offset) / kBr : 0; };
  auto first_block = [&](int j) {
    const int lowest = first_row_block(j);
    return lowest <= split ? split : split + cuda::ceil_div(lowest - split, p.splits) * p.splits;
  };

  // Line 2: O = 0, l = 0, m = -inf in HBM. Each thread always handles the same elements of O (its accumulator
  // slots) and its rows' l and m, and a barrier separates any two steps, so no other synchronisation is needed.
  // Blocks whose rows see no key at all (causal, seq_q > seq_k) are never visited: their output is O = 0 and
  // L = -inf at once (line 16).
  for (int i = split; i < Tr; i += p.splits) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) *o_slot(i, dt) = float4{0.0f, 0.0f, 0.0f, 0.0f};
    for (int half = 0; half < 2; ++half) {
      const int row = row_of(i, half);
      if (t == 0) l_hbm[row] = 0.0f, m_hbm[row] = -kInf;
      if (i >= first_row_block(0) || row >= p.seq_q) continue;
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<std::uint32_t*>(o_out + row * p.q_seq + dt * 8 + 2 * t) = mma::pack2<T>(0.0f, 0.0f);
      if (t == 0) lse[row] = -kInf;
    }
  }

  // The (j, i) steps of lines 5 and 7 in order, and what each needs in shared memory: K_j, V_j (stage j % 2) and
  // Q_i (stage: the step's parity). Everything the next step needs is fetched by cp.async during this one.
  struct Step {
    int j, i;
  };
  auto next_step = [&](Step step) {
    step.i += p.splits;
    if (step.i >= Tr) {
      ++step.j;
      step.i = step.j < Tc ? first_block(step.j) : Tr;
    }
    return step;  // step.i >= Tr: no more steps
  };
  auto fetch = [&](Step step, int q_stage, bool new_kv) {
    if (new_kv) {  // Line 6: load K_j, V_j to on-chip memory.
      const int key0 = step.j * kBc;
      T* k_tile = kv_tiles + (step.j % 2) * 2 * kBc * kStride;
      load_tile_async<kBc, HeadDim, kStride, kThreads>(k_tile, k + key0 * p.kv_seq, p.kv_seq, p.seq_k - key0);
      load_tile_async<kBc, HeadDim, kStride, kThreads>(k_tile + kBc * kStride, v + key0 * p.kv_seq, p.kv_seq,
                                                       p.seq_k - key0);
    }
    // Line 8 (Q_i): load Q_i to on-chip memory.
    load_tile_async<kBr, HeadDim, kStride, kThreads>(q_tiles + q_stage * kBr * kStride, q + step.i * kBr * p.q_seq,
                                                     p.q_seq, p.seq_q - step.i * kBr);
    mma::cp_async_commit();
  };

  Step step{0, first_block(0)};
  if (step.i >= Tr) return;
  fetch(step, 0, true);
  // Line 5: for j = 1..Tc; line 7: for i = 1..Tr (this thread block's share).
  for (int count = 0; step.i < Tr; ++count) {
    const int j = step.j, i = step.i;
    const Step next = next_step(step);
    mma::cp_async_wait<0>();
    __syncthreads();  // this step's K_j, V_j, Q_i have landed; every warp is done with the previous step's tiles
    if (next.i < Tr) fetch(next, (count + 1) % 2, next.j != j);
    const T* k_tile = kv_tiles + (j % 2) * 2 * kBc * kStride;
    const T* v_tile = k_tile + kBc * kStride;
    const T* q_tile = q_tiles + (count % 2) * kBr * kStride;
    const int key0 = j * kBc;

    // Line 8: load O_i, l_i, m_i (this thread's share) from HBM: 16-byte loads, issued first so that their
    // latency overlaps the S_ij product below.
    float o_i[kDTiles][4];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const float4 slot = *o_slot(i, dt);
      o_i[dt][0] = slot.x, o_i[dt][1] = slot.y, o_i[dt][2] = slot.z, o_i[dt][3] = slot.w;
    }
    float l_i[2], m_i[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) l_i[half] = l_hbm[row_of(i, half)], m_i[half] = m_hbm[row_of(i, half)];

    // Line 9: S_ij = Q_i K_j^T (scaled inside the exponentials below).
    float s[kNTiles][4] = {};
    mma::warp_rows_times_transposed<T, HeadDim, kBc>(s, q_tile, k_tile, kStride, warp * 16);
    if (key0 + kBc > p.seq_k || (p.causal && key0 + kBc - 1 > i * kBr + causal_offset)) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (masked(p, row_of(i, e / 2), key0 + nt * 8 + 2 * t + e % 2)) s[nt][e] = -kInf;
    }

    // Line 10: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij), l~_ij = rowsum(P~_ij).
    float m_block[2], l_block[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float row_max = -kInf;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) row_max = fmaxf(row_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      m_block[half] = mma::group_max(row_max);
      const float shift = m_block[half] == -kInf ? 0.0f : m_block[half] * p.scale_log2;  // masked rows stay 0
      float row_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[nt][e] = exp2_fast(s[nt][e] * p.scale_log2 - shift);
          row_sum += s[nt][e];
        }
      l_block[half] = mma::group_sum(row_sum);
    }

    // Line 11: m_new = max(m_i, m~_ij), l_new = exp(m_i - m_new) l_i + exp(m~_ij - m_new) l~_ij.
    float m_new[2], l_new[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      m_new[half] = fmaxf(m_i[half], m_block[half]);
      const float old_weight = m_i[half] == -kInf ? 0.0f : exp2_fast((m_i[half] - m_new[half]) * p.scale_log2);
      const float block_weight =
          m_block[half] == -kInf ? 0.0f : exp2_fast((m_block[half] - m_new[half]) * p.scale_log2);
      l_new[half] = old_weight * l_i[half] + block_weight * l_block[half];
      // Line 12's two terms before the product: diag(l_i) exp(m_i - m_new) O_i in place, and
      // exp(m~_ij - m_new) P~_ij, which then enters the tensor cores (rounded to T) ...
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        for (int e = 2 * half; e < 2 * half + 2; ++e) o_i[dt][e] *= l_i[half] * old_weight;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        for (int e = 2 * half; e < 2 * half + 2; ++e) s[nt][e] *= block_weight;
    }
    // ... so that the product P~_ij V_j accumulates straight onto the rescaled O_i.
    mma::accumulators_times<T, HeadDim, kBc>(o_i, s, v_tile, kStride);

    // Line 12: O_i = diag(l_new)^-1 (...), to HBM; line 13: l_i = l_new, m_i = m_new, to HBM. At the last K/V
    // block this Q block sees, O_i goes to the output instead, in its type, with L = m + log(l) (line 16; the
    // harness keeps only L, the paper keeps l and m), as FlashAttention-1's kernel writes its last step.
    const bool last = j + 1 == Tc || first_row_block(j + 1) > i;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float inverse = l_new[half] > 0.0f ? 1.0f / l_new[half] : 0.0f;  // rows with no key yet: O stays 0
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        for (int e = 2 * half; e < 2 * half + 2; ++e) o_i[dt][e] *= inverse;
    }
    if (!last) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) *o_slot(i, dt) = float4{o_i[dt][0], o_i[dt][1], o_i[dt][2], o_i[dt][3]};
      if (t == 0)
        for (int half = 0; half < 2; ++half) l_hbm[row_of(i, half)] = l_new[half], m_hbm[row_of(i, half)] = m_new[half];
    } else {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_of(i, half);
        if (row >= p.seq_q) continue;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          *reinterpret_cast<std::uint32_t*>(o_out + row * p.q_seq + dt * 8 + 2 * t) =
              mma::pack2<T>(o_i[dt][2 * half], o_i[dt][2 * half + 1]);
        if (t == 0) lse[row] = l_new[half] > 0.0f ? m_new[half] * p.scale + logf(l_new[half]) : -kInf;
      }
    }
    step = next;
  }
  // LAB END flash-v1-gpu
}

// ============================================================================================================
// Backward: Algorithm 4.
// ============================================================================================================

// Backward blocks: Bc = 64 keys (4 warps of 16 keys), Br = 64 query rows.
constexpr int kBackwardWarps = 4;
constexpr int kBackwardThreads = 32 * kBackwardWarps;
constexpr int kBackwardBc = 16 * kBackwardWarps;
constexpr int kBackwardBr = 64;

template <int HeadDim>
constexpr int backward_smem_bytes() {
  // K_j, V_j; two stages of (Q_i, dO_i); dS_ij^T; two stages of (L_i, D_i).
  return (2 * kBackwardBc + 4 * kBackwardBr) * padded(HeadDim) * 2 + kBackwardBc * padded(kBackwardBr) * 2 +
         4 * kBackwardBr * 4;
}

/// Algorithm 4, one thread block per (batch, KV head): the outer loop over K/V blocks j keeps dK_j, dV_j in
/// registers; the inner loop over Q blocks i (of every query head sharing the KV head, so that dK and dV sum over
/// the group) recomputes P_ij and reads, updates and writes dQ_i in HBM. The block owns every dQ row of its
/// heads, and each thread always updates the same elements, so no atomics are needed.
template <class T, int HeadDim>
__global__ void __launch_bounds__(kBackwardThreads) backward_kernel(const Params p) {
  constexpr int Br = kBackwardBr, Bc = kBackwardBc;
  constexpr int kStride = padded(HeadDim), kDsStride = padded(Br);
  constexpr int kDTiles = HeadDim / 8;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + Bc * kStride;
  T* q_tiles = v_tile + Bc * kStride;
  T* do_tiles = q_tiles + 2 * Br * kStride;
  T* ds_tile = do_tiles + 2 * Br * kStride;
  float* lse_tiles = reinterpret_cast<float*>(ds_tile + Bc * kDsStride);
  float* delta_tiles = lse_tiles + 2 * Br;

  const int kv_head = blockIdx.x, batch = blockIdx.y;
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  const int warp_key0 = warp * 16;
  const int causal_offset = p.seq_k - p.seq_q;
  const int Tr = cuda::ceil_div(p.seq_q, Br), Tc = cuda::ceil_div(p.seq_k, Bc);

  // Algorithm 4's outer loop: for j = 1..Tc.
  for (int j = 0; j < Tc; ++j) {
    const int key0 = j * Bc;
    const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head + key0 * p.kv_seq;
    const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head + key0 * p.kv_seq;
    const int first_i = p.causal ? max(0, key0 - causal_offset) / Br : 0;
    const int blocks_per_head = Tr - first_i;
    const int steps = p.group_size * blocks_per_head;
    auto head_of = [&](int step) { return kv_head * p.group_size + step / blocks_per_head; };
    auto row0_of = [&](int step) { return (first_i + step % blocks_per_head) * Br; };
    auto load_q_block = [&](int step, int stage) {
      const int head = head_of(step), row0 = row0_of(step);
      const long long offset = batch * p.q_batch + head * p.q_head + row0 * p.q_seq;
      load_tile_async<Br, HeadDim, kStride, kBackwardThreads>(q_tiles + stage * Br * kStride,
                                                              static_cast<const T*>(p.q) + offset, p.q_seq, p.seq_q - row0);
      load_tile_async<Br, HeadDim, kStride, kBackwardThreads>(do_tiles + stage * Br * kStride,
                                                              static_cast<const T*>(p.d_o) + offset, p.q_seq, p.seq_q - row0);
      const long long row_offset = (static_cast<long long>(batch) * p.q_heads + head) * p.seq_q + row0;
      for (int r = threadIdx.x; r < Br; r += kBackwardThreads) {
        const bool in_bounds = row0 + r < p.seq_q;
        mma::cp_async_4(lse_tiles + stage * Br + r, p.lse_log2 + (in_bounds ? row_offset + r : 0), in_bounds);
        mma::cp_async_4(delta_tiles + stage * Br + r, p.delta + (in_bounds ? row_offset + r : 0), in_bounds);
      }
    };

    __syncthreads();  // every warp is done with the previous K_j, V_j and stages
    // Load K_j, V_j; dK_j = dV_j = 0 (in registers).
    load_tile_async<Bc, HeadDim, kStride, kBackwardThreads>(k_tile, k, p.kv_seq, p.seq_k - key0);
    load_tile_async<Bc, HeadDim, kStride, kBackwardThreads>(v_tile, v, p.kv_seq, p.seq_k - key0);
    load_q_block(0, 0);
    mma::cp_async_commit();
    float acc_dk[kDTiles][4] = {}, acc_dv[kDTiles][4] = {};

    // Inner loop: for i = 1..Tr (for each query head of the group).
    for (int step = 0; step < steps; ++step) {
      const int stage = step % 2;
      if (step + 1 < steps) {
        load_q_block(step + 1, stage ^ 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      __syncthreads();
      const int head = head_of(step), row0 = row0_of(step);
      const T* q_tile = q_tiles + stage * Br * kStride;
      const T* do_tile = do_tiles + stage * Br * kStride;
      const float* lse_log2 = lse_tiles + stage * Br;
      const float* delta = delta_tiles + stage * Br;

      // Lines 11-13, 16-17, 20 and 22: S_ij^T = K_j Q_i^T (keys in rows), P_ij = exp(S_ij - L_i) recomputed,
      // dV_j += P_ij^T dO_i, dP_ij, dS_ij = P_ij * (dP_ij - D_i), dK_j += dS_ij^T Q_i; dS_ij^T to shared
      // memory, so that for line 21 each warp can take whole query rows: warp w owns rows 16 w .. 16 w + 15 of
      // dQ_i, all columns.
      flash::key_block_backward_step<T, HeadDim, Br>(
          k_tile, v_tile, q_tile, do_tile, kStride, lse_log2, delta, p.scale_log2, warp_key0,
          [&](int query, int key_row) { return masked(p, row0 + query, key0 + key_row); }, acc_dk, acc_dv,
          ds_tile, kDsStride);
      __syncthreads();
      float dq[kDTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < Bc / 16; ++kk) {
        std::uint32_t a[4];
        load_a_transposed(a, ds_tile, kDsStride, kk * 16, warp * 16);
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          std::uint32_t b[4];
          load_b_pair_transposed(b, k_tile, kStride, kk * 16, dp * 16);
          mma_m16n8k16<T>(dq[2 * dp], a, b[0], b[1]);
          mma_m16n8k16<T>(dq[2 * dp + 1], a, b[2], b[3]);
        }
      }
      float* dq_rows = p.dq_hbm + (static_cast<long long>(batch) * p.q_heads + head) * p.seq_q * HeadDim;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int query = row0 + warp * 16 + group + 8 * half;
        if (query >= p.seq_q) continue;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          float2* at = reinterpret_cast<float2*>(dq_rows + static_cast<long long>(query) * HeadDim + dt * 8 + 2 * t);
          const float2 old = *at;
          *at = float2{old.x + dq[dt][2 * half], old.y + dq[dt][2 * half + 1]};
        }
      }
      __syncthreads();  // the next step overwrites this step's stage and dS tile
    }

    // Write dK_j, dV_j to HBM.
    T* dk = static_cast<T*>(p.dk) + batch * p.kv_batch + kv_head * p.kv_head;
    T* dv = static_cast<T*>(p.dv) + batch * p.kv_batch + kv_head * p.kv_head;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + warp_key0 + group + 8 * half;
      if (key >= p.seq_k) continue;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const long long at = key * p.kv_seq + dt * 8 + 2 * t;
        *reinterpret_cast<std::uint32_t*>(dk + at) =
            mma::pack2<T>(acc_dk[dt][2 * half] * p.scale, acc_dk[dt][2 * half + 1] * p.scale);
        *reinterpret_cast<std::uint32_t*>(dv + at) = mma::pack2<T>(acc_dv[dt][2 * half], acc_dv[dt][2 * half + 1]);
      }
    }
  }
}

/// dQ = scale * dQ_hbm, rounded to T, in dQ's layout.
template <class T, int HeadDim>
__global__ void store_dq_kernel(const Params p, long long elements) {
  const long long index = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= elements) return;
  const int d = static_cast<int>(index % HeadDim);
  const long long row = index / HeadDim;
  const long long i = row % p.seq_q, bh = row / p.seq_q;
  const long long head = bh % p.q_heads, batch = bh / p.q_heads;
  static_cast<T*>(p.dq)[batch * p.q_batch + head * p.q_head + i * p.q_seq + d] =
      cuda::from_float<T>(p.dq_hbm[index] * p.scale);
}

// ============================================================================================================
// Host side.
// ============================================================================================================

const char* const kWho = "flash_v1/gpu";

void validate_gpu_call(const AttentionProblem& p, const AttentionTensors& t, bool backward) {
  validate_call(p, t, gpu_caps(), kWho, backward);
}

Params make_params(const AttentionProblem& p, const AttentionTensors& t) {
  Params params;
  static_cast<cuda::AttentionParams&>(params) = cuda::make_attention_params(p, t);
  return params;
}

template <class Body>
void dispatch_head_dim(std::int64_t head_dim, Body&& body) {
  switch (head_dim) {
    case 32: body(std::integral_constant<int, 32>{}); return;
    case 64: body(std::integral_constant<int, 64>{}); return;
    case 96: body(std::integral_constant<int, 96>{}); return;
    case 128: body(std::integral_constant<int, 128>{}); return;
  }
  throw std::invalid_argument("head_dim: " + std::to_string(head_dim) + " is not supported by " + kWho);
}

template <class T, int D>
void forward_typed(const Params& params, int batch) {
  auto kernel = forward_kernel<T, D>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, forward_smem_bytes<D>()));
  kernel<<<dim3(params.splits, params.q_heads, batch), kThreads, forward_smem_bytes<D>()>>>(params);
  ATTN_CUDA_CHECK_LAUNCH();
}

template <class T, int D>
void backward_typed(const Params& params, int batch, int kv_heads) {
  const long long rows = static_cast<long long>(batch) * params.q_heads * params.seq_q;
  // D_i = rowsum(dO_i * O_i) (Algorithm 4 forms it inside the loop, line 19; once beforehand is the same
  // number) and L_i in log2 units, +inf where a row sees no key so that exp2(s - L) = 0 there.
  flash::launch_backward_prepare<T, D>(params, rows);
  auto kernel = backward_kernel<T, D>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, backward_smem_bytes<D>()));
  kernel<<<dim3(kv_heads, batch), kBackwardThreads, backward_smem_bytes<D>()>>>(params);
  ATTN_CUDA_CHECK_LAUNCH();
  const long long elements = rows * D;
  store_dq_kernel<T, D><<<cuda::ceil_div(elements, 256), 256>>>(params, elements);
  ATTN_CUDA_CHECK_LAUNCH();
}

// O, l, m in HBM for whole Q blocks: Tr Br rows of (D + 2) floats per head.
std::size_t forward_scratch_rows(const AttentionProblem& p) {
  return static_cast<std::size_t>(p.batch * p.q_heads) * cuda::ceil_div(p.seq_q, kBr) * kBr;
}
std::size_t forward_scratch_bytes(const AttentionProblem& p) {
  return forward_scratch_rows(p) * static_cast<std::size_t>(p.head_dim + 2) * sizeof(float);
}

/// The option `splits`: how many thread blocks share each (batch, head)'s Q blocks. 0 (the default) chooses
/// the fewest that (a) give every SM a thread block (one fits per SM) and (b) keep the fp32 O_i of the thread
/// blocks running at once within half the L2 cache, so that the O_i re-read at every step come from L2, not
/// from HBM. More splits than Q blocks are cut to Tr.
int forward_splits(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t requested = options.get("splits", 0);
  if (requested < 0)
    throw std::invalid_argument("splits: " + std::to_string(requested) +
                                " is negative (the number of thread blocks per head; 0 chooses it)");
  const int Tr = cuda::ceil_div(p.seq_q, kBr);
  if (requested > 0) return static_cast<int>(std::min<std::int64_t>(requested, Tr));
  const long long sms = cuda::device_attribute(cudaDevAttrMultiProcessorCount);
  const long long l2_bytes = cuda::device_attribute(cudaDevAttrL2CacheSize);
  const long long heads = p.batch * p.q_heads;
  for (int splits = 1; splits < Tr; ++splits) {
    const long long resident = std::min(heads * splits, sms);
    const long long o_bytes = resident * cuda::ceil_div(Tr, splits) * kBr * p.head_dim * 4;
    if (heads * splits >= sms && 2 * o_bytes <= l2_bytes) return splits;
  }
  return Tr;
}
std::size_t backward_scratch_bytes(const AttentionProblem& p) {
  return (static_cast<std::size_t>(p.q_elements()) + 2 * static_cast<std::size_t>(p.lse_elements())) * sizeof(float);
}

}  // namespace

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16, DType::f16};
  caps.stride_multiple = 8;  // K/V and Q rows are copied in 16-byte chunks (cp.async / ldmatrix)
  caps.max_seq = 1 << 30;    // row indices are 32-bit in the kernels
  caps.max_head_dim = 128;
  caps.head_dims = {32, 64, 96, 128};
  caps.has_backward = true;
  caps.pointer_alignment = 16;
  return caps;
}

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_gpu_call(p, t, false);
  Params params = make_params(p, t);
  params.splits = forward_splits(p, options);
  options.counters["splits"] = params.splits;
  // Algorithm 1's O, l and m "in HBM": fp32 arrays, so that re-reading O on every step does not round it.
  DeviceBuffer<float> o_hbm(forward_scratch_rows(p) * static_cast<std::size_t>(p.head_dim));
  DeviceBuffer<float> l_hbm(forward_scratch_rows(p));
  DeviceBuffer<float> m_hbm(forward_scratch_rows(p));
  params.o_hbm = o_hbm.data();
  params.l_hbm = l_hbm.data();
  params.m_hbm = m_hbm.data();
  cuda::dispatch_dtype(t.dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>)
      dispatch_head_dim(p.head_dim, [&](auto d) { forward_typed<T, decltype(d)::value>(params, static_cast<int>(p.batch)); });
  });
}

void backward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions&) {
  validate_gpu_call(p, t, true);
  Params params = make_params(p, t);
  DeviceBuffer<float> dq_hbm(static_cast<std::size_t>(p.q_elements()));
  DeviceBuffer<float> lse_log2(static_cast<std::size_t>(p.lse_elements()));
  DeviceBuffer<float> delta(static_cast<std::size_t>(p.lse_elements()));
  params.dq_hbm = dq_hbm.data();
  params.lse_log2 = lse_log2.data();
  params.delta = delta.data();
  ATTN_CUDA_CHECK(cudaMemsetAsync(dq_hbm.data(), 0, dq_hbm.bytes()));  // Algorithm 4 starts with dQ = 0 in HBM
  cuda::dispatch_dtype(t.dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>)
      dispatch_head_dim(p.head_dim, [&](auto d) {
        backward_typed<T, decltype(d)::value>(params, static_cast<int>(p.batch), static_cast<int>(p.kv_heads));
      });
  });
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_gpu(p, t, options);
    options.counters["Tc"] = static_cast<double>((p.seq_k + kBc - 1) / kBc);
  };
  gpu.backward = backward_gpu;
  gpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward) {
    return backward ? backward_scratch_bytes(p) : forward_scratch_bytes(p);
  };
  gpu.option_names = {"splits"};  // the forward's thread blocks per head (0: chosen by forward_splits)
  return gpu;
}

}  // namespace attn::flash_v1
