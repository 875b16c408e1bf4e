// flash_v3 FP8, GPU tier: the e4m3 forward of FA3 Section 3.3 on Hopper (sm_90a), built on the bf16 kernel's
// schedule 3 (flash_v3_cuda.cu): a producer warpgroup and two consumer warpgroups of 64 query rows, pingpong
// between the consumers, and the next S = Q K^T overlapped with this block's softmax (FA3 Alg. 2). What FP8
// changes:
//  - a quantization kernel first turns Q, K, V (bf16) into e4m3 codes with one fp32 scale per block of rows
//    (B_r = 128 rows of Q, B_c = 128 of K and of V), optionally after incoherent processing (Q and K rotated by
//    M = diag(signs) H / sqrt(d), a Walsh-Hadamard transform per row, in registers across one warp);
//  - both GEMMs are wgmma e4m3 (k = 32 per instruction), whose operands must both be K-major. S = Q K^T is (Q and
//    K rows hold the head dimension contiguously); O += P V is not: V's rows are keys, the reduction dimension.
//    So the producer warpgroup, once TMA has brought a V tile in, transposes it in shared memory into V^T (keys
//    contiguous; ldmatrix.trans, byte permutes, stmatrix) and only then hands it to the consumers. V^T's rows, and
//    so O's accumulator columns, come in stmatrix's order; the epilogue writes each column where it belongs;
//  - P is computed as exp2(x - m + 8), in (0, 256], converted to e4m3 straight into the A-operand registers. The
//    fp32 accumulator holds, per thread and per 32 keys, keys {2t, 2t+1, 8+2t, 9+2t} and {16+2t, ...} of its two
//    rows, while the e4m3 A operand wants 4 consecutive k per register. Instead of moving data between threads,
//    P's keys are renumbered: the thread's four values go into one register as they are, and the V transpose
//    writes V's rows in the same permuted order (README: "FP8: the two register layouts");
//  - the scales: S's fp32 sums are multiplied by q_scale x k_scale (folded with softmax scale x log2 e into the
//    exp2's FFMA); V's block scales are powers of two, and each block's ratio to v_ref (the tile's largest) goes
//    into P~'s exponent, so that O stays in units of v_ref and is rescaled only when a row's max grows; O = O x
//    v_ref / l at the end, written in bf16; LSE in fp32.
#include <cmath>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/attention_params.cuh"
#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/e4m3.hpp"
#include "common/hopper.cuh"
#include "common/mma.cuh"
#include "common/validate.hpp"
#include "flash_v3/flash_v3.hpp"
#include "flash_v3/flash_v3_schedule.cuh"
#include "flash_v3/fp8.hpp"
#include "flash_v3/fp8_gpu.hpp"

namespace attn::flash_v3::fp8 {
namespace {

using schedule::Slot;
using schedule::slot_of;
using schedule::Tile;
using schedule::tile_at;

using namespace attn::hopper;
using E4M3 = __nv_fp8_e4m3;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ============================================================================================================
// Quantization (+ incoherent processing): one thread block per block of rows, held in registers; a warp holds rows,
// HeadDim / 32 consecutive elements of each per lane.
// ============================================================================================================

/// Two fp32 values to two e4m3 codes, `low` in the low byte (cvt.rn.satfinite.e4m3x2.f32 puts its first source in
/// the high byte): round to nearest even, saturating, as e4m3::from_float.
__device__ __forceinline__ std::uint32_t e4m3x2(float low, float high) {
  unsigned short pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(pair) : "f"(high), "f"(low));
  return pair;
}
/// Four fp32 values to one register of four e4m3 codes, x0 in the lowest byte.
__device__ __forceinline__ std::uint32_t e4m3x4(float x0, float x1, float x2, float x3) {
  return e4m3x2(x0, x1) | (e4m3x2(x2, x3) << 16);
}

/// This lane's E = HeadDim / 32 consecutive elements of a row (lane * E ..), in one load of 4, 8 or 16 bytes: rows
/// start 16-byte aligned (the validator's rules for pointers and strides), so the lane's part is E x 2 aligned.
template <int HeadDim>
__device__ __forceinline__ void load_lane_part(float (&x)[HeadDim / 32], const __nv_bfloat16* row_pointer) {
  constexpr int E = HeadDim / 32;
  static_assert(E == 2 || E == 4 || E == 8, "head dims 64, 128, 256");
  using Word = std::conditional_t<E == 2, std::uint32_t, std::conditional_t<E == 4, uint2, uint4>>;
  union {
    Word word;
    __nv_bfloat162 pairs[E / 2];
  } part;
  part.word = *reinterpret_cast<const Word*>(row_pointer + (threadIdx.x % 32) * E);
#pragma unroll
  for (int i = 0; i < E / 2; ++i) {
    const float2 pair = __bfloat1622float2(part.pairs[i]);
    x[2 * i] = pair.x;
    x[2 * i + 1] = pair.y;
  }
}

/// With Incoherent, x (this lane's part of a row, as load_lane_part gives it) times M = diag(signs) H / sqrt(d): the
/// butterflies of walsh_hadamard (fp8_cpu.cpp) in the same order, those of stride < E inside the lane, the others
/// between lanes (__shfl_xor), so that the result is bit-identical to the CPU's.
template <int HeadDim, bool Incoherent>
__device__ __forceinline__ void rotate_lane_part(float (&x)[HeadDim / 32], const float* signs, float norm) {
  constexpr int E = HeadDim / 32;
  const int lane = threadIdx.x % 32;
  if constexpr (Incoherent) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] *= signs[lane * E + e];
#pragma unroll
    for (int h = 1; h < E; h *= 2)
#pragma unroll
      for (int e = 0; e < E; ++e)
        if ((e & h) == 0) {
          const float a = x[e], b = x[e + h];
          x[e] = a + b;
          x[e + h] = a - b;
        }
#pragma unroll
    for (int lanes = 1; lanes < 32; lanes *= 2)  // stride h = lanes * E
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float other = __shfl_xor_sync(0xFFFFFFFFu, x[e], lanes);
        x[e] = (lane & lanes) ? other - x[e] : x[e] + other;
      }
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] *= norm;
  }
}

/// quantize_kernel's shape: a block of kQuantizeRows rows read once and held in registers by kQuantizeWarps warps,
/// 8 rows each (with 8 warps of 16 rows d = 128 ran at half the speed: docs/measurements, 2026-11-30 fp8-quantize).
constexpr int kQuantizeRows = 128, kQuantizeWarps = 16;

/// Block quantization (fp8.hpp: quantize) of one block of up to kQuantizeRows rows of one (batch, head): grid
/// (blocks per head, batch x heads). One pass: each warp loads its rows (row warp, warp + warps, ...), all their
/// loads issued together, rotates them (Incoherent), and keeps them in registers while the block finds its amax;
/// then writes the codes.
template <int HeadDim, bool Incoherent>
__global__ void __launch_bounds__(32 * kQuantizeWarps)
    quantize_kernel(const __nv_bfloat16* x, long long batch_stride, long long head_stride, long long seq_stride,
                    int heads, int seq, int block_rows, ScaleRule rule, std::uint8_t* codes, float* scales,
                    const float* signs, float norm) {
  constexpr int E = HeadDim / 32, kWarps = kQuantizeWarps, kRowsPerWarp = kQuantizeRows / kWarps;
  __shared__ float warp_amax[kWarps];
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * block_rows, row_end = min(row0 + block_rows, seq);
  const __nv_bfloat16* slice = x + b * batch_stride + h * head_stride;
  float values[kRowsPerWarp][E];  // this warp's rows; those past the block as zeros (no effect on amax)
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp + kWarps * r;
    if (row < row_end) {
      load_lane_part<HeadDim>(values[r], slice + row * seq_stride);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) values[r][e] = 0.0f;
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    rotate_lane_part<HeadDim, Incoherent>(values[r], signs, norm);
#pragma unroll
    for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(values[r][e]));
  }
#pragma unroll
  for (int lanes = 16; lanes >= 1; lanes /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, lanes));
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, warp_amax[w]);
  const BlockScale scale = block_scale(amax, rule);  // the CPU's function (fp8.hpp)
  const float inverse = scale.inverse;
  if (threadIdx.x == 0) scales[static_cast<long long>(bh) * gridDim.x + blockIdx.x] = scale.scale;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp + kWarps * r;
    if (row >= row_end) continue;
    std::uint8_t* out = codes + (static_cast<long long>(bh) * seq + row) * HeadDim + lane * E;
    const float* v = values[r];
    if constexpr (E == 2) {  // D = 64: two codes per lane
      *reinterpret_cast<std::uint16_t*>(out) = static_cast<std::uint16_t>(e4m3x2(v[0] * inverse, v[1] * inverse));
    } else {
#pragma unroll
      for (int e = 0; e < E; e += 4)
        *reinterpret_cast<std::uint32_t*>(out + e) =
            e4m3x4(v[e] * inverse, v[e + 1] * inverse, v[e + 2] * inverse, v[e + 3] * inverse);
    }
  }
}

