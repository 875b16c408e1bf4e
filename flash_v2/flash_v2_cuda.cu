// flash_v2, GPU tier: FlashAttention-2 on tensor cores (mma.sync m16n8k16, fp32 accumulators), bf16 and fp16.
// Forward: FA2 Algorithm 1, one thread block per (batch, head, Q block), 4 warps splitting the Q block (split-Q),
// K/V tiles double-buffered through shared memory with cp.async. Backward: FA2 Algorithm 2, one thread block per
// (batch, KV head, K/V block), dQ by fp32 atomics (or, with "deterministic" = 1, by a separate pass).
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attention_params.cuh"
#include "common/backward_layouts.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/flash_blocks.cuh"
#include "common/mma.cuh"
#include "common/validate.hpp"
#include "flash_v2/flash_v2.hpp"

namespace attn::flash_v2 {
namespace {

using mma::a_from_accumulators;
using mma::exp2_fast;
using mma::load_a;
using mma::load_a_transposed;
using mma::load_b_pair;
using mma::load_b_pair_transposed;
using mma::load_tile_async;
using mma::mma_m16n8k16;
using mma::Stored;
using mma::warp_mma;

using cuda::kLog2e;
using cuda::masked;
using flash::launch_backward_prepare;
using flash::launch_store_dq;
using flash::online_softmax;
using flash::padded;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Everything a kernel needs about the problem, strides in elements.
// The shared arguments (common/attention_params.cuh) plus this stage's scratch.
struct Params : cuda::AttentionParams {
  float* delta = nullptr;     // backward scratch: D_i = rowsum(dO_i * O_i)
  float* dq_accum = nullptr;  // backward scratch: dQ in fp32, [batch, q_heads, seq_q, head_dim]
};

// ============================================================================================================
// Forward: FA2 Algorithm 1.
// ============================================================================================================

template <int HeadDim, int Br, int Bc>
struct ForwardShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = Br / kWarps;  // split-Q: each warp owns whole rows of the Q block
  static constexpr int kMTiles = kRowsPerWarp / 16;  // 16-row mma tiles per warp
  static constexpr int kNTiles = Bc / 8;             // 8-column tiles of S_ij
  static constexpr int kDTiles = HeadDim / 8;        // 8-column tiles of O_i
  static constexpr int kStride = padded(HeadDim);
  // Q_i, then two stages of (K_j, V_j).
  static constexpr int kSmemBytes = (Br + 4 * Bc) * kStride * 2;
  static_assert(kRowsPerWarp % 16 == 0 && Bc % 16 == 0 && HeadDim % 16 == 0, "tiles are made of 16 x 16 blocks");
};

template <class T, int HeadDim, int Br, int Bc>
__global__ void __launch_bounds__(128) forward_kernel(const Params p) {
  // LAB BEGIN flash-v2-gpu: FA2 Alg. 1 for one Q block, the softmax state in registers
  using Shape = ForwardShape<HeadDim, Br, Bc>;
  constexpr int kStride = Shape::kStride;
  constexpr int kMTiles = Shape::kMTiles, kNTiles = Shape::kNTiles, kDTiles = Shape::kDTiles;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);  // Q_i: Br x D
  T* k_tiles = q_tile + Br * kStride;              // K_j: 2 stages of Bc x D
  T* v_tiles = k_tiles + 2 * Bc * kStride;         // V_j: 2 stages of Bc x D

  // Causal: the last Q blocks have the most K/V blocks to visit; starting them first shortens the tail.
  const int q_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group_size;
  const int row0 = q_block * Br;  // first query row of Q_i
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  const int warp_row0 = warp * Shape::kRowsPerWarp;  // first row of this warp inside the block
  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch + head * p.q_head + row0 * p.q_seq;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head;
  T* o = static_cast<T*>(p.o_out) + batch * p.q_batch + head * p.q_head;
  float* lse = p.lse + (static_cast<long long>(batch) * p.q_heads + head) * p.seq_q;

  // Causal: K/V blocks wholly above the diagonal are never loaded (FA2 Section 3.1, "causal masking").
  int kv_blocks = cuda::ceil_div(p.seq_k, Bc);
  if (p.causal) {
    const int last_visible_key = row0 + Br - 1 + (p.seq_k - p.seq_q);  // of the block's last row
    kv_blocks = last_visible_key < 0 ? 0 : min(kv_blocks, last_visible_key / Bc + 1);
  }
  if (kv_blocks == 0) {  // every row of this Q block sees no key: O = 0, LSE = -inf
    for (int i = threadIdx.x; i < Br * HeadDim; i += Shape::kThreads)
      if (row0 + i / HeadDim < p.seq_q) o[(row0 + i / HeadDim) * p.q_seq + i % HeadDim] = cuda::from_float<T>(0.0f);
    for (int i = threadIdx.x; i < Br; i += Shape::kThreads)
      if (row0 + i < p.seq_q) lse[row0 + i] = -kInf;
    return;
  }

  auto load_kv_block = [&](int j, int stage) {
    const int valid = p.seq_k - j * Bc;
    load_tile_async<Bc, HeadDim, kStride, Shape::kThreads>(k_tiles + stage * Bc * kStride, k + j * Bc * p.kv_seq,
                                                           p.kv_seq, valid);
    load_tile_async<Bc, HeadDim, kStride, Shape::kThreads>(v_tiles + stage * Bc * kStride, v + j * Bc * p.kv_seq,
                                                           p.kv_seq, valid);
  };
  // FA2 Alg. 1 line 4: load Q_i (rows past seq_q read as zeros); K_0, V_0 come in the same group.
  load_tile_async<Br, HeadDim, kStride, Shape::kThreads>(q_tile, q, p.q_seq, p.seq_q - row0);
  load_kv_block(0, 0);
  mma::cp_async_commit();

