// paged, GPU tier: reshape-and-cache and decode attention through block tables, bf16 / f16 cache, fp32
// accumulation. A thread block runs the online softmax over one partition of one sequence's context for the
// query heads of one KV head; v1 makes the whole context one partition, v2 splits it and adds
// reduce_partitions_kernel, which combines the partial results by their log-sum-exp. The per-chunk math comes
// twice: on the CUDA cores (paged_decode_kernel, the plain version) and on the tensor cores (the default).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/mma.cuh"
#include "common/validate.hpp"
#include "paged/paged.hpp"

namespace attn::paged {
namespace {

[[noreturn]] void reject(const std::string& argument, const std::string& rule) {
  throw std::invalid_argument(argument + ": " + rule);
}

constexpr int kWarps = 4;  // warps per thread block; they take the partition's token chunks in turn
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- named primitives -------------------------------------------------------------------------------------

/// 8 consecutive 16-bit elements (16 bytes, one vector load) widened to fp32.
template <class T>
__device__ __forceinline__ void load8(const T* source, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(source));
  const auto* pairs = reinterpret_cast<const typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (std::is_same<T, __half>::value) f = __half22float2(pairs[i]);
    else f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

/// Sum (or max) over the `width` lanes of an aligned lane group, result in every lane of the group.
template <int width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = width / 2; offset >= 1; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
/// Sum (or max) across the lane groups of a warp: lanes with the same position in their group combine.
template <int width>
__device__ __forceinline__ float across_groups_sum(float x) {
#pragma unroll
  for (int offset = width; offset < 32; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
template <int width>
__device__ __forceinline__ float across_groups_max(float x) {
#pragma unroll
  for (int offset = width; offset < 32; offset *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// ---- the decode kernel ------------------------------------------------------------------------------------

template <class T>
struct DecodeArgs {
  const T* q;
  std::int64_t q_batch_stride, q_head_stride;
  const T* k_cache;
  const T* v_cache;
  const std::int32_t* block_tables;
  const std::int32_t* context_lens;
  int max_blocks_per_sequence;
  int kv_heads, q_heads, group_size, head_tiles;
  int block_size_log2;
  float scale_log2;  ///< softmax scale * log2(e): the kernel works with exp2
  int partition_tokens;
  int partitions;    ///< grid.x; 1 for v1
  T* o;              ///< v1: the final output
  float* lse;
  float* partial_o;  ///< v2: [sequences, q_heads, partitions, D], each normalised by its own l
  float* partial_lse;
};

/// Thread block (partition, KV head x head tile, sequence). Each warp walks chunks of CHUNK tokens; within a
/// warp, a group of LANES = D / 8 lanes holds one token's row (8 elements a lane, one 16-byte load), so a
/// warp reads 32 / LANES tokens per step and STEPS steps per chunk. The online softmax (FA2 Alg. 1 lines 8-10)
/// runs per warp per chunk; the kWarps warps' states are combined at the end by their maxima.
template <class T, int D, int HEADS>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeArgs<T> a) {
  constexpr int LANES = D / 8;
  constexpr int TOKENS_PER_STEP = 32 / LANES;
  constexpr int STEPS = HEADS >= 8 ? 4 : 8;
  constexpr int CHUNK = TOKENS_PER_STEP * STEPS;
  __shared__ float warp_m[kWarps][HEADS], warp_l[kWarps][HEADS];
  __shared__ float warp_acc[kWarps][HEADS][D];

  const int sequence = blockIdx.z;
  const int kv_head = blockIdx.y / a.head_tiles;
  const int first_head = kv_head * a.group_size + (blockIdx.y % a.head_tiles) * HEADS;
  const int context = a.context_lens[sequence];
  const int begin = blockIdx.x * a.partition_tokens;
  if (begin >= context && blockIdx.x > 0) return;  // past this sequence's context: the reduction skips it
  const int end = min(begin + a.partition_tokens, context);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int token_in_step = lane / LANES, dim0 = (lane % LANES) * 8;
  const std::int32_t* table = a.block_tables + static_cast<std::int64_t>(sequence) * a.max_blocks_per_sequence;
  const int block_mask = (1 << a.block_size_log2) - 1;

  // This lane's 8 dims of each query head, pre-scaled so that logits come out in log2 units.
  float q[HEADS][8];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    load8(a.q + sequence * a.q_batch_stride + (first_head + h) * a.q_head_stride + dim0, q[h]);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[h][e] *= a.scale_log2;
  }
  float m[HEADS], l[HEADS], acc[HEADS][8];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
  }

  for (int chunk = begin + warp * CHUNK; chunk < end; chunk += kWarps * CHUNK) {
    // Issue every K and V load of the chunk first: the block table turns token -> (physical block, offset).
    float k[STEPS][8], v[STEPS][8];
    bool valid[STEPS];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const int token = chunk + s * TOKENS_PER_STEP + token_in_step;
      valid[s] = token < end;
      if (valid[s]) {
        const std::int64_t block = table[token >> a.block_size_log2];
        const std::int64_t row = ((block * a.kv_heads + kv_head) << a.block_size_log2) + (token & block_mask);
        load8(a.k_cache + row * D + dim0, k[s]);
        load8(a.v_cache + row * D + dim0, v[s]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) k[s][e] = v[s][e] = 0.0f;
      }
    }
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      // Logits of the chunk's tokens (each lane group holds its own tokens' logits).
      float logit[STEPS];
      float chunk_max = -INFINITY;
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        float partial = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) partial = fmaf(q[h][e], k[s][e], partial);
        const float dot = group_sum<LANES>(partial);  // every lane shuffles, valid token or not
        logit[s] = valid[s] ? dot : -INFINITY;
        chunk_max = fmaxf(chunk_max, logit[s]);
      }
      // New running max over the whole warp (finite: a chunk holds at least one valid token); rescale the
      // old sums by exp2(m_old - m_new) -- 0 on the first chunk, where m_old = -inf.
      const float m_new = fmaxf(m[h], across_groups_max<LANES>(chunk_max));
      const float rescale = exp2f(m[h] - m_new);
      m[h] = m_new;
      l[h] *= rescale;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= rescale;
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        const float p = exp2f(logit[s] - m_new);  // 0 for invalid tokens
        l[h] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, v[s][e], acc[h][e]);
      }
    }
  }

  // Each lane group summed different tokens under the same warp max: add the groups up, then the warps.
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    l[h] = across_groups_sum<LANES>(l[h]);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = across_groups_sum<LANES>(acc[h][e]);
    if (lane < LANES) {
#pragma unroll
      for (int e = 0; e < 8; ++e) warp_acc[warp][h][dim0 + e] = acc[h][e];
    }
    if (lane == 0) {
      warp_m[warp][h] = m[h];
      warp_l[warp][h] = l[h];
    }
  }
  __syncthreads();

  // Combine the warps: M = max_w m_w, L = sum_w l_w 2^(m_w - M), O = sum_w acc_w 2^(m_w - M) / L.
  for (int index = threadIdx.x; index < HEADS * D; index += kThreads) {
    const int h = index / D, d = index % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, warp_m[w][h]);
    float L = 0.0f, O = 0.0f;
    if (M != -INFINITY) {  // else the partition is empty (a context of 0 tokens): O = 0, LSE = -inf
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(warp_m[w][h] - M);
        L += warp_l[w][h] * weight;
        O += warp_acc[w][h][d] * weight;
      }
      O /= L;
    }
    const float lse = M != -INFINITY ? (M + log2f(L)) * kLn2 : -INFINITY;  // back to natural log
    const int head = first_head + h;
    if (a.partial_o == nullptr) {
      a.o[sequence * a.q_batch_stride + head * a.q_head_stride + d] = cuda::from_float<T>(O);
      if (d == 0) a.lse[static_cast<std::int64_t>(sequence) * a.q_heads + head] = lse;
    } else {
      const std::int64_t slot = (static_cast<std::int64_t>(sequence) * a.q_heads + head) * a.partitions + blockIdx.x;
      a.partial_o[slot * D + d] = O;
      if (d == 0) a.partial_lse[slot] = lse;
    }
  }
}