// ============================================================================================================
// The forward kernel's configuration and pipeline.
// ============================================================================================================

/// Deep: the K and V rings 4 stages deep and the V^T ring 3 at D = 128 (TMA's latency must hide behind fewer FLOPs
/// per block than in bf16, since e4m3 halves the GEMM time); at D = 256 shared memory holds only 2 of each (Q 32
/// KiB, K, V and V^T blocks 32 KiB each: 224 KiB of the 227). Shallow: 2 stages everywhere, as the bf16 kernel
/// (option "stages" = 2, for the comparison).
template <int HeadDim_, bool Deep = true>
struct Config {
  static constexpr int HeadDim = HeadDim_;
  // Consumer warpgroups of 64 query rows: three at D = 128, so that each scheduler has more than one warp whose
  // softmax can issue while the other warpgroups' GEMMs run (O is 64 registers there: 160 per consumer thread
  // suffice); two at D = 256 (O is 128 registers: a consumer needs 240).
  static constexpr int kConsumers = HeadDim == 128 ? 3 : 2;
  static constexpr int kThreads = kWarpgroupThreads * (kConsumers + 1);
  static constexpr int Br = 64 * kConsumers;  // 192 or 128 rows; each consumer's 64 lie in one Q block (kBlockRows)
  // Two consumers: the next S = Q K^T overlaps this block's softmax (FA3 Alg. 2); three: S, P and O do not fit in
  // 160 registers at once, and the loop runs O += P V, then S = Q K^T, then the softmax.
  static constexpr bool kOverlap = kConsumers == 2;
  // Keys per K/V block: 128 (= kBlockCols, one K and one V scale per block). At D = 256 a consumer thread then
  // holds O (128 fp32), S (64) and P (16) at once in its 240 registers (kConsumerRegisters). With 64 keys S = Q
  // K^T was an m64n64k32 wgmma, which reads 4 KiB of shared memory per 32 cycles, all the bandwidth there is.
  static constexpr int Bc = 128;
  static constexpr int kStages = !Deep || HeadDim == 256 ? 2 : 4;  // depth of the K and V rings (as loaded)
  static constexpr int kVtStages = !Deep || HeadDim == 256 ? 2 : 3;  // the transposition runs kVtStages - 1 ahead
  static constexpr int kPanels = HeadDim / kPanelRowBytes;  // 128 e4m3 columns per 128-byte panel row
  static constexpr int kQBytes = Br * HeadDim;
  static constexpr int kTileBytes = Bc * HeadDim;           // one K or V block
  static constexpr int kVtBytes = HeadDim * Bc;  // one V^T block: HeadDim rows of 128 bytes (= Bc keys)
  // Shared memory from a 1024-byte aligned base: Q | K stages | V stages (as TMA wrote them) | V^T stages | mbarriers.
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kTileBytes;
  static constexpr int kVtOffset = kVOffset + kStages * kTileBytes;
  static constexpr int kBarrierOffset = kVtOffset + kVtStages * kVtBytes;
  static constexpr int kSmemBytes = kBarrierOffset + 8 * (1 + 4 * kStages + 2 * kVtStages) + kSwizzleAtomBytes;
  static_assert(HeadDim % kPanelRowBytes == 0, "head dims of whole 128-byte panels");
  static_assert(kBlockRows % 64 == 0 && kBlockCols == Bc, "a consumer's rows lie in one Q block; a K/V block is one");
  static_assert(Bc == kPanelRowBytes, "V^T rows are 128-byte swizzled panel rows");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per thread block");
};

// Named barriers (0 is __syncthreads): one per consumer for the pingpong hand-over, a ring: consumer i waits on its
// own and, its GEMMs issued, arrives on consumer i + 1's (mod kConsumers).
constexpr int kPingpongBarrier = 3;  // + consumer
constexpr int kTransposers = 4;      // every warp of the producer warpgroup transposes V
// Registers per thread after setmaxnreg (multiples of 8). At entry every thread has 65536 / threads rounded down to
// a multiple of 8 (168 of 384 threads, 128 of 512); setmaxnreg only moves registers between warpgroups, and an
// increase waits until the decreases have freed enough: a total above what the block started with never
// completes (the kernel hangs; 32 / 240 with 384 threads did). D = 128 (three consumers, 512 threads): 160 per
// consumer (O 64 and S 64 or P 16, and the rest), 32 for the producer (with 24 it spills in its loop): 32 + 3 x
// 160 = 4 x 128, all there is; D = 256 (two consumers): the consumers need 240 (O is 128), the producer makes do
// with 24.
template <int HeadDim>
constexpr int kProducerRegisters = HeadDim == 256 ? 24 : 32;
template <int HeadDim>
constexpr int kConsumerRegisters = HeadDim == 256 ? 240 : 160;
template <class Cfg>
constexpr bool registers_fit() {
  constexpr int at_entry = 65536 / Cfg::kThreads / 8 * 8;
  return (kProducerRegisters<Cfg::HeadDim> + kConsumerRegisters<Cfg::HeadDim> * Cfg::kConsumers) * kWarpgroupThreads <=
         at_entry * Cfg::kThreads;
}

template <class Cfg>
struct Barriers {
  std::uint64_t q_full;
  std::uint64_t k_full[Cfg::kStages], k_empty[Cfg::kStages];  // K: TMA -> consumers (one arrival per consumer)
  std::uint64_t v_full[Cfg::kStages], v_empty[Cfg::kStages];  // V as loaded: TMA -> transposing warps (3 arrivals)
  std::uint64_t vt_full[Cfg::kVtStages], vt_empty[Cfg::kVtStages];  // V^T: transposing warps (3) -> consumers
};


/// Scales and output of the FP8 forward, beside the common parameters (q, k, v unused: the codes are read by TMA).
struct Fp8Params {
  cuda::AttentionParams base;
  const float* q_scales;  // [batch x q_heads][ceil(seq_q / Br)]
  const float* k_scales;  // [batch x kv_heads][ceil(seq_k / Bc)]
  const float* v_scales;
  bool transpose;  // false: a timing probe only (ATTN_FP8_PROBE=no_transpose)
  bool vt_sync;    // false: a timing probe only (ATTN_FP8_PROBE=no_vt_sync): nobody waits on the V^T barriers
  // The tail split (TailSplit): thread blocks from whole_tiles on are pieces, `pieces` per split tile, each of
  // which writes its rows' O / l (fp32, columns in order) and LSE for combine_pieces_kernel instead of O and LSE.
  int whole_tiles, split_tiles, pieces;
  float* partial_o;    // [split_tiles x pieces][Br][HeadDim]
  float* partial_lse;  // [split_tiles x pieces][Br]
};


// ============================================================================================================
// Producer warpgroup: thread 0 issues the TMA loads; warps 1-3 transpose each V tile into V^T.
// ============================================================================================================

/// Key held at position l (0..15) of a 16-key group of the e4m3 A operand of P: a thread's register holds
/// accumulator columns {2t, 2t+1, 8+2t, 9+2t} at A positions {4t .. 4t+3} (see the file comment).
__host__ __device__ constexpr int key_at_position(int l) { return 2 * (l / 4) + (l % 2) + 8 * (l % 4 / 2); }
/// Column of V (= of O) held by row r of V^T: within each 16-row group, rows 0..7 hold the even columns and rows
/// 8..15 the odd ones (what stmatrix writes without bank conflicts, below); the epilogue puts O's columns back.
__host__ __device__ constexpr int column_at_row(int r) { return 16 * (r / 16) + 2 * (r % 8) + r % 16 / 8; }

/// transpose_v's data movement on the first unit (16 keys x 32 columns), simulated at compile time: where each byte
/// that lane 4p + q's stmatrix register i (byte e) writes came from, by ldmatrix.trans's layout and the byte
/// permutes; true if that is V[key_at_position(4q + e)][column_at_row(8i + p)], the byte V^T row 8i + p needs at
/// position 4q + e.
constexpr unsigned kEvenBytes = 0x6420, kOddBytes = 0x7531;  // __byte_perm selectors: bytes 0, 2 (1, 3) of each
constexpr bool transpose_unit_moves_right() {
  for (int lane = 0; lane < 32; ++lane) {
    const int p = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i)
      for (int e = 0; e < 4; ++e) {
        const int selector = ((i % 2 ? kOddBytes : kEvenBytes) >> (4 * e)) & 0xF;  // __byte_perm(r[lo], r[lo + 1], ...)
        const int block = 2 * (i / 2) + selector / 4, byte = selector % 4;  // ldmatrix block, byte in its register
        // ldmatrix.trans: byte k of block b's register = element (row 2q + k / 2, 16-bit column p) of that block.
        const int key = 8 * (block % 2) + 2 * q + byte / 2, column = 16 * (block / 2) + 2 * p + byte % 2;
        if (key != key_at_position(4 * q + e) || column != column_at_row(8 * i + p)) return false;
      }
  }
  return true;
}
static_assert(transpose_unit_moves_right(), "transpose_v's ldmatrix / byte permute / stmatrix layouts disagree");