  // FA2 Alg. 1 line 5: O_i = 0, l_i = 0, m_i = -inf, in registers.
  float acc_o[kMTiles][kDTiles][4] = {};
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_max[mt][0] = row_max[mt][1] = -kInf, row_sum[mt][0] = row_sum[mt][1] = 0.0f;

  // FA2 Alg. 1 line 6: for j = 1..Tc (only the blocks left of the diagonal when causal).
  for (int j = 0; j < kv_blocks; ++j) {
    const int stage = j % 2;
    if (j + 1 < kv_blocks) {
      __syncthreads();  // every warp is done with block j - 1, whose stage the next copy overwrites
      load_kv_block(j + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();  // block j has landed; block j + 1 is still on its way
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = k_tiles + stage * Bc * kStride;
    const T* v_tile = v_tiles + stage * Bc * kStride;

    // FA2 Alg. 1 line 8: S_ij = Q_i K_j^T on tensor cores (the scale is applied inside the exponential).
    float s[kMTiles][kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < HeadDim / 16; ++kk) {
      std::uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) load_a(a[mt], q_tile, kStride, warp_row0 + mt * 16, kk * 16);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        std::uint32_t b[4];
        load_b_pair(b, k_tile, kStride, np * 16, kk * 16);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_m16n8k16<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // Masking: only the last block (keys past seq_k) and blocks crossing the causal diagonal need it.
    const int key0 = j * Bc;
    if (key0 + Bc > p.seq_k || (p.causal && key0 + Bc - 1 > row0 + (p.seq_k - p.seq_q))) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int query = row0 + warp_row0 + mt * 16 + group + 8 * (e / 2);
            const int key = key0 + nt * 8 + 2 * t + e % 2;
            if (key >= p.seq_k || (p.causal && key > query + (p.seq_k - p.seq_q))) s[mt][nt][e] = -kInf;
          }
    }

    // FA2 Alg. 1 lines 9-10: m_i, P~_ij = exp(S_ij - m_i), l_i, and O_i rescaled by exp(m_old - m_new).
    online_softmax(s, acc_o, row_max, row_sum, p.scale_log2);

    // FA2 Alg. 1 line 10: O_i += P~_ij V_j, P~ straight from the S accumulators (rounded to T) as the A operand.
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      std::uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) a_from_accumulators<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        std::uint32_t b[4];
        load_b_pair_transposed(b, v_tile, kStride, kk * 16, dp * 16);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_m16n8k16<T>(acc_o[mt][2 * dp], a[mt], b[0], b[1]);
          mma_m16n8k16<T>(acc_o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // FA2 Alg. 1 lines 12-13: O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i); rows that saw no key get 0 and -inf.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = mma::group_sum(row_sum[mt][half]);
      const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
      const int row = row0 + warp_row0 + mt * 16 + group + 8 * half;
      if (row >= p.seq_q) continue;
      T* o_row = o + row * p.q_seq;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<std::uint32_t*>(o_row + dt * 8 + 2 * t) =
            mma::pack2<T>(acc_o[mt][dt][2 * half] * inverse, acc_o[mt][dt][2 * half + 1] * inverse);
      if (t == 0) lse[row] = l > 0.0f ? row_max[mt][half] * p.scale + logf(l) : -kInf;
    }
  }
  // LAB END flash-v2-gpu
}

template <class T, int HeadDim, int Br, int Bc>
void launch_forward(const Params& p, int batch) {
  using Shape = ForwardShape<HeadDim, Br, Bc>;
  auto kernel = forward_kernel<T, HeadDim, Br, Bc>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes));
  const dim3 grid(cuda::ceil_div(p.seq_q, Br), p.q_heads, batch);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes>>>(p);
  ATTN_CUDA_CHECK_LAUNCH();
}

// ============================================================================================================
// Backward: FA2 Algorithm 2.
// ============================================================================================================

// Three warp layouts, one per kind of product (common/backward_layouts.cuh, FlashAttention-2's own choice): S_ij^T
// and dP_ij^T as 4 warps along the keys x 2 along the queries, dV_j and dK_j as 4 along the keys x 2 along d, dQ_i
// as warps along the queries x warps along d, each chosen so that a fragment read from shared memory feeds
// several mma tiles. P_ij^T and dS_ij^T cross from the first layout to the other two through shared memory.
//
// The (Q_i, dO_i, L_i, D_i) copies go through kStages stages in shared memory. With three (d = 64, 96 and 128; at
// d = 32 not measured, and d = 256's tiles leave no room for one), a step has no barrier
// before its S^T, dP^T products: the copy into a stage is issued after the barrier that follows the last reads of
// that stage (two steps back), so the step's two barriers are the one before the P^T, dS^T stores (every warp done
// reading the previous step's) and the one after them, and a warp that ends its step early starts the next one's
// products instead of waiting. With two, the step opens with a barrier.
//
// Q_i and dO_i, copied at every step, are Swizzled tiles wherever their rows are whole 128-byte multiples (d = 64,
// 128 and 256): into padded rows each of the step's cp.async took 2.6 times the shared-memory wavefronts
// (common/tile_layout.hpp), and the backward ran 4-5% faster without them at d = 64 and 256 (README log, step 16)
// and, once step 19 had halved dQ's atomics, 3-4% at d = 128 (step 21; 1% slower before it). Not at d = 32 and 96,
// whose rows are not 128-byte multiples. K_j and V_j, copied once per thread block, keep their padded rows.
template <int HeadDim, int Br, int Bc>
struct BackwardShape : flash::BackwardLayouts<HeadDim, Br, Bc> {
  using Layouts = flash::BackwardLayouts<HeadDim, Br, Bc>;
  static constexpr bool kSwizzleQ = HeadDim % 64 == 0;
  using QLayout = std::conditional_t<kSwizzleQ, mma::Swizzled, mma::RowMajor>;
  static constexpr int kQStride = kSwizzleQ ? HeadDim : Layouts::kStride;  // Q_i's and dO_i's rows
  // K_j, V_j; `stages` of (Q_i, dO_i); P_ij^T and dS_ij^T; `stages` of (L_i, D_i).
  static constexpr int smem_bytes(int stages) {
    return (2 * Bc * Layouts::kStride + stages * 2 * Br * kQStride + 2 * Bc * Layouts::kPStride) * 2 +
           stages * 2 * Br * 4;
  }
  static constexpr int kStages = HeadDim >= 64 && smem_bytes(3) <= 227 * 1024 ? 3 : 2;
  static constexpr int kSmemBytes = smem_bytes(kStages);
  static_assert(kSmemBytes <= 227 * 1024, "one thread block's shared memory on sm_90");
};

