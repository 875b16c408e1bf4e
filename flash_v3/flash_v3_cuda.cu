// flash_v3, GPU tier: FlashAttention-3's forward on Hopper (sm_90a), bf16 and fp16, head dims 64, 128, 256.
// The arithmetic is flash_v2's (Q blocks outer, online softmax with exp2, O divided by l once at the end); what
// changes is how the hardware is fed: TMA copies K/V tiles into a ring of shared-memory stages guarded by
// mbarriers, wgmma multiplies straight out of shared memory (and out of registers for P), a producer warpgroup
// does nothing but load, and the consumer warpgroups take turns on the tensor cores (pingpong) and overlap the
// next S = Q K^T with this block's softmax (FA3 Alg. 2). The primitives are in common/hopper.cuh.
//
// The build-up of the chapter stays selectable (option "schedule", kernel template parameter Schedule):
//   0  one consumer warpgroup (64 query rows) whose first thread also issues the TMA loads: no specialization
//   1  a producer warpgroup + two consumer warpgroups (128 query rows), setmaxnreg 24 / 240
//   2  1 + pingpong: named barriers hand the tensor cores from one consumer to the other
//   3  2 + intra-warpgroup overlap: softmax of block j while O += P V of block j - 1 runs (the default)
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/hopper.cuh"
#include "common/mma.cuh"
#include "common/validate.hpp"
#include "flash_v3/flash_v3.hpp"
#include "flash_v3/flash_v3_schedule.cuh"
#include "flash_v3/fp8_gpu.hpp"