// ---- the tensor-core decode kernel ------------------------------------------------------------------------
//
// With GQA, G query heads read the same K and V: on CUDA cores that is 2 G FMAs per element loaded, and at
// G = 4 the kernel above reaches half the memory bandwidth at best (README.md), by our reading limited by
// instruction issue rather than by memory. Here the
// G heads become the rows of an mma.m16n8k16 tile (padded to 16 with zero queries), so that S = Q K^T and
// O += P V run on the tensor cores and the CUDA cores only do the softmax. K and V reach shared memory with
// cp.async (two chunks in flight per warp) and the tensor cores' operands with ldmatrix.

constexpr int kChunk = 16;  // tokens per warp step: the k of the P V product, two n8 tiles of S

// The PTX primitives (cp.async, ldmatrix, mma.sync m16n8k16, pack2) are the named wrappers of common/mma.cuh,
// which also documents the fragment layouts used below.

/// Element offset of 16-byte piece `piece` of row `row` in a [kChunk, D] staging tile. The piece index is
/// XOR-swizzled with the row, so that the 8 rows an ldmatrix reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int staged(int row, int piece) { return row * D + ((piece ^ (row & 7)) * 8); }

/// Thread block (partition, KV head x head tile, sequence), as paged_decode_kernel, with `rows` <= 16 query
/// heads of the group as the rows of the tensor-core tiles. Dynamic shared memory: per warp two stages of K
/// and V chunks ([kChunk, D] each), reused at the end for the warps' partial results.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) paged_decode_mma_kernel(const DecodeArgs<T> a, int rows) {
  constexpr int PIECES = D / 8;                 // 16-byte pieces per row
  constexpr int STAGE = 2 * kChunk * D;         // elements: K then V
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* warp_stages = reinterpret_cast<T*>(shared_bytes);

  const int sequence = blockIdx.z;
  const int kv_head = blockIdx.y / a.head_tiles;
  const int first_head = kv_head * a.group_size + (blockIdx.y % a.head_tiles) * rows;
  const int context = a.context_lens[sequence];
  const int begin = blockIdx.x * a.partition_tokens;
  if (begin >= context && blockIdx.x > 0) return;
  const int end = min(begin + a.partition_tokens, context);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const std::int32_t* table = a.block_tables + static_cast<std::int64_t>(sequence) * a.max_blocks_per_sequence;
  const int block_mask = (1 << a.block_size_log2) - 1;
  auto stage_buffer = [&](int i) { return warp_stages + (2 * warp + (i & 1)) * STAGE; };  // this warp's two stages

  // Stage one chunk: each lane copies PIECES / 2 pieces of K and of V; rows past `end` become zeros.
  auto stage_chunk = [&](T* stage, int chunk) {
#pragma unroll
    for (int i = 0; i < kChunk * PIECES / 32; ++i) {
      const int index = lane + 32 * i, row = index / PIECES, piece = index % PIECES;
      const int token = chunk + row;
      const bool valid = token < end;
      std::int64_t offset = 0;
      if (valid) {
        const std::int64_t block = table[token >> a.block_size_log2];
        offset = (((block * a.kv_heads + kv_head) << a.block_size_log2) + (token & block_mask)) * D + piece * 8;
      }
      mma::cp_async_16(stage + staged<D>(row, piece), a.k_cache + offset, valid);
      mma::cp_async_16(stage + kChunk * D + staged<D>(row, piece), a.v_cache + offset, valid);
    }
  };

  // Q as the A operand, rows g and g+8 of the tile (zero beyond `rows`), for each 16-wide slice of D.
  std::uint32_t q[D / 16][4];
  {
    const T* q0 = a.q + sequence * a.q_batch_stride + (first_head + g) * a.q_head_stride;
    const T* q8 = a.q + sequence * a.q_batch_stride + (first_head + g + 8) * a.q_head_stride;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      q[k][0] = g < rows ? *reinterpret_cast<const std::uint32_t*>(q0 + 16 * k + 2 * c) : 0u;
      q[k][1] = g + 8 < rows ? *reinterpret_cast<const std::uint32_t*>(q8 + 16 * k + 2 * c) : 0u;
      q[k][2] = g < rows ? *reinterpret_cast<const std::uint32_t*>(q0 + 16 * k + 2 * c + 8) : 0u;
      q[k][3] = g + 8 < rows ? *reinterpret_cast<const std::uint32_t*>(q8 + 16 * k + 2 * c + 8) : 0u;
    }
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g+8
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  const int step = kWarps * kChunk;
  int chunk = begin + warp * kChunk;
  if (chunk < end) stage_chunk(stage_buffer(0), chunk);
  mma::cp_async_commit();
  for (int i = 0; chunk < end; chunk += step, ++i) {
    if (chunk + step < end) stage_chunk(stage_buffer(i + 1), chunk + step);  // the next chunk flies meanwhile
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    __syncwarp();
    const T* k_tile = stage_buffer(i);
    const T* v_tile = k_tile + kChunk * D;

    // S = Q K^T for the chunk's 16 tokens: two n8 tiles (tokens 0-7, 8-15), D / 16 k-steps.
    float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      std::uint32_t b[4];  // matrices: tokens 0-7 x d[16k, +8), tokens 0-7 x d[16k+8, +8), then tokens 8-15
      const int matrix = lane / 8, row = (matrix / 2) * 8 + lane % 8;
      mma::ldmatrix_x4(b, k_tile + staged<D>(row, 2 * k + matrix % 2));
      mma::mma_m16n8k16<T>(s[0], q[k], b[0], b[1]);
      mma::mma_m16n8k16<T>(s[1], q[k], b[2], b[3]);
    }
    // Online softmax per row (FA2 Alg. 1 lines 8-10), in log2 units; tokens past `end` get -inf.
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = chunk + 8 * t + 2 * c + (e % 2);
        s[t][e] = token < end ? s[t][e] * a.scale_log2 : -INFINITY;
        row_max[e / 2] = fmaxf(row_max[e / 2], s[t][e]);
      }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the four lanes of a quad share a row
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
      const float m_new = fmaxf(m[r], row_max[r]);
      rescale[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= rescale[r];
    }
    std::uint32_t p[4];  // P as the A operand of P V: the S accumulators of tiles 0 and 1, rounded to T
    {
      float e[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          e[t][j] = exp2f(s[t][j] - m[j / 2]);
          l[j / 2] += e[t][j];
        }
      mma::a_from_accumulators<T>(p, e[0], e[1]);
    }
    // O = O * rescale + P V: D / 8 n-tiles of 8 dims, V fragments through a transposing ldmatrix.
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      std::uint32_t b[4];  // matrices: tokens 0-7 x d[8n, +8), tokens 8-15 x d[8n, +8), then d[8n+8, +8)
      const int matrix = lane / 8, row = (matrix % 2) * 8 + lane % 8;
      mma::ldmatrix_x4_trans(b, v_tile + staged<D>(row, n + matrix / 2));
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        o[n + j][0] *= rescale[0];
        o[n + j][1] *= rescale[0];
        o[n + j][2] *= rescale[1];
        o[n + j][3] *= rescale[1];
        mma::mma_m16n8k16<T>(o[n + j], p, b[2 * j], b[2 * j + 1]);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  mma::cp_async_wait<0>();

  // Each row's l is split over the four lanes of its quad.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  // Combine the warps through shared memory (the staging area is free now): per warp and row, m, l, O.
  __syncthreads();
  float* warp_o = reinterpret_cast<float*>(shared_bytes);  // [kWarps][16][D]
  float* warp_ml = warp_o + kWarps * 16 * D;               // [kWarps][16][2]
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    warp_o[(warp * 16 + g) * D + 8 * n + 2 * c] = o[n][0];
    warp_o[(warp * 16 + g) * D + 8 * n + 2 * c + 1] = o[n][1];
    warp_o[(warp * 16 + g + 8) * D + 8 * n + 2 * c] = o[n][2];
    warp_o[(warp * 16 + g + 8) * D + 8 * n + 2 * c + 1] = o[n][3];
  }
  if (c == 0) {
    warp_ml[(warp * 16 + g) * 2] = m[0];
    warp_ml[(warp * 16 + g) * 2 + 1] = l[0];
    warp_ml[(warp * 16 + g + 8) * 2] = m[1];
    warp_ml[(warp * 16 + g + 8) * 2 + 1] = l[1];
  }
  __syncthreads();
  for (int index = threadIdx.x; index < rows * D; index += kThreads) {
    const int h = index / D, d = index % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, warp_ml[(w * 16 + h) * 2]);
    float L = 0.0f, O = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(warp_ml[(w * 16 + h) * 2] - M);
        L += warp_ml[(w * 16 + h) * 2 + 1] * weight;
        O += warp_o[(w * 16 + h) * D + d] * weight;
      }
      O /= L;
    }
    const float lse = M != -INFINITY ? (M + log2f(L)) * kLn2 : -INFINITY;
    const int head = first_head + h;
    if (a.partial_o == nullptr) {
      a.o[sequence * a.q_batch_stride + head * a.q_head_stride + d] = cuda::from_float<T>(O);
      if (d == 0) a.lse[static_cast<std::int64_t>(sequence) * a.q_heads + head] = lse;
    } else {
      const std::int64_t slot = (static_cast<std::int64_t>(sequence) * a.q_heads + head) * a.partitions + blockIdx.x;
      a.partial_o[slot * D + d] = O;
      if (d == 0) a.partial_lse[slot] = lse;
    }
  }
}

