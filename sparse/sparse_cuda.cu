// sparse, GPU tier: sparse causal flash attention (QK-sparse and hash-sparse) on tensor cores, bf16 and fp16.
// Every step runs on the device: the keep mask or bucket of each row (sparsity.hpp, the same rules as the CPU
// tier), a stable counting sort of each head's rows by (bucket, original index), and flash_v2's kernels run
// over the sorted rows, gathering them through the permutation, skipping the tiles that cannot meet and
// scattering the results back to the rows' original places.
#include <cmath>
#include <memory>
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
#include "sparse/sparse.hpp"
#include "sparse/sparsity.hpp"

namespace attn::sparse {
namespace {

using flash::exp2_fast;
using flash::kInf;
using flash::online_softmax;
using flash::padded;
using mma::a_from_accumulators;
using mma::load_a;
using mma::load_a_transposed;
using mma::load_b_pair;
using mma::load_b_pair_transposed;
using mma::mma_m16n8k16;

/// Sorted rows are cut into tiles of at most kRowTile rows that never cross a bucket boundary: the forward's Q
/// blocks and the backward's K blocks. (A tile cut by a boundary would be visited for the keys of both buckets.)
constexpr int kRowTile = 128;

/// One side (queries or keys) of a call after sorting, for every (batch, head) of that side, "head" below
/// meaning the flattened b * heads + h:
///   order[head * seq + pos]  original index of the row at sorted position pos; positions [0, count[head]) hold
///                            the kept rows by (bucket, original index), then the dropped rows
///   bucket[head * seq + pos] its bucket (QK-sparse: 0 for kept rows)
///   first[head * (buckets + 2) + b]  the first sorted position of bucket b; b = buckets: of the dropped rows;
///                            b = buckets + 1: seq
///   tiles[head * max_tiles + n]: the sorted positions [x, y) of tile n, for n < tile_count[head].y; the kept
///                            rows' tiles first (n < tile_count[head].x), by their rank in their bucket (the
///                            first tile of every bucket, then the second of every bucket, ...), then the
///                            dropped rows'. A forward Q block of rank r sees about r + 1 K/V tiles of its bucket
///                            and a backward K block of rank r about (the bucket's tiles - r) Q blocks: taken in
///                            this order (backward) or its reverse (forward), the longest blocks start first.
///   chunk_first[(head * (buckets + 1) + b) * chunks + k]: the first sorted position of the rows of bucket b among
///                            original rows [k * kChunkRows, (k + 1) * kChunkRows) (the sort's scan), so that a
///                            search for an original index needs to look at one chunk's rows of a bucket only.
struct SortedRows {
  const int* order = nullptr;
  const int* bucket = nullptr;
  const int* count = nullptr;
  const int* first = nullptr;
  const int2* tiles = nullptr;
  const int2* tile_count = nullptr;
  int buckets = 1;  // kept buckets
  int max_tiles = 0;
  const int* chunk_first = nullptr;
  int chunks = 0;
  const int* row_bucket = nullptr;  // [head * seq + i]: row i's bucket, in original order; `buckets` if dropped
};

struct Params : cuda::AttentionParams {
  SortedRows queries, keys;
  // spans[q_head * seq_q + pos]: the sorted key positions [x, y) the query at sorted position pos sees
  // (spans_kernel); (0, 0) for dropped queries.
  int2* spans = nullptr;
  float* lse_log2 = nullptr;  // backward scratch: L_i in log2 units, +inf for rows that see no key
  float* delta = nullptr;     // backward scratch: D_i = rowsum(dO_i * O_i)
  float* dq_accum = nullptr;  // backward scratch: dQ in fp32 at the rows' original places
  // backward scratch: runs[(k_flat * keys.max_tiles + n) * group_size + head_in_group] = the sorted query
  // positions [first, end) of that query head that see some key of the k_flat head's n-th K tile (tile_run);
  // first >= end when none do. Found by the lead blocks of backward_prepare_kernel (flash::kHasLeadBlocks), one
  // warp per entry: run_blocks thread blocks for its run_slots entries.
  int2* runs = nullptr;
  int run_slots = 0, run_blocks = 0;
  __host__ __device__ int lead_blocks() const { return run_blocks; }
  __device__ void lead_block(int block) const;

  /// For the backward's element-wise passes (flash::kDropsRows): query row `row` (over batch, q_heads, seq_q) is kept
  /// iff its bucket is. So a dropped query's O, dO and dq_accum row are never read, its dq_accum row never cleared,
  /// and its dQ written as zeros.
  __device__ bool row_kept(long long row) const { return queries.row_bucket[row] < queries.buckets; }
};

// ============================================================================================================
// Masks, buckets and the sort: SCFA Alg. 1 lines 1-3 (and Alg. 2 line 1), on the device.
// ============================================================================================================

/// Hash-sparse's projection R (head_dim x buckets / 2, row-major), one thread per entry.
__global__ void projection_kernel(float* projection, std::uint64_t seed, int head_dim, int half) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index < head_dim * half) projection[index] = projection_entry(seed, index / half, index % half);
}

/// R passed by value as a kernel argument, for Half = buckets / 2 up to kMaxFixedHalf: a kernel's arguments sit in
/// its constant bank, so each entry of R (the same for the whole warp) goes from there into a uniform register,
/// one load per warp, not one per thread through shared or global memory. Half = 0: hash-sparse with R read from
/// memory instead (Classify::projection); Half = kKeepDraws: QK-sparse, no R (classify_rows_kernel's variants).
template <int HeadDim, int Half, bool Argument = (Half > 0)>
struct FixedProjection {
  float r[HeadDim * Half];  // R[d][c] at d * Half + c
};
template <int HeadDim, int Half>
struct FixedProjection<HeadDim, Half, false> {};

/// classify_rows_kernel's Half for QK-sparse: the rows' keep draws only (a kernel of its own, without the hash's
/// code and registers).
constexpr int kKeepDraws = -1;

/// Up to 16 buckets: R of at most 128 x 8 floats (4 KiB) as an argument.
constexpr int kMaxFixedHalf = 8;

/// What classify_rows_kernel needs besides the tensors. Kept rows get buckets [0, buckets); a dropped row gets
/// bucket `buckets`, so that the sort puts it after every kept row.
struct Classify {
  Mode mode = Mode::qk;
  int buckets = 1;      // kept buckets: 1 for QK-sparse, nb for hash-sparse
  std::uint64_t seed = 1;
  const float* projection = nullptr;  // R in global memory, where it is not an argument
  int projection_floats = 0;          // head_dim x buckets / 2
  bool staged = false;                // R copied to shared memory by every thread block (kMaxStagedProjection)
};

/// Rows per thread block of classify_rows_kernel (two per thread) and of place_rows_kernel (one per thread): a
/// "chunk". The sort counts each chunk's rows per bucket, scans those counts, then places each chunk's rows.
constexpr int kChunkRows = 256;
constexpr int kChunkWarps = kChunkRows / 32;
constexpr int kClassifyRows = 2;  // rows per thread of classify_rows_kernel: rows t and t + kClassifyThreads
constexpr int kClassifyThreads = kChunkRows / kClassifyRows;

/// One side (queries or keys) for classify_rows_kernel: the tensor, its heads and length, where the rows' buckets
/// go (row_bucket[(b * heads + h) * seq + i]) and where each chunk's count of rows per bucket goes
/// (chunk_counts[((b * heads + h) * (buckets + 1) + bucket) * chunks + chunk]).
struct ClassifySide {
  const void* x = nullptr;
  Strides strides;
  int heads = 0, seq = 0, chunks = 0;
  bool queries = true;  // which random stream (sparsity.hpp): query rows or key rows
  int drop_permille = 0;
  int* row_bucket = nullptr;
  int* chunk_counts = nullptr;
};

/// bucket_of (sparsity.hpp) four projections at a time, where buckets / 2 is a multiple of 4: each dot product is
/// the same sequence of fused multiply-adds and the projections are considered in the same order, so the bucket
/// is bucket_of's, bit for bit; four independent sums and one 16-byte load of R per step make it faster.
template <int HeadDim>
__device__ __forceinline__ int bucket_of_by_four(const float (&x)[HeadDim], int buckets, const float* projection) {
  const int half = buckets / 2;
  int best = 0;
  float best_value = 0;
  for (int c = 0; c < half; c += 4) {
    float dot[4] = {};
#pragma unroll
    for (int d = 0; d < HeadDim; ++d) {
      const float4 r = *reinterpret_cast<const float4*>(projection + d * half + c);  // R[d][c .. c + 3]
      dot[0] = fused_multiply_add(x[d], r.x, dot[0]);
      dot[1] = fused_multiply_add(x[d], r.y, dot[1]);
      dot[2] = fused_multiply_add(x[d], r.z, dot[2]);
      dot[3] = fused_multiply_add(x[d], r.w, dot[3]);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) consider_projection(c + k, half, dot[k], best, best_value);
  }
  return best;
}

/// bucket_of of one row (HeadDim floats in registers) with R at `projection` (shared or global memory).
template <int HeadDim>
__device__ __forceinline__ int bucket_of_row(const float (&x)[HeadDim], int buckets, const float* projection) {
  return buckets / 2 % 4 == 0 ? bucket_of_by_four(x, buckets, projection) : bucket_of(x, HeadDim, buckets, projection);
}

/// bucket_of of kClassifyRows rows at once (row k at rows[k], 16-byte aligned; nullptr: none, bucket left as is),
/// with R an argument (FixedProjection): for each row the same fused multiply-adds in the same order for each of
/// the Half dot products (independent of each other, so the compiler interleaves them), and the projections
/// considered in the same order. The rows are read 16 bytes (8 elements) at a time, and each entry of R, loaded
/// once into a uniform register, serves every row.
template <class T, int HeadDim, int Half>
__device__ __forceinline__ void buckets_of_fixed(const T* const (&rows)[kClassifyRows],
                                                 const FixedProjection<HeadDim, Half>& r,
                                                 int (&bucket)[kClassifyRows]) {
  float dot[kClassifyRows][Half] = {};
#pragma unroll
  for (int piece = 0; piece < HeadDim / 8; ++piece) {
    uint4 bits[kClassifyRows];
#pragma unroll
    for (int k = 0; k < kClassifyRows; ++k)
      bits[k] = rows[k] != nullptr ? reinterpret_cast<const uint4*>(rows[k])[piece] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = piece * 8 + e;
#pragma unroll
      for (int c = 0; c < Half; ++c) {
        const float entry = r.r[d * Half + c];
#pragma unroll
        for (int k = 0; k < kClassifyRows; ++k) {
          const float x = cuda::to_float(reinterpret_cast<const T*>(&bits[k])[e]);
          dot[k][c] = fused_multiply_add(x, entry, dot[k][c]);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kClassifyRows; ++k) {
    if (rows[k] == nullptr) continue;
    float best_value = 0;
    bucket[k] = 0;
#pragma unroll
    for (int c = 0; c < Half; ++c) consider_projection(c, Half, dot[k][c], bucket[k], best_value);
  }
}

/// One row (HeadDim elements from `x`, 16-byte aligned) converted to fp32, 16 bytes per load.
template <class T, int HeadDim>
__device__ __forceinline__ void load_row(const T* x, float (&values)[HeadDim]) {
  const uint4* source = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int piece = 0; piece < HeadDim / 8; ++piece) {
    const uint4 bits = source[piece];
    const T* elements = reinterpret_cast<const T*>(&bits);
#pragma unroll
    for (int e = 0; e < 8; ++e) values[piece * 8 + e] = cuda::to_float(elements[e]);
  }
}

/// One chunk's count of rows per bucket (`all` buckets; bucket -1: no row), written to counts[b * stride]: what the
/// sort's scan turns into positions. Called by every thread of the block with its rows' buckets; `histogram` is
/// `all` ints of shared memory.
__device__ __forceinline__ void count_chunk(const int (&bucket)[kClassifyRows], int all, int* histogram, int* counts,
                                            int stride) {
  for (int b = threadIdx.x; b < all; b += blockDim.x) histogram[b] = 0;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kClassifyRows; ++k) {
    const unsigned same = __match_any_sync(0xffffffffu, bucket[k]);  // the lanes of the warp with this bucket
    if (bucket[k] >= 0 && (same & ((1u << threadIdx.x % 32) - 1u)) == 0)
      atomicAdd(&histogram[bucket[k]], __popc(same));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < all; b += blockDim.x) counts[b * stride] = histogram[b];
}

/// The shared memory of classify_rows_kernel before the chunk's counts: with R an argument (Half > 0), the chunk's
/// rows (padded, as flash_v2's tiles); else nothing, or R when staged (Classify::staged).
template <class T, int HeadDim, int Half>
constexpr int classify_rows_bytes() {
  return Half > 0 ? kChunkRows * padded(HeadDim) * static_cast<int>(sizeof(T)) : 0;
}