/// FA2 Alg. 2 lines 6-18 for one K/V block: dK_j and dV_j accumulate in registers over every Q block that sees
/// the block, of every query head that shares its KV head (GQA/MQA: dK, dV are summed over the group).
/// With accumulate_dq, dQ_i += dS_ij K_j goes to p.dq_accum by fp32 atomics (line 15).
template <class T, int HeadDim, int Br, int Bc>
__global__ void __launch_bounds__(BackwardShape<HeadDim, Br, Bc>::kThreads)
    backward_kernel(const Params p, bool accumulate_dq) {
  using Shape = BackwardShape<HeadDim, Br, Bc>;
  using QLayout = typename Shape::QLayout;
  constexpr int kStride = Shape::kStride, kPStride = Shape::kPStride, kQStride = Shape::kQStride;
  constexpr int kSMTiles = Shape::kSMTiles, kSNTiles = Shape::kSNTiles;
  constexpr int kKvMTiles = Shape::kKvMTiles, kKvDTiles = Shape::kKvDTiles;
  constexpr int kDqMTiles = Shape::kDqMTiles, kDqDTiles = Shape::kDqDTiles;
  constexpr int kStages = Shape::kStages;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // K_j, V_j; kStages of Q_i and of dO_i; P_ij^T, dS_ij^T; kStages of L_i (natural log) and of D_i.
  const flash::StepTiles<T, Shape, Br, Bc, kQStride, kStages> tiles(shared_bytes);
  T *const k_tile = tiles.k, *const v_tile = tiles.v, *const q_tiles = tiles.q, *const do_tiles = tiles.d_o;
  T *const p_tile = tiles.p, *const ds_tile = tiles.ds;
  float *const lse_tiles = tiles.lse, *const delta_tiles = tiles.delta;

  // The grid is (K/V blocks, KV heads, batch). Causal: a K/V block near the start is seen by the most Q blocks,
  // so the blocks are taken in key-block-major order, every head's heaviest first: a short tail, even with GQA,
  // where one thread block covers every query head of its group.
  int kv_block = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z;
  if (p.causal) {
    const int heads_by_batch = gridDim.y * gridDim.z;
    const int linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);  // the launch order
    kv_block = linear / heads_by_batch;
    kv_head = linear % heads_by_batch % gridDim.y;
    batch = linear % heads_by_batch / gridDim.y;
  }
  const int key0 = kv_block * Bc;
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  // This warp's share in each layout (see BackwardShape).
  const int s_key0 = (warp % 4) * Shape::kSKeys, s_query0 = (warp / 4) * Shape::kSQueries;
  const int kv_key0 = (warp % 4) * Shape::kKvKeys, kv_column0 = (warp / 4) * Shape::kKvColumns;
  const int dq_row0 = (warp % Shape::kDqRowWarps) * Shape::kDqRows;
  const int dq_column0 = (warp / Shape::kDqRowWarps) * Shape::kDqColumns;
  const int causal_offset = p.seq_k - p.seq_q;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head + key0 * p.kv_seq;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head + key0 * p.kv_seq;

  // Causal: Q blocks wholly above the diagonal see none of these keys and are skipped.
  const int first_q_block = p.causal ? max(0, key0 - causal_offset) / Br : 0;
  const int q_blocks_per_head = cuda::ceil_div(p.seq_q, Br) - first_q_block;
  const int steps = q_blocks_per_head > 0 ? p.group_size * q_blocks_per_head : 0;  // (query head, Q block) pairs

  // The steps run over the group's query heads, and inside each over the Q blocks that see these keys; (head, row0)
  // of the next step by a counter rather than a division (the step's copy is issued with no loop or division).
  auto next_block = [&](int& head, int& row0) {
    row0 += Br;
    if (row0 >= p.seq_q) row0 = first_q_block * Br, ++head;
  };
  static_assert(Br <= Shape::kThreads, "one thread copies each row's L_i and D_i");
  auto load_q_block = [&](int head, int row0, int stage) {
    const long long offset = batch * p.q_batch + head * p.q_head + row0 * p.q_seq;
    mma::load_tile_async_unrolled<Br, HeadDim, kQStride, Shape::kThreads, QLayout>(
        q_tiles + stage * Br * kQStride, static_cast<const T*>(p.q) + offset, p.q_seq, p.seq_q - row0);
    mma::load_tile_async_unrolled<Br, HeadDim, kQStride, Shape::kThreads, QLayout>(
        do_tiles + stage * Br * kQStride, static_cast<const T*>(p.d_o) + offset, p.q_seq, p.seq_q - row0);
    const int i = static_cast<int>(threadIdx.x);
    if (i < Br) {
      const long long row_offset = (static_cast<long long>(batch) * p.q_heads + head) * p.seq_q + row0;
      const bool in_bounds = row0 + i < p.seq_q;
      mma::cp_async_4(lse_tiles + stage * Br + i, p.lse + (in_bounds ? row_offset + i : 0), in_bounds);
      mma::cp_async_4(delta_tiles + stage * Br + i, p.delta + (in_bounds ? row_offset + i : 0), in_bounds);
    }
  };

  // FA2 Alg. 2 lines 6-7: load K_j, V_j; dK_j = dV_j = 0 in registers.
  mma::load_tile_async_unrolled<Bc, HeadDim, kStride, Shape::kThreads>(k_tile, k, p.kv_seq, p.seq_k - key0);
  mma::load_tile_async_unrolled<Bc, HeadDim, kStride, Shape::kThreads>(v_tile, v, p.kv_seq, p.seq_k - key0);
  int head = kv_head * p.group_size, row0 = first_q_block * Br;  // of step 0
  int copy_head = head, copy_row0 = row0;                          // of the last (Q_i, dO_i) copy issued
  if (steps > 0) load_q_block(head, row0, 0);
  mma::cp_async_commit();
  if constexpr (kStages == 3) {
    if (steps > 1) {  // step 1's tiles come in a group of their own, waited for in step 0
      next_block(copy_head, copy_row0);
      load_q_block(copy_head, copy_row0, 1);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    __syncthreads();  // K_j, V_j and step 0's tiles visible to all
  }
  float acc_dv_dk[2][kKvMTiles][kKvDTiles][4] = {};
  auto& acc_dv = acc_dv_dk[0];
  auto& acc_dk = acc_dv_dk[1];
  // The next copy: the tiles of step + kStages - 1, into the stage that step - 1 read.
  auto load_next_q_block = [&](int step, int stage) {
    if (step + kStages - 1 < steps) {
      next_block(copy_head, copy_row0);
      load_q_block(copy_head, copy_row0, (stage + kStages - 1) % kStages);
      mma::cp_async_commit();
    }
  };

  // FA2 Alg. 2 line 8: for i = 1..Tr (and, with GQA, for each query head of the group).
  for (int step = 0; step < steps; ++step) {
    const int stage = step % kStages;
    if constexpr (kStages == 2) {
      mma::cp_async_wait<0>();
      // Step's tiles visible to all; every warp is done with step - 1 (the other stage, the P^T and dS^T tiles).
      __syncthreads();
      load_next_q_block(step, stage);  // lands while this step computes
    }
    const T* q_tile = q_tiles + stage * Br * kQStride;
    const T* do_tile = do_tiles + stage * Br * kQStride;
    const float* lse = lse_tiles + stage * Br;
    const float* delta = delta_tiles + stage * Br;

    // Lines 10 and 13 together: S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T, this warp's keys by its queries (the
    // transpose keeps keys in rows, which is what dV_j and dK_j need as the A operand).
    float s_dp[2][kSMTiles][kSNTiles][4] = {};
    auto& s = s_dp[0];
    auto& dp = s_dp[1];
    warp_mma<Stored::by_rows, Stored::by_rows, HeadDim, QLayout>(s_dp, {k_tile, v_tile}, kStride, s_key0,
                                                                 {q_tile, do_tile}, kQStride, s_query0);

    // Line 11: P_ij^T = exp(scale S_ij^T - L_i), 0 where masked, with L_i converted to log2 units here; line 14:
    // dS_ij^T = P_ij^T * (dP_ij^T - D_i) (the softmax scale is applied to dK and dQ at the end). Both rounded to
    // 16 bits and stored to shared memory for lines 12, 15 and 16. Written twice by the compiler, with and without
    // the mask: a block that needs no mask (most of them) runs straight-line code, with no branch per score to
    // break up its schedule.
    //
    // With three stages the values wait in registers for the step's first barrier, and then go out by one
    // stmatrix per 16 x 16 block (log steps 24 and 25): 5% less time at d = 64 and 1% at d = 128 than four 4-byte
    // stores per block issued as the values come. With two (d = 32 and 256) each 16 x 8 tile is stored as it
    // comes, by 4-byte stores: d = 256 ran 2.5% slower with the stores after the loop.
    constexpr bool kStoresAfterBarrier = kStages == 3;
    std::uint32_t p_ds[2][kSMTiles][kSNTiles][2];  // [P^T, dS^T][mt][nt][rows group, group + 8]: column pairs
    auto probabilities = [&](auto with_mask) {
      constexpr bool kMask = decltype(with_mask)::value;
      // L_i of this thread's query columns. Without the mask every row of the block sees every key of it, so no
      // L_i is -inf and one multiply converts it; with the mask a row may see no key (L_i = -inf: lse_to_log2).
      float lse_log2[kSNTiles][2];
#pragma unroll
      for (int nt = 0; nt < kSNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float lse_i = lse[s_query0 + nt * 8 + 2 * t + e];
          lse_log2[nt][e] = kMask ? flash::lse_to_log2(lse_i) : lse_i * kLog2e;
        }
#pragma unroll
      for (int mt = 0; mt < kSMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSNTiles; ++nt) {
          const int column = s_query0 + nt * 8 + 2 * t;  // query, inside the block (and column + 1)
          float prob[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            prob[e] = exp2_fast(s[mt][nt][e] * p.scale_log2 - lse_log2[nt][e % 2]);
            if constexpr (kMask) {
              const int key = key0 + s_key0 + mt * 16 + group + 8 * (e / 2);
              if (masked(p, row0 + column + e % 2, key)) prob[e] = 0.0f;
            }
            ds[e] = prob[e] * (dp[mt][nt][e] - delta[column + e % 2]);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            p_ds[0][mt][nt][half] = mma::pack2<T>(prob[2 * half], prob[2 * half + 1]);
            p_ds[1][mt][nt][half] = mma::pack2<T>(ds[2 * half], ds[2 * half + 1]);
            if constexpr (!kStoresAfterBarrier) {  // rows group and group + 8 of the tile, now
              const int at = (s_key0 + mt * 16 + group + 8 * half) * kPStride + column;
              *reinterpret_cast<std::uint32_t*>(p_tile + at) = p_ds[0][mt][nt][half];
              *reinterpret_cast<std::uint32_t*>(ds_tile + at) = p_ds[1][mt][nt][half];
            }
          }
        }
    };
    const bool needs_mask = key0 + Bc > p.seq_k || row0 + Br > p.seq_q ||
                            (p.causal && key0 + Bc - 1 > row0 + causal_offset);
    if (needs_mask)
      probabilities(std::true_type{});
    else
      probabilities(std::false_type{});
    if constexpr (kStoresAfterBarrier) {
      // The step's first barrier, after the exponentials: every warp is done with step - 1's reads of the P^T and
      // dS^T tiles, which the stores below overwrite.
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < kSMTiles; ++mt)
#pragma unroll
        for (int np = 0; np < kSNTiles / 2; ++np)  // the 16 x 16 block of tiles 2 np and 2 np + 1
#pragma unroll
          for (int n = 0; n < 2; ++n)
            mma::store_accumulator_block(n == 0 ? p_tile : ds_tile, kPStride, s_key0 + mt * 16, s_query0 + np * 16,
                                         {p_ds[n][mt][2 * np][0], p_ds[n][mt][2 * np][1], p_ds[n][mt][2 * np + 1][0],
                                          p_ds[n][mt][2 * np + 1][1]});
    }
    if constexpr (kStages == 3) mma::cp_async_wait<0>();  // step + 1's tiles, visible to all after the barrier
    __syncthreads();  // P^T and dS^T complete
    // Three stages: every warp is past step - 1 (the barrier above follows its last reads), so its stage is free.
    if constexpr (kStages == 3) load_next_q_block(step, stage);  // lands while this step and the next compute

    // Line 12: dV_j += P_ij^T dO_i and line 16: dK_j += dS_ij^T Q_i, this warp's keys by its columns.
    warp_mma<Stored::by_rows, Stored::by_depth, Br, QLayout>(acc_dv_dk, {p_tile, ds_tile}, kPStride, kv_key0,
                                                             {do_tile, q_tile}, kQStride, kv_column0);

    // Line 15: dQ_i += dS_ij K_j, this warp's queries by its columns, summed across the thread blocks of all K/V
    // blocks by fp32 atomics.
    if (accumulate_dq) {
      // Up to d = 128 the keys go in two halves, each into accumulators of its own (warp_mma's two "products"),
      // summed after: twice the independent mma chains per k-step (log step 23); at d = 256 the extra registers
      // would spill.
      constexpr int kKeyParts = HeadDim <= 128 ? 2 : 1;
      float dq_parts[kKeyParts][kDqMTiles][kDqDTiles][4] = {};
      if constexpr (kKeyParts == 2)
        warp_mma<Stored::by_depth, Stored::by_depth, Bc / 2>(dq_parts, {ds_tile, ds_tile + Bc / 2 * kPStride}, kPStride,
                                                             dq_row0, {k_tile, k_tile + Bc / 2 * kStride}, kStride,
                                                             dq_column0);
      else
        warp_mma<Stored::by_depth, Stored::by_depth, Bc>(dq_parts, {ds_tile}, kPStride, dq_row0, {k_tile}, kStride,
                                                         dq_column0);
      float dq[1][kDqMTiles][kDqDTiles][4];
#pragma unroll
      for (int mt = 0; mt < kDqMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDqDTiles; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dq[0][mt][dt][e] = dq_parts[0][mt][dt][e];
            if constexpr (kKeyParts == 2) dq[0][mt][dt][e] += dq_parts[1][mt][dt][e];
          }
      // Each lane's values of two neighbouring 8-column tiles are adjacent in the accumulator's rows
      // (mma::DqAccumulatorRow), so one 16-byte atomic adds four of them (log step 19). One address per thread, its
      // first row and 16-column group; every other run it adds to sits a compile-time offset away, so each atomic
      // is [dq_first + immediate] (atomic_add_quad_at) and none waits for a register that the atomic before it
      // still has to read, and the rows are tested against N_q in the last Q block only (log step 15).
      static_assert(kDqDTiles % 2 == 0 && Shape::kDqColumns % 16 == 0, "whole 16-column groups per warp");
      const int first_query = row0 + dq_row0 + group;
      float* dq_first = p.dq_accum +
                        (((static_cast<long long>(batch) * p.q_heads + head) * p.seq_q) + first_query) * HeadDim +
                        mma::DqAccumulatorRow::position(dq_column0 + 2 * t);
      const bool whole_block = row0 + Br <= p.seq_q;  // only the last Q block has rows past N_q
      mma::static_for<2 * kDqMTiles>([&]<int kRowGroup>() {  // rows mt * 16 + group + 8 * half: kRowGroup = 2 mt + half
        constexpr int kMt = kRowGroup / 2, kHalf = kRowGroup % 2, kRowOffset = kMt * 16 + 8 * kHalf;
        if (!whole_block && first_query + kRowOffset >= p.seq_q) return;
        mma::static_for<kDqDTiles / 2>([&]<int kGroup>() {  // tiles 2 kGroup and 2 kGroup + 1: 16 columns
          const auto& low = dq[0][kMt][2 * kGroup], &high = dq[0][kMt][2 * kGroup + 1];
          mma::atomic_add_quad_at<(kRowOffset * HeadDim + kGroup * 16) * 4>(
              dq_first, low[2 * kHalf], low[2 * kHalf + 1], high[2 * kHalf], high[2 * kHalf + 1]);
        });
      });
    }
    // (No barrier here: the next step's first barrier keeps its P^T / dS^T stores, and its copy into this step's
    // stage, behind every warp's reads.)
    if constexpr (kStages == 2)
      head = copy_head, row0 = copy_row0;  // (the copy issued in this step was the next step's)
    else
      next_block(head, row0);
  }

  // Line 18: write dK_j (times the softmax scale, which S = scale Q K^T puts on every dS) and dV_j.
  T* dk = static_cast<T*>(p.dk) + batch * p.kv_batch + kv_head * p.kv_head;
  T* dv = static_cast<T*>(p.dv) + batch * p.kv_batch + kv_head * p.kv_head;