template <int D>
constexpr int mma_shared_bytes() {
  const int stages = kWarps * 2 * 2 * kChunk * D * 2;         // 16-bit K and V, two stages per warp
  const int combine = kWarps * 16 * (D + 2) * 4;              // fp32 partial results
  return stages > combine ? stages : combine;
}

/// v2's second kernel, one thread block per (query head, sequence), one thread per dim:
///   LSE = log sum_p exp(LSE_p),  O = sum_p exp(LSE_p - LSE) O_p  over the partitions the context reaches.
template <class T, int D>
__global__ void reduce_partitions_kernel(const DecodeArgs<T> a) {
  const int head = blockIdx.x, sequence = blockIdx.y, d = threadIdx.x;
  const int used = max(1, (a.context_lens[sequence] + a.partition_tokens - 1) / a.partition_tokens);
  const std::int64_t first = (static_cast<std::int64_t>(sequence) * a.q_heads + head) * a.partitions;
  float max_lse = -INFINITY;
  for (int p = 0; p < used; ++p) max_lse = fmaxf(max_lse, a.partial_lse[first + p]);
  float O = 0.0f, lse = -INFINITY;
  if (max_lse != -INFINITY) {
    float sum = 0.0f;
    for (int p = 0; p < used; ++p) sum += __expf(a.partial_lse[first + p] - max_lse);
    lse = max_lse + __logf(sum);
    for (int p = 0; p < used; ++p) O += __expf(a.partial_lse[first + p] - lse) * a.partial_o[(first + p) * D + d];
  }
  a.o[sequence * a.q_batch_stride + head * a.q_head_stride + d] = cuda::from_float<T>(O);
  if (d == 0) a.lse[static_cast<std::int64_t>(sequence) * a.q_heads + head] = lse;
}