/// stmatrix.sync.aligned.m8n8.x4.shared.b16 (sm_90): the inverse of ldmatrix_x4 (common/mma.cuh). Lanes 8i..8i+7
/// give the shared-memory addresses of rows 0..7 of matrix i (16 bytes each); lane l's r[i] goes to row l / 4,
/// bytes 4 (l % 4) .. 4 (l % 4) + 3 of matrix i.
__device__ __forceinline__ void stmatrix_x4(std::uint32_t row_address, const std::uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(row_address), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}
/// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 at a shared-memory address (mma::ldmatrix_x4_trans takes a
/// pointer): lanes 8i..8i+7 give the rows of 8 x 8 block i, lane 4p + q receives, per block, row 2q's and row
/// 2q + 1's 16-bit element p.
__device__ __forceinline__ void ldmatrix_x4_trans_at(std::uint32_t (&r)[4], std::uint32_t row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address)
               : "memory");
}

/// V (Bc keys x HeadDim, TMA's swizzled panels of 128 columns) -> V^T (HeadDim rows x Bc keys, 128-byte rows,
/// swizzled), keys of each 16-group in A-operand order and columns in stmatrix order:
/// V^T[r][16j + l] = V[16j + key_at_position(l)][column_at_row(r)]. A unit is 16 keys (group j) x 32 columns
/// (c0 ..): one ldmatrix.x4.trans reads the four 8 x 8 blocks of 16-bit pairs (keys 16j + 0..7 and 16j + 8..15, x
/// columns c0 .. c0 + 15 and c0 + 16 .. c0 + 31); lane 4p + q then holds, per block, keys 2q and 2q + 1 of column
/// pair p, both bytes of each. Two byte permutes per block pair gather keys {2q, 2q+1, 8+2q, 9+2q} of column 2p
/// (even bytes) and of column 2p + 1 (odd bytes): A positions 4q .. 4q + 3 of V^T rows c0 + p and c0 + 8 + p. One
/// stmatrix.x4 writes them, lane l giving the address of V^T row c0 + l. Both sides touch each bank once per 8
/// rows through the 128-byte swizzle (chunk ^ row % 8): no bank conflicts.
///
/// Warp w of the four takes groups w and w + 4 (Bc = 128: 8 groups) at every c0, both groups' loads issued before
/// their permutes and stores (two loads in flight). The addresses are a per-thread part, computed once, plus a
/// part that depends on c0 alone: the stores' is a constant (c0 x 128 bytes), the loads' is a constant (the panel)
/// plus ((c0 % 128 / 16) ^ row % 8) x 16, whose row-dependent bits are those of row % 8 & 6 (c0 % 128 / 16 is even).
template <class Cfg>
__device__ __forceinline__ void transpose_v(std::uint32_t v, std::uint32_t vt, unsigned warp) {
  static_assert(Cfg::Bc == 16 * 2 * 4, "four warps x two 16-key groups");
  const unsigned lane = threadIdx.x % 32, block = lane / 8, row7 = lane % 8;  // row7: key % 8 and V^T row % 8 alike
  std::uint32_t load_base[2], store_base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const unsigned group = warp + 4 * i;
    // ldmatrix: lane gives row lane % 8 of block `block`: key 16 group + 8 (block % 2) + lane % 8, the 16 columns
    // from c0 + 16 (block / 2), a 16-byte chunk of the key's 128-byte row in its panel.
    const unsigned key = 16 * group + 8 * (block % 2) + row7;
    load_base[i] = v + key * kPanelRowBytes + (((block / 2) ^ (row7 & 1)) << 4);
    store_base[i] = vt + lane * kPanelRowBytes + ((group ^ row7) << 4);  // V^T row c0 + lane
  }
  const unsigned row_bits = (row7 & 6) << 4;
#pragma unroll
  for (int c0 = 0; c0 < Cfg::HeadDim; c0 += 32) {
    const unsigned panel = c0 / kPanelRowBytes, chunk = c0 % kPanelRowBytes / 16;  // chunk even
    const unsigned column_offset = panel * Cfg::Bc * kPanelRowBytes + ((chunk << 4) ^ row_bits);
    std::uint32_t r[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) ldmatrix_x4_trans_at(r[i], load_base[i] + column_offset);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const std::uint32_t out[4] = {__byte_perm(r[i][0], r[i][1], kEvenBytes), __byte_perm(r[i][0], r[i][1], kOddBytes),
                                    __byte_perm(r[i][2], r[i][3], kEvenBytes), __byte_perm(r[i][2], r[i][3], kOddBytes)};
      stmatrix_x4(store_base[i] + c0 * kPanelRowBytes, out);
    }
  }
}

/// The producer warpgroup: its first thread issues every TMA load (FA3 Alg. 1 lines 2-8, K and V each through a
/// ring with full/empty barriers, kStages - 1 blocks ahead of the transposition), between two V tiles; all four
/// warps transpose each V tile that lands into the V^T ring. `transpose` = false (the probe
/// ATTN_FP8_PROBE=no_transpose) leaves V^T as it is: wrong results, for timing what the transposition costs.
template <class Cfg>
__device__ void producer(const CUtensorMap* q_map, const CUtensorMap* k_map, const CUtensorMap* v_map,
                         unsigned char* smem, Barriers<Cfg>* bars, const Tile& tile, const Fp8Params& fp) {
  const int thread = threadIdx.x % kWarpgroupThreads, warp = thread / 32;
  const bool loads = thread == 0;
  auto load_tile = [&](const CUtensorMap* map, int offset, std::uint64_t* full, std::uint64_t* empty, int it) {
    const Slot slot = slot_of<Cfg::kStages>(it);
    mbarrier_wait(&empty[slot.stage], slot.phase ^ 1);  // the first pass sees every slot free
    mbarrier_arrive_expect_tx(&full[slot.stage], Cfg::kTileBytes);
    const int key0 = tile.block_at(it) * Cfg::Bc;
    for (int panel = 0; panel < Cfg::kPanels; ++panel)
      tma_load(smem + offset + slot.stage * Cfg::kTileBytes + panel * Cfg::Bc * kPanelRowBytes, map,
               &full[slot.stage], panel * kPanelRowBytes, key0, tile.kv_head, tile.batch);
  };
  auto load_block = [&](int it) {  // lines 5-8
    load_tile(k_map, Cfg::kKOffset, bars->k_full, bars->k_empty, it);
    load_tile(v_map, Cfg::kVOffset, bars->v_full, bars->v_empty, it);
  };
  constexpr int kAhead = Cfg::kStages - 1;  // blocks loaded before the first transposition
  if (loads) {
    mbarrier_arrive_expect_tx(&bars->q_full, Cfg::kQBytes);  // line 4: Q_i
    for (int panel = 0; panel < Cfg::kPanels; ++panel)
      tma_load(smem + panel * Cfg::Br * kPanelRowBytes, q_map, &bars->q_full, panel * kPanelRowBytes, tile.row0,
               tile.head, tile.batch);
    for (int it = 0; it < min(kAhead, tile.blocks); ++it) load_block(it);
  }
  for (int it = 0; it < tile.blocks; ++it) {
    const Slot v_slot = slot_of<Cfg::kStages>(it), vt_slot = slot_of<Cfg::kVtStages>(it);
    if (fp.vt_sync) mbarrier_wait(&bars->vt_empty[vt_slot.stage], vt_slot.phase ^ 1);  // the consumers are done with it
    // Block it + kAhead goes into the slots of block it - 1, free by now: the consumers released K_{it-1} before
    // V^T_{it-kVtStages} (just waited for), and V_{it-1} is released once the four warps have transposed it.
    if (loads && it + kAhead < tile.blocks) load_block(it + kAhead);
    mbarrier_wait(&bars->v_full[v_slot.stage], v_slot.phase);  // V_j has landed
    if (fp.transpose)
      transpose_v<Cfg>(smem_address(smem + Cfg::kVOffset + v_slot.stage * Cfg::kTileBytes),
                       smem_address(smem + Cfg::kVtOffset + vt_slot.stage * Cfg::kVtBytes), warp);
    fence_proxy_async();  // ordinary stores read next by wgmma (the async proxy)
    __syncwarp();         // the warp's loads and stores are done: one arrival speaks for the warp
    if (thread % 32 == 0) {
      mbarrier_arrive(&bars->vt_full[vt_slot.stage]);
      mbarrier_arrive(&bars->v_empty[v_slot.stage]);  // TMA may load the next V into the slot
    }
  }
}