namespace attn::flash_v3 {
namespace {

using schedule::Slot;
using schedule::slot_of;
using schedule::Tile;
using schedule::tile_at;

using namespace attn::hopper;
constexpr float kInf = std::numeric_limits<float>::infinity();

/// Keys per K/V block: 128 (S = 64 x 128 fp32 per consumer next to O), 64 at D = 256 (O alone takes 128
/// registers per thread). Option "block_cols" offers 192 at D = 64 (the default there for long sequences) and
/// 176 at D = 128 (block_cols_option, below).
constexpr int default_block_cols(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Everything fixed at compile time for one (head dim, schedule, key-block size).
template <int HeadDim_, int Schedule_, int BlockCols = default_block_cols(HeadDim_), bool Persistent = false>
struct Config {
  static constexpr int HeadDim = HeadDim_, Schedule = Schedule_;
  static constexpr bool kPersistent = Persistent;  // one thread block per SM walking many Q tiles (schedule 3)
  static constexpr bool kProducerWarpgroup = Schedule >= 1;
  static constexpr bool kPingpong = Schedule >= 2;
  static constexpr bool kOverlap = Schedule >= 3;
  static constexpr int kConsumers = Schedule >= 1 ? 2 : 1;
  static constexpr int kThreads = kWarpgroupThreads * (kConsumers + (kProducerWarpgroup ? 1 : 0));
  static constexpr int Br = 64 * kConsumers;            // query rows per thread block: 64 per consumer (wgmma M)
  static constexpr int Bc = BlockCols;                 // keys per K/V block (S = 64 x Bc fp32 per consumer)
  static constexpr int kStages = 2;                     // depth of the K and V rings
  static constexpr int kPanels = HeadDim / kPanelColumns;
  static constexpr int kQBytes = Br * HeadDim * 2;
  static constexpr int kTileBytes = Bc * HeadDim * 2;  // one K or one V block
  // Shared memory, from a 1024-byte aligned base: Q | K stages | V stages | mbarriers.
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kTileBytes;
  static constexpr int kBarrierOffset = kVOffset + kStages * kTileBytes;
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (2 + 4 * kStages) + kSwizzleAtomBytes;  // + alignment slack
  static_assert(HeadDim % kPanelColumns == 0, "head dims are whole 64-column panels");
  static_assert(Bc % 16 == 0 && (Bc * kPanelRowBytes) % kSwizzleAtomBytes == 0, "key blocks of whole swizzle atoms");
};

// Named barrier ids (0 is __syncthreads): one per consumer warpgroup for its epilogue, one per consumer for
// the pingpong hand-over.
constexpr int kEpilogueBarrier = 1;  // + consumer
constexpr int kPingpongBarrier = 3;  // + consumer

// The mbarriers of the pipeline (FA3 Alg. 1): Q has a "full" barrier (and, in the persistent kernel, an "empty"
// one: both consumers have finished with Q_i and with the O staging that reuses its space); each stage of the K ring and of the V ring
// has a "full" barrier (the producer's arrive.expect_tx plus the TMA bytes) and an "empty" one (one arrival per
// consumer warpgroup when it is done reading the stage).
template <int Stages>
struct Barriers {
  std::uint64_t q_full, q_empty;
  std::uint64_t k_full[Stages], k_empty[Stages];
  std::uint64_t v_full[Stages], v_empty[Stages];
};



// ============================================================================================================
// Producer (FA3 Alg. 1 lines 2-8): one thread issues every TMA copy; the others of its warpgroup only give up registers.
// ============================================================================================================

template <class Cfg>
struct Producer {
  const CUtensorMap* q_map;
  const CUtensorMap* k_map;
  const CUtensorMap* v_map;
  unsigned char* smem;
  Barriers<Cfg::kStages>* bars;
  Tile tile;
  int ring = 0;  // blocks loaded for earlier tiles: ring positions continue from tile to tile

  __device__ void load_q() const {
    mbarrier_arrive_expect_tx(&bars->q_full, Cfg::kQBytes);
    for (int panel = 0; panel < Cfg::kPanels; ++panel)
      tma_load(smem + panel * Cfg::Br * kPanelRowBytes, q_map, &bars->q_full, panel * kPanelColumns, tile.row0,
               tile.head, tile.batch);
  }
  // FA3 Alg. 1 lines 6-7 for K (and V below): wait until the consumers have released the slot, announce the
  // bytes, issue one TMA box per 64-column panel.
  __device__ void load_k(int it) const { load_block(it, k_map, Cfg::kKOffset, bars->k_full, bars->k_empty); }
  __device__ void load_v(int it) const { load_block(it, v_map, Cfg::kVOffset, bars->v_full, bars->v_empty); }
  // Waits until every slot's last load has been consumed, so that no copy is in flight when the block exits.
  __device__ void drain(int loads) const {
    for (int it = loads; it < loads + Cfg::kStages; ++it) {
      const Slot slot = slot_of<Cfg::kStages>(it);
      mbarrier_wait(&bars->k_empty[slot.stage], slot.phase ^ 1);
      mbarrier_wait(&bars->v_empty[slot.stage], slot.phase ^ 1);
    }
  }

 private:
  __device__ void load_block(int it, const CUtensorMap* map, int ring_offset, std::uint64_t* full,
                             std::uint64_t* empty) const {
    const Slot slot = slot_of<Cfg::kStages>(ring + it);
    mbarrier_wait(&empty[slot.stage], slot.phase ^ 1);  // the first pass sees every slot free
    mbarrier_arrive_expect_tx(&full[slot.stage], Cfg::kTileBytes);
    unsigned char* destination = smem + ring_offset + slot.stage * Cfg::kTileBytes;
    const int key0 = (tile.blocks - 1 - it) * Cfg::Bc;
    for (int panel = 0; panel < Cfg::kPanels; ++panel)
      tma_load(destination + panel * Cfg::Bc * kPanelRowBytes, map, &full[slot.stage], panel * kPanelColumns, key0,
               tile.kv_head, tile.batch);
  }
};

// ============================================================================================================
// Consumer: the math of one warpgroup on its 64 query rows.
// ============================================================================================================

/// S (64 x Bc, fp32) = Q_i K_j^T: HeadDim / 16 wgmmas, both operands K-major in shared memory. Issued, not
/// waited for.
template <class T, class Cfg>
__device__ __forceinline__ void issue_qk(float (&s)[Cfg::Bc / 2], const unsigned char* q_rows,
                                         const unsigned char* k_tile) {
#pragma unroll
  for (int kk = 0; kk < Cfg::HeadDim / 16; ++kk) {
    const int panel = kk / 4, byte_in_row = (kk % 4) * 32;  // 16 elements = 32 bytes of a 128-byte row
    const std::uint64_t a = smem_descriptor(q_rows + panel * Cfg::Br * kPanelRowBytes + byte_in_row, 16, 1024);
    const std::uint64_t b = smem_descriptor(k_tile + panel * Cfg::Bc * kPanelRowBytes + byte_in_row, 16, 1024);
    wgmma_ss<Cfg::Bc, T>(s, a, b, kk > 0);
  }
  wgmma_commit();
}

/// O (64 x HeadDim, fp32) += P (64 x Bc, registers) V_j: Bc / 16 wgmmas, V MN-major in shared memory (its rows are
/// keys, the reduction dimension). Issued, not waited for.
template <class T, class Cfg>
__device__ __forceinline__ void issue_pv(float (&o)[Cfg::HeadDim / 2], const std::uint32_t (&p)[Cfg::Bc / 16][4],
                                         const unsigned char* v_tile) {
#pragma unroll
  for (int kk = 0; kk < Cfg::Bc / 16; ++kk) {
    const std::uint64_t b = smem_descriptor(v_tile + kk * 16 * kPanelRowBytes, Cfg::Bc * kPanelRowBytes, 1024);
    wgmma_rs<Cfg::HeadDim, T>(o, p[kk], b, true);
  }
  wgmma_commit();
}

/// The running softmax state of this thread's two rows (accumulator rows g and g + 8 of its warp's 16).
struct RowState {
  float m[2] = {-kInf, -kInf};  // running max of the raw scores
  float l[2] = {0.0f, 0.0f};    // running sum of exp2(scale_log2 (s - m)), this thread's columns only
};

/// FA3 Alg. 2 line 12 (FA2 Alg. 1 lines 9-10) on one block of raw scores s: masks what the row
/// cannot see (Masked), finds the new row max, replaces s by P~ = exp(scale (s - m_new)), updates l, and returns
/// in `rescale` the factor exp(scale (m_old - m_new)) by which O must still be multiplied.
template <bool Masked, int Bc>
__device__ __forceinline__ void online_softmax(float (&s)[Bc / 2], RowState& rows, float (&rescale)[2],
                                               const cuda::AttentionParams& p, int query0, int key0) {
  if constexpr (Masked) schedule::mask_invisible<Bc>(s, p, query0, key0);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float block_max = -kInf;
#pragma unroll
    for (int i = 0; i < Bc / 8; ++i) block_max = fmaxf(block_max, fmaxf(s[4 * i + 2 * half], s[4 * i + 2 * half + 1]));
    const float m_new = fmaxf(rows.m[half], mma::group_max(block_max));
    // A row that has seen only masked keys keeps m = -inf; subtracting 0 then keeps every term 0, not NaN.
    const float m_scaled = m_new == -kInf ? 0.0f : m_new * p.scale_log2;
    rescale[half] = mma::exp2_fast(rows.m[half] * p.scale_log2 - m_scaled);
    rows.m[half] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < Bc / 8; ++i)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[4 * i + e] = mma::exp2_fast(s[4 * i + e] * p.scale_log2 - m_scaled);  // one FFMA + one MUFU.EX2
        sum += s[4 * i + e];
      }
    rows.l[half] = rows.l[half] * rescale[half] + sum;
  }
}