/// Reshape-and-cache: one thread per 8-element piece of a (token, KV head) row.
template <class T>
__global__ void write_to_cache_kernel(const T* k, const T* v, std::int64_t tokens, std::int64_t token_stride,
                                      std::int64_t head_stride, const std::int64_t* slot_mapping, T* k_cache,
                                      T* v_cache, int kv_heads, int block_size, int head_dim) {
  const int pieces = head_dim / 8;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= tokens * kv_heads * pieces) return;
  const std::int64_t token = index / (kv_heads * pieces);
  const int head = static_cast<int>(index / pieces % kv_heads), piece = static_cast<int>(index % pieces);
  const std::int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding token
  const std::int64_t block = slot / block_size, offset = slot % block_size;
  const std::int64_t source = token * token_stride + head * head_stride + piece * 8;
  const std::int64_t target = ((block * kv_heads + head) * block_size + offset) * head_dim + piece * 8;
  *reinterpret_cast<uint4*>(k_cache + target) = *reinterpret_cast<const uint4*>(k + source);
  *reinterpret_cast<uint4*>(v_cache + target) = *reinterpret_cast<const uint4*>(v + source);
}

/// Deterministic pseudo-random normal-ish fill (sum of uniforms), for benchmark caches.
template <class T>
__global__ void fill_random_kernel(T* data, std::int64_t count, std::uint64_t seed) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(i);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = static_cast<float>(z & 0xffffff) / 16777216.0f + static_cast<float>((z >> 24) & 0xffffff) / 16777216.0f;
    data[i] = cuda::from_float<T>((u - 1.0f) * 2.45f);  // mean 0, variance ~1
  }
}