// ============================================================================================================
// Consumers: FA3 Alg. 2 on 64 query rows each.
// ============================================================================================================

/// A wgmma shared-memory descriptor (smem_descriptor) `bytes` further on: its start-address field (bits 0-13,
/// address / 16) plus bytes / 16, in 32-bit arithmetic. Shared addresses are below 2^18, so the field never carries
/// into the next one and the result equals smem_descriptor of the moved address, bit for bit. The consumers build
/// each operand's descriptor once and advance it by constants, instead of rebuilding all of it per wgmma.
__device__ __forceinline__ std::uint64_t advanced(std::uint64_t desc, std::uint32_t bytes) {
  const std::uint32_t low = static_cast<std::uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | low;
}
/// The same descriptor, its low word hidden from the compiler (an empty asm), so that a descriptor built from the
/// thread index (a consumer's Q rows) stays in a register instead of being rebuilt from the index in every block.
__device__ __forceinline__ std::uint64_t held(std::uint64_t desc) {
  std::uint32_t low = static_cast<std::uint32_t>(desc);
  asm volatile("" : "+r"(low));
  return (desc & 0xFFFFFFFF00000000ull) | low;
}

/// S (64 x Bc) = Q_i K_j^T in e4m3: HeadDim / 32 wgmmas, both operands K-major (32 bytes of each row per step).
/// q_desc, k_desc: descriptors of this consumer's Q rows and of the K block (smem_descriptor(.., 16, 1024)).
template <class Cfg>
__device__ __forceinline__ void issue_qk(float (&s)[Cfg::Bc / 2], std::uint64_t q_desc, std::uint64_t k_desc) {
#pragma unroll
  for (int kk = 0; kk < Cfg::HeadDim / 32; ++kk) {
    const int panel = kk / 4, byte_in_row = (kk % 4) * 32;
    const std::uint64_t a = advanced(q_desc, panel * Cfg::Br * kPanelRowBytes + byte_in_row);
    const std::uint64_t b = advanced(k_desc, panel * Cfg::Bc * kPanelRowBytes + byte_in_row);
    wgmma_ss<Cfg::Bc, E4M3>(s, a, b, kk > 0);
  }
  wgmma_commit();
}

/// O (64 x HeadDim) += P (registers, e4m3) V_j: Bc / 32 wgmmas, B = V^T K-major (32 keys = 32 bytes per step);
/// vt_desc: the descriptor of the V^T block.
template <class Cfg>
__device__ __forceinline__ void issue_pv(float (&o)[Cfg::HeadDim / 2], const std::uint32_t (&p)[Cfg::Bc / 32][4],
                                         std::uint64_t vt_desc) {
#pragma unroll
  for (int kk = 0; kk < Cfg::Bc / 32; ++kk) wgmma_rs<Cfg::HeadDim, E4M3>(o, p[kk], advanced(vt_desc, kk * 32), true);
  wgmma_commit();
}

/// P~ (fp32 accumulator layout) -> the e4m3 A operand, 4 registers per 32 keys: slices 4kk, 4kk+1 (keys 2t, 2t+1,
/// 8+2t, 9+2t of 32kk) into a[0] (row g) and a[1] (row g + 8); slices 4kk+2, 4kk+3 into a[2], a[3]. Each register
/// takes this thread's own four values: P's keys are renumbered (key_at_position) instead of moved.
template <int Bc>
__device__ __forceinline__ void to_p_operand(std::uint32_t (&p)[Bc / 32][4], const float (&s)[Bc / 2]) {
#pragma unroll
  for (int kk = 0; kk < Bc / 32; ++kk) {
    const float* x = s + 16 * kk;
    p[kk][0] = e4m3x4(x[0], x[1], x[4], x[5]);
    p[kk][1] = e4m3x4(x[2], x[3], x[6], x[7]);
    p[kk][2] = e4m3x4(x[8], x[9], x[12], x[13]);
    p[kk][3] = e4m3x4(x[10], x[11], x[14], x[15]);
  }
}

struct RowState {
  float m[2] = {-kInf, -kInf};  // running max of the base-2 logits x = s q_scale k_scale scale log2(e)
  float l[2] = {0.0f, 0.0f};    // running sum of exp2(x - m + 8), this thread's columns only
};

/// What a K/V block's V scale v_j does to its P~: P~ = exp2(x - m + p_offset), p_offset = 8 + log2(v_j / v_ref) <=
/// 8, so that sum P8 V8 stays in units of v_ref (fp8.hpp, forward_cpu); l adds sum P~ x l_factor (= v_ref / v_j).
/// The quantization kernel makes V's scales powers of two (ScaleRule::power_of_two): log2 of one is its exponent
/// field, and 2^k is a float with exponent field k + 127, so both take integer instructions only.
struct VBlock {
  float p_offset, l_factor;
};
__device__ __forceinline__ int exponent_field(float power_of_two) { return (__float_as_int(power_of_two) >> 23) & 0xFF; }
__device__ __forceinline__ VBlock v_block(float v_scale, int v_ref_exponent) {
  const int log2_ratio = exponent_field(v_scale) - v_ref_exponent;  // log2(v_j / v_ref) <= 0
  return {static_cast<float>(kPExponent + log2_ratio), __int_as_float((127 - log2_ratio) << 23)};
}

/// x[0] = op over x[0 .. 2 Width - 1], as a pairwise tree: x[i] = op(x[i], x[i + Width]), then Width / 2, ...
template <int Width, class Op>
__device__ __forceinline__ void fold(float* x, Op op) {
  if constexpr (Width >= 1) {
#pragma unroll
    for (int i = 0; i < Width; ++i) x[i] = op(x[i], x[i + Width]);
    fold<Width / 2>(x, op);
  }
}

/// FA3 Alg. 2 line 12 in base 2 with the block scales: x = s to_logits; m_new; P~ = exp2(x - m_new + p_offset)
/// over s; l updated; `rescale` = exp2(m_old - m_new). Returns whether a row's max grew (else rescale = 1 for
/// both rows and O need not be touched).
template <bool Masked, int Bc>
__device__ __forceinline__ bool online_softmax(float (&s)[Bc / 2], RowState& rows, float (&rescale)[2], float to_logits,
                                               VBlock v, const cuda::AttentionParams& p, int query0, int key0) {
  if constexpr (Masked) schedule::mask_invisible<Bc>(s, p, query0, key0);
  bool grew = false;
  // Max and sum as pairwise trees (depth log2(Bc / 4), not Bc / 4): the consumer's softmax is a chain of
  // dependent instructions, and two consumer warps per scheduler cannot hide a long one.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float tree[Bc / 8];
#pragma unroll
    for (int i = 0; i < Bc / 8; ++i) tree[i] = fmaxf(s[4 * i + 2 * half], s[4 * i + 2 * half + 1]);
    fold<Bc / 16>(tree, [](float a, float b) { return fmaxf(a, b); });
    const float m_new = fmaxf(rows.m[half], mma::group_max(tree[0]) * to_logits);  // to_logits > 0
    const float shift = m_new == -kInf ? 0.0f : m_new - v.p_offset;  // a row with no key yet keeps P = 0
    grew |= m_new != rows.m[half];
    rescale[half] = mma::exp2_fast(rows.m[half] - (m_new == -kInf ? 0.0f : m_new));
    rows.m[half] = m_new;
#pragma unroll
    for (int i = 0; i < Bc / 8; ++i) {
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e)
        s[4 * i + e] = mma::exp2_fast(s[4 * i + e] * to_logits - shift);  // one FFMA + one MUFU.EX2
      tree[i] = s[4 * i + 2 * half] + s[4 * i + 2 * half + 1];
    }
    fold<Bc / 16>(tree, [](float a, float b) { return a + b; });
    rows.l[half] = rows.l[half] * rescale[half] + tree[0] * v.l_factor;
  }
  return grew;
}

template <int HeadDim>
__device__ __forceinline__ void rescale_output(float (&o)[HeadDim / 2], float row0_factor, float row8_factor) {
#pragma unroll
  for (int i = 0; i < HeadDim / 8; ++i) {
    o[4 * i + 0] *= row0_factor;
    o[4 * i + 1] *= row0_factor;
    o[4 * i + 2] *= row8_factor;
    o[4 * i + 3] *= row8_factor;
  }
}