/// The largest R (in floats) every thread block of classify_rows_kernel copies to shared memory (40 KiB: with the
/// chunk's counts it stays within the default limit of 48 KiB); a larger one is read from global memory.
constexpr int kMaxStagedProjection = 40 * 1024 / static_cast<int>(sizeof(float));

/// The bucket of every row of both sides, in original order, two rows per thread and one thread block per chunk,
/// in one launch: the query side's thread blocks first (chunks per head), then the key side's; blockIdx.y is the
/// batch. QK-sparse (Half = kKeepDraws): keep_row's draw; hash-sparse: bucket_of on the row converted to fp32 (as
/// the CPU tier sees it), with R an argument (Half > 0: no loads of R at all, each entry serving both rows; the
/// chunk's rows first copied to shared memory with coalesced loads), or else in shared memory (shared-memory
/// broadcasts rather than global loads queued behind the rows' own) or, when too large, global memory. Each
/// chunk's count of rows per bucket is the first step of the sort (place_rows_kernel).
template <class T, int HeadDim, int Half>
__global__ void __launch_bounds__(kClassifyThreads)
    classify_rows_kernel(const Classify c, const ClassifySide queries, const ClassifySide keys,
                         const __grid_constant__ FixedProjection<HeadDim, Half> fixed) {
  // The chunk's rows (Half > 0) or R (when c.staged), then the chunk's counts.
  extern __shared__ __align__(16) unsigned char classify_shared[];
  const int query_blocks = queries.heads * queries.chunks;
  const bool query_side = static_cast<int>(blockIdx.x) < query_blocks;
  const ClassifySide side = query_side ? queries : keys;
  const int block = query_side ? blockIdx.x : blockIdx.x - query_blocks;
  const int head = block / side.chunks, chunk = block % side.chunks, b = blockIdx.y;
  const long long flat_head = static_cast<long long>(b) * side.heads + head;
  auto row_pointer = [&](int i) {  // row i of this (batch, head)
    return static_cast<const T*>(side.x) + b * side.strides.batch + head * side.strides.head + i * side.strides.seq;
  };
  int row[kClassifyRows], bucket[kClassifyRows];
#pragma unroll
  for (int k = 0; k < kClassifyRows; ++k) {
    row[k] = chunk * kChunkRows + k * kClassifyThreads + threadIdx.x;
    bucket[k] = -1;  // none: past the end of the side
  }
  if constexpr (Half == kKeepDraws) {
    const std::uint64_t stream = side.queries ? query_stream(gridDim.y, side.heads, b, head)
                                                 : key_stream(gridDim.y, side.heads, b, head);
#pragma unroll
    for (int k = 0; k < kClassifyRows; ++k)
      if (row[k] < side.seq) bucket[k] = keep_row(c.seed, stream, row[k], side.drop_permille) ? 0 : 1;
  } else if constexpr (Half > 0) {
    // The chunk's rows copied to shared memory, consecutive threads on consecutive 16 bytes of a row: a warp's
    // copy covers 512 bytes of 4 rows (8 of d = 32), where each thread loading its own row from global memory
    // would touch 32 rows (32 cache lines) per warp-wide load.
    constexpr int kStride = padded(HeadDim);
    T* tile = reinterpret_cast<T*>(classify_shared);
    const int first = chunk * kChunkRows;
    mma::load_tile_async_unrolled<kChunkRows, HeadDim, kStride, kClassifyThreads>(tile, row_pointer(first),
                                                                                  side.strides.seq, side.seq - first);
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
    __syncthreads();
    const T* rows[kClassifyRows];
#pragma unroll
    for (int k = 0; k < kClassifyRows; ++k)
      rows[k] = row[k] < side.seq ? tile + (k * kClassifyThreads + threadIdx.x) * kStride : nullptr;
    buckets_of_fixed(rows, fixed, bucket);
  } else {
    float* staged_projection = reinterpret_cast<float*>(classify_shared);
    if (c.staged) {
      for (int k = threadIdx.x; k < c.projection_floats; k += kClassifyThreads) staged_projection[k] = c.projection[k];
      __syncthreads();
    }
    for (int k = 0; k < kClassifyRows; ++k) {  // one row after the other (the registers of one)
      const int i = chunk * kChunkRows + k * kClassifyThreads + threadIdx.x;
      if (i >= side.seq) continue;
      float values[HeadDim];
      load_row(row_pointer(i), values);
      const int hashed = c.staged ? bucket_of_row(values, c.buckets, staged_projection)
                                  : bucket_of_row(values, c.buckets, c.projection);
#pragma unroll
      for (int j = 0; j < kClassifyRows; ++j)  // (bucket[k] would put the array in local memory)
        if (j == k) bucket[j] = hashed;
    }
  }
#pragma unroll
  for (int k = 0; k < kClassifyRows; ++k)
    if (row[k] < side.seq) side.row_bucket[flat_head * side.seq + row[k]] = bucket[k];
  const int all = c.buckets + 1;
  const int before_counts = Half == 0 && c.staged ? c.projection_floats * static_cast<int>(sizeof(float))
                                                  : classify_rows_bytes<T, HeadDim, Half>();
  int* histogram = reinterpret_cast<int*>(classify_shared + before_counts);
  count_chunk(bucket, all, histogram, side.chunk_counts + flat_head * all * side.chunks + chunk, side.chunks);
}

/// The caller's index lists (CSR over heads, validated on the host): one thread block per head marks every
/// row dropped (bucket 1), then the listed ones kept (bucket 0), then counts each chunk's kept and dropped rows
/// (ClassifySide::chunk_counts), a warp per chunk.
__global__ void mark_listed_rows_kernel(const std::int64_t* offsets, const std::int32_t* indices, int seq,
                                        int chunks, int* row_bucket, int* chunk_counts) {
  const long long head = blockIdx.x;
  int* buckets = row_bucket + head * seq;
  for (int i = threadIdx.x; i < seq; i += blockDim.x) buckets[i] = 1;
  __syncthreads();
  for (long long at = offsets[head] + threadIdx.x; at < offsets[head + 1]; at += blockDim.x) buckets[indices[at]] = 0;
  __syncthreads();
  int* counts = chunk_counts + head * 2 * chunks;
  const int warps = static_cast<int>(blockDim.x / 32), lane = threadIdx.x % 32;
  for (int chunk = threadIdx.x / 32; chunk < chunks; chunk += warps) {
    const int begin = chunk * kChunkRows, rows = min(seq - begin, kChunkRows);
    int kept = 0;
    for (int r = lane; r < kChunkRows; r += 32)
      kept += __popc(__ballot_sync(0xffffffffu, r < rows && buckets[begin + r] == 0));
    if (lane == 0) {
      counts[chunk] = kept;
      counts[chunks + chunk] = rows - kept;
    }
  }
}

/// One side's arrays for the sort (device pointers; the layout of SortedRows and ClassifySide::chunk_counts;
/// "head" here is the flattened b * heads + h).
struct SortSide {
  const int* row_bucket = nullptr;  // [heads * seq], in original order
  int* chunk_counts = nullptr;      // [heads][buckets + 1][chunks]: counts, then (scan_chunks_kernel) positions
  int seq = 0, heads = 0, chunks = 0;
  int* order = nullptr;
  int* bucket = nullptr;
  int* count = nullptr;
  int* first = nullptr;
  int2* tiles = nullptr;
  int2* tile_count = nullptr;
  int max_tiles = 0;
};

constexpr int kScanThreads = 1024;  // 32 warps listing the tiles: with nothing dropped, 128 ranks at N = 16384
constexpr int kScanWarps = kScanThreads / 32;

/// The sort's middle step, one thread block per head of either side (the query heads first, then the KV heads):
/// the chunks' counts, taken in (bucket, chunk) order, replaced by their exclusive prefix sums. The count of
/// bucket b in chunk k becomes the sorted position of the first row of bucket b in chunk k: after every row of a
/// lower bucket, and after the rows of bucket b in earlier chunks (a stable counting sort; `buckets` kept
/// buckets, plus one for the dropped rows). Each thread sums a contiguous run of the counts; the runs' sums are
/// scanned across the block. Then each bucket's first position and the tiles (SortedRows). Given `statistics`
/// (the forward's visible pairs and tiles visited, counted by spans_kernel), it also zeroes them.
__global__ void __launch_bounds__(kScanThreads) scan_chunks_kernel(const SortSide queries, const SortSide keys,
                                                                   int buckets, unsigned long long* statistics) {
  extern __shared__ int first_of[];  // [buckets + 2]: each bucket's first sorted position, then seq; then [buckets]
  __shared__ int run_start[kScanWarps];
  // The forward's two counters (Params::tiles_visited), zeroed here rather than by a memset of their own.
  if (statistics != nullptr && blockIdx.x == 0 && threadIdx.x < 2) statistics[threadIdx.x] = 0;
  const bool query_side = blockIdx.x < static_cast<unsigned>(queries.heads);
  const SortSide side = query_side ? queries : keys;
  const long long head = query_side ? blockIdx.x : blockIdx.x - queries.heads;
  const int all = buckets + 1, seq = side.seq, chunks = side.chunks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  int* counts = side.chunk_counts + head * all * chunks;
  const int n = all * chunks, per_thread = (n + kScanThreads - 1) / kScanThreads;
  const int begin = min(n, static_cast<int>(threadIdx.x) * per_thread), end = min(n, begin + per_thread);
  int sum = 0;
  for (int k = begin; k < end; ++k) sum += counts[k];
  int inclusive = sum;  // over the warp's runs, then the block's
#pragma unroll
  for (int step = 1; step < 32; step *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, step);
    if (lane >= step) inclusive += other;
  }
  if (lane == 31) run_start[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the warps' sums
    const int value = lane < kScanWarps ? run_start[lane] : 0;
    int warp_inclusive = value;
#pragma unroll
    for (int step = 1; step < kScanWarps; step *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, warp_inclusive, step);
      if (lane >= step) warp_inclusive += other;
    }
    if (lane < kScanWarps) run_start[lane] = warp_inclusive - value;
  }
  __syncthreads();
  int position = run_start[warp] + inclusive - sum;
  for (int k = begin; k < end; ++k) {
    const int count = counts[k];
    counts[k] = position;
    if (k % chunks == 0) first_of[k / chunks] = position;
    position += count;
  }
  if (threadIdx.x == 0) first_of[all] = seq;
  __syncthreads();
  const int kept = first_of[buckets];  // the dropped rows' bucket starts after every kept row
  if (threadIdx.x == 0) side.count[head] = kept;
  int* first = side.first + head * (all + 1);
  for (int b = threadIdx.x; b <= all; b += blockDim.x) first[b] = first_of[b];
  // The tiles (at most seq / kRowTile + all: SortSide::max_tiles): the kept buckets' by rank, then the dropped
  // rows'. first_of[b + 1] is the end of kept bucket b. Bucket b has tiles_of[b] tiles; the tile of rank r of
  // bucket b goes after every tile of lower rank (sum over buckets of min(tiles, r)) and after the rank-r tiles
  // of the buckets before b: each warp lists whole ranks, from a sum and a ballot over the buckets, 32 at a time.
  __shared__ int max_rank, kept_tiles;
  int* tiles_of = first_of + all + 1;
  if (threadIdx.x == 0) max_rank = kept_tiles = 0;
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    tiles_of[b] = (first_of[b + 1] - first_of[b] + kRowTile - 1) / kRowTile;
    atomicMax(&max_rank, tiles_of[b]);
    atomicAdd(&kept_tiles, tiles_of[b]);
  }
  __syncthreads();
  int2* tiles = side.tiles + head * side.max_tiles;
  for (int rank = warp; rank < max_rank; rank += kScanWarps) {
    int at = 0;  // the tiles of lower rank
    for (int b0 = 0; b0 < buckets; b0 += 32)
      at += __reduce_add_sync(0xffffffffu, b0 + lane < buckets ? min(tiles_of[b0 + lane], rank) : 0);
    for (int b0 = 0; b0 < buckets; b0 += 32) {
      const int b = b0 + lane;
      const bool has = b < buckets && tiles_of[b] > rank;
      const unsigned with = __ballot_sync(0xffffffffu, has);
      if (has) {
        const int row = first_of[b] + rank * kRowTile;
        tiles[at + __popc(with & lanes_below)] = make_int2(row, min(first_of[b + 1], row + kRowTile));
      }
      at += __popc(with);
    }
  }
  for (int n_tile = threadIdx.x; kept + n_tile * kRowTile < seq; n_tile += blockDim.x)
    tiles[kept_tiles + n_tile] = make_int2(kept + n_tile * kRowTile, min(seq, kept + (n_tile + 1) * kRowTile));
  if (threadIdx.x == 0)
    side.tile_count[head] = make_int2(kept_tiles, kept_tiles + (seq - kept + kRowTile - 1) / kRowTile);
}