int log2_exact(std::int64_t value) {
  int bits = 0;
  while ((std::int64_t{1} << bits) < value) ++bits;
  return bits;
}

int heads_per_block(std::int64_t group_size) {
  for (int heads : {8, 4, 2}) if (group_size % heads == 0) return heads;
  return 1;
}

template <class T, int D>
void launch_reduce(const DecodeArgs<T>& args, dim3 grid) {
  reduce_partitions_kernel<T, D><<<dim3(args.q_heads, grid.z), D>>>(args);
  ATTN_CUDA_CHECK_LAUNCH();
}

template <class T, int D, int HEADS>
void launch_decode(const DecodeArgs<T>& args, dim3 grid, bool reduce) {
  paged_decode_kernel<T, D, HEADS><<<grid, kThreads>>>(args);
  ATTN_CUDA_CHECK_LAUNCH();
  if (reduce) launch_reduce<T, D>(args, grid);
}

template <class T, int D>
void launch_decode_mma(const DecodeArgs<T>& args, int rows, dim3 grid, bool reduce) {
  constexpr int bytes = mma_shared_bytes<D>();
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(paged_decode_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  paged_decode_mma_kernel<T, D><<<grid, kThreads, bytes>>>(args, rows);
  ATTN_CUDA_CHECK_LAUNCH();
  if (reduce) launch_reduce<T, D>(args, grid);
}

template <class T, int D>
void launch_for_heads(int heads, const DecodeArgs<T>& args, dim3 grid, bool reduce) {
  switch (heads) {
    case 8: launch_decode<T, D, 8>(args, grid, reduce); return;
    case 4: launch_decode<T, D, 4>(args, grid, reduce); return;
    case 2: launch_decode<T, D, 2>(args, grid, reduce); return;
    default: launch_decode<T, D, 1>(args, grid, reduce); return;
  }
}

}  // namespace