template <int HeadDim>
__device__ __forceinline__ void rescale_output(float (&o)[HeadDim / 2], const float (&rescale)[2]) {
#pragma unroll
  for (int i = 0; i < HeadDim / 8; ++i) {
    o[4 * i + 0] *= rescale[0];
    o[4 * i + 1] *= rescale[0];
    o[4 * i + 2] *= rescale[1];
    o[4 * i + 3] *= rescale[1];
  }
}

/// P~ (fp32 in the S accumulator) rounded to T as the A operand of O += P V, one group of 4 registers per 16 keys.
template <class T, int Bc>
__device__ __forceinline__ void to_p_operand(std::uint32_t (&p)[Bc / 16][4], const float (&s)[Bc / 2]) {
#pragma unroll
  for (int kk = 0; kk < Bc / 16; ++kk) to_a_operand<T>(p[kk], s, kk);
}

/// The pingpong hand-over (FA3 Section 3.1): a consumer waits for its turn on the tensor cores before issuing
/// its GEMMs and passes the turn on right after, so that its softmax runs while the other consumer's GEMMs run.
/// bar.sync on its own barrier completes once the other consumer has bar.arrive'd on it (256 threads).
template <bool Pingpong>
__device__ __forceinline__ void wait_for_turn(int consumer) {
  if constexpr (Pingpong) named_barrier_sync(kPingpongBarrier + consumer, 2 * kWarpgroupThreads);
}
template <bool Pingpong>
__device__ __forceinline__ void pass_turn(int consumer) {
  if constexpr (Pingpong) named_barrier_arrive(kPingpongBarrier + (1 - consumer), 2 * kWarpgroupThreads);
}