/// The sort's last step (SCFA Alg. 1 lines 2-3), one thread per row and one thread block per chunk of either side
/// (the query side's first): each row goes to its chunk's first position for its bucket (scan_chunks_kernel) plus
/// the number of rows of its bucket before it in the chunk, counted per warp (__match_any_sync) and across the
/// chunk's warps; so original order is kept inside every bucket.
__global__ void __launch_bounds__(kChunkRows) place_rows_kernel(const SortSide queries, const SortSide keys,
                                                                int buckets) {
  extern __shared__ int start[];  // [all]: the chunk's first position per bucket; then [kChunkWarps][all]
  const int query_blocks = queries.heads * queries.chunks;
  const bool query_side = static_cast<int>(blockIdx.x) < query_blocks;
  const SortSide side = query_side ? queries : keys;
  const int block = query_side ? blockIdx.x : blockIdx.x - query_blocks;
  const long long head = block / side.chunks;
  const int chunk = block % side.chunks, all = buckets + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int* warp_count = start + all;  // warp_count[w * all + b]: rows of bucket b in warp w of the chunk
  const int* positions = side.chunk_counts + head * all * side.chunks + chunk;
  for (int b = threadIdx.x; b < all; b += kChunkRows) {
    start[b] = positions[b * side.chunks];
#pragma unroll
    for (int w = 0; w < kChunkWarps; ++w) warp_count[w * all + b] = 0;
  }
  const int i = chunk * kChunkRows + threadIdx.x;
  const int bucket = i < side.seq ? side.row_bucket[head * side.seq + i] : -1;
  const unsigned same = __match_any_sync(0xffffffffu, bucket);
  const unsigned lanes_below = (1u << lane) - 1u;
  __syncthreads();
  if (bucket >= 0 && (same & lanes_below) == 0) warp_count[warp * all + bucket] = __popc(same);
  __syncthreads();
  if (bucket < 0) return;
  int position = start[bucket] + __popc(same & lanes_below);
  for (int w = 0; w < warp; ++w) position += warp_count[w * all + bucket];
  side.order[head * side.seq + position] = i;
  side.bucket[head * side.seq + position] = bucket;
}

// ---- Spans: what a query sees, as one run of sorted key positions -------------------------------------------
// The keys are sorted by (bucket, original index), so the keys a kept query sees (its bucket's, and with causal
// only those not after its limit) are one run [first, end) of sorted key positions. And the queries are sorted
// the same way, so along a head's kept query positions neither first nor end ever decreases. The kernels work
// from these spans alone: SCFA Alg. 1 line 10's mask becomes a comparison of key positions (as flash_v2's causal
// mask), and line 8's skip test the span of a Q block's first and last query (forward) or a binary search over
// a head's spans (backward).

/// The first position in [low, high) where `before` is false, `before` being true on a prefix of the range and
/// false after it (a binary search, as std::partition_point).
template <class Before>
__device__ __forceinline__ int lower_bound(int low, int high, Before&& before) {
  while (low < high) {
    const int middle = low + (high - low) / 2;
    if (before(middle))
      low = middle + 1;
    else
      high = middle;
  }
  return low;
}

/// lower_bound by one warp: each round every lane tests one of 32 evenly spaced positions and a ballot counts the
/// ones where `before` holds (a prefix of them), which leaves a range 32 times narrower: 16384 positions take three
/// rounds (three dependent loads) instead of 14. Every lane must call it with the same arguments, and gets the same
/// answer.
template <class Before>
__device__ __forceinline__ int warp_lower_bound(int low, int high, Before&& before) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  while (low < high) {
    const int step = cuda::ceil_div(high - low, 32);
    const int at = low + lane * step;
    const int before_count = __popc(__ballot_sync(0xffffffffu, at < high && before(at)));
    if (before_count == 0) return low;
    high = min(high, low + before_count * step);  // the first tested position where `before` is false, or high
    low += (before_count - 1) * step + 1;         // past the last one where it holds
  }
  return low;
}

/// SCFA Alg. 2 line 7 for every K tile before the backward runs: the queries of a head that see some key of the
/// tile [key0, key_end) are one run of sorted positions, from the first whose span ends after key0 to the last
/// whose span starts before key_end (the spans never decrease). One warp per entry of Params::runs, entry `slot` =
/// ((batch x kv_heads + kv_head) x max_tiles + n) x group_size + head_in_group. Searched here, all at once, rather
/// than by each backward thread block at its start, where the two searches' dependent loads held the block's first
/// step back (about 7000 of its 12500 cycles before the first step with 8 buckets at N = 16384).
__device__ void tile_run(const Params& p, int slot) {
  if (slot >= p.run_slots) return;
  const int head_in_group = slot % p.group_size;
  const int tile_slot = slot / p.group_size;  // k_flat x max_tiles + n
  const int n = tile_slot % p.keys.max_tiles;
  const long long k_flat = tile_slot / p.keys.max_tiles;
  const int2 keys = n < p.keys.tile_count[k_flat].y ? p.keys.tiles[tile_slot] : int2{0, 0};
  int2 run{0, 0};
  if (keys.x < keys.y && keys.x < p.keys.count[k_flat]) {  // a tile of kept keys
    const int kv_heads = p.q_heads / p.group_size;
    const long long q_flat = k_flat / kv_heads * p.q_heads + k_flat % kv_heads * p.group_size + head_in_group;
    const int q_count = p.queries.count[q_flat];
    const int2* spans = p.spans + q_flat * p.seq_q;
    run.x = warp_lower_bound(0, q_count, [&](int i) { return spans[i].y <= keys.x; });
    run.y = warp_lower_bound(run.x, q_count, [&](int i) { return spans[i].x < keys.y; });
  }
  if (threadIdx.x % 32 == 0) p.runs[slot] = run;
}

__device__ void Params::lead_block(int block) const {
  tile_run(*this, block * static_cast<int>(blockDim.x / 32) + static_cast<int>(threadIdx.x / 32));
}

constexpr int kSpansThreads = 256;

/// The span of every sorted query position, one thread each (SCFA Alg. 1 lines 8 and 10 prepared once per
/// call): its bucket's first key, and the first key of its bucket after its causal limit (a binary search among
/// the bucket's keys of the limit's chunk, SortedRows::chunk_first; without causal, the next bucket's first key).
/// Dropped positions get (0, 0). When `statistics` is given (the forward's, with its `block_cols`) it also counts,
/// for the counters, the visible pairs (the spans' lengths) into statistics[0] and the (Q tile, K/V tile) pairs
/// forward_kernel will compute into statistics[1]: a Q tile's queries all start at their bucket's first key x, so
/// the tile whose last query this is visits ceil((y - x) / Bc) K/V tiles (forward_kernel's `tiles`), known before
/// it runs.
/// One thread block per kSpansThreads positions of one (batch, query head), `blocks_per_head` of them per head:
/// the head and position from 32-bit arithmetic on blockIdx.x, not a 64-bit division per thread.
__global__ void __launch_bounds__(kSpansThreads) spans_kernel(const Params p, int blocks_per_head,
                                                              unsigned long long* statistics, int block_cols) {
  const int q_flat = blockIdx.x / blocks_per_head;  // b * q_heads + h
  const int position = (blockIdx.x % blocks_per_head) * kSpansThreads + threadIdx.x;
  const long long row = static_cast<long long>(q_flat) * p.seq_q + position;
  const int kv_heads = p.q_heads / p.group_size;
  int2 span = make_int2(0, 0);
  bool last_of_tile = false;  // the last query of its Q tile (kRowTile rows from its bucket's first)
  if (position < p.seq_q) {
    const int k_flat = (q_flat / p.q_heads) * kv_heads + (q_flat % p.q_heads) / p.group_size;
    // The three loads at once (a dropped position's order and bucket are there too, unused): one wait, not two.
    const int kept = p.queries.count[q_flat], query = p.queries.order[row], bucket = p.queries.bucket[row];
    if (position < kept) {
      const int* query_first = p.queries.first + static_cast<long long>(q_flat) * (p.queries.buckets + 2);
      last_of_tile =
          position + 1 == query_first[bucket + 1] || (position - query_first[bucket]) % kRowTile == kRowTile - 1;
      const int* key_first = p.keys.first + static_cast<long long>(k_flat) * (p.keys.buckets + 2);
      const int* key_order = p.keys.order + static_cast<long long>(k_flat) * p.seq_k;
      const int limit = query + (p.seq_k - p.seq_q);  // the last original key index it may see, with causal
      span.x = key_first[bucket];
      span.y = key_first[bucket + 1];
      if (p.causal && limit < 0) {
        span.y = span.x;
      } else if (p.causal && limit < p.seq_k - 1) {
        // The bucket's keys with original index <= limit: all those of the chunks before limit's, then a binary
        // search among the bucket's keys of limit's chunk only (at most kChunkRows, not the whole bucket).
        const int chunk = limit / kChunkRows;
        const int* starts = p.keys.chunk_first + (static_cast<long long>(k_flat) * (p.keys.buckets + 1) + bucket) *
                                                     p.keys.chunks;  // of the bucket's keys, chunk by chunk
        const int high = chunk + 1 < p.keys.chunks ? starts[chunk + 1] : span.y;
        span.y = lower_bound(starts[chunk], high, [&](int c) { return key_order[c] <= limit; });
      }
    }
    p.spans[row] = span;
  }
  if (statistics == nullptr) return;
  unsigned long long pairs = static_cast<unsigned long long>(span.y - span.x);
  unsigned long long tiles =
      last_of_tile ? static_cast<unsigned long long>((span.y - span.x + block_cols - 1) / block_cols) : 0;  // 32-bit
#pragma unroll
  for (int step = 16; step > 0; step /= 2) {
    pairs += __shfl_xor_sync(0xffffffffu, pairs, step);
    tiles += __shfl_xor_sync(0xffffffffu, tiles, step);
  }
  // Then over the block, so that each block adds once: every warp adding to the same two words made them a
  // queue of some 8000 atomics at N = 16384.
  __shared__ unsigned long long warp_sums[2][kSpansThreads / 32];
  if (threadIdx.x % 32 == 0) {
    warp_sums[0][threadIdx.x / 32] = pairs;
    warp_sums[1][threadIdx.x / 32] = tiles;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    unsigned long long sum = 0;
    for (int w = 0; w < kSpansThreads / 32; ++w) sum += warp_sums[threadIdx.x][w];
    if (sum > 0) atomicAdd(statistics + threadIdx.x, sum);
  }
}

/// Copies rows rows[0..valid_rows) of a tensor (row r at source + rows[r] * row_stride) into a shared tile, 16
/// bytes per cp.async: load_tile_async through a permutation. Rows r >= valid_rows are zero-filled. Each thread
/// copies a fixed number of chunks, so the loop unrolls whole (no loop left in the kernels' main loops).
template <int Rows, int Cols, int SmemStride, int Threads, class T>
__device__ __forceinline__ void gather_tile_async(T* tile, const T* source, long long row_stride, const int* rows,
                                                  int valid_rows) {
  constexpr int kChunksPerRow = Cols / 8;
  static_assert(Rows * kChunksPerRow % Threads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < Rows * kChunksPerRow / Threads; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * Threads;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    const bool in_bounds = row < valid_rows;
    mma::cp_async_16(tile + row * SmemStride + col, in_bounds ? source + rows[row] * row_stride + col : source,
                     in_bounds);
  }
}