template <class Cfg>
__device__ void consumer(const Fp8Params& fp, const Tile& tile, unsigned char* smem, Barriers<Cfg>* bars,
                         int consumer_index, int piece_slot) {
  constexpr int Bc = Cfg::Bc, HeadDim = Cfg::HeadDim;
  const cuda::AttentionParams& p = fp.base;
  const bool releases = threadIdx.x % kWarpgroupThreads == 0;
  const unsigned char* q_rows = smem + consumer_index * 64 * kPanelRowBytes;
  const int warp = threadIdx.x % kWarpgroupThreads / 32, lane = threadIdx.x % 32;
  const int query0 = tile.row0 + consumer_index * 64 + warp * 16;
  const long long q_bh = static_cast<long long>(tile.batch) * p.q_heads + tile.head;
  const long long kv_bh = static_cast<long long>(tile.batch) * (p.q_heads / p.group_size) + tile.kv_head;
  const int kv_blocks = cuda::ceil_div(p.seq_k, kBlockCols);  // quantization blocks per KV head
  // This consumer's Q scale: its 64 rows lie in one Q block of kBlockRows (one past the last, rows that are all
  // beyond seq_q, take the last block's: never written).
  const int q_blocks = cuda::ceil_div(p.seq_q, static_cast<int>(kBlockRows));
  const int q_block = min((tile.row0 + consumer_index * 64) / static_cast<int>(kBlockRows), q_blocks - 1);
  const float q_factor = fp.q_scales[q_bh * q_blocks + q_block] * p.scale_log2;
  const float* k_scales = fp.k_scales + kv_bh * kv_blocks;  // one per K/V block (Bc = kBlockCols)
  const float* v_scales = fp.v_scales + kv_bh * kv_blocks;
  // v_ref: the largest V scale of the visited blocks that this consumer's 64 rows see (each warp reduces it on its
  // own; causal: up to the block the last of the 64 rows sees, at least one block). O holds sum P8 V8 in units of
  // v_ref, so it is rescaled only when a row's max grows. The CPU emulation takes the same 64-row groups
  // (fp8_cpu.cpp), whatever the tile's height, over all the blocks a row sees (a piece of a split tile visits part).
  int ref_end = tile.first_block + tile.blocks;
  if (p.causal) ref_end = min(ref_end, (tile.row0 + consumer_index * 64 + 63 + p.seq_k - p.seq_q) / Bc + 1);
  ref_end = max(ref_end, tile.first_block + 1);
  float v_ref = 0.0f;
  for (int b = tile.first_block + lane; b < ref_end; b += 32) v_ref = fmaxf(v_ref, __ldg(v_scales + b));
#pragma unroll
  for (int lanes = 16; lanes >= 1; lanes /= 2) v_ref = fmaxf(v_ref, __shfl_xor_sync(0xFFFFFFFFu, v_ref, lanes));
  const int v_ref_exponent = exponent_field(v_ref);
  // What the K and V scales do to block `it`'s softmax (to_logits = q_scale k_scale scale log2 e; VBlock), 32 blocks
  // at a time: lane i holds those of block it = window + i, and a block takes them with three shuffles from lane
  // it % 32, instead of two global loads and their address arithmetic per block. Every 32nd block loads the next
  // 32 (taken after the block's wgmmas are issued, so that the loads' latency hides behind them; a window loaded
  // ahead would cost 3 more registers, which D = 256 does not have). Indices past the tile's last block read block
  // 0's scales (never used).
  struct BlockFactors {
    float to_logits;
    VBlock v;
  };
  auto factors_of = [&](int it) {  // this lane's, for block `it`
    const int block = tile.block_at(min(it, tile.blocks - 1));
    return BlockFactors{q_factor * __ldg(k_scales + block), v_block(__ldg(v_scales + block), v_ref_exponent)};
  };
  BlockFactors window = factors_of(lane);
  auto factors_at = [&](int it) {
    if (it % 32 == 0 && it > 0) window = factors_of(it + lane);  // warp-uniform
    const int from = it % 32;
    return BlockFactors{__shfl_sync(0xFFFFFFFFu, window.to_logits, from),
                        {__shfl_sync(0xFFFFFFFFu, window.v.p_offset, from), __shfl_sync(0xFFFFFFFFu, window.v.l_factor, from)}};
  };
  // The wgmma descriptors of Q, of K stage 0 and of V^T stage 0, built once (FA3 Alg. 2 lines 8 and 10 then add
  // constants: the stage's offset and the step's).
  const std::uint64_t q_desc = held(smem_descriptor(q_rows, 16, 1024));
  const std::uint64_t k_desc = smem_descriptor(smem + Cfg::kKOffset, 16, 1024);
  const std::uint64_t vt_desc = smem_descriptor(smem + Cfg::kVtOffset, 16, 1024);
  auto k_tile = [&](int stage) { return advanced(k_desc, stage * Cfg::kTileBytes); };
  auto vt_tile = [&](int stage) { return advanced(vt_desc, stage * Cfg::kVtBytes); };
  RowState rows;
  auto softmax = [&](float (&s)[Bc / 2], float (&rescale)[2], int it, const BlockFactors& f) {
    if (it < tile.masked_blocks)
      return online_softmax<true, Bc>(s, rows, rescale, f.to_logits, f.v, p, query0, tile.block_at(it) * Bc);
    return online_softmax<false, Bc>(s, rows, rescale, f.to_logits, f.v, p, query0, tile.block_at(it) * Bc);
  };
  auto wait_for_turn = [&] { named_barrier_sync(kPingpongBarrier + consumer_index, 2 * kWarpgroupThreads); };
  auto pass_turn = [&] {
    named_barrier_arrive(kPingpongBarrier + (consumer_index + 1) % Cfg::kConsumers, 2 * kWarpgroupThreads);
  };
  auto wait_for_vt = [&](const Slot& slot) {
    if (fp.vt_sync) mbarrier_wait(&bars->vt_full[slot.stage], slot.phase);
  };

  float s[Bc / 2], o[HeadDim / 2], rescale[2];
  std::uint32_t p_operand[Bc / 32][4];
#pragma unroll
  for (int i = 0; i < HeadDim / 2; ++i) o[i] = 0.0f;

  // FA3 Alg. 2 lines 2-5.
  mbarrier_wait(&bars->q_full, 0);
  Slot slot = slot_of<Cfg::kStages>(0);
  mbarrier_wait(&bars->k_full[slot.stage], slot.phase);
  wait_for_turn();
  wgmma_fence();
  issue_qk<Cfg>(s, q_desc, k_tile(slot.stage));
  pass_turn();
  wgmma_wait<0>();
  fence_registers(s);
  if (releases) mbarrier_arrive(&bars->k_empty[slot.stage]);
  softmax(s, rescale, 0, factors_at(0));  // O = 0: nothing to rescale
  to_p_operand<Bc>(p_operand, s);

  // FA3 Alg. 2 lines 6-17.
  for (int it = 1; it < tile.blocks; ++it) {
    const Slot k_slot = slot_of<Cfg::kStages>(it), v_slot = slot_of<Cfg::kVtStages>(it - 1);
    mbarrier_wait(&bars->k_full[k_slot.stage], k_slot.phase);    // line 7
    wait_for_vt(v_slot);                                         // line 9 (V^T, transposed by the producer)
    wait_for_turn();
    wgmma_fence();
    bool grew;
    if constexpr (Cfg::kOverlap) {
      // Q's descriptors held across the loop would not fit beside O (the loop would spill: 8 at D = 256): rebuilt
      // from the one held word (one add each).
      issue_qk<Cfg>(s, held(q_desc), k_tile(k_slot.stage));  // line 8
      issue_pv<Cfg>(o, p_operand, vt_tile(v_slot.stage));     // line 10
      pass_turn();
      const BlockFactors factors = factors_at(it);
      wgmma_wait<1>();                                              // line 11
      fence_registers(s);
      if (releases) mbarrier_arrive(&bars->k_empty[k_slot.stage]);  // line 15 (K_j)
      grew = softmax(s, rescale, it, factors);                      // line 12
      wgmma_wait<0>();                                              // line 13
      fence_registers(o);
      if (releases) mbarrier_arrive(&bars->vt_empty[v_slot.stage]);  // line 15 (V_{j-1})
    } else {
      // No overlap within the warpgroup (the other two consumers' GEMMs run during this one's softmax): O +=
      // P_{j-1} V_{j-1} completes before S_j = Q K_j^T is issued, so that P and S never hold registers at once.
      issue_pv<Cfg>(o, p_operand, vt_tile(v_slot.stage));  // line 10
      wgmma_wait<0>();                                     // line 13
      fence_registers(o);
      if (releases) mbarrier_arrive(&bars->vt_empty[v_slot.stage]);  // line 15 (V_{j-1})
      wgmma_fence();
      issue_qk<Cfg>(s, held(q_desc), k_tile(k_slot.stage));  // line 8
      pass_turn();
      const BlockFactors factors = factors_at(it);
      wgmma_wait<0>();  // line 11
      fence_registers(s);
      if (releases) mbarrier_arrive(&bars->k_empty[k_slot.stage]);  // line 15 (K_j)
      grew = softmax(s, rescale, it, factors);                      // line 12
    }
    // Line 14, skipped by a warp none of whose rows' max grew (factor 1): after the first blocks, most of the time.
    if (__any_sync(0xFFFFFFFFu, grew)) rescale_output<HeadDim>(o, rescale[0], rescale[1]);
    to_p_operand<Bc>(p_operand, s);                                // line 16
  }

  // FA3 Alg. 2 lines 18-20.
  slot = slot_of<Cfg::kVtStages>(tile.blocks - 1);
  wait_for_vt(slot);
  wait_for_turn();
  wgmma_fence();
  issue_pv<Cfg>(o, p_operand, vt_tile(slot.stage));
  pass_turn();
  wgmma_wait<0>();
  fence_registers(o);
  if (releases) mbarrier_arrive(&bars->vt_empty[slot.stage]);

  // FA3 Alg. 2 lines 21-22: O = O v_ref / l in bf16 straight from registers; LSE = ln 2 (m + log2 l - 8). A piece
  // of a split tile (piece_slot >= 0) writes the same O in fp32 and its LSE into its slot of the partial results.
  const int group = mma::lane_group(), t = mma::lane_in_group();
  auto* out = static_cast<__nv_bfloat16*>(p.o_out) + tile.batch * p.q_batch + tile.head * p.q_head;
  float* lse = p.lse + q_bh * p.seq_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = mma::group_sum(rows.l[half]);
    const float factor = l > 0.0f ? v_ref / l : 0.0f;
    const int row = query0 + group + 8 * half;
    if (row >= p.seq_q) continue;
    const float row_lse = l > 0.0f ? 0.69314718f * (rows.m[half] + log2f(l) - kPExponent) : -kInf;
    // O's accumulator columns follow V^T's rows (column_at_row): slices 2s and 2s + 1 hold, for this thread,
    // columns 16s + 4t, + 2 and 16s + 4t + 1, + 3: four consecutive columns, one 8-byte store (16 in fp32).
    if (piece_slot < 0) {
      if (t == 0) lse[row] = row_lse;
#pragma unroll
      for (int s = 0; s < HeadDim / 16; ++s) {
        const float* even = o + 8 * s + 2 * half;  // slice 2s: columns 16s + 4t and 16s + 4t + 2
        const float* odd = even + 4;               // slice 2s + 1: columns 16s + 4t + 1 and 16s + 4t + 3
        *reinterpret_cast<uint2*>(out + row * p.q_seq + 16 * s + 4 * t) =
            make_uint2(mma::pack2<__nv_bfloat16>(even[0] * factor, odd[0] * factor),
                       mma::pack2<__nv_bfloat16>(even[1] * factor, odd[1] * factor));
      }
    } else {
      const long long slot_row = static_cast<long long>(piece_slot) * Cfg::Br + (row - tile.row0);
      if (t == 0) fp.partial_lse[slot_row] = row_lse;
#pragma unroll
      for (int s = 0; s < HeadDim / 16; ++s) {
        const float* even = o + 8 * s + 2 * half;
        const float* odd = even + 4;
        *reinterpret_cast<float4*>(fp.partial_o + slot_row * HeadDim + 16 * s + 4 * t) =
            make_float4(even[0] * factor, odd[0] * factor, even[1] * factor, odd[1] * factor);
      }
    }
  }
}