/// A consumer warpgroup's whole Q tile (FA3 Alg. 2; with Schedule < 3 FA3 Alg. 1 lines 10-17 in the same order: it
/// waits for both GEMMs before the softmax). Leaves O unnormalised, with its row state.
template <class T, class Cfg>
__device__ void consumer_mainloop(const cuda::AttentionParams& p, const Tile& tile, unsigned char* smem,
                                  Barriers<Cfg::kStages>* bars, int consumer, const Producer<Cfg>* inline_producer,
                                  int ring, std::uint32_t q_phase, float (&o)[Cfg::HeadDim / 2], RowState& rows) {
  constexpr int Bc = Cfg::Bc, HeadDim = Cfg::HeadDim;
  const bool releases = threadIdx.x % kWarpgroupThreads == 0;  // one arrival per warpgroup on "empty"
  const unsigned char* q_rows = smem + consumer * 64 * kPanelRowBytes;  // this consumer's 64 rows of Q_i
  const int query0 = tile.row0 + consumer * 64 + (threadIdx.x % kWarpgroupThreads / 32) * 16;  // + group (+8)
  auto k_tile = [&](int stage) { return smem + Cfg::kKOffset + stage * Cfg::kTileBytes; };
  auto v_tile = [&](int stage) { return smem + Cfg::kVOffset + stage * Cfg::kTileBytes; };
  auto softmax = [&](float (&s)[Bc / 2], float (&rescale)[2], int it) {
    const int key0 = (tile.blocks - 1 - it) * Bc;
    if (it < tile.masked_blocks)
      online_softmax<true, Bc>(s, rows, rescale, p, query0, key0);
    else
      online_softmax<false, Bc>(s, rows, rescale, p, query0, key0);
  };

  float s[Bc / 2];
  std::uint32_t p_operand[Bc / 16][4];
  float rescale[2];
#pragma unroll
  for (int i = 0; i < HeadDim / 2; ++i) o[i] = 0.0f;

  // Schedule 0 has no producer warpgroup: its first thread keeps one block of K and of V in flight.
  if (inline_producer != nullptr) {
    inline_producer->load_q();
    inline_producer->load_k(0);
    if (tile.blocks > 1) inline_producer->load_k(1);
    inline_producer->load_v(0);
  }

  // FA3 Alg. 2 lines 2-5: S = Q K_0^T, softmax, release K_0.
  mbarrier_wait(&bars->q_full, q_phase);
  Slot slot = slot_of<Cfg::kStages>(ring);
  mbarrier_wait(&bars->k_full[slot.stage], slot.phase);
  wait_for_turn<Cfg::kPingpong>(consumer);
  wgmma_fence();
  issue_qk<T, Cfg>(s, q_rows, k_tile(slot.stage));
  pass_turn<Cfg::kPingpong>(consumer);
  wgmma_wait<0>();
  fence_registers(s);
  if (releases) mbarrier_arrive(&bars->k_empty[slot.stage]);
  softmax(s, rescale, 0);
  to_p_operand<T, Bc>(p_operand, s);

  // FA3 Alg. 2 lines 6-17.
  for (int it = 1; it < tile.blocks; ++it) {
    const Slot k_slot = slot_of<Cfg::kStages>(ring + it), v_slot = slot_of<Cfg::kStages>(ring + it - 1);
    if (inline_producer != nullptr) {
      if (it + 1 < tile.blocks) inline_producer->load_k(it + 1);
      inline_producer->load_v(it);
    }
    mbarrier_wait(&bars->k_full[k_slot.stage], k_slot.phase);  // line 7
    mbarrier_wait(&bars->v_full[v_slot.stage], v_slot.phase);  // line 9
    wait_for_turn<Cfg::kPingpong>(consumer);
    wgmma_fence();
    issue_qk<T, Cfg>(s, q_rows, k_tile(k_slot.stage));               // line 8
    issue_pv<T, Cfg>(o, p_operand, v_tile(v_slot.stage));           // line 10
    pass_turn<Cfg::kPingpong>(consumer);
    if constexpr (Cfg::kOverlap)
      wgmma_wait<1>();  // line 11: S is ready; O += P V may still be running
    else
      wgmma_wait<0>();
    fence_registers(s);
    if (releases) mbarrier_arrive(&bars->k_empty[k_slot.stage]);  // line 15 (K_j)
    softmax(s, rescale, it);                                        // line 12
    wgmma_wait<0>();                                                // line 13
    fence_registers(o);
    if (releases) mbarrier_arrive(&bars->v_empty[v_slot.stage]);  // line 15 (V_{j-1})
    rescale_output<HeadDim>(o, rescale);                          // line 14
    to_p_operand<T, Bc>(p_operand, s);                            // line 16
  }

  // FA3 Alg. 2 lines 18-20: the last O += P V.
  slot = slot_of<Cfg::kStages>(ring + tile.blocks - 1);
  mbarrier_wait(&bars->v_full[slot.stage], slot.phase);
  wait_for_turn<Cfg::kPingpong>(consumer);
  wgmma_fence();
  issue_pv<T, Cfg>(o, p_operand, v_tile(slot.stage));
  pass_turn<Cfg::kPingpong>(consumer);
  wgmma_wait<0>();
  fence_registers(o);
  if (releases) mbarrier_arrive(&bars->v_empty[slot.stage]);
}