/// gather_tile_async for two tensors read through the same permutation with the same row stride (K_j and V_j;
/// the backward's Q_i and dO_i): each row's place is computed once for both copies (a row index from shared memory and a
/// 64-bit multiply), and where the chunks divide evenly among the threads (as load_tile_async_unrolled) each
/// thread copies one column of rows r, r + Threads / (Cols / 8), ..., at constant offsets from its first, so
/// that the only per-row arithmetic left is that multiply. Other shapes (d = 96) are two gather_tile_async.
/// WholeRows: rows[] holds all Rows entries (a shared slot, zeros past valid_rows), so they are read without a
/// test; otherwise (global memory, the first tile) only the valid ones are. Layout: where a row's 16-byte chunks
/// go in the tiles (common/tile_layout.hpp; Swizzled only where each thread's rows are 8 apart, so that its
/// chunk's place is the same in every row it copies).
template <int Rows, int Cols, int SmemStride, int Threads, bool WholeRows, class Layout = mma::RowMajor, class T>
__device__ __forceinline__ void gather_tile_pair_async(T* tile_a, const T* source_a, T* tile_b, const T* source_b,
                                                       long long row_stride, const int* rows, int valid_rows) {
  constexpr int kChunksPerRow = Cols / 8;
  static_assert(Rows * kChunksPerRow % Threads == 0, "every thread copies the same number of chunks");
  constexpr bool kEvenSplit = Threads % kChunksPerRow == 0 && Rows % (Threads / kChunksPerRow) == 0;
  static_assert(std::is_same_v<Layout, mma::RowMajor> || (kEvenSplit && Threads / kChunksPerRow % 8 == 0),
                "a swizzled gather copies rows 8 apart");
  if constexpr (!kEvenSplit) {
    gather_tile_async<Rows, Cols, SmemStride, Threads>(tile_a, source_a, row_stride, rows, valid_rows);
    gather_tile_async<Rows, Cols, SmemStride, Threads>(tile_b, source_b, row_stride, rows, valid_rows);
  } else {
    constexpr int kRowsPerPass = Threads / kChunksPerRow;
    const int row = static_cast<int>(threadIdx.x) / kChunksPerRow;
    const int col = (static_cast<int>(threadIdx.x) % kChunksPerRow) * 8;
    const int left = valid_rows - row;  // this thread's rows r + pass * kRowsPerPass < valid_rows: pass * ... < left
    rows += row;
    tile_a += Layout::offset(SmemStride, row, col), tile_b += Layout::offset(SmemStride, row, col);
    source_a += col, source_b += col;
#pragma unroll
    for (int pass = 0; pass < Rows / kRowsPerPass; ++pass) {
      const bool in_bounds = pass * kRowsPerPass < left;
      // An original index is never negative: zero-extended, a 32 x 64-bit multiply (two instructions) rather
      // than a sign-extended 64 x 64-bit one.
      const int index = WholeRows || in_bounds ? rows[pass * kRowsPerPass] : 0;
      const long long offset = static_cast<long long>(static_cast<unsigned>(index) *
                                                      static_cast<unsigned long long>(row_stride));
      mma::cp_async_16(tile_a + pass * kRowsPerPass * SmemStride, source_a + offset, in_bounds);
      mma::cp_async_16(tile_b + pass * kRowsPerPass * SmemStride, source_b + offset, in_bounds);
    }
  }
}

/// Copies Count 32-bit words from[0..valid) into shared `to` (zeros past valid), by cp.async.
template <int Count, int Threads, class Word>
__device__ __forceinline__ void copy_words_async(Word* to, const Word* from, int valid) {
#pragma unroll
  for (int k = 0; k < (Count + Threads - 1) / Threads; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * Threads;
    if (Count % Threads == 0 || i < Count) mma::cp_async_4(to + i, from + (i < valid ? i : 0), i < valid);
  }
}

// ============================================================================================================
// Forward: SCFA Algorithm 1, FA2 Algorithm 1 over the sorted rows.
// ============================================================================================================

template <int HeadDim, int Br, int Bc>
struct ForwardShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = Br / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;
  static constexpr int kNTiles = Bc / 8;
  static constexpr int kDTiles = HeadDim / 8;
  static constexpr int kStride = padded(HeadDim);
  // Q_i, two stages of (K_j, V_j); then the spans of Q_i's rows and two slots of K/V tiles' original indices.
  static constexpr int kTileBytes = (Br + 4 * Bc) * kStride * 2;
  static constexpr int kSmemBytes = kTileBytes + Br * 8 + 2 * Bc * 4;
  static_assert(kRowsPerWarp % 16 == 0 && Bc % 16 == 0 && HeadDim % 16 == 0, "tiles are made of 16 x 16 blocks");
};

/// One thread block per (batch, query head, tile of sorted queries): SCFA Alg. 1 lines 4-16. A tile holds the
/// queries of one bucket (or dropped queries only), so they all see keys from the same first one, spans[0].x,
/// up to the last query's end: the K/V tiles are taken from that first key on (line 8's skip then leaves nothing
/// to search), and the mask is applied per element only where a tile is not seen whole by every query. Dropped
/// queries get O = 0 and LSE = -inf.
template <class T, int HeadDim, int Br, int Bc>
__global__ void __launch_bounds__(128) forward_kernel(const Params p) {
  using Shape = ForwardShape<HeadDim, Br, Bc>;
  static_assert(Br == kRowTile, "a Q block is one tile of sorted queries");
  constexpr int kStride = Shape::kStride;
  constexpr int kMTiles = Shape::kMTiles, kNTiles = Shape::kNTiles, kDTiles = Shape::kDTiles;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);
  T* k_tiles = q_tile + Br * kStride;
  T* v_tiles = k_tiles + 2 * Bc * kStride;
  int2* spans = reinterpret_cast<int2*>(shared_bytes + Shape::kTileBytes);  // of Q_i's Br rows
  int* key_rows = reinterpret_cast<int*>(spans + Br);  // 2 slots of Bc original indices (the next tiles')

  // Thread blocks go out in the order of blockIdx.x: the n-th tile of every head, then the (n + 1)-th.
  const int n = blockIdx.x / p.q_heads, head = blockIdx.x % p.q_heads, batch = blockIdx.y;
  const int kv_heads = p.q_heads / p.group_size, kv_head = head / p.group_size;
  const long long q_flat = static_cast<long long>(batch) * p.q_heads + head;
  const long long k_flat = static_cast<long long>(batch) * kv_heads + kv_head;
  const int2 tile_count = p.queries.tile_count[q_flat];
  if (n >= tile_count.y) return;  // (the grid has room for the most tiles a head can have)
  // The kept tiles from the last (the most keys to visit), then the dropped ones (zeros to write).
  const int tile = n < tile_count.x ? tile_count.x - 1 - n : n;
  const int2 rows = p.queries.tiles[q_flat * p.queries.max_tiles + tile];
  const int row0 = rows.x, tile_rows = rows.y - rows.x;
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  const int warp_row0 = warp * Shape::kRowsPerWarp;
  const int q_count = p.queries.count[q_flat], k_count = p.keys.count[k_flat];
  const int valid = row0 < q_count ? tile_rows : 0;  // kept queries in Q_i (a tile is all kept or all dropped)
  const int* q_order = p.queries.order + q_flat * p.seq_q;
  const int* k_order = p.keys.order + k_flat * p.seq_k;
  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch + head * p.q_head;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head;
  T* o = static_cast<T*>(p.o_out) + batch * p.q_batch + head * p.q_head;
  float* lse = p.lse + q_flat * p.seq_q;

  // K/V tile n holds the sorted keys [key_first + n Bc, key_first + (n + 1) Bc); rows[] their original indices
  // (global or shared memory). Keys past the kept ones read as zeros (and are masked: no span reaches them).
  int key_first = 0, tiles = 0;
  auto load_kv_block = [&](int n, int stage, const int* rows, auto whole_rows) {
    gather_tile_pair_async<Bc, HeadDim, kStride, Shape::kThreads, decltype(whole_rows)::value>(
        k_tiles + stage * Bc * kStride, k, v_tiles + stage * Bc * kStride, v, p.kv_seq, rows,
        k_count - (key_first + n * Bc));
  };
  auto load_key_rows = [&](int n, int slot) {
    const int key0 = key_first + n * Bc;
    copy_words_async<Bc, Shape::kThreads>(key_rows + slot * Bc, k_order + key0, k_count - key0);
  };

  // SCFA Alg. 1 line 5: Q_i through the permutation (rows past the tile read as zeros), and its spans.
  if (valid > 0) {
    // SCFA Alg. 1 line 8: the keys some query of Q_i sees are [spans[0].x, spans[valid - 1].y) (one bucket's,
    // and the spans never decrease); each K/V tile there is seen by the last query at least. Read straight from
    // global memory, so that the first K/V tile is on its way with Q_i rather than after it.
    const int2* tile_spans = p.spans + q_flat * p.seq_q + row0;
    key_first = tile_spans[0].x;
    tiles = cuda::ceil_div(max(0, tile_spans[valid - 1].y - key_first), Bc);
    gather_tile_async<Br, HeadDim, kStride, Shape::kThreads>(q_tile, q, p.q_seq, q_order + row0, valid);
    copy_words_async<2 * Br, Shape::kThreads>(reinterpret_cast<int*>(spans),
                                               reinterpret_cast<const int*>(tile_spans), 2 * valid);
    // The first K/V tile reads its original indices from global memory; every later one from the slot its
    // indices were copied to one tile ahead, so that no gather waits on a global load. The loop's first wait
    // is the one for all of these (and the mask reads the spans only after it).
    if (tiles > 0) load_kv_block(0, 0, k_order + key_first, std::false_type{});
    if (tiles > 1) load_key_rows(1, 1);
    mma::cp_async_commit();
  }

  float acc_o[kMTiles][kDTiles][4] = {};
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_max[mt][0] = row_max[mt][1] = -kInf, row_sum[mt][0] = row_sum[mt][1] = 0.0f;

  // SCFA Alg. 1 lines 7-9: the visible K/V tiles only. Tile n lives in stage n % 2 and its original indices in
  // slot n % 2; the indices are copied two tiles ahead, the tile one ahead.
  for (int n = 0, stage = 0; n < tiles; ++n, stage ^= 1) {
    mma::cp_async_wait<0>();
    __syncthreads();  // K_j, V_j and the next tile's indices have landed; every warp is done with the last tile
    const T* k_tile = k_tiles + stage * Bc * kStride;
    const T* v_tile = v_tiles + stage * Bc * kStride;

    // FA2 Alg. 1 line 8: S_ij = Q_i K_j^T.
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
    // The next tile's copies are issued once S_ij's products are on the tensor cores: their address arithmetic
    // (a row index from shared memory and a 64-bit multiply per row) then runs under the products instead of
    // before them.
    if (n + 1 < tiles) {
      load_kv_block(n + 1, stage ^ 1, key_rows + (stage ^ 1) * Bc, std::true_type{});
      if (n + 2 < tiles) load_key_rows(n + 2, stage);  // slot `stage` was read one tile ago
      mma::cp_async_commit();
    }

    // SCFA Alg. 1 line 10: a key at sorted position c is visible from a query with span [x, y) iff x <= c < y.
    // Every query of Q_i starts at x = key_first (its bucket's first key), at or before each tile's first key,
    // so only c < y is left to test (rows past the tile, spans (0, 0), fail it everywhere). The spans never
    // decrease, so every query sees the whole tile iff the first one ends no earlier than the tile: then no mask.
    const int key0 = key_first + n * Bc;
    if (spans[0].y < key0 + Bc) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int end = spans[warp_row0 + mt * 16 + group + 8 * half].y;  // 0 past the tile's rows
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const int key = key0 + nt * 8 + 2 * t + e % 2;
              if (key >= end) s[mt][nt][e] = -kInf;
            }
        }
    }

    // SCFA Alg. 1 line 11 (FA2 Alg. 1 lines 9-10).
    online_softmax(s, acc_o, row_max, row_sum, p.scale_log2);
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
  mma::cp_async_wait<0>();  // (nothing is left in flight; a guard for changes)

  // SCFA Alg. 1 lines 13-14 and 16: scattered to the rows' original places; dropped rows and rows that saw no
  // key get O = 0 and LSE = -inf.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = mma::group_sum(row_sum[mt][half]);
      const int local = warp_row0 + mt * 16 + group + 8 * half;
      if (local >= tile_rows) continue;  // another tile's row
      const bool kept = valid > 0 && l > 0.0f;
      const float inverse = kept ? 1.0f / l : 0.0f;
      const int row = q_order[row0 + local];
      T* o_row = o + row * p.q_seq;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<std::uint32_t*>(o_row + dt * 8 + 2 * t) =
            mma::pack2<T>(acc_o[mt][dt][2 * half] * inverse, acc_o[mt][dt][2 * half + 1] * inverse);
      if (t == 0) lse[row] = kept ? row_max[mt][half] * p.scale + logf(l) : -kInf;
    }
  }
}

/// Lets `kernel` take `bytes` of dynamic shared memory (above the default 48 KiB), for the current device.
/// Called once per kernel through a function-local static (thread-safe); a program that moves between devices
/// would need it per device.
template <class Kernel>
bool allow_shared_memory(Kernel kernel, int bytes) {
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  return true;
}