/// Rows of a tile that see no key (causal, seq_q > seq_k): O = 0, LSE = -inf.
template <int HeadDim>
__device__ void write_empty_rows(const cuda::AttentionParams& p, const Tile& tile, int rows) {
  auto* o = static_cast<__nv_bfloat16*>(p.o_out) + tile.batch * p.q_batch + tile.head * p.q_head;
  float* lse = p.lse + (static_cast<long long>(tile.batch) * p.q_heads + tile.head) * p.seq_q;
  for (int i = threadIdx.x; i < rows * HeadDim; i += blockDim.x) {
    const int row = tile.row0 + i / HeadDim;
    if (row < p.seq_q) o[row * p.q_seq + i % HeadDim] = __float2bfloat16_rn(0.0f);
  }
  for (int i = threadIdx.x; i < rows; i += blockDim.x)
    if (tile.row0 + i < p.seq_q) lse[tile.row0 + i] = -kInf;
}

/// A piece of a split tile that visits no K/V block (causal): its rows saw nothing, LSE = -inf (the combination
/// gives such a piece no weight and reads none of its O).
__device__ void write_empty_piece(const Fp8Params& fp, int piece_slot, int rows) {
  for (int i = threadIdx.x; i < rows; i += blockDim.x) fp.partial_lse[static_cast<long long>(piece_slot) * rows + i] = -kInf;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                   const __grid_constant__ CUtensorMap v_map, const Fp8Params fp) {
  static_assert(registers_fit<Cfg>(), "setmaxnreg cannot hand out more registers than the thread block has");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char shared_bytes[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(shared_bytes) + kSwizzleAtomBytes - 1) & ~std::uintptr_t(kSwizzleAtomBytes - 1));
  auto* bars = reinterpret_cast<Barriers<Cfg>*>(smem + Cfg::kBarrierOffset);
  // Thread blocks past the whole tiles are pieces of the last wave's tiles (TailSplit): `pieces` consecutive
  // thread blocks per tile, each visiting its range of the tile's K/V blocks.
  int index = blockIdx.x, piece_slot = -1;
  if (index >= fp.whole_tiles) {
    piece_slot = index - fp.whole_tiles;
    index = fp.whole_tiles + piece_slot / fp.pieces;
  }
  Tile tile = tile_at<Cfg::Br, Cfg::Bc>(fp.base, index);
  if (piece_slot >= 0) tile = schedule::piece_of(tile, piece_slot % fp.pieces, fp.pieces);
  if (tile.blocks == 0) {  // every thread leaves by the same path, before any barrier
    if (piece_slot < 0)
      write_empty_rows<Cfg::HeadDim>(fp.base, tile, Cfg::Br);
    else
      write_empty_piece(fp, piece_slot, Cfg::Br);
    return;
  }
  if (threadIdx.x == 0) {
    prefetch_tensor_map(&q_map);
    prefetch_tensor_map(&k_map);
    prefetch_tensor_map(&v_map);
    mbarrier_init(&bars->q_full, 1);
    for (int stage = 0; stage < Cfg::kStages; ++stage) {
      mbarrier_init(&bars->k_full[stage], 1);
      mbarrier_init(&bars->k_empty[stage], Cfg::kConsumers);
      mbarrier_init(&bars->v_full[stage], 1);
      mbarrier_init(&bars->v_empty[stage], kTransposers);  // one arrival per producer warp
    }
    for (int stage = 0; stage < Cfg::kVtStages; ++stage) {
      mbarrier_init(&bars->vt_full[stage], kTransposers);
      mbarrier_init(&bars->vt_empty[stage], Cfg::kConsumers);
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  if (warpgroup == 0) {
    setmaxnreg_decrease<kProducerRegisters<Cfg::HeadDim>>();
    producer<Cfg>(&q_map, &k_map, &v_map, smem, bars, tile, fp);
  } else {
    setmaxnreg_increase<kConsumerRegisters<Cfg::HeadDim>>();
    const int consumer_index = warpgroup - 1;
    // 0 goes first: the last consumer of the ring passes it the turn.
    if (consumer_index == Cfg::kConsumers - 1) named_barrier_arrive(kPingpongBarrier + 0, 2 * kWarpgroupThreads);
    consumer<Cfg>(fp, tile, smem, bars, consumer_index, piece_slot);
  }
#endif
}

/// The tail split's second step: the rows of each split tile from its pieces' results, O_s (already divided by
/// their own l) and LSE_s: LSE = log sum_s exp(LSE_s), O = sum_s exp(LSE_s - LSE) O_s, the combination of
/// split-KV (each exp(LSE_s) is the piece's sum of exp(logits) over its keys); a piece whose rows saw no key
/// (LSE_s = -inf) has no weight. One warp per row, HeadDim / 32 consecutive columns per lane, O in bf16.
template <int HeadDim, int Br>
__global__ void __launch_bounds__(128) combine_pieces_kernel(const Fp8Params fp) {
  constexpr int kColumns = HeadDim / 32;
  const cuda::AttentionParams& p = fp.base;
  const int warp_row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split_tile = warp_row / Br, tile_row = warp_row % Br;
  const Tile tile = tile_at<Br, kBlockCols>(p, fp.whole_tiles + split_tile);
  const int row = tile.row0 + tile_row;
  if (split_tile >= fp.split_tiles || row >= p.seq_q) return;
  const long long first = static_cast<long long>(split_tile) * fp.pieces * Br + tile_row;  // piece 0's row
  float lse_max = -kInf;
  for (int piece = 0; piece < fp.pieces; ++piece) lse_max = fmaxf(lse_max, fp.partial_lse[first + piece * Br]);
  float o[kColumns] = {}, sum = 0.0f;
  for (int piece = 0; piece < fp.pieces && lse_max != -kInf; ++piece) {
    const long long slot_row = first + piece * Br;
    const float lse = fp.partial_lse[slot_row];
    if (lse == -kInf) continue;  // its O was never written
    const float weight = expf(lse - lse_max);
    sum += weight;
    const float* o_piece = fp.partial_o + slot_row * HeadDim + lane * kColumns;
#pragma unroll
    for (int c = 0; c < kColumns; c += 4) {
      const float4 part = *reinterpret_cast<const float4*>(o_piece + c);
      o[c] += weight * part.x;
      o[c + 1] += weight * part.y;
      o[c + 2] += weight * part.z;
      o[c + 3] += weight * part.w;
    }
  }
  const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
  auto* out = static_cast<__nv_bfloat16*>(p.o_out) + tile.batch * p.q_batch + tile.head * p.q_head + row * p.q_seq;
#pragma unroll
  for (int c = 0; c < kColumns; c += 4)
    *reinterpret_cast<uint2*>(out + lane * kColumns + c) =
        make_uint2(mma::pack2<__nv_bfloat16>(o[c] * inverse, o[c + 1] * inverse),
                   mma::pack2<__nv_bfloat16>(o[c + 2] * inverse, o[c + 3] * inverse));
  if (lane == 0)
    p.lse[(static_cast<long long>(tile.batch) * p.q_heads + tile.head) * p.seq_q + row] =
        lse_max == -kInf ? -kInf : lse_max + logf(sum);
}

// ============================================================================================================
// Host side.
// ============================================================================================================

/// The tail split. A grid of T tiles on S SMs (one thread block per SM: shared memory holds one) runs in T / S
/// waves, and the last, r = T mod S tiles long, leaves S - r SMs idle for a whole tile's time. Splitting each of
/// those r tiles along its keys into k pieces (the split-KV of flash-decoding, here for the tail alone) makes r k
/// thread blocks of about 1/k of a tile, which take ceil(r k / S) rounds: the tail costs ceil(r k / S) (1/k + c)
/// tiles' time instead of 1, where c is what a piece costs beyond its share of the keys (starting up, writing its
/// partial result, the combination in combine_pieces_kernel, pieces finishing unevenly). The rule takes the k of
/// 2..16 (at most a tile's K/V blocks) with the lowest cost, if below 1. Only non-causal problems by default:
/// causal tiles differ in length, and the scheduler already starts the longest first.
struct TailSplit {
  long long whole_tiles = 0;  // tiles run whole, first in launch order
  long long split_tiles = 0;  // the tiles after them, `pieces` thread blocks each
  int pieces = 1;
  long long thread_blocks() const { return whole_tiles + split_tiles * pieces; }
  long long pieces_total() const { return split_tiles * pieces; }
};
constexpr int kMaxPieces = 16;
// c, in tiles, measured on the H200 (flash_v3 README, FP8 log v14): at d = 128 (r = 56 of 132 SMs) k = 2 was the
// fastest, then 4, 7 and 3 (1, 2, 3 and 2 rounds); at d = 256 (r = 100) k = 5 (4 rounds) gained nothing. c = 0.1
// ranks them so (0.6, 0.7, 0.73, 0.87) and leaves d = 256 whole (1.2).
constexpr double kPieceCost = 0.1;

/// option: 0 = the rule above (default), 1 = every tile whole, k = 2..16: the last wave's tiles (all of them if
/// there are fewer than SMs) in k pieces, causal or not (at most a tile's K/V blocks).
TailSplit plan_tail_split(long long tiles, int blocks_per_tile, int sms, bool causal, std::int64_t option) {
  TailSplit plan;
  plan.whole_tiles = tiles;
  const long long last_wave = tiles % sms;
  const int most = std::min(kMaxPieces, blocks_per_tile);
  if (option == 1 || last_wave == 0 || most < 2 || (option == 0 && causal)) return plan;
  int pieces = static_cast<int>(std::min<std::int64_t>(option, most));
  if (option == 0) {
    double best = 1.0;  // k = 1: one round of whole tiles, nothing to combine
    pieces = 1;
    for (int k = 2; k <= most; ++k) {
      const double rounds = static_cast<double>((last_wave * k + sms - 1) / sms);
      if (const double cost = rounds * (1.0 / k + kPieceCost); cost < best - 1e-9) {
        best = cost;
        pieces = k;
      }
    }
  }
  if (pieces < 2) return plan;
  plan.whole_tiles = tiles - last_wave;
  plan.split_tiles = last_wave;
  plan.pieces = pieces;
  return plan;
}

template <int HeadDim>
TailSplit tail_split_of(const AttentionProblem& p, std::int64_t option) {
  using Cfg = Config<HeadDim>;
  const long long tiles = static_cast<long long>(cuda::ceil_div(p.seq_q, Cfg::Br)) * p.q_heads * p.batch;
  if (!cuda::device_available()) return TailSplit{tiles, 0, 1};  // (scratch_bytes without a GPU: nothing to split)
  return plan_tail_split(tiles, cuda::ceil_div(p.seq_k, Cfg::Bc),
                         cuda::device_attribute(cudaDevAttrMultiProcessorCount), p.causal, option);
}
TailSplit tail_split_of(const AttentionProblem& p, std::int64_t option) {
  return p.head_dim == 256 ? tail_split_of<256>(p, option) : tail_split_of<128>(p, option);
}

const char* const kWho = "flash_v3/gpu (fp8)";

/// The timing probes (environment ATTN_FP8_PROBE): "no_transpose", the producer skips the V transposition, so
/// that the kernel's time without it can be measured (O is then wrong: V^T holds whatever shared memory held);
/// "no_vt_sync", the transposition runs but neither side waits on the V^T barriers (O wrong too: what the
/// hand-over of V^T costs, as against the transposition's work).
bool probe_is(const char* name) {
  const char* probe = std::getenv("ATTN_FP8_PROBE");
  return probe != nullptr && std::string(probe) == name;
}


template <int HeadDim>
void launch_quantize(const void* x, const Strides& strides, std::int64_t batch, std::int64_t heads, std::int64_t seq,
                     int block_rows, ScaleRule rule, bool incoherent, const float* signs, float norm, std::uint8_t* codes,
                     float* scales) {
  if (block_rows < 1 || block_rows > kQuantizeRows)
    throw std::invalid_argument("block_rows: " + std::to_string(block_rows) + " is not in 1.." +
                                std::to_string(kQuantizeRows) + " (the quantization kernel holds a block in registers)");
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(seq, block_rows)), static_cast<unsigned>(batch * heads));
  auto kernel = incoherent ? quantize_kernel<HeadDim, true> : quantize_kernel<HeadDim, false>;
  constexpr int kThreads = 32 * kQuantizeWarps;
  kernel<<<grid, kThreads>>>(static_cast<const __nv_bfloat16*>(x), strides.batch, strides.head, strides.seq,
                        static_cast<int>(heads), static_cast<int>(seq), block_rows, rule, codes, scales, signs, norm);
  ATTN_CUDA_CHECK_LAUNCH();
}