/// FA3 Alg. 2 lines 21-22: O_i / l_i and L_i = m_i + log(l_i) for this consumer's 64 rows. LSE goes straight from
/// registers to global memory; O is rounded to T into this consumer's (finished) rows of the Q tile in shared
/// memory, in the swizzled panel layout, and written to global memory by TMA stores (rows past seq_q clipped).
template <class T, class Cfg>
__device__ void consumer_epilogue(const cuda::AttentionParams& p, const Tile& tile, unsigned char* smem,
                                  Barriers<Cfg::kStages>* bars, const CUtensorMap* o_map, int consumer,
                                  float (&o)[Cfg::HeadDim / 2], RowState& rows) {
  constexpr int HeadDim = Cfg::HeadDim;
  const int warp = threadIdx.x % kWarpgroupThreads / 32, group = mma::lane_group(), t = mma::lane_in_group();
  unsigned char* o_rows = smem + consumer * 64 * kPanelRowBytes;  // staging: this consumer's rows of Q_i
  float* lse = p.lse + (static_cast<long long>(tile.batch) * p.q_heads + tile.head) * p.seq_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = mma::group_sum(rows.l[half]);
    const float inverse = l > 0.0f ? 1.0f / l : 0.0f;  // a row that sees no key: O = 0
    const int local_row = warp * 16 + group + 8 * half;
    const int row = tile.row0 + consumer * 64 + local_row;
    if (t == 0 && row < p.seq_q) lse[row] = l > 0.0f ? rows.m[half] * p.scale + logf(l) : -kInf;
#pragma unroll
    for (int i = 0; i < HeadDim / 8; ++i) {
      const int column = 8 * i + 2 * t, panel = column / kPanelColumns;
      *reinterpret_cast<std::uint32_t*>(o_rows + panel * Cfg::Br * kPanelRowBytes +
                                        swizzled_offset(local_row, column % kPanelColumns)) =
          mma::pack2<T>(o[4 * i + 2 * half] * inverse, o[4 * i + 2 * half + 1] * inverse);
    }
  }
  fence_proxy_async();  // these ordinary stores are read next by TMA (the async proxy)
  named_barrier_sync(kEpilogueBarrier + consumer, kWarpgroupThreads);
  if (threadIdx.x % kWarpgroupThreads == 0) {
    for (int panel = 0; panel < Cfg::kPanels; ++panel)
      tma_store(o_map, o_rows + panel * Cfg::Br * kPanelRowBytes, panel * kPanelColumns,
                tile.row0 + consumer * 64, tile.head, tile.batch);
    tma_store_commit();
    tma_store_wait_read();  // shared memory must outlive the copy's reads
    if constexpr (Cfg::kPersistent) mbarrier_arrive(&bars->q_empty);  // the next tile's Q may come in
  }
}

/// Rows [row0, row0 + rows) of a tile whose rows all see no key (causal with seq_q > seq_k): O = 0, LSE = -inf,
/// written by `threads` threads of which this is number `thread`.
template <class T, int HeadDim>
__device__ void write_empty_rows(const cuda::AttentionParams& p, const Tile& tile, int row0, int rows, int thread,
                                 int threads) {
  T* o = static_cast<T*>(p.o_out) + tile.batch * p.q_batch + tile.head * p.q_head;
  float* lse = p.lse + (static_cast<long long>(tile.batch) * p.q_heads + tile.head) * p.seq_q;
  for (int i = thread; i < rows * HeadDim; i += threads) {
    const int row = row0 + i / HeadDim;
    if (row < p.seq_q) o[row * p.q_seq + i % HeadDim] = cuda::from_float<T>(0.0f);
  }
  for (int i = thread; i < rows; i += threads)
    if (row0 + i < p.seq_q) lse[row0 + i] = -kInf;
}