#pragma unroll
  for (int mt = 0; mt < kKvMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + kv_key0 + mt * 16 + group + 8 * half;
      if (key >= p.seq_k) continue;
#pragma unroll
      for (int dt = 0; dt < kKvDTiles; ++dt) {
        const long long at = key * p.kv_seq + kv_column0 + dt * 8 + 2 * t;
        *reinterpret_cast<std::uint32_t*>(dk + at) =
            mma::pack2<T>(acc_dk[mt][dt][2 * half] * p.scale, acc_dk[mt][dt][2 * half + 1] * p.scale);
        *reinterpret_cast<std::uint32_t*>(dv + at) = mma::pack2<T>(acc_dv[mt][dt][2 * half], acc_dv[mt][dt][2 * half + 1]);
      }
    }
}

/// The deterministic alternative to line 15's atomics: a second pass with the loops of the forward (one
/// thread block per Q block, each warp owning 16 query rows, K/V blocks streamed), recomputing P_ij and dS_ij
/// to form dQ_i = scale * sum_j dS_ij K_j in registers. Same sums in the same order on every run.
template <class T, int HeadDim, int Br, int Bc>
__global__ void __launch_bounds__(128) dq_kernel(const Params p) {
  constexpr int kStride = padded(HeadDim);
  constexpr int kNTiles = Bc / 8, kDTiles = HeadDim / 8;
  static_assert(Br == 64, "4 warps of 16 query rows");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);  // Q_i
  T* do_tile = q_tile + Br * kStride;              // dO_i
  T* k_tiles = do_tile + Br * kStride;             // K_j: 2 stages
  T* v_tiles = k_tiles + 2 * Bc * kStride;         // V_j: 2 stages

  const int q_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group_size;
  const int row0 = q_block * Br;
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  const long long q_offset = batch * p.q_batch + head * p.q_head + row0 * p.q_seq;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head;
  const long long row_offset = (static_cast<long long>(batch) * p.q_heads + head) * p.seq_q;

  int kv_blocks = cuda::ceil_div(p.seq_k, Bc);
  if (p.causal) {
    const int last_visible_key = row0 + Br - 1 + (p.seq_k - p.seq_q);
    kv_blocks = last_visible_key < 0 ? 0 : min(kv_blocks, last_visible_key / Bc + 1);
  }
  auto load_kv_block = [&](int j, int stage) {
    load_tile_async<Bc, HeadDim, kStride, 128>(k_tiles + stage * Bc * kStride, k + j * Bc * p.kv_seq, p.kv_seq,
                                               p.seq_k - j * Bc);
    load_tile_async<Bc, HeadDim, kStride, 128>(v_tiles + stage * Bc * kStride, v + j * Bc * p.kv_seq, p.kv_seq,
                                               p.seq_k - j * Bc);
  };
  load_tile_async<Br, HeadDim, kStride, 128>(q_tile, static_cast<const T*>(p.q) + q_offset, p.q_seq, p.seq_q - row0);
  load_tile_async<Br, HeadDim, kStride, 128>(do_tile, static_cast<const T*>(p.d_o) + q_offset, p.q_seq,
                                             p.seq_q - row0);
  if (kv_blocks > 0) load_kv_block(0, 0);
  mma::cp_async_commit();

  // This thread's two rows: L_i (log2) and D_i.
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int query = row0 + warp * 16 + group + 8 * half;
    row_lse[half] = query < p.seq_q ? flash::lse_to_log2(p.lse[row_offset + query]) : kInf;
    row_delta[half] = query < p.seq_q ? p.delta[row_offset + query] : 0.0f;
  }
  float acc_dq[kDTiles][4] = {};

  for (int j = 0; j < kv_blocks; ++j) {
    const int stage = j % 2;
    if (j + 1 < kv_blocks) {
      __syncthreads();
      load_kv_block(j + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = k_tiles + stage * Bc * kStride;
    const T* v_tile = v_tiles + stage * Bc * kStride;

    // S_ij = Q_i K_j^T and dP_ij = dO_i V_j^T, this warp's 16 rows.
    float s[kNTiles][4] = {}, dp[kNTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < HeadDim / 16; ++kk) {
      std::uint32_t a_q[4], a_do[4];
      load_a(a_q, q_tile, kStride, warp * 16, kk * 16);
      load_a(a_do, do_tile, kStride, warp * 16, kk * 16);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        std::uint32_t b[4];
        load_b_pair(b, k_tile, kStride, np * 16, kk * 16);
        mma_m16n8k16<T>(s[2 * np], a_q, b[0], b[1]);
        mma_m16n8k16<T>(s[2 * np + 1], a_q, b[2], b[3]);
        load_b_pair(b, v_tile, kStride, np * 16, kk * 16);
        mma_m16n8k16<T>(dp[2 * np], a_do, b[0], b[1]);
        mma_m16n8k16<T>(dp[2 * np + 1], a_do, b[2], b[3]);
      }
    }
    // P_ij = exp(scale S_ij - L_i); dS_ij = P_ij * (dP_ij - D_i).
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = row0 + warp * 16 + group + 8 * (e / 2);
        const int key = j * Bc + nt * 8 + 2 * t + e % 2;
        const float prob = masked(p, query, key) ? 0.0f : exp2_fast(s[nt][e] * p.scale_log2 - row_lse[e / 2]);
        s[nt][e] = prob * (dp[nt][e] - row_delta[e / 2]);
      }
    // dQ_i += dS_ij K_j.
    mma::accumulators_times<T, HeadDim, Bc>(acc_dq, s, k_tile, kStride);
  }

  mma::cp_async_wait<0>();  // (only Q_i and dO_i are in flight when no K/V block is visible)
  T* dq = static_cast<T*>(p.dq) + q_offset;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int local = warp * 16 + group + 8 * half;
    if (row0 + local >= p.seq_q) continue;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<std::uint32_t*>(dq + local * p.q_seq + dt * 8 + 2 * t) =
          mma::pack2<T>(acc_dq[dt][2 * half] * p.scale, acc_dq[dt][2 * half + 1] * p.scale);
  }
}