TierCaps gpu_caps() {
  TierCaps caps{{DType::bf16, DType::f16}, 256, {64, 128, 256}, false, 16};
  caps.max_seq_q = 1;
  return caps;
}

bool gpu_block_size_supported(std::int64_t block_size) {
  return block_size >= 1 && block_size <= 256 && (block_size & (block_size - 1)) == 0;
}

DeviceDecodeBatch::DeviceDecodeBatch(const DecodeBatch& batch) : host_(batch) {
  validate_decode_batch(batch, "paged/gpu");
  if (!gpu_block_size_supported(batch.cache.block_size))
    reject("block_size", std::to_string(batch.cache.block_size) + " is not supported by paged/gpu (a power of two <= 256)");
  block_tables_ = DeviceBuffer<std::int32_t>(batch.block_tables.size());
  context_lens_ = DeviceBuffer<std::int32_t>(batch.context_lens.size());
  ATTN_CUDA_CHECK(cudaMemcpy(block_tables_.data(), batch.block_tables.data(), block_tables_.bytes(), cudaMemcpyHostToDevice));
  ATTN_CUDA_CHECK(cudaMemcpy(context_lens_.data(), batch.context_lens.data(), context_lens_.bytes(), cudaMemcpyHostToDevice));
}

void write_to_cache_gpu(const CacheGeometry& cache, DType dtype, const NewTokens& tokens,
                        std::span<const std::int64_t> slot_mapping, void* k_cache, void* v_cache) {
  validate_slot_mapping(cache, slot_mapping, tokens.count);
  if (dtype == DType::f32) reject("dtype", "f32 is not supported by paged/gpu (bf16, f16)");
  if (cache.head_dim % 8 != 0 || tokens.token_stride % 8 != 0 || tokens.head_stride % 8 != 0 ||
      reinterpret_cast<std::uintptr_t>(tokens.k) % 16 != 0 || reinterpret_cast<std::uintptr_t>(tokens.v) % 16 != 0)
    reject("tokens", "rows must start on 16-byte boundaries (head_dim and strides multiples of 8)");
  if (tokens.count == 0) return;
  DeviceBuffer<std::int64_t> slots(slot_mapping.size());
  ATTN_CUDA_CHECK(cudaMemcpy(slots.data(), slot_mapping.data(), slots.bytes(), cudaMemcpyHostToDevice));
  const std::int64_t threads = tokens.count * cache.kv_heads * (cache.head_dim / 8);
  cuda::dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    write_to_cache_kernel<T><<<cuda::ceil_div(threads, 256), 256>>>(
        static_cast<const T*>(tokens.k), static_cast<const T*>(tokens.v), tokens.count, tokens.token_stride,
        tokens.head_stride, slots.data(), static_cast<T*>(k_cache), static_cast<T*>(v_cache),
        static_cast<int>(cache.kv_heads), static_cast<int>(cache.block_size), static_cast<int>(cache.head_dim));
    ATTN_CUDA_CHECK_LAUNCH();
  });
  ATTN_CUDA_CHECK(cudaDeviceSynchronize());  // `slots` is freed on return
}