// ============================================================================================================
// The kernel: one thread block per Q tile (of q_blocks x heads x batch), or with Persistent one per SM, each
// walking the tiles blockIdx.x, blockIdx.x + gridDim.x, ... so that one tile's epilogue overlaps the next one's
// loads and no block pays the start-up (barrier set-up, first loads) twice.
// ============================================================================================================

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                   const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap o_map,
                   const cuda::AttentionParams p, int tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int HeadDim = Cfg::HeadDim;
  extern __shared__ unsigned char shared_bytes[];
  // TMA boxes with the 128-byte swizzle, and wgmma's view of them, need 1024-byte aligned panels.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(shared_bytes) + kSwizzleAtomBytes - 1) & ~std::uintptr_t(kSwizzleAtomBytes - 1));
  auto* bars = reinterpret_cast<Barriers<Cfg::kStages>*>(smem + Cfg::kBarrierOffset);
  const int tile_step = Cfg::kPersistent ? gridDim.x : tiles;  // without Persistent: exactly one tile per block

  if constexpr (!Cfg::kPersistent) {
    const Tile tile = tile_at<Cfg::Br, Cfg::Bc>(p, blockIdx.x);
    if (tile.blocks == 0) {  // before any barrier is used: every thread leaves by the same path
      write_empty_rows<T, HeadDim>(p, tile, tile.row0, Cfg::Br, threadIdx.x, blockDim.x);
      return;
    }
  }

  if (threadIdx.x == 0) {
    prefetch_tensor_map(&q_map);
    prefetch_tensor_map(&k_map);
    prefetch_tensor_map(&v_map);
    prefetch_tensor_map(&o_map);
    mbarrier_init(&bars->q_full, 1);
    mbarrier_init(&bars->q_empty, Cfg::kConsumers);
    for (int stage = 0; stage < Cfg::kStages; ++stage) {
      mbarrier_init(&bars->k_full[stage], 1);  // the producer's arrive.expect_tx; then the bytes
      mbarrier_init(&bars->v_full[stage], 1);
      mbarrier_init(&bars->k_empty[stage], Cfg::kConsumers);  // one arrival per consumer warpgroup
      mbarrier_init(&bars->v_empty[stage], Cfg::kConsumers);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  float o[HeadDim / 2];
  if constexpr (Cfg::kProducerWarpgroup) {
    const int warpgroup = threadIdx.x / kWarpgroupThreads;
    if (warpgroup == 0) {
      // Producer warpgroup (FA3 Alg. 1 lines 2-8): 24 registers per thread are plenty for address arithmetic.
      setmaxnreg_decrease<24>();
      if (threadIdx.x == 0) {
        int ring = 0, q_loads = 0;
        for (int index = blockIdx.x; index < tiles; index += tile_step) {
          const Tile tile = tile_at<Cfg::Br, Cfg::Bc>(p, index);
          if (tile.blocks == 0) continue;  // the consumers write it; nothing to load
          const Producer<Cfg> producer{&q_map, &k_map, &v_map, smem, bars, tile, ring};
          if constexpr (Cfg::kPersistent)  // Q's space is free once both consumers have stored the last O
            mbarrier_wait(&bars->q_empty, static_cast<std::uint32_t>(q_loads & 1) ^ 1);
          producer.load_q();
          for (int it = 0; it < tile.blocks; ++it) {
            producer.load_k(it);
            producer.load_v(it);
          }
          ring += tile.blocks;
          ++q_loads;
        }
        const Producer<Cfg> last{&q_map, &k_map, &v_map, smem, bars, Tile{}, 0};
        last.drain(ring);
      }
    } else {
      // Consumer warpgroups: 240 registers each (24 x 128 + 240 x 256 <= 65536).
      setmaxnreg_increase<240>();
      const int consumer = warpgroup - 1;
      if constexpr (Cfg::kPingpong)  // consumer 0 goes first: consumer 1 grants it the first turn
        if (consumer == 1) named_barrier_arrive(kPingpongBarrier + 0, 2 * kWarpgroupThreads);
      int ring = 0, q_loads = 0;
      for (int index = blockIdx.x; index < tiles; index += tile_step) {
        const Tile tile = tile_at<Cfg::Br, Cfg::Bc>(p, index);
        if (tile.blocks == 0) {
          write_empty_rows<T, HeadDim>(p, tile, tile.row0 + 64 * consumer, 64, threadIdx.x % kWarpgroupThreads,
                                       kWarpgroupThreads);
          continue;
        }
        RowState rows;
        consumer_mainloop<T, Cfg>(p, tile, smem, bars, consumer, nullptr, ring, q_loads & 1, o, rows);
        consumer_epilogue<T, Cfg>(p, tile, smem, bars, &o_map, consumer, o, rows);
        ring += tile.blocks;
        ++q_loads;
      }
    }
  } else {
    const Tile tile = tile_at<Cfg::Br, Cfg::Bc>(p, blockIdx.x);
    const Producer<Cfg> producer{&q_map, &k_map, &v_map, smem, bars, tile, 0};
    const Producer<Cfg>* inline_producer = threadIdx.x == 0 ? &producer : nullptr;
    RowState rows;
    consumer_mainloop<T, Cfg>(p, tile, smem, bars, 0, inline_producer, 0, 0, o, rows);
    consumer_epilogue<T, Cfg>(p, tile, smem, bars, &o_map, 0, o, rows);
  }
#endif
}

// ============================================================================================================
// Host side: validation, tensor maps, launch.
// ============================================================================================================

const char* const kWho = "flash_v3/gpu";

/// Option "schedule": 0-3 (the file header says what each adds), default 3.
int schedule_option(const StageOptions& options) {
  const std::int64_t value = options.get("schedule", 3);
  if (value < 0 || value > 3)
    throw std::invalid_argument("schedule: " + std::to_string(value) + " is not one of 0 (one warpgroup, no " +
                                "specialization), 1 (producer + 2 consumers), 2 (+ pingpong), 3 (+ overlap)");
  return static_cast<int>(value);
}



template <class T, class Cfg>
void launch(const AttentionProblem& problem, const AttentionTensors& t, const cuda::AttentionParams& params) {
  constexpr int HeadDim = Cfg::HeadDim;
  const DType dtype = t.dtype;
  const CUtensorMap q_map = make_tensor_map(t.q, dtype, problem.batch, problem.q_heads, problem.seq_q,
                                            HeadDim, t.q_strides, Cfg::Br);
  const CUtensorMap k_map = make_tensor_map(t.k, dtype, problem.batch, problem.kv_heads, problem.seq_k,
                                            HeadDim, t.kv_strides, Cfg::Bc);
  const CUtensorMap v_map = make_tensor_map(t.v, dtype, problem.batch, problem.kv_heads, problem.seq_k,
                                            HeadDim, t.kv_strides, Cfg::Bc);
  const CUtensorMap o_map = make_tensor_map(t.o, dtype, problem.batch, problem.q_heads, problem.seq_q,
                                            HeadDim, t.q_strides, 64);
  auto kernel = forward_kernel<T, Cfg>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const long long tiles = static_cast<long long>(cuda::ceil_div(problem.seq_q, Cfg::Br)) * problem.q_heads * problem.batch;
  if (tiles > std::numeric_limits<int>::max())
    throw std::invalid_argument("batch: " + std::to_string(problem.batch) + " x q_heads x ceil(seq_q / " +
                                std::to_string(Cfg::Br) + ") = " + std::to_string(tiles) + " tiles exceed 2^31 - 1");
  int blocks = static_cast<int>(tiles);
  if constexpr (Cfg::kPersistent) blocks = std::min(blocks, cuda::device_attribute(cudaDevAttrMultiProcessorCount));
  kernel<<<blocks, Cfg::kThreads, Cfg::kSmemBytes>>>(q_map, k_map, v_map, o_map, params, static_cast<int>(tiles));
  ATTN_CUDA_CHECK_LAUNCH();
}

template <class T, int HeadDim>
void launch_schedule(int schedule, int block_cols, bool persistent, const AttentionProblem& problem,
                     const AttentionTensors& t, const cuda::AttentionParams& params) {
  constexpr int kDefaultCols = default_block_cols(HeadDim);
  switch (schedule) {
    case 0: launch<T, Config<HeadDim, 0>>(problem, t, params); return;
    case 1: launch<T, Config<HeadDim, 1>>(problem, t, params); return;
    case 2: launch<T, Config<HeadDim, 2>>(problem, t, params); return;
  }
  if constexpr (HeadDim == 64) {
    if (block_cols == 192)
      return persistent ? launch<T, Config<HeadDim, 3, 192, true>>(problem, t, params)
                        : launch<T, Config<HeadDim, 3, 192>>(problem, t, params);
  } else if constexpr (HeadDim == 128) {
    if (block_cols == 176) return launch<T, Config<HeadDim, 3, 176>>(problem, t, params);
  }
  if (persistent) return launch<T, Config<HeadDim, 3, kDefaultCols, true>>(problem, t, params);
  launch<T, Config<HeadDim, 3>>(problem, t, params);
}

/// Option "persistent" = 1 (schedule 3 only): one thread block per SM walking the tiles, instead of one per tile.
bool persistent_option(const StageOptions& options, int schedule, int block_cols) {
  const std::int64_t value = options.get("persistent", 0);
  if (value != 0 && value != 1)
    throw std::invalid_argument("persistent: " + std::to_string(value) + " must be 0 (a thread block per tile) or 1 " +
                                "(a thread block per SM walking the tiles)");
  if (value == 1 && (schedule != 3 || block_cols == 176))
    throw std::invalid_argument("persistent: 1 needs schedule 3 and block_cols other than 176");
  return value == 1;
}

/// Option "block_cols" (keys per K/V block): the head dim's default, or with schedule 3 also 192 at D = 64 and
/// 176 at D = 128 (fewer, larger steps; S then takes 96 or 88 registers per thread). Measured (README, log):
/// 192 is 6-8% faster at D = 64 from N = 8192 and 1-4% slower at 2048, so it is the default at D = 64 from
/// seq_k = 4096 on; 176 gains nothing at D = 128 (offered for the study).
int block_cols_option(const AttentionProblem& p, const StageOptions& options, int schedule) {
  const int head_default = default_block_cols(static_cast<int>(p.head_dim));
  const bool long_keys_at_64 = p.head_dim == 64 && schedule == 3 && p.seq_k >= 4096;
  const std::int64_t value = options.get("block_cols", long_keys_at_64 ? 192 : head_default);
  if (value == head_default) return head_default;
  const bool offered = (p.head_dim == 64 && value == 192) || (p.head_dim == 128 && value == 176);
  if (!offered)
    throw std::invalid_argument("block_cols: " + std::to_string(value) + " is not offered by " + kWho + " at head_dim " +
                                std::to_string(p.head_dim) + " (128 or 192 at 64, 128 or 176 at 128, 64 at 256)");
  if (schedule != 3)
    throw std::invalid_argument("block_cols: " + std::to_string(value) + " needs schedule 3 (the other schedules use " +
                                std::to_string(head_default) + ")");
  return static_cast<int>(value);
}

}  // namespace