// ============================================================================================================
// Host side: validation, block sizes per head dim, launches.
// ============================================================================================================

const char* const kWho = "flash_v2/gpu";

// 16-byte copies need every row to start 16-byte aligned: strides that are multiples of 8 elements.
void validate_gpu_call(const AttentionProblem& p, const AttentionTensors& t, bool backward) {
  validate_call(p, t, gpu_caps(), kWho, backward);
}

Params make_params(const AttentionProblem& p, const AttentionTensors& t) {
  Params params;
  static_cast<cuda::AttentionParams&>(params) = cuda::make_attention_params(p, t);
  return params;
}

/// Calls body(std::integral_constant<int, D>{}) for the supported head dims.
template <class Body>
void dispatch_head_dim(std::int64_t head_dim, Body&& body) {
  switch (head_dim) {
    case 32: body(std::integral_constant<int, 32>{}); return;
    case 64: body(std::integral_constant<int, 64>{}); return;
    case 96: body(std::integral_constant<int, 96>{}); return;
    case 128: body(std::integral_constant<int, 128>{}); return;
    case 256: body(std::integral_constant<int, 256>{}); return;
  }
  throw std::invalid_argument("head_dim: " + std::to_string(head_dim) + " is not supported by " + kWho);
}

// Forward block sizes: Br = 128 query rows (32 per warp, so each K/V fragment read from shared memory feeds two
// mma tiles); Bc = 128 keys for D <= 64 and 64 above (option "block_cols"; S_ij and O_i share the registers;
// at D = 128, Bc = 32 halves S_ij, see forward_block_cols); D = 256 halves Br to keep O_i (D floats per row) in
// registers.
template <class T, int D>
void forward_typed(const Params& params, int batch, int block_cols) {
  if constexpr (D == 256) {
    launch_forward<T, D, 64, 64>(params, batch);
  } else if constexpr (D <= 64) {
    if (block_cols == 128)
      launch_forward<T, D, 128, 128>(params, batch);
    else
      launch_forward<T, D, 128, 64>(params, batch);
  } else if constexpr (D == 128) {
    if (block_cols == 32)
      launch_forward<T, D, 128, 32>(params, batch);
    else
      launch_forward<T, D, 128, 64>(params, batch);
  } else {
    launch_forward<T, D, 128, 64>(params, batch);
  }
}