template <class T, int HeadDim, int Br, int Bc>
void launch_forward(const Params& p, int batch) {
  using Shape = ForwardShape<HeadDim, Br, Bc>;
  auto kernel = forward_kernel<T, HeadDim, Br, Bc>;
  static const bool configured = allow_shared_memory(kernel, Shape::kSmemBytes);  // once per kernel, not per pass
  (void)configured;
  const dim3 grid(p.queries.max_tiles * p.q_heads, batch);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes>>>(p);
  ATTN_CUDA_CHECK_LAUNCH();
}

// ============================================================================================================
// Backward: SCFA Algorithm 2, FA2 Algorithm 2 over the sorted rows.
// ============================================================================================================

// flash_v2's three warp layouts (common/backward_layouts.cuh): S^T and dP^T 4 warps along the keys x 2 along the
// queries, dV and dK 4 along the keys x 2 along d, dQ warps along the queries x warps along d; P^T and dS^T cross
// between them through shared memory.
//
// Q_i and dO_i, gathered at every step, are Swizzled tiles at d = 64, as in flash_v2's backward: a cp.async into
// padded rows takes 2.6 times the shared-memory wavefronts (flash_v2's README, log step 16). Not at d = 128, where
// the swizzle's address arithmetic made ptxas spill (16 bytes, 10 reloads in the loop), nor at d = 32 and 96,
// whose rows are not 128-byte multiples. K_j and V_j, copied once per thread block, keep their padded rows.
//
// The gathered (Q_i, dO_i, L_i, D_i, spans) go through three stages, as flash_v2's backward at d = 64 to 128 (its
// log steps 17, 24 and 25): a step's copy is issued after the barrier that follows the last reads of its stage
// (two steps back), so a step opens with its products, no barrier; its first barrier comes after the
// exponentials, with P^T and dS^T held in registers until then and stored by stmatrix after it. The original
// indices that a gather reads go one step ahead of it, and dQ's scatter reads them in the step itself: four slots.
//
// Where in the step the next copies go out (their index loads and address arithmetic take issue slots from the
// products around them) was measured, not derived (sparse/README.md's log): with nothing dropped at N = 16384 the
// backward took 3.9% less time than with two stages at d = 64 with the copies after the dV_j, dK_j products (1-2%
// with them before), 5.3% at d = 128 after the dQ_i products (2-3% before dV_j, dK_j), 6.8% at d = 96 before dV_j,
// dK_j (2% after them). d = 32 takes d = 96's place without a comparison of its own (7.5% less).
enum class CopiesAt { before_dv_dk, after_dv_dk, after_dq };

template <int HeadDim, int Br, int Bc>
struct BackwardShape : flash::BackwardLayouts<HeadDim, Br, Bc> {
  using Layouts = flash::BackwardLayouts<HeadDim, Br, Bc>;
  static constexpr bool kSwizzleQ = HeadDim == 64;
  using QLayout = std::conditional_t<kSwizzleQ, mma::Swizzled, mma::RowMajor>;
  static constexpr int kQStride = kSwizzleQ ? HeadDim : Layouts::kStride;  // Q_i's and dO_i's rows
  static constexpr int kStages = 3, kIndexSlots = 4;
  static constexpr CopiesAt kCopiesAt =
      HeadDim == 64 ? CopiesAt::after_dv_dk : HeadDim == 128 ? CopiesAt::after_dq : CopiesAt::before_dv_dk;
  // K_j, V_j; kStages of (Q_i, dO_i); P_ij^T and dS_ij^T; then kStages of (L_i, D_i, spans: 16 bytes a row) and
  // kIndexSlots of original indices.
  static constexpr int kSmemBytes =
      (2 * Bc * Layouts::kStride + kStages * 2 * Br * kQStride + 2 * Bc * Layouts::kPStride) * 2 +
      kStages * 16 * Br + kIndexSlots * Br * 4;
  static_assert(kSmemBytes <= 227 * 1024, "one thread block's shared memory on sm_90");
};

/// One thread block per (batch, KV head, tile of sorted keys), SCFA Alg. 2 lines 4-14: dK_j, dV_j in registers
/// over the Q blocks (of every query head of the group) that see some key of the tile; dQ by fp32 atomics into
/// dq_accum at the queries' original rows. A tile holds the keys of one bucket (or dropped keys only, which get
/// dK = dV = 0), and its Q blocks start at the first query that sees it.
template <class T, int HeadDim, int Br, int Bc>
__global__ void __launch_bounds__(BackwardShape<HeadDim, Br, Bc>::kThreads) backward_kernel(const Params p) {
  using Shape = BackwardShape<HeadDim, Br, Bc>;
  static_assert(Bc == kRowTile, "a K block is one tile of sorted keys");
  using QLayout = typename Shape::QLayout;
  constexpr int kStride = Shape::kStride, kPStride = Shape::kPStride, kQStride = Shape::kQStride;
  constexpr int kSMTiles = Shape::kSMTiles, kSNTiles = Shape::kSNTiles;
  constexpr int kKvMTiles = Shape::kKvMTiles, kKvDTiles = Shape::kKvDTiles;
  constexpr int kDqMTiles = Shape::kDqMTiles, kDqDTiles = Shape::kDqDTiles;
  constexpr int kStages = Shape::kStages, kSlots = Shape::kIndexSlots;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // flash_v2's step tiles (L_i in log2 units here), then kStages of the spans and kSlots of original indices.
  const flash::StepTiles<T, Shape, Br, Bc, kQStride, kStages> tiles(shared_bytes);
  T *const k_tile = tiles.k, *const v_tile = tiles.v, *const q_tiles = tiles.q, *const do_tiles = tiles.d_o;
  T *const p_tile = tiles.p, *const ds_tile = tiles.ds;
  float *const lse_tiles = tiles.lse, *const delta_tiles = tiles.delta;
  int2* span_tiles = reinterpret_cast<int2*>(tiles.end());  // spans: kStages of Br
  int* query_rows = reinterpret_cast<int*>(span_tiles + kStages * Br);     // kSlots of Br original indices

  // Thread blocks go out in the order of blockIdx.x: the n-th tile of every KV head, then the (n + 1)-th; the
  // kept tiles in their order (the most Q blocks to visit first), then the dropped ones (zeros to write).
  const int kv_heads = p.q_heads / p.group_size;
  const int n = blockIdx.x / kv_heads, kv_head = blockIdx.x % kv_heads, batch = blockIdx.y;
  const long long k_flat = static_cast<long long>(batch) * kv_heads + kv_head;
  if (n >= p.keys.tile_count[k_flat].y) return;  // (the grid has room for the most tiles a head can have)
  const int2 keys = p.keys.tiles[k_flat * p.keys.max_tiles + n];
  const int key0 = keys.x, key_end = keys.y;  // this block's sorted key positions
  const int warp = threadIdx.x / 32, group = mma::lane_group(), t = mma::lane_in_group();
  // This warp's share in each layout (see BackwardShape).
  const int s_key0 = (warp % 4) * Shape::kSKeys, s_query0 = (warp / 4) * Shape::kSQueries;
  const int kv_key0 = (warp % 4) * Shape::kKvKeys, kv_column0 = (warp / 4) * Shape::kKvColumns;
  const int dq_row0 = (warp % Shape::kDqRowWarps) * Shape::kDqRows;
  const int dq_column0 = (warp / Shape::kDqRowWarps) * Shape::kDqColumns;
  const int k_count = p.keys.count[k_flat];
  const int valid_keys = key0 < k_count ? key_end - key0 : 0;  // a tile is all kept or all dropped
  const int* k_order = p.keys.order + k_flat * p.seq_k;
  const T* k = static_cast<const T*>(p.k) + batch * p.kv_batch + kv_head * p.kv_head;
  const T* v = static_cast<const T*>(p.v) + batch * p.kv_batch + kv_head * p.kv_head;
  auto flat_of = [&](int head_in_group) {
    return static_cast<long long>(batch) * p.q_heads + kv_head * p.group_size + head_in_group;
  };

  // SCFA Alg. 2 line 7: the (query head of the group, Q block) steps to visit. The queries of a head that see
  // some key of K_j are one run of sorted positions: from the first whose span ends after key0 to the last
  // whose span starts before key_end (the spans never decrease); the steps are that run cut into Br rows.
  struct Step {
    int head_in_group, row0, end, q_count;  // this Q block: sorted rows row0 .. row0 + Br - 1 of the run .. end
  };
  // Each head's run was found before the pass (tile_run): one load here, not a search.
  const int2* runs = p.runs + (k_flat * p.keys.max_tiles + n) * p.group_size;
  auto first_step_from = [&](int head_in_group) {  // of this head, or the next head with any
    for (; head_in_group < p.group_size; ++head_in_group) {
      const int2 run = runs[head_in_group];
      if (run.x < run.y) return Step{head_in_group, run.x, run.y, p.queries.count[flat_of(head_in_group)]};
    }
    return Step{p.group_size, 0, 0, 0};
  };
  auto next_step = [&](Step step) {
    if (step.head_in_group >= p.group_size) return step;
    step.row0 += Br;
    if (step.row0 < step.end) return step;
    return first_step_from(step.head_in_group + 1);
  };
  auto load_query_rows = [&](const Step& at, int slot) {
    const int row0 = at.row0;
    copy_words_async<Br, Shape::kThreads>(query_rows + slot * Br,
                                          p.queries.order + flat_of(at.head_in_group) * p.seq_q + row0,
                                          at.q_count - row0);
  };
  // Q_i, dO_i, L_i, D_i through the permutation, rows[] their original indices (global memory, or a shared slot
  // with zeros past the kept queries: whole_rows). Q_i and dO_i by one gather: each row's place computed once.
  auto load_q_block = [&](const Step& at, int stage, const int* rows, auto whole_rows) {
    const long long q_flat = flat_of(at.head_in_group);
    const int row0 = at.row0, valid = at.q_count - row0;
    const long long offset = batch * p.q_batch + (kv_head * p.group_size + at.head_in_group) * p.q_head;
    gather_tile_pair_async<Br, HeadDim, kQStride, Shape::kThreads, decltype(whole_rows)::value, QLayout>(
        q_tiles + stage * Br * kQStride, static_cast<const T*>(p.q) + offset, do_tiles + stage * Br * kQStride,
        static_cast<const T*>(p.d_o) + offset, p.q_seq, rows, valid);
    copy_words_async<2 * Br, Shape::kThreads>(reinterpret_cast<int*>(span_tiles + stage * Br),
                                               reinterpret_cast<const int*>(p.spans + q_flat * p.seq_q + row0),
                                               2 * valid);
    for (int i = threadIdx.x; i < Br; i += Shape::kThreads) {
      const long long at_row = q_flat * p.seq_q + (i < valid ? rows[i] : 0);
      mma::cp_async_4(lse_tiles + stage * Br + i, p.lse_log2 + at_row, i < valid);
      mma::cp_async_4(delta_tiles + stage * Br + i, p.delta + at_row, i < valid);
    }
  };

  // SCFA Alg. 2 line 5 (keys past the tile read as zeros), and the first two steps' Q blocks: all through
  // indices in global memory; every later Q block through indices copied to shared memory one step before its
  // gather, so that no gather waits on a global load. K_j and V_j go first: they need no search, and are on their
  // way during it. Steps n, n + 1, n + 2 and n + 3 are `step`, `ahead[0]`, `ahead[1]` and `ahead[2]`.
  gather_tile_pair_async<Bc, HeadDim, kStride, Shape::kThreads, false>(k_tile, k, v_tile, v, p.kv_seq,
                                                                      k_order + key0, valid_keys);
  Step step = valid_keys > 0 ? first_step_from(0) : Step{p.group_size, 0, 0, 0};
  Step ahead[3];
  ahead[0] = next_step(step);
  ahead[1] = next_step(ahead[0]);
  auto visits = [&](const Step& at) { return at.head_in_group < p.group_size; };
  auto global_rows = [&](const Step& at) { return p.queries.order + flat_of(at.head_in_group) * p.seq_q + at.row0; };
  if (visits(step)) {
    load_q_block(step, 0, global_rows(step), std::false_type{});
    load_query_rows(step, 0);  // for the scatter of dQ
  }
  mma::cp_async_commit();
  if (visits(ahead[0])) {  // step 1's tiles come in a group of their own, waited for in step 0
    load_q_block(ahead[0], 1, global_rows(ahead[0]), std::false_type{});
    load_query_rows(ahead[0], 1);
  }
  if (visits(ahead[1])) load_query_rows(ahead[1], 2);  // for step 2's gather, issued in step 0
  mma::cp_async_commit();
  mma::cp_async_wait<1>();
  __syncthreads();  // K_j, V_j and step 0's tiles visible to all
  float acc_dv_dk[2][kKvMTiles][kKvDTiles][4] = {};
  auto& acc_dv = acc_dv_dk[0];
  auto& acc_dk = acc_dv_dk[1];

  // SCFA Alg. 2 lines 6-7: the visible Q blocks of each query head of the group. Step number n lives in stage
  // n % kStages and its original indices in slot n % kSlots.
  for (int stage = 0, slot = 0; visits(step);
       stage = stage == kStages - 1 ? 0 : stage + 1, slot = slot == kSlots - 1 ? 0 : slot + 1) {
    ahead[2] = next_step(ahead[1]);  // (its search, where it has one, is the whole block's)
    const T* q_tile = q_tiles + stage * Br * kQStride;
    const T* do_tile = do_tiles + stage * Br * kQStride;
    const float* lse_log2 = lse_tiles + stage * Br;
    const float* delta = delta_tiles + stage * Br;
    const int2* spans = span_tiles + stage * Br;
    const int* q_index = query_rows + slot * Br;
    const int row0 = step.row0;

    // SCFA Alg. 2 lines 8-9 (FA2 Alg. 2 lines 10 and 13 together): S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T,
    // this warp's keys by its queries (the transpose keeps keys in rows, the A operand of dV_j and dK_j).
    float s_dp[2][kSMTiles][kSNTiles][4] = {};
    auto& s = s_dp[0];
    auto& dp = s_dp[1];
    mma::warp_mma<mma::Stored::by_rows, mma::Stored::by_rows, HeadDim, QLayout>(
        s_dp, {k_tile, v_tile}, kStride, s_key0, {q_tile, do_tile}, kQStride, s_query0);

    // FA2 Alg. 2 line 11 with SCFA Alg. 1 line 10's mask: P_ij^T = exp(scale S_ij^T - L_i), 0 where key
    // position c is outside the query's span [x, y) or past this tile (the zeros past key_end, and other tiles'
    // keys, are another block's; the spans are (0, 0) past the kept queries, and L_i = +inf for a query that
    // sees no key). Line 14: dS_ij^T = P_ij^T * (dP_ij^T - D_i). Both rounded to 16 bits into registers, in
    // store_accumulator_block's order, for lines 12, 15 and 16. Written twice by the compiler, with and without
    // the mask: where every query of Q_i sees all of K_j (most blocks with nothing dropped) the code is
    // straight-line, with no comparison per score.
    std::uint32_t p_ds[2][kSMTiles][kSNTiles / 2][4];  // [P^T, dS^T][mt][16 x 16 block np]: its column pairs
    auto probabilities = [&](auto with_mask) {
      constexpr bool kMask = decltype(with_mask)::value;
#pragma unroll
      for (int mt = 0; mt < kSMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSNTiles; ++nt) {
          const int column = s_query0 + nt * 8 + 2 * t;  // query, inside the block (and column + 1)
          float prob[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            prob[e] = exp2_fast(s[mt][nt][e] * p.scale_log2 - lse_log2[column + e % 2]);
            if constexpr (kMask) {
              const int key = key0 + s_key0 + mt * 16 + group + 8 * (e / 2);
              const int2 span = spans[column + e % 2];
              if (key < span.x || key >= span.y || key >= key_end) prob[e] = 0.0f;
            }
            ds[e] = prob[e] * (dp[mt][nt][e] - delta[column + e % 2]);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            p_ds[0][mt][nt / 2][2 * (nt % 2) + half] = mma::pack2<T>(prob[2 * half], prob[2 * half + 1]);
            p_ds[1][mt][nt / 2][2 * (nt % 2) + half] = mma::pack2<T>(ds[2 * half], ds[2 * half + 1]);
          }
        }
    };
    // No mask where every query of Q_i sees all of K_j: the spans never decrease, so the last query's x and the
    // first query's y bound them all.
    const bool needs_mask = step.q_count - row0 < Br || spans[Br - 1].x > key0 || spans[0].y < key0 + Bc ||
                            key_end < key0 + Bc;
    if (needs_mask)
      probabilities(std::true_type{});
    else
      probabilities(std::false_type{});

    // The step's first barrier, after the exponentials: every warp is done with step n - 1, its reads of the P^T
    // and dS^T tiles (overwritten below), of its stage (step n + 2's, copied below) and of its indices' slot
    // (step n + 3's). Then one stmatrix per 16 x 16 block (flash_v2's log step 25).
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < kSMTiles; ++mt)
#pragma unroll
      for (int np = 0; np < kSNTiles / 2; ++np) {
        mma::store_accumulator_block(p_tile, kPStride, s_key0 + mt * 16, s_query0 + np * 16, p_ds[0][mt][np]);
        mma::store_accumulator_block(ds_tile, kPStride, s_key0 + mt * 16, s_query0 + np * 16, p_ds[1][mt][np]);
      }
    mma::cp_async_wait<0>();  // step n + 1's tiles and step n + 2's indices, visible to all after the barrier
    __syncthreads();          // P^T and dS^T complete

    // Step n + 2's copies, into the stage that step n - 1 read, through the indices that have just landed; step
    // n + 3's indices into the slot that step n - 1's scatter read. They land while this step and the next compute.
    // Issued among the products below, at the place Shape::kCopiesAt names.
    auto issue_copies = [&] {
      const int slot_2 = slot + 2 < kSlots ? slot + 2 : slot + 2 - kSlots, slot_3 = slot == 0 ? kSlots - 1 : slot - 1;
      if (visits(ahead[1])) {
        load_q_block(ahead[1], stage == 0 ? kStages - 1 : stage - 1, query_rows + slot_2 * Br, std::true_type{});
        if (visits(ahead[2])) load_query_rows(ahead[2], slot_3);
        mma::cp_async_commit();
      }
    };
    if constexpr (Shape::kCopiesAt == CopiesAt::before_dv_dk) issue_copies();

    // SCFA Alg. 2 line 11 (FA2 Alg. 2 lines 12 and 16): dV_j += P_ij^T dO_i and dK_j += dS_ij^T Q_i, this warp's
    // keys by its columns.
    mma::warp_mma<mma::Stored::by_rows, mma::Stored::by_depth, Br, QLayout>(
        acc_dv_dk, {p_tile, ds_tile}, kPStride, kv_key0, {do_tile, q_tile}, kQStride, kv_column0);
    if constexpr (Shape::kCopiesAt == CopiesAt::after_dv_dk) issue_copies();

    // SCFA Alg. 2 lines 10 and 15 (FA2 Alg. 2 line 15): dQ_i += dS_ij K_j, this warp's queries by its columns, by
    // fp32 atomics straight at each query's original row.
    static_assert(kDqDTiles % 2 == 0 && Shape::kDqColumns % 16 == 0, "whole 16-column groups per warp");
    float dq[1][kDqMTiles][kDqDTiles][4] = {};
    mma::warp_mma<mma::Stored::by_depth, mma::Stored::by_depth, Bc>(dq, {ds_tile}, kPStride, dq_row0, {k_tile},
                                                                    kStride, dq_column0);
    if constexpr (Shape::kCopiesAt == CopiesAt::after_dq) issue_copies();
    float* dq_rows = p.dq_accum + flat_of(step.head_in_group) * p.seq_q * HeadDim;
#pragma unroll
    for (int mt = 0; mt < kDqMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int local = dq_row0 + mt * 16 + group + 8 * half;
        if (row0 + local >= step.q_count) continue;  // past the kept queries
        // A lane's values of two neighbouring 8-column tiles are adjacent there (mma::DqAccumulatorRow): one
        // 16-byte atomic each.
        float* out = dq_rows + static_cast<long long>(q_index[local]) * HeadDim +
                     mma::DqAccumulatorRow::position(dq_column0 + 2 * t);
#pragma unroll
        for (int dt = 0; dt < kDqDTiles; dt += 2)
          mma::atomic_add_quad(out + dt * 8, dq[0][mt][dt][2 * half], dq[0][mt][dt][2 * half + 1],
                               dq[0][mt][dt + 1][2 * half], dq[0][mt][dt + 1][2 * half + 1]);
      }
    // (No barrier here: the next step's first barrier keeps its P^T / dS^T stores, and its copies into this
    // step's stage and slot, behind every warp's reads.)
    step = ahead[0];
    ahead[0] = ahead[1];
    ahead[1] = ahead[2];
  }
  mma::cp_async_wait<0>();  // (K_j, V_j are still in flight when no Q tile was visible)

  // SCFA Alg. 2 lines 13 and 15: dK_j (times tau) and dV_j at the keys' original rows; dropped keys get zeros.
  T* dk = static_cast<T*>(p.dk) + batch * p.kv_batch + kv_head * p.kv_head;
  T* dv = static_cast<T*>(p.dv) + batch * p.kv_batch + kv_head * p.kv_head;
  const float keep = valid_keys > 0 ? 1.0f : 0.0f;
  // This thread's keys' original indices, all loaded before the first store (a store through a 32-bit pointer
  // could alias k_order, so loads among the stores would each wait for the last).
  int key_rows[kKvMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kKvMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int local = kv_key0 + mt * 16 + group + 8 * half;
      key_rows[mt][half] = local < key_end - key0 ? k_order[key0 + local] : 0;
    }