void fill_random_gpu(void* data, std::int64_t count, DType dtype, std::uint64_t seed) {
  cuda::dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    fill_random_kernel<T><<<1024, 256>>>(static_cast<T*>(data), count, seed);
    ATTN_CUDA_CHECK_LAUNCH();
  });
}

void decode_gpu(const DeviceDecodeBatch& device_batch, const DecodeTensors& t, const DecodeOptions& options) {
  const DecodeBatch& batch = device_batch.host();
  const std::int64_t D = batch.cache.head_dim;
  if (t.dtype != DType::bf16 && t.dtype != DType::f16)
    reject("dtype", std::string(dtype_name(t.dtype)) + " is not supported by paged/gpu (bf16, f16)");
  if (D != 64 && D != 128 && D != 256) reject("head_dim", std::to_string(D) + " is not supported by paged/gpu (64, 128, 256)");
  if (t.q == nullptr || t.k_cache == nullptr || t.v_cache == nullptr || t.o == nullptr || t.lse == nullptr)
    reject("tensors", "q, k_cache, v_cache, o and lse must all be set");
  if (t.q_strides.batch % 8 != 0 || t.q_strides.head % 8 != 0)
    reject("q_strides", "must be multiples of 8 elements (16-byte rows)");
  if (options.partition_tokens < 1) reject("partition", std::to_string(options.partition_tokens) + " must be >= 1");
  const int variant = options.variant != 0 ? options.variant
                                           : choose_variant(batch, cuda::device_attribute(cudaDevAttrMultiProcessorCount));
  if (variant != 1 && variant != 2) reject("variant", std::to_string(options.variant) + " must be 0 (choose), 1 or 2");

  // Tensor cores (default) take up to 16 heads of a group per block; CUDA cores up to 8.
  const bool tensor_cores = options.tensor_cores && (batch.group_size() <= 16 || batch.group_size() % 16 == 0);
  const int heads = tensor_cores ? static_cast<int>(std::min<std::int64_t>(batch.group_size(), 16))
                                 : heads_per_block(batch.group_size());
  const std::int64_t max_context = std::max<std::int64_t>(1, batch.max_context());
  const std::int64_t partition_tokens = variant == 1 ? max_context : options.partition_tokens;
  const std::int64_t partitions = (max_context + partition_tokens - 1) / partition_tokens;
  DeviceBuffer<float> partial_o, partial_lse;
  if (variant == 2) {
    partial_o = DeviceBuffer<float>(static_cast<std::size_t>(batch.sequences() * batch.q_heads * partitions * D));
    partial_lse = DeviceBuffer<float>(static_cast<std::size_t>(batch.sequences() * batch.q_heads * partitions));
  }
  const dim3 grid(static_cast<unsigned>(partitions), static_cast<unsigned>(batch.cache.kv_heads * (batch.group_size() / heads)),
                  static_cast<unsigned>(batch.sequences()));
  cuda::dispatch_dtype(t.dtype, [&](auto zero) {
    using T = decltype(zero);
    if constexpr (!std::is_same<T, float>::value) {
      DecodeArgs<T> a{};
      a.q = static_cast<const T*>(t.q);
      a.q_batch_stride = t.q_strides.batch;
      a.q_head_stride = t.q_strides.head;
      a.k_cache = static_cast<const T*>(t.k_cache);
      a.v_cache = static_cast<const T*>(t.v_cache);
      a.block_tables = device_batch.block_tables();
      a.context_lens = device_batch.context_lens();
      a.max_blocks_per_sequence = static_cast<int>(batch.max_blocks_per_sequence);
      a.kv_heads = static_cast<int>(batch.cache.kv_heads);
      a.q_heads = static_cast<int>(batch.q_heads);
      a.group_size = static_cast<int>(batch.group_size());
      a.head_tiles = static_cast<int>(batch.group_size() / heads);
      a.block_size_log2 = log2_exact(batch.cache.block_size);
      a.scale_log2 = batch.softmax_scale() * kLog2e;
      a.partition_tokens = static_cast<int>(partition_tokens);
      a.partitions = static_cast<int>(partitions);
      a.o = static_cast<T*>(t.o);
      a.lse = t.lse;
      a.partial_o = variant == 2 ? partial_o.data() : nullptr;
      a.partial_lse = variant == 2 ? partial_lse.data() : nullptr;
      const bool reduce = variant == 2;
      switch (D) {
        case 64: tensor_cores ? launch_decode_mma<T, 64>(a, heads, grid, reduce) : launch_for_heads<T, 64>(heads, a, grid, reduce); break;
        case 128: tensor_cores ? launch_decode_mma<T, 128>(a, heads, grid, reduce) : launch_for_heads<T, 128>(heads, a, grid, reduce); break;
        default: tensor_cores ? launch_decode_mma<T, 256>(a, heads, grid, reduce) : launch_for_heads<T, 256>(heads, a, grid, reduce); break;
      }
    }
  });
}