constexpr int kDqPassBr = 64;  // query rows per thread block of the deterministic dQ pass
constexpr int kDqPassBc = 64;  // keys per step of that pass

template <class T, int D, int Br, int Bc>
void backward_typed(const Params& params, int batch, int kv_heads, bool deterministic) {
  const long long rows = static_cast<long long>(batch) * params.q_heads * params.seq_q;
  launch_backward_prepare<T, D>(params, rows);

  using Shape = BackwardShape<D, Br, Bc>;
  auto kernel = backward_kernel<T, D, Br, Bc>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes));
  const dim3 grid(cuda::ceil_div(params.seq_k, Bc), kv_heads, batch);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes>>>(params, !deterministic);
  ATTN_CUDA_CHECK_LAUNCH();

  if (deterministic) {
    constexpr int kSmem = (2 * kDqPassBr + 4 * kDqPassBc) * padded(D) * 2;
    auto pass = dq_kernel<T, D, kDqPassBr, kDqPassBc>;
    ATTN_CUDA_CHECK(cudaFuncSetAttribute(pass, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const dim3 dq_grid(cuda::ceil_div(params.seq_q, kDqPassBr), params.q_heads, batch);
    pass<<<dq_grid, 128, kSmem>>>(params);
    ATTN_CUDA_CHECK_LAUNCH();
  } else {
    launch_store_dq<T, D>(params, rows);
  }
}

/// Option "block_cols" (forward Bc): 64, or 128 where D <= 64 (S_ij of 32 x 128 per warp still fits registers
/// next to O_i), the default there: measured 10% faster at D = 64 (README, GPU tier); or 32 where D = 128
/// (S_ij of 32 x 32 per warp: 32 floats per thread instead of 64 next to the 128 of O_i, no register spill).
int forward_block_cols(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t value = options.get("block_cols", p.head_dim <= 64 ? 128 : 64);
  if (value == 64 || (value == 128 && p.head_dim <= 64) || (value == 32 && p.head_dim == 128))
    return static_cast<int>(value);
  throw std::invalid_argument("block_cols: " + std::to_string(value) + " is not supported by " + kWho +
                              " (64, 128 when head_dim <= 64, or 32 when head_dim = 128)");
}

/// Option "backward_block_cols" (keys per backward thread block): 128, the default for D <= 128, or 64, the only
/// choice at D = 256 (K_j, V_j, two stages of Q_i, dO_i and the P^T, dS^T tiles of 128 keys by D = 256 would
/// need 301 KB of shared memory).
int backward_block_cols(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t value = options.get("backward_block_cols", p.head_dim <= 128 ? 128 : 64);
  if (value == 64 || (value == 128 && p.head_dim <= 128)) return static_cast<int>(value);
  throw std::invalid_argument("backward_block_cols: " + std::to_string(value) + " is not supported by " + kWho +
                              " (64, or 128 when head_dim <= 128)");
}

/// Option "backward_block_rows" (query rows per step of the backward): 64, or 128 where D <= 64, the default there
/// (FlashAttention-2's own choice: twice the work per barrier and per step's fixed costs; S^T and dP^T of 32 keys x
/// 64 queries per warp still fit registers next to dK_j, dV_j; measured 13-15% faster at D = 64, README log step 6).
int backward_block_rows(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t value = options.get("backward_block_rows", p.head_dim <= 64 ? 128 : 64);
  if (value == 64 || (value == 128 && p.head_dim <= 64)) return static_cast<int>(value);
  throw std::invalid_argument("backward_block_rows: " + std::to_string(value) + " is not supported by " + kWho +
                              " (64, or 128 when head_dim <= 64)");
}

/// The backward's scratch, FlashAttention-2's own: dQ's fp32 accumulator and D_i (one fp32 per query row).
std::size_t backward_scratch_bytes(const AttentionProblem& p) {
  return static_cast<std::size_t>(p.q_elements()) * sizeof(float) +  // dQ accumulator
         static_cast<std::size_t>(p.lse_elements()) * sizeof(float);  // D_i
}

}  // namespace

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16, DType::f16};
  caps.stride_multiple = 8;  // K/V and Q rows are copied in 16-byte chunks (cp.async / ldmatrix)
  caps.max_seq = 1 << 30;    // row indices are 32-bit in the kernels
  caps.max_head_dim = 256;
  caps.head_dims = {32, 64, 96, 128, 256};
  caps.has_backward = true;
  caps.pointer_alignment = 16;
  return caps;
}

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_gpu_call(p, t, false);
  const int block_cols = forward_block_cols(p, options);
  const Params params = make_params(p, t);
  cuda::dispatch_dtype(t.dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>)
      dispatch_head_dim(p.head_dim, [&](auto d) {
        forward_typed<T, decltype(d)::value>(params, static_cast<int>(p.batch), block_cols);
      });
  });
}