#pragma unroll
  for (int mt = 0; mt < kKvMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int local = kv_key0 + mt * 16 + group + 8 * half;
      if (local >= key_end - key0) continue;  // another tile's key
      const long long row = static_cast<long long>(key_rows[mt][half]) * p.kv_seq;
#pragma unroll
      for (int dt = 0; dt < kKvDTiles; ++dt) {
        const long long at = row + kv_column0 + dt * 8 + 2 * t;
        *reinterpret_cast<std::uint32_t*>(dk + at) =
            mma::pack2<T>(keep * acc_dk[mt][dt][2 * half] * p.scale, keep * acc_dk[mt][dt][2 * half + 1] * p.scale);
        *reinterpret_cast<std::uint32_t*>(dv + at) =
            mma::pack2<T>(keep * acc_dv[mt][dt][2 * half], keep * acc_dv[mt][dt][2 * half + 1]);
      }
    }
}


// ============================================================================================================
// Host side: validation, the device workspace, launches.
// ============================================================================================================

const char* const kWho = "sparse/gpu";
/// The backward's blocks: K blocks of kRowTile sorted keys; Q blocks of 128 sorted queries where D <= 64 (S^T and
/// dP^T of 32 keys x 64 queries per warp still fit the registers next to dK_j and dV_j: twice the work per barrier
/// and per step's fixed costs, flash_v2's choice there), 64 above.
constexpr int kBackwardBc = kRowTile;
template <int D>
constexpr int kBackwardBr = D <= 64 ? 128 : 64;

int forward_block_cols(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t value = options.get("block_cols", p.head_dim <= 64 ? 128 : 64);
  if (value == 64 || (value == 128 && p.head_dim <= 64)) return static_cast<int>(value);
  throw std::invalid_argument("block_cols: " + std::to_string(value) + " is not supported by " + kWho +
                              " (64, or 128 when head_dim <= 64)");
}

/// Every rule, before any work: the problem and tensors (gpu_caps), the options, the caller's lists.
Settings validate_gpu_call(const AttentionProblem& p, const AttentionTensors& t, const StageOptions& options,
                           const KeepLists* lists, bool backward) {
  validate_call(p, t, gpu_caps(), kWho, backward);
  const Settings settings = read_settings(options);
  forward_block_cols(p, options);
  if (lists != nullptr) validate_keep_lists(p, *lists);
  return settings;
}

/// The kept buckets of a call: QK-sparse keeps rows in one bucket (0), hash-sparse in nb.
int kept_buckets(const Settings& s, const KeepLists* lists) {
  return lists == nullptr && s.mode == Mode::hash ? s.buckets : 1;
}

/// The most tiles of kRowTile sorted rows one head can have: each group of rows (a kept bucket, or the dropped
/// rows) adds at most one partial tile.
/// (The kernels' grids are max_tiles x heads thread blocks wide: below 2^31 for any tensor that fits in memory.)
std::int64_t max_tiles(std::int64_t seq, int buckets) { return (seq + kRowTile - 1) / kRowTile + buckets + 1; }

/// Chunks of kChunkRows rows per head.
std::int64_t chunks_of(std::int64_t seq) { return (seq + kChunkRows - 1) / kChunkRows; }

/// One side's sort: per row its bucket, original index and sorted bucket; per head the chunks' counts per bucket
/// (buckets + 1 each), the kept count, the bucket boundaries (buckets + 2), the tiles (int2 each) and their count.
std::size_t side_bytes(std::int64_t heads, std::int64_t seq, int buckets) {
  return static_cast<std::size_t>(heads) *
         ((3 * seq + (buckets + 1) * chunks_of(seq) + 1 + (buckets + 2) + 2 * max_tiles(seq, buckets) + 1) *
          sizeof(int));
}