namespace {

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, gpu_caps(), "paged/gpu", false);
  const std::int64_t block_size = block_size_option(options);
  if (!gpu_block_size_supported(block_size))
    reject("block_size", std::to_string(block_size) + " is not supported by paged/gpu (a power of two <= 256)");
  PagedProblem paged(p, block_size, static_cast<std::uint64_t>(options.get("shuffle_seed", 1)));
  const std::size_t element = dtype_size(t.dtype);
  DeviceBuffer<unsigned char> k_pool(static_cast<std::size_t>(paged.geometry.pool_elements()) * element);
  DeviceBuffer<unsigned char> v_pool(k_pool.size());
  for (std::int64_t b = 0; b < p.batch; ++b)
    write_to_cache_gpu(paged.geometry, t.dtype, paged.tokens_of(t, b, element), paged.slots[b], k_pool.data(), v_pool.data());
  const DeviceDecodeBatch batch(paged.batch);
  const DecodeTensors tensors{t.dtype, t.q_strides, t.q, k_pool.data(), v_pool.data(), t.o, t.lse};
  CudaEventTimer timer;
  timer.start();
  decode_gpu(batch, tensors, decode_options(options));
  const double ms = timer.stop_ms();  // waits: the pools may be released after this
  options.counters["decode_ms"] = ms;
  options.counters["kv_GBps"] = paged.batch.kv_bytes(t.dtype) / (ms * 1e-3) / 1e9;
  options.counters["Tc"] = static_cast<double>((p.seq_k + block_size - 1) / block_size);  // cache blocks per sequence
}

}  // namespace

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = forward_gpu;
  gpu.extra_bytes = [](const AttentionProblem& p, DType dtype, bool, const StageOptions& options) {
    return registry_extra_bytes(p, dtype, options);
  };
  gpu.option_names = {"block_size", "shuffle_seed", "variant", "partition", "tensor_cores"};
  return gpu;
}

}  // namespace attn::paged