void backward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_gpu_call(p, t, true);
  const bool deterministic = options.get("deterministic", 0) != 0;
  const int block_cols = backward_block_cols(p, options);
  const int block_rows = backward_block_rows(p, options);
  Params params = make_params(p, t);
  DeviceBuffer<float> dq_accum(deterministic ? 0 : static_cast<std::size_t>(p.q_elements()));
  DeviceBuffer<float> delta(static_cast<std::size_t>(p.lse_elements()));
  params.dq_accum = dq_accum.data();
  params.delta = delta.data();
  if (!deterministic) ATTN_CUDA_CHECK(cudaMemsetAsync(dq_accum.data(), 0, dq_accum.bytes()));
  cuda::dispatch_dtype(t.dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>)
      dispatch_head_dim(p.head_dim, [&](auto d) {
        constexpr int D = decltype(d)::value;
        const int batch = static_cast<int>(p.batch), kv_heads = static_cast<int>(p.kv_heads);
        if constexpr (D <= 64) {
          if (block_rows == 128 && block_cols == 128)
            return backward_typed<T, D, 128, 128>(params, batch, kv_heads, deterministic);
          if (block_rows == 128) return backward_typed<T, D, 128, 64>(params, batch, kv_heads, deterministic);
        }
        if constexpr (D <= 128) {
          if (block_cols == 128) return backward_typed<T, D, 64, 128>(params, batch, kv_heads, deterministic);
        }
        backward_typed<T, D, 64, 64>(params, batch, kv_heads, deterministic);
      });
  });
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_gpu(p, t, options);
    const std::int64_t Bc = forward_block_cols(p, options);
    options.counters["Tc"] = static_cast<double>((p.seq_k + Bc - 1) / Bc);
  };
  gpu.backward = backward_gpu;
  gpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward) {
    return backward ? backward_scratch_bytes(p) : std::size_t{0};
  };
  gpu.option_names = {"block_cols", "backward_block_cols", "backward_block_rows", "deterministic"};
  return gpu;
}

}  // namespace attn::flash_v2