/// The device workspace of one pass: both sides' buckets, permutations and counts, the queries' spans (O(N)
/// per head), the projection R, and in the backward dQ in fp32 plus L_i and D_i and the K tiles' runs of queries.
std::size_t workspace_bytes(const AttentionProblem& p, const Settings& s, bool backward) {
  const int buckets = kept_buckets(s, nullptr);
  std::size_t bytes = side_bytes(p.batch * p.q_heads, p.seq_q, buckets) +
                      side_bytes(p.batch * p.kv_heads, p.seq_k, buckets) +
                      static_cast<std::size_t>(p.lse_elements()) * sizeof(int2);
  if (s.mode == Mode::hash) bytes += static_cast<std::size_t>(p.head_dim) * (s.buckets / 2) * sizeof(float);
  if (backward)
    bytes += static_cast<std::size_t>(p.q_elements()) * sizeof(float) +
             2 * static_cast<std::size_t>(p.lse_elements()) * sizeof(float) +
             static_cast<std::size_t>(p.batch * p.q_heads * max_tiles(p.seq_k, buckets)) * sizeof(int2);
  else
    bytes += 2 * sizeof(unsigned long long);  // the forward's statistics for the counters
  return bytes;
}

/// One side's workspace, filled by classify_side and sort_sides.
struct SideBuffers {
  DeviceBuffer<int> row_bucket, chunk_counts, order, bucket, count, first;
  DeviceBuffer<int2> tiles;
  DeviceBuffer<int2> tile_count;
  DeviceBuffer<std::int64_t> list_offsets;
  DeviceBuffer<std::int32_t> list_indices;
  int heads = 0, seq = 0, chunks = 0, buckets = 1, max_tiles = 0;

  SideBuffers(std::int64_t heads_, std::int64_t seq_, int buckets_)
      : row_bucket(heads_ * seq_), chunk_counts(heads_ * (buckets_ + 1) * chunks_of(seq_)), order(heads_ * seq_),
        bucket(heads_ * seq_), count(heads_), first(heads_ * (buckets_ + 2)),
        tiles(heads_ * sparse::max_tiles(seq_, buckets_)), tile_count(heads_), heads(static_cast<int>(heads_)),
        seq(static_cast<int>(seq_)), chunks(static_cast<int>(chunks_of(seq_))), buckets(buckets_),
        max_tiles(static_cast<int>(sparse::max_tiles(seq_, buckets_))) {}

  SortedRows view() const {
    return {order.data(),      bucket.data(), count.data(), first.data(),        tiles.data(),
            tile_count.data(), buckets,       max_tiles,    chunk_counts.data(), chunks,
            row_bucket.data()};
  }
  SortSide sort_side() {
    return {row_bucket.data(), chunk_counts.data(), seq,          heads,        chunks,           order.data(),
            bucket.data(),     count.data(),        first.data(), tiles.data(), tile_count.data(), max_tiles};
  }
};

/// The caller's lists of one side uploaded and marked (SCFA Alg. 1 line 1 with the caller's masks).
void mark_listed_side(SideBuffers& side, const std::vector<std::int64_t>& offsets,
                      const std::vector<std::int32_t>& indices) {
  side.list_offsets = DeviceBuffer<std::int64_t>(offsets.size());
  side.list_indices = DeviceBuffer<std::int32_t>(indices.size());
  ATTN_CUDA_CHECK(cudaMemcpyAsync(side.list_offsets.data(), offsets.data(), side.list_offsets.bytes(),
                                  cudaMemcpyHostToDevice));
  if (!indices.empty())
    ATTN_CUDA_CHECK(cudaMemcpyAsync(side.list_indices.data(), indices.data(), side.list_indices.bytes(),
                                    cudaMemcpyHostToDevice));
  mark_listed_rows_kernel<<<side.heads, 256>>>(side.list_offsets.data(), side.list_indices.data(), side.seq,
                                               side.chunks, side.row_bucket.data(), side.chunk_counts.data());
  ATTN_CUDA_CHECK_LAUNCH();
}

/// One side's part of classify_rows_kernel's arguments.
ClassifySide classify_side(SideBuffers& side, const void* x, const Strides& strides, int batch, bool queries,
                           int drop_permille) {
  ClassifySide c;
  c.x = x;
  c.strides = strides;
  c.heads = side.heads / batch;
  c.seq = side.seq;
  c.chunks = side.chunks;
  c.queries = queries;
  c.drop_permille = drop_permille;
  c.row_bucket = side.row_bucket.data();
  c.chunk_counts = side.chunk_counts.data();
  return c;
}

/// R as classify_rows_kernel's argument (Half = buckets / 2 > 0), computed on the host (projection_entry is exact,
/// so the same R as projection_kernel's); kept for the thread's next pass with the same seed (R depends on
/// nothing else).
template <int D, int Half>
const FixedProjection<D, Half>& fixed_projection(std::uint64_t seed) {
  thread_local FixedProjection<D, Half> r{};
  thread_local std::uint64_t made_for = 0;
  thread_local bool made = false;
  if (!made || made_for != seed) {
    for (int d = 0; d < D; ++d)
      for (int c = 0; c < Half; ++c) r.r[d * Half + c] = projection_entry(seed, d, c);
    made_for = seed;
    made = true;
  }
  return r;
}

/// The Half of classify_rows_kernel's FixedProjection: kKeepDraws for QK-sparse; for hash-sparse buckets / 2 where
/// that is 1, 2, 4 or 8 (up to kMaxFixedHalf), else 0 (R in memory, `Classify::projection`; none for one bucket).
int argument_half(Mode mode, int buckets) {
  static_assert(kMaxFixedHalf == 8, "the cases below");
  if (mode == Mode::qk) return kKeepDraws;
  const int half = buckets / 2;
  return half == 1 || half == 2 || half == 4 || half == 8 ? half : 0;
}

/// Both sides' classify_rows_kernel, with R an argument or in memory (argument_half).
template <class T, int D>
void launch_classify(const Classify& c, const ClassifySide& queries, const ClassifySide& keys, int batch) {
  const dim3 grid(queries.heads * queries.chunks + keys.heads * keys.chunks, batch);
  const int counts_bytes = (c.buckets + 1) * static_cast<int>(sizeof(int));
  auto launch = [&](auto half) {
    constexpr int Half = decltype(half)::value;
    if constexpr (Half > 0) {
      auto kernel = classify_rows_kernel<T, D, Half>;
      const int smem = classify_rows_bytes<T, D, Half>() + counts_bytes;  // the same on every pass
      static const bool configured = allow_shared_memory(kernel, smem);  // once per kernel (above 48 KiB at d >= 96)
      (void)configured;
      kernel<<<grid, kClassifyThreads, smem>>>(c, queries, keys, fixed_projection<D, Half>(c.seed));
    } else {
      const int smem = (c.staged ? c.projection_floats * static_cast<int>(sizeof(float)) : 0) + counts_bytes;
      classify_rows_kernel<T, D, Half><<<grid, kClassifyThreads, smem>>>(c, queries, keys, FixedProjection<D, Half>{});
    }
    ATTN_CUDA_CHECK_LAUNCH();
  };
  switch (argument_half(c.mode, c.buckets)) {
    case 1: launch(std::integral_constant<int, 1>{}); return;
    case 2: launch(std::integral_constant<int, 2>{}); return;
    case 4: launch(std::integral_constant<int, 4>{}); return;
    case 8: launch(std::integral_constant<int, 8>{}); return;
    case kKeepDraws: launch(std::integral_constant<int, kKeepDraws>{}); return;
    default: launch(std::integral_constant<int, 0>{}); return;
  }
}

/// Both sides' stable sorts (SCFA Alg. 1 lines 2-3), after the chunks' counts (classify_rows_kernel or
/// mark_listed_rows_kernel): the counts scanned into positions per head, then every chunk's rows placed, each
/// step one launch for both sides; `statistics` (or nullptr) zeroed by the scan.
void sort_sides(SideBuffers& queries, SideBuffers& keys, int buckets, unsigned long long* statistics) {
  const int scan_smem = (2 * buckets + 2) * static_cast<int>(sizeof(int));
  scan_chunks_kernel<<<queries.heads + keys.heads, kScanThreads, scan_smem>>>(queries.sort_side(), keys.sort_side(),
                                                                             buckets, statistics);
  ATTN_CUDA_CHECK_LAUNCH();
  const int place_smem = (kChunkWarps + 1) * (buckets + 1) * static_cast<int>(sizeof(int));
  place_rows_kernel<<<queries.heads * queries.chunks + keys.heads * keys.chunks, kChunkRows, place_smem>>>(
      queries.sort_side(), keys.sort_side(), buckets);
  ATTN_CUDA_CHECK_LAUNCH();
}

/// Both sides' sorted rows for one pass; the buffers keep them alive.
struct Prepared {
  SideBuffers queries, keys;
  DeviceBuffer<int2> spans;
  DeviceBuffer<float> projection;

  Prepared(const AttentionProblem& p, int buckets)
      : queries(p.batch * p.q_heads, p.seq_q, buckets), keys(p.batch * p.kv_heads, p.seq_k, buckets),
        spans(static_cast<std::size_t>(p.lse_elements())) {}
};

}  // namespace

/// What a plan was made for, and its buffers (a Prepared): a SavedPlan's content.
struct SavedPlan::State {
  AttentionProblem problem;
  Settings settings;
  bool with_lists = false;
  KeepLists lists;  // a copy, when with_lists
  DType dtype = DType::bf16;
  const void* q = nullptr;
  const void* k = nullptr;
  Strides q_strides, kv_strides;
  std::shared_ptr<void> buffers;
};

SavedPlan::SavedPlan() = default;
SavedPlan::~SavedPlan() = default;
SavedPlan::SavedPlan(SavedPlan&&) noexcept = default;
SavedPlan& SavedPlan::operator=(SavedPlan&&) noexcept = default;
void SavedPlan::reset() { state_.reset(); }
void SavedPlan::set(std::unique_ptr<State> state) { state_ = std::move(state); }