void quantize_dispatch(int head_dim, const void* x, const Strides& strides, std::int64_t batch, std::int64_t heads,
                       std::int64_t seq, int block_rows, ScaleRule rule, bool incoherent, const float* signs, float norm,
                       std::uint8_t* codes, float* scales) {
  // Each lane loads its part of a row in one 4- to 16-byte load: every row must start 16-byte aligned.
  if (reinterpret_cast<std::uintptr_t>(x) % 16 != 0 || strides.batch % 8 != 0 || strides.head % 8 != 0 ||
      strides.seq % 8 != 0)
    throw std::invalid_argument("x: the quantization kernel needs 16-byte aligned rows (pointer aligned to 16 bytes, "
                                "strides multiples of 8 elements)");
  switch (head_dim) {
    case 64: return launch_quantize<64>(x, strides, batch, heads, seq, block_rows, rule, incoherent, signs, norm, codes, scales);
    case 128: return launch_quantize<128>(x, strides, batch, heads, seq, block_rows, rule, incoherent, signs, norm, codes, scales);
    case 256: return launch_quantize<256>(x, strides, batch, heads, seq, block_rows, rule, incoherent, signs, norm, codes, scales);
  }
  throw std::invalid_argument("head_dim: " + std::to_string(head_dim) + " is not 64, 128 or 256 (quantization kernel)");
}