std::string gpu_build_target() {
#ifdef ATTN_FLASH_V3_SM90A
  return "sm_90a";
#else
  return "built without sm_90a kernels (configure with CMAKE_CUDA_ARCHITECTURES containing 90a)";
#endif
}

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16, DType::f16};
  caps.head_dims = {64, 128, 256};
  caps.max_head_dim = 256;
  caps.has_backward = false;
  caps.pointer_alignment = 16;  // TMA: the tensor's base address 16-byte aligned
  caps.stride_multiple = 8;     // TMA: every stride a multiple of 16 bytes
  caps.max_seq = 1 << 30;       // TMA coordinates and row indices are 32-bit
  return caps;
}

/// Option "fp8" = 1: the e4m3 path of fp8_cuda.cu (its own options: "incoherent", "stages", "tail_split"), else the bf16/fp16
/// kernels.
bool fp8_option(const StageOptions& options) {
  const std::int64_t value = options.get("fp8", 0);
  if (value != 0 && value != 1)
    throw std::invalid_argument("fp8: " + std::to_string(value) + " must be 0 (bf16/fp16 kernels) or 1 (e4m3 forward)");
  for (const char* name : {"schedule", "persistent", "block_cols"})
    if (value == 1 && options.values.count(name))
      throw std::invalid_argument(std::string(name) + ": not an option of the FP8 kernel (fp8 = 1: schedule 3, Bc = 128)");
  for (const char* name : {"incoherent", "stages", "tail_split"})
    if (value == 0 && options.values.count(name)) throw std::invalid_argument(std::string(name) + ": needs fp8 = 1");
  return value == 1;
}

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  if (fp8_option(options)) return fp8::forward_gpu(p, t, options);
  validate_call(p, t, gpu_caps(), kWho, false);
  const int schedule = schedule_option(options);
  const int block_cols = block_cols_option(p, options, schedule);
  const bool persistent = persistent_option(options, schedule, block_cols);
  schedule::require_hopper(kWho);
  options.counters["Tc"] = static_cast<double>((p.seq_k + block_cols - 1) / block_cols);  // K/V blocks per row
  const cuda::AttentionParams params = cuda::make_attention_params(p, t);
  cuda::dispatch_dtype(t.dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>) {
      switch (p.head_dim) {
        case 64: launch_schedule<T, 64>(schedule, block_cols, persistent, p, t, params); return;
        case 128: launch_schedule<T, 128>(schedule, block_cols, persistent, p, t, params); return;
        case 256: launch_schedule<T, 256>(schedule, block_cols, persistent, p, t, params); return;
      }
    }
  });
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = forward_gpu;
  gpu.extra_bytes = [](const AttentionProblem& p, DType, bool, const StageOptions& options) {
    // the e4m3 copies and scales, and the tail split's partial results
    return options.get("fp8", 0) == 1 ? fp8::scratch_bytes(p, options.get("tail_split", 0)) : std::size_t{0};
  };
  gpu.option_names = {"schedule", "persistent", "block_cols", "fp8", "incoherent", "stages", "tail_split"};
  gpu.target = gpu_build_target();
  gpu.no_backward_note = "backward not implemented yet";
  return gpu;
}

}  // namespace attn::flash_v3