namespace {

std::unique_ptr<SavedPlan::State> saved_plan_state(const AttentionProblem& p, const AttentionTensors& t,
                                                   const Settings& settings, const KeepLists* lists,
                                                   std::shared_ptr<Prepared> prepared) {
  auto state = std::make_unique<SavedPlan::State>();
  state->problem = p;
  state->settings = settings;
  state->with_lists = lists != nullptr;
  if (lists != nullptr) state->lists = *lists;
  state->dtype = t.dtype;
  state->q = t.q;
  state->k = t.k;
  state->q_strides = t.q_strides;
  state->kv_strides = t.kv_strides;
  state->buffers = std::move(prepared);
  return state;
}

bool same_strides(const Strides& a, const Strides& b) { return a.batch == b.batch && a.head == b.head && a.seq == b.seq; }

/// Refuses (std::invalid_argument naming "plan") a plan the backward cannot use: empty, or made for another
/// problem, other settings or index lists, or other Q and K tensors than the backward's.
void check_saved_plan(const SavedPlan& plan, const AttentionProblem& p, const AttentionTensors& t,
                      const Settings& s, const KeepLists* lists) {
  auto refuse = [](const std::string& why) {
    throw std::invalid_argument(std::string("plan: ") + why + " (" + kWho +
                                "'s backward takes only the plan of the forward of the same call)");
  };
  if (plan.empty()) refuse("empty: no forward filled it");
  const SavedPlan::State& made = *plan.state();
  const AttentionProblem& q = made.problem;
  if (q.batch != p.batch || q.q_heads != p.q_heads || q.kv_heads != p.kv_heads || q.seq_q != p.seq_q ||
      q.seq_k != p.seq_k || q.head_dim != p.head_dim || q.causal != p.causal || q.scale != p.scale)
    refuse("made for another problem, " + q.describe() + ", not " + p.describe());
  const Settings& m = made.settings;
  if (m.mode != s.mode || m.drop_q_permille != s.drop_q_permille || m.drop_k_permille != s.drop_k_permille ||
      m.buckets != s.buckets || m.seed != s.seed)
    refuse("made with other options (mode, drop_q_permille, drop_k_permille, buckets or seed)");
  if (made.with_lists != (lists != nullptr) ||
      (lists != nullptr &&
       (made.lists.query_offsets != lists->query_offsets || made.lists.query_indices != lists->query_indices ||
        made.lists.key_offsets != lists->key_offsets || made.lists.key_indices != lists->key_indices)))
    refuse("made with other index lists");
  if (made.dtype != t.dtype || made.q != t.q || made.k != t.k || !same_strides(made.q_strides, t.q_strides) ||
      !same_strides(made.kv_strides, t.kv_strides))
    refuse("made from other Q or K tensors (dtype, pointers or strides)");
}

/// SCFA Alg. 1 lines 1-3 (Alg. 2 line 1) on the device: masks or buckets, the sorts, the queries' spans (and,
/// given the forward's `statistics` and its `block_cols`, both counters zeroed by the sort and counted by the
/// spans: the visible pairs into statistics[0], the tiles the forward will visit into statistics[1]).
template <class T, int D>
void prepare(Prepared& prepared, Params& params, const AttentionProblem& p, const AttentionTensors& t,
             const Settings& s, const KeepLists* lists, unsigned long long* statistics, int block_cols = 0) {
  Classify classify;
  classify.mode = lists != nullptr ? Mode::qk : s.mode;
  classify.buckets = kept_buckets(s, lists);
  classify.seed = s.seed;
  if (classify.mode == Mode::hash && classify.buckets > 1 && argument_half(classify.mode, classify.buckets) == 0) {
    const int half = classify.buckets / 2;
    prepared.projection = DeviceBuffer<float>(static_cast<std::size_t>(D) * half);
    projection_kernel<<<cuda::ceil_div(D * half, 256), 256>>>(prepared.projection.data(), s.seed, D, half);
    ATTN_CUDA_CHECK_LAUNCH();
    classify.projection = prepared.projection.data();
    classify.projection_floats = D * half;
    classify.staged = classify.projection_floats <= kMaxStagedProjection;
  }
  const int batch = static_cast<int>(p.batch);
  if (lists != nullptr) {
    mark_listed_side(prepared.queries, lists->query_offsets, lists->query_indices);
    mark_listed_side(prepared.keys, lists->key_offsets, lists->key_indices);
  } else {  // both sides in one launch
    const ClassifySide queries = classify_side(prepared.queries, t.q, t.q_strides, batch, true, s.drop_q_permille);
    const ClassifySide keys = classify_side(prepared.keys, t.k, t.kv_strides, batch, false, s.drop_k_permille);
    launch_classify<T, D>(classify, queries, keys, batch);
  }
  sort_sides(prepared.queries, prepared.keys, classify.buckets, statistics);
  params.queries = prepared.queries.view();
  params.keys = prepared.keys.view();
  params.spans = prepared.spans.data();
  const int blocks_per_head = cuda::ceil_div(static_cast<int>(p.seq_q), kSpansThreads);
  spans_kernel<<<static_cast<unsigned>(p.batch * p.q_heads * blocks_per_head), kSpansThreads>>>(
      params, blocks_per_head, statistics, block_cols);
  ATTN_CUDA_CHECK_LAUNCH();
}

/// What the passes of one host thread reuse instead of creating per pass: the planning's two timing events, and
/// for the forward's counters an event, a stream of their own (non-blocking: it never waits for the legacy
/// default stream's work, nor that for it) and two values of pinned host memory for them to be copied into.
/// Created on the thread's first pass, on the device current then.
struct PassResources {
  cudaEvent_t start{}, planned{}, copied{};
  cudaStream_t copy_stream{};
  unsigned long long* counted = nullptr;  // pinned: visible pairs, tiles visited

  PassResources() {
    ATTN_CUDA_CHECK(cudaEventCreate(&start));
    ATTN_CUDA_CHECK(cudaEventCreate(&planned));
    ATTN_CUDA_CHECK(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming));
    ATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking));
    ATTN_CUDA_CHECK(cudaMallocHost(&counted, 2 * sizeof(unsigned long long)));
  }
  ~PassResources() {  // at thread exit (errors ignored: the runtime may already be unloading)
    cudaFreeHost(counted);
    cudaStreamDestroy(copy_stream);
    cudaEventDestroy(copied);
    cudaEventDestroy(planned);
    cudaEventDestroy(start);
  }
  PassResources(const PassResources&) = delete;
  PassResources& operator=(const PassResources&) = delete;
};

PassResources& pass_resources() {
  thread_local PassResources resources;
  return resources;
}

/// The device time of a pass's planning (masks or buckets, sorts, spans), for the "plan_ms" counter: events
/// around it, read once the pass has finished.
class PlanTimer {
 public:
  PlanTimer() : r_(pass_resources()) { ATTN_CUDA_CHECK(cudaEventRecord(r_.start)); }
  void planned() { ATTN_CUDA_CHECK(cudaEventRecord(r_.planned)); }
  /// Waits for the planning to finish (not for what was launched after it).
  double milliseconds() {
    float ms = 0;
    ATTN_CUDA_CHECK(cudaEventSynchronize(r_.planned));
    ATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, r_.start, r_.planned));
    return ms;
  }

 private:
  PassResources& r_;
};

/// The registry's hand-over of a plan (option "keep_plan" = 1): the host thread's last forward's, until its next
/// backward takes it or its next forward replaces or drops it.
SavedPlan& registry_plan() {
  thread_local SavedPlan plan;
  return plan;
}

/// The option "keep_plan": 0 (default: the backward plans itself) or 1 (SavedPlan through registry_plan).
bool keep_plan(const StageOptions& options) {
  const std::int64_t value = options.get("keep_plan", 0);
  if (value != 0 && value != 1)
    throw std::invalid_argument("keep_plan: must be 0 or 1 (hand the forward's plan to the backward), got " +
                                std::to_string(value));
  return value == 1;
}

/// Calls body(std::integral_constant<int, D>{}) for the supported head dims.
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

template <class Body>
void dispatch(const AttentionProblem& p, DType dtype, Body&& body) {
  cuda::dispatch_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>)
      dispatch_head_dim(p.head_dim, [&](auto d) { body(T{}, d); });
  });
}

}  // namespace

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16, DType::f16};
  caps.stride_multiple = 8;  // rows are copied in 16-byte chunks (cp.async / ldmatrix)
  caps.max_seq = 1 << 30;    // row indices are 32-bit in the kernels
  caps.max_head_dim = 128;   // O_i and dK_j, dV_j of D floats per row in registers, as flash_v2's
  caps.head_dims = {32, 64, 96, 128};
  caps.has_backward = true;
  caps.pointer_alignment = 16;
  return caps;
}

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options, const KeepLists* lists,
                 SavedPlan* keep) {
  const Settings settings = validate_gpu_call(p, t, options, lists, false);
  const int block_cols = forward_block_cols(p, options);
  if (keep != nullptr) keep->reset();  // its buffers back before this pass's are taken
  Params params;
  static_cast<cuda::AttentionParams&>(params) = cuda::make_attention_params(p, t);
  const auto prepared_buffers = std::make_shared<Prepared>(p, kept_buckets(settings, lists));
  Prepared& prepared = *prepared_buffers;
  DeviceBuffer<unsigned long long> statistics(2);  // visible pairs, tiles visited (zeroed by the sort)
  PassResources& resources = pass_resources();
  PlanTimer timer;
  dispatch(p, t.dtype, [&](auto element, auto d) {
    using T = decltype(element);
    constexpr int D = decltype(d)::value;
    prepare<T, D>(prepared, params, p, t, settings, lists, statistics.data(), block_cols);
    timer.planned();
    // The counters are known once the spans are: copied on the side stream while the forward kernel runs, so
    // that the pass does not end with a blocking copy after it.
    ATTN_CUDA_CHECK(cudaStreamWaitEvent(resources.copy_stream, resources.planned));
    ATTN_CUDA_CHECK(cudaMemcpyAsync(resources.counted, statistics.data(), 2 * sizeof(unsigned long long),
                                    cudaMemcpyDeviceToHost, resources.copy_stream));
    ATTN_CUDA_CHECK(cudaEventRecord(resources.copied, resources.copy_stream));
    if constexpr (D <= 64) {
      if (block_cols == 128) {
        launch_forward<T, D, 128, 128>(params, static_cast<int>(p.batch));
        return;
      }
    }
    launch_forward<T, D, 128, 64>(params, static_cast<int>(p.batch));
  });
  ATTN_CUDA_CHECK(cudaEventSynchronize(resources.copied));  // the planning and the copy, not the forward kernel
  const unsigned long long counted[2] = {resources.counted[0], resources.counted[1]};
  const double dense_pairs = static_cast<double>(p.batch * p.q_heads) * p.visible_pairs();
  const std::int64_t Bc = block_cols;
  options.counters["Tc"] = static_cast<double>((p.seq_k + Bc - 1) / Bc);
  options.counters["visible_pairs"] = static_cast<double>(counted[0]);
  options.counters["visible_fraction"] = dense_pairs > 0 ? static_cast<double>(counted[0]) / dense_pairs : 0.0;
  options.counters["tiles_visited"] = static_cast<double>(counted[1]);
  options.counters["tiles_total"] =
      static_cast<double>(p.batch * p.q_heads * ((p.seq_q + 127) / 128) * ((p.seq_k + Bc - 1) / Bc));
  options.counters["plan_ms"] = timer.milliseconds();
  if (keep != nullptr) keep->set(saved_plan_state(p, t, settings, lists, prepared_buffers));
}

void backward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options, const KeepLists* lists,
                  const SavedPlan* plan) {
  const Settings settings = validate_gpu_call(p, t, options, lists, true);
  if (plan != nullptr) check_saved_plan(*plan, p, t, settings, lists);
  Params params;
  static_cast<cuda::AttentionParams&>(params) = cuda::make_attention_params(p, t);
  // SCFA Alg. 2 line 1: the forward's plan when handed over, else planned again below.
  std::shared_ptr<Prepared> prepared_buffers =
      plan != nullptr ? std::static_pointer_cast<Prepared>(plan->state()->buffers)
                      : std::make_shared<Prepared>(p, kept_buckets(settings, lists));
  Prepared& prepared = *prepared_buffers;
  DeviceBuffer<float> dq_accum(static_cast<std::size_t>(p.q_elements()));
  DeviceBuffer<float> lse_log2(static_cast<std::size_t>(p.lse_elements()));
  DeviceBuffer<float> delta(static_cast<std::size_t>(p.lse_elements()));
  DeviceBuffer<int2> runs(static_cast<std::size_t>(p.batch * p.q_heads) * prepared.keys.max_tiles);
  params.runs = runs.data();
  params.dq_accum = dq_accum.data();
  params.lse_log2 = lse_log2.data();
  params.delta = delta.data();  // (dq_accum's kept rows are cleared by backward_prepare_kernel: Params::row_kept)
  PlanTimer timer;
  dispatch(p, t.dtype, [&](auto element, auto d) {
    using T = decltype(element);
    constexpr int D = decltype(d)::value;
    if (plan == nullptr) {
      prepare<T, D>(prepared, params, p, t, settings, lists, nullptr);
    } else {
      params.queries = prepared.queries.view();
      params.keys = prepared.keys.view();
      params.spans = prepared.spans.data();
    }
    timer.planned();
    params.run_slots = static_cast<int>(p.batch * p.q_heads) * params.keys.max_tiles;  // one warp each:
    params.run_blocks = cuda::ceil_div(params.run_slots, flash::kRowThreads / 32);  // backward_prepare's lead blocks
    const long long rows = p.lse_elements();
    flash::launch_backward_prepare<T, D>(params, rows);
    using Shape = BackwardShape<D, kBackwardBr<D>, kBackwardBc>;
    auto kernel = backward_kernel<T, D, kBackwardBr<D>, kBackwardBc>;
    static const bool configured = allow_shared_memory(kernel, Shape::kSmemBytes);  // once per kernel
    (void)configured;
    const dim3 grid(params.keys.max_tiles * static_cast<unsigned>(p.kv_heads), static_cast<int>(p.batch));
    kernel<<<grid, Shape::kThreads, Shape::kSmemBytes>>>(params);
    ATTN_CUDA_CHECK_LAUNCH();
    flash::launch_store_dq<T, D>(params, rows);
  });
  options.counters["plan_ms"] = timer.milliseconds();
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    SavedPlan& kept = registry_plan();
    if (keep_plan(options)) {
      forward_gpu(p, t, options, nullptr, &kept);
    } else {
      kept.reset();  // a plan from an earlier pass is not this one's
      forward_gpu(p, t, options);
    }
  };
  gpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    SavedPlan plan = keep_plan(options) ? std::move(registry_plan()) : SavedPlan();  // taken: one backward per plan
    backward_gpu(p, t, options, nullptr, plan.empty() ? nullptr : &plan);
  };
  gpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward, const StageOptions& options) {
    return workspace_bytes(p, read_settings(options), backward);
  };
  gpu.option_names = {"mode", "drop_q_permille", "drop_k_permille", "buckets", "seed", "block_cols", "keep_plan"};
  gpu.ladder_options = ladder_sparsity();
  gpu.target = "sm_90a";
  return gpu;
}

}  // namespace attn::sparse