template <int HeadDim, bool Deep>
void launch_forward(const AttentionProblem& p, const AttentionTensors& t, const Scratch& scratch, bool transpose,
                    std::int64_t tail_split) {
  using Cfg = Config<HeadDim, Deep>;
  const Strides q_strides = make_strides(Layout::bhnd, p.q_heads, p.seq_q, p.head_dim);
  const Strides kv_strides = make_strides(Layout::bhnd, p.kv_heads, p.seq_k, p.head_dim);
  const CUtensorMap q_map = make_tensor_map_bytes(scratch.q, p.batch, p.q_heads, p.seq_q, HeadDim, q_strides, Cfg::Br);
  const CUtensorMap k_map = make_tensor_map_bytes(scratch.k, p.batch, p.kv_heads, p.seq_k, HeadDim, kv_strides, Cfg::Bc);
  const CUtensorMap v_map = make_tensor_map_bytes(scratch.v, p.batch, p.kv_heads, p.seq_k, HeadDim, kv_strides, Cfg::Bc);
  const TailSplit split = tail_split_of<HeadDim>(p, tail_split);
  if (split.thread_blocks() > std::numeric_limits<int>::max())
    throw std::invalid_argument("batch: batch x q_heads x ceil(seq_q / " + std::to_string(Cfg::Br) +
                                ") exceeds 2^31 - 1 thread blocks");
  DeviceBuffer<float> partial(static_cast<std::size_t>(split.pieces_total() * Cfg::Br * (HeadDim + 1)));
  Fp8Params fp{cuda::make_attention_params(p, t), scratch.q_scales, scratch.k_scales, scratch.v_scales, transpose,
               !probe_is("no_vt_sync"), static_cast<int>(split.whole_tiles), static_cast<int>(split.split_tiles),
               split.pieces, partial.data(), partial.data() + split.pieces_total() * Cfg::Br * HeadDim};
  auto kernel = forward_kernel<Cfg>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  kernel<<<static_cast<int>(split.thread_blocks()), Cfg::kThreads, Cfg::kSmemBytes>>>(q_map, k_map, v_map, fp);
  ATTN_CUDA_CHECK_LAUNCH();
  if (split.split_tiles > 0) {
    combine_pieces_kernel<HeadDim, Cfg::Br><<<static_cast<int>(split.split_tiles * Cfg::Br / 4), 128>>>(fp);
    ATTN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16};
  caps.head_dims = {128, 256};  // whole 128-byte e4m3 panel rows (64 would need the 64-byte swizzle)
  caps.max_head_dim = 256;
  caps.has_backward = false;
  caps.pointer_alignment = 16;
  caps.stride_multiple = 8;
  caps.max_seq = 1 << 30;
  return caps;
}

std::size_t scratch_bytes(const AttentionProblem& p, std::int64_t tail_split) {
  const TailSplit split = tail_split_of(p, tail_split);
  const std::size_t partial = sizeof(float) * static_cast<std::size_t>(split.pieces_total() * (p.head_dim == 256 ? 128 : 192)) *
                              static_cast<std::size_t>(p.head_dim + 1);
  const std::size_t q_blocks = static_cast<std::size_t>((p.seq_q + kBlockRows - 1) / kBlockRows);
  const std::size_t kv_blocks = static_cast<std::size_t>((p.seq_k + kBlockCols - 1) / kBlockCols);
  return partial + static_cast<std::size_t>(p.q_elements() + 2 * p.kv_elements()) +
         sizeof(float) * (static_cast<std::size_t>(p.batch * p.q_heads) * q_blocks +
                          2 * static_cast<std::size_t>(p.batch * p.kv_heads) * kv_blocks + static_cast<std::size_t>(p.head_dim));
}

Scratch::Scratch(const AttentionProblem& p)
    : codes(static_cast<std::size_t>(p.q_elements() + 2 * p.kv_elements())),
      floats(static_cast<std::size_t>(p.batch * p.q_heads * ((p.seq_q + kBlockRows - 1) / kBlockRows) +
                                      2 * p.batch * p.kv_heads * ((p.seq_k + kBlockCols - 1) / kBlockCols) + p.head_dim)) {
  q = codes.data();
  k = q + p.q_elements();
  v = k + p.kv_elements();
  q_scales = floats.data();
  k_scales = q_scales + p.batch * p.q_heads * ((p.seq_q + kBlockRows - 1) / kBlockRows);
  v_scales = k_scales + p.batch * p.kv_heads * ((p.seq_k + kBlockCols - 1) / kBlockCols);
  signs = v_scales + p.batch * p.kv_heads * ((p.seq_k + kBlockCols - 1) / kBlockCols);
}

void quantize_gpu(const AttentionProblem& p, const AttentionTensors& t, bool incoherent, std::uint64_t seed,
                  Scratch& scratch) {
  const int d = static_cast<int>(p.head_dim);
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));  // as rotate_rows computes it
  if (incoherent) {
    const std::vector<float> signs = random_signs(d, seed);
    ATTN_CUDA_CHECK(cudaMemcpy(scratch.signs, signs.data(), signs.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  // Q and K rotated by the same M (incoherent processing); V never. V's scales are powers of two (the forward
  // moves each block's V scale into P exactly: fp8.hpp, forward_cpu).
  quantize_dispatch(d, t.q, t.q_strides, p.batch, p.q_heads, p.seq_q, static_cast<int>(kBlockRows), ScaleRule::amax,
                    incoherent, scratch.signs, norm, scratch.q, scratch.q_scales);
  quantize_dispatch(d, t.k, t.kv_strides, p.batch, p.kv_heads, p.seq_k, static_cast<int>(kBlockCols), ScaleRule::amax,
                    incoherent, scratch.signs, norm, scratch.k, scratch.k_scales);
  quantize_dispatch(d, t.v, t.kv_strides, p.batch, p.kv_heads, p.seq_k, static_cast<int>(kBlockCols),
                    ScaleRule::power_of_two, false, scratch.signs, norm, scratch.v, scratch.v_scales);
}

void forward_quantized_gpu(const AttentionProblem& p, const AttentionTensors& t, const Scratch& scratch, bool deep,
                           bool transpose, std::int64_t tail_split) {
  schedule::require_hopper(kWho);
  switch (p.head_dim) {
    case 128:
      return deep ? launch_forward<128, true>(p, t, scratch, transpose, tail_split)
                  : launch_forward<128, false>(p, t, scratch, transpose, tail_split);
    case 256:
      return deep ? launch_forward<256, true>(p, t, scratch, transpose, tail_split)
                  : launch_forward<256, false>(p, t, scratch, transpose, tail_split);
  }
  throw std::invalid_argument(std::string("head_dim: ") + std::to_string(p.head_dim) + " is not taken by " + kWho);
}


void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, gpu_caps(), kWho, false);
  const std::int64_t incoherent = options.get("incoherent", 0);
  if (incoherent != 0 && incoherent != 1)
    throw std::invalid_argument("incoherent: " + std::to_string(incoherent) + " must be 0 or 1 (Q and K rotated by a " +
                                "random Hadamard matrix before quantization)");
  const std::int64_t stages = options.get("stages", 0);
  if (stages != 0 && stages != 2)
    throw std::invalid_argument("stages: " + std::to_string(stages) + " must be 0 (the deep K/V rings, default) or 2 " +
                                "(the bf16 kernel's depth, for comparison)");
  const std::int64_t tail_split = options.get("tail_split", 0);
  if (tail_split < 0 || tail_split > kMaxPieces)
    throw std::invalid_argument("tail_split: " + std::to_string(tail_split) + " must be 0 (split the last wave's " +
                                "tiles by the cost rule, default), 1 (never) or 2.." + std::to_string(kMaxPieces) +
                                " (pieces per tile of the last wave)");
  schedule::require_hopper(kWho);
  Scratch scratch(p);
  // The two steps timed apart (counters quantize_ms, attention_ms): the paper's figure is the attention kernel's.
  cudaEvent_t marks[3];
  for (cudaEvent_t& mark : marks) ATTN_CUDA_CHECK(cudaEventCreate(&mark));
  ATTN_CUDA_CHECK(cudaEventRecord(marks[0]));
  quantize_gpu(p, t, incoherent == 1, 1, scratch);
  ATTN_CUDA_CHECK(cudaEventRecord(marks[1]));
  forward_quantized_gpu(p, t, scratch, stages == 0, !probe_is("no_transpose"), tail_split);
  ATTN_CUDA_CHECK(cudaEventRecord(marks[2]));
  ATTN_CUDA_CHECK(cudaEventSynchronize(marks[2]));
  float quantize_ms = 0.0f, attention_ms = 0.0f;
  ATTN_CUDA_CHECK(cudaEventElapsedTime(&quantize_ms, marks[0], marks[1]));
  ATTN_CUDA_CHECK(cudaEventElapsedTime(&attention_ms, marks[1], marks[2]));
  for (cudaEvent_t mark : marks) ATTN_CUDA_CHECK(cudaEventDestroy(mark));
  options.counters["quantize_ms"] = quantize_ms;
  options.counters["attention_ms"] = attention_ms;
  options.counters["attention_tflops"] = p.forward_flops() / (attention_ms * 1e-3) / 1e12;
  const TailSplit split = tail_split_of(p, tail_split);  // what launch_forward ran
  options.counters["split_tiles"] = static_cast<double>(split.split_tiles);
  options.counters["pieces_per_split_tile"] = split.split_tiles > 0 ? split.pieces : 0;
}

}  // namespace attn::flash_v3::fp8
