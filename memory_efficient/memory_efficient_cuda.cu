// memory_efficient, GPU tier: the CPU tier's chunk / summarise / combine structure as CUDA kernels (RS Alg.
// 2 and 3). Forward, one query chunk after the other: summarize_kernel writes one summary per (query row, key
// chunk) into a device scratch buffer, combine_kernel reduces them through the global max. Backward by
// recomputation from the saved log-sum-exp. Plain fp32 CUDA-core kernels: this stage is about memory.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/validate.hpp"
#include "memory_efficient/memory_efficient.hpp"

namespace attn::memory_efficient {
namespace {

using cuda::from_float;
using cuda::to_float;

// ---- the thread-block layout every kernel here shares ---------------------------------------------------
//
// A block of 256 threads works on a tile of 32 rows (query rows, or keys in the dK/dV kernel). The 8 threads
// of one row sit next to each other in a warp ("row lanes"); they split the 32 keys of a shared-memory
// sub-tile (4 each, strided by 8) when computing scores, and split the head dim (d = lane + 8 s) when
// accumulating D-vectors, so each thread keeps at most kMaxDim / 8 accumulators in registers.
constexpr int kThreads = 256;
constexpr int kTile = 32;          // rows per block and keys per shared-memory sub-tile
constexpr int kRowLanes = 8;       // threads per row
constexpr int kPerLane = kTile / kRowLanes;  // keys (or rows) per thread in a score tile
static_assert(kTile * kRowLanes == kThreads);

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// What every kernel reads about the problem (plain values: passed by value to each launch).
struct ProblemView {
  int q_heads, group, seq_q, seq_k, head_dim;
  bool causal;
  float scale;
  Strides q_strides, kv_strides;

  // Keys query row i sees: [0, visible_keys(i)) (bottom-right aligned causal mask).
  __device__ int visible_keys(int i) const {
    if (!causal) return seq_k;
    return min(max(i + seq_k - seq_q + 1, 0), seq_k);
  }
  __device__ long long q_offset(int b, int h, int n) const {
    return b * q_strides.batch + h * q_strides.head + n * q_strides.seq;
  }
  __device__ long long kv_offset(int b, int kv_head, int n) const {
    return b * kv_strides.batch + kv_head * kv_strides.head + n * kv_strides.seq;
  }
};

ProblemView view_of(const AttentionProblem& p, const AttentionTensors& t) {
  return ProblemView{static_cast<int>(p.q_heads),  static_cast<int>(p.group_size()), static_cast<int>(p.seq_q),
                     static_cast<int>(p.seq_k),    static_cast<int>(p.head_dim),    p.causal,
                     p.softmax_scale(),            t.q_strides,                     t.kv_strides};
}

// ---- named device helpers ---------------------------------------------------------------------------------

// Copies `count` rows (row n at base + n * row_stride, head_dim contiguous elements) into a kTile x ld fp32
// shared tile; rows past count become 0. All threads of the block take part; the caller synchronises.
template <class T>
__device__ void load_tile(const T* base, long long row_stride, int count, int head_dim, float* tile, int ld) {
  for (int index = threadIdx.x; index < kTile * head_dim; index += blockDim.x) {
    const int row = index / head_dim, d = index % head_dim;
    tile[row * ld + d] = row < count ? to_float(base[row * row_stride + d]) : 0.0f;
  }
}

// a . b over head_dim fp32 values in shared memory.
__device__ float dot_shared(const float* a, const float* b, int head_dim) {
  float sum = 0.0f;
  for (int d = 0; d < head_dim; ++d) sum = fmaf(a[d], b[d], sum);
  return sum;
}

// Reductions over the 8 row lanes (adjacent lanes of one warp).
__device__ float row_lanes_max(float x) {
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ float row_lanes_sum(float x) {
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// acc[s] += weight * row[lane + 8 s] for the head-dim slots of this row lane.
template <int kMaxDim>
__device__ void accumulate_row(float (&acc)[kMaxDim / kRowLanes], float weight, const float* row, int lane, int head_dim) {
#pragma unroll
  for (int s = 0; s < kMaxDim / kRowLanes; ++s) {
    const int d = lane + kRowLanes * s;
    if (d < head_dim) acc[s] = fmaf(weight, row[d], acc[s]);
  }
}

template <class T, int kMaxDim>
__device__ void store_row(T* out, const float (&acc)[kMaxDim / kRowLanes], float factor, int lane, int head_dim) {
#pragma unroll
  for (int s = 0; s < kMaxDim / kRowLanes; ++s) {
    const int d = lane + kRowLanes * s;
    if (d < head_dim) out[d] = from_float<T>(factor * acc[s]);
  }
}

// ---- forward: summaries and their combine ------------------------------------------------------------------

// The summaries of one query chunk for every (batch, head): [bh][key chunk][row of the query chunk], values
// with head_dim floats each. The scratch buffer is reused for the next query chunk.
struct SummaryView {
  float* values;   // sum_j exp(s_ij - m_c) v_j
  float* weights;  // sum_j exp(s_ij - m_c)
  float* maxes;    // m_c, -inf when the row sees no key of the chunk
  int key_chunks, chunk_rows_max;  // layout extents: ceil(Nk / Ck) and Cq

  __device__ long long index(int bh, int key_chunk, int row) const {
    return (static_cast<long long>(bh) * key_chunks + key_chunk) * chunk_rows_max + row;
  }
};

// Which query chunk and key chunks one forward launch covers.
struct ChunkLaunch {
  int q_begin;     // first query row of the chunk
  int rows;        // query rows in the chunk
  int key_chunk;   // Ck
};

// One block = 32 query rows of the current query chunk x one key chunk (blockIdx.x) of one (batch, head)
// (blockIdx.z). The paper's summarize_chunk: m_c = max_j s_ij; w_ij = exp(s_ij - m_c); weights = sum_j w_ij;
// values = sum_j w_ij v_j. Two sweeps over the chunk's keys, 32 at a time through shared memory: the first
// finds m_c, the second (recomputing the scores) forms the weights, so no score block is stored.
template <class T, int kMaxDim>
__global__ void __launch_bounds__(kThreads) summarize_kernel(ProblemView pv, const T* q, const T* k, const T* v,
                                                             ChunkLaunch launch, SummaryView out) {
  extern __shared__ float shared[];
  const int ld = pv.head_dim + 1;  // +1: rows of the tile start in different banks
  float* q_tile = shared;
  float* k_tile = q_tile + kTile * ld;
  float* v_tile = k_tile + kTile * ld;
  float* w_tile = v_tile + kTile * ld;  // kTile x (kTile + 1): this sub-tile's exp weights

  const int key_chunk = blockIdx.x, bh = blockIdx.z;
  const int b = bh / pv.q_heads, h = bh % pv.q_heads, kv_head = h / pv.group;
  const int local_row0 = blockIdx.y * kTile;  // within the query chunk
  const int rows = min(kTile, launch.rows - local_row0);
  const int row0 = launch.q_begin + local_row0;
  const int key0 = key_chunk * launch.key_chunk;
  const int keys = min(launch.key_chunk, pv.seq_k - key0);
  const int r = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
  // Keys of this chunk row r sees (a prefix; 0 for padding rows), and the most any row of the tile sees.
  auto visible_in_chunk = [&](int row) { return min(max(pv.visible_keys(row0 + row) - key0, 0), keys); };
  const int visible = r < rows ? visible_in_chunk(r) : 0;
  const int tile_visible = visible_in_chunk(rows - 1);

  load_tile(q + pv.q_offset(b, h, row0), pv.q_strides.seq, rows, pv.head_dim, q_tile, ld);
  const T* k_chunk = k + pv.kv_offset(b, kv_head, key0);
  const T* v_chunk = v + pv.kv_offset(b, kv_head, key0);

  // Sweep 1: m_c, the chunk's max score (a constant for differentiation, RS Alg. 2 line 5).
  float chunk_max = kNegInf;
  for (int j0 = 0; j0 < tile_visible; j0 += kTile) {
    __syncthreads();  // the previous sub-tile has been read
    load_tile(k_chunk + j0 * pv.kv_strides.seq, pv.kv_strides.seq, min(kTile, tile_visible - j0), pv.head_dim, k_tile, ld);
    __syncthreads();
    for (int n = 0; n < kPerLane; ++n) {
      const int c = lane + kRowLanes * n;
      if (j0 + c < visible) chunk_max = fmaxf(chunk_max, pv.scale * dot_shared(q_tile + r * ld, k_tile + c * ld, pv.head_dim));
    }
  }
  chunk_max = row_lanes_max(chunk_max);

  // Sweep 2: w_ij = exp(s_ij - m_c) <= 1, their sum and the weighted sum of the values rows.
  float weight_sum = 0.0f;
  float acc[kMaxDim / kRowLanes] = {};
  for (int j0 = 0; j0 < tile_visible; j0 += kTile) {
    __syncthreads();
    const int count = min(kTile, tile_visible - j0);
    load_tile(k_chunk + j0 * pv.kv_strides.seq, pv.kv_strides.seq, count, pv.head_dim, k_tile, ld);
    load_tile(v_chunk + j0 * pv.kv_strides.seq, pv.kv_strides.seq, count, pv.head_dim, v_tile, ld);
    __syncthreads();
    for (int n = 0; n < kPerLane; ++n) {
      const int c = lane + kRowLanes * n;
      float w = 0.0f;  // masked keys (and padding rows) weigh nothing
      if (j0 + c < visible) w = expf(pv.scale * dot_shared(q_tile + r * ld, k_tile + c * ld, pv.head_dim) - chunk_max);
      w_tile[r * (kTile + 1) + c] = w;
      weight_sum += w;
    }
    __syncthreads();
    for (int c = 0; c < kTile; ++c) accumulate_row<kMaxDim>(acc, w_tile[r * (kTile + 1) + c], v_tile + c * ld, lane, pv.head_dim);
  }
  weight_sum = row_lanes_sum(weight_sum);

  if (r >= rows) return;
  const long long at = out.index(bh, key_chunk, local_row0 + r);
  store_row<float, kMaxDim>(out.values + at * pv.head_dim, acc, 1.0f, lane, pv.head_dim);
  if (lane == 0) {
    out.weights[at] = weight_sum;
    out.maxes[at] = chunk_max;  // -inf when this row sees none of the chunk's keys
  }
}

// One warp per query row of the current chunk (8 rows per block, blockIdx.y = batch x head). The paper's
// combine: M = max_c m_c; all_weights = sum_c exp(m_c - M) weights_c; O = sum_c exp(m_c - M) values_c /
// all_weights; LSE = M + log(all_weights). A row that sees no key: O = 0, LSE = -inf.
template <class T>
__global__ void __launch_bounds__(kThreads) combine_kernel(ProblemView pv, T* o, float* lse, ChunkLaunch launch,
                                                           int key_chunks_seen, SummaryView in) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int local_row = blockIdx.x * (kThreads / 32) + warp;
  if (local_row >= launch.rows) return;
  const int bh = blockIdx.y, b = bh / pv.q_heads, h = bh % pv.q_heads;
  const int i = launch.q_begin + local_row;
  T* o_row = o + pv.q_offset(b, h, i);
  float* lse_i = lse + static_cast<long long>(bh) * pv.seq_q + i;

  float global_max = kNegInf;
  for (int c = lane; c < key_chunks_seen; c += 32) global_max = fmaxf(global_max, in.maxes[in.index(bh, c, local_row)]);
  global_max = warp_max(global_max);
  if (global_max == kNegInf) {
    for (int d = lane; d < pv.head_dim; d += 32) o_row[d] = from_float<T>(0.0f);
    if (lane == 0) *lse_i = kNegInf;
    return;
  }
  // exp(m_c - M) of chunk c; 0 for a chunk the row does not see (m_c = -inf).
  auto max_diff = [&](int c) {
    const float m_c = in.maxes[in.index(bh, c, local_row)];
    return m_c == kNegInf ? 0.0f : expf(m_c - global_max);
  };
  float all_weights = 0.0f;
  for (int c = lane; c < key_chunks_seen; c += 32) all_weights += max_diff(c) * in.weights[in.index(bh, c, local_row)];
  all_weights = warp_sum(all_weights);
  for (int d = lane; d < pv.head_dim; d += 32) {
    float all_values = 0.0f;
    for (int c = 0; c < key_chunks_seen; ++c) all_values += max_diff(c) * in.values[in.index(bh, c, local_row) * pv.head_dim + d];
    o_row[d] = from_float<T>(all_values / all_weights);
  }
  if (lane == 0) *lse_i = global_max + logf(all_weights);
}

// ---- backward: recomputation from the log-sum-exp ----------------------------------------------------------

// delta_i = rowsum(dO_i * O_i), one warp per row of all (batch, head)s.
template <class T>
__global__ void __launch_bounds__(kThreads) delta_kernel(ProblemView pv, const T* o, const T* d_o, float* delta,
                                                         long long total_rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;
  const int i = static_cast<int>(row % pv.seq_q);
  const int bh = static_cast<int>(row / pv.seq_q);
  const long long at = pv.q_offset(bh / pv.q_heads, bh % pv.q_heads, i);
  float sum = 0.0f;
  for (int d = lane; d < pv.head_dim; d += 32) sum += to_float(d_o[at + d]) * to_float(o[at + d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// dQ for 32 query rows (blockIdx.x) of one (batch, head) (blockIdx.y), walking every key it sees:
// P_ij = exp(s_ij - LSE_i), dS_ij = P_ij (dO_i . v_j - delta_i), dQ_i = scale sum_j dS_ij k_j.
template <class T, int kMaxDim>
__global__ void __launch_bounds__(kThreads) dq_kernel(ProblemView pv, const T* q, const T* k, const T* v, const T* d_o,
                                                      const float* lse, const float* delta, T* dq) {
  extern __shared__ float shared[];
  const int ld = pv.head_dim + 1;
  float* q_tile = shared;
  float* do_tile = q_tile + kTile * ld;
  float* k_tile = do_tile + kTile * ld;
  float* v_tile = k_tile + kTile * ld;
  float* ds_tile = v_tile + kTile * ld;  // kTile x (kTile + 1)

  const int bh = blockIdx.y, b = bh / pv.q_heads, h = bh % pv.q_heads, kv_head = h / pv.group;
  const int row0 = blockIdx.x * kTile;
  const int rows = min(kTile, pv.seq_q - row0);
  const int r = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
  const int i = row0 + r;
  const int visible = r < rows ? pv.visible_keys(i) : 0;
  const int tile_visible = pv.visible_keys(row0 + rows - 1);
  const long long row_index = static_cast<long long>(bh) * pv.seq_q + i;
  const float lse_i = r < rows ? lse[row_index] : 0.0f;
  const float delta_i = r < rows ? delta[row_index] : 0.0f;

  load_tile(q + pv.q_offset(b, h, row0), pv.q_strides.seq, rows, pv.head_dim, q_tile, ld);
  load_tile(d_o + pv.q_offset(b, h, row0), pv.q_strides.seq, rows, pv.head_dim, do_tile, ld);
  float acc[kMaxDim / kRowLanes] = {};
  for (int j0 = 0; j0 < tile_visible; j0 += kTile) {
    __syncthreads();
    const int count = min(kTile, tile_visible - j0);
    load_tile(k + pv.kv_offset(b, kv_head, j0), pv.kv_strides.seq, count, pv.head_dim, k_tile, ld);
    load_tile(v + pv.kv_offset(b, kv_head, j0), pv.kv_strides.seq, count, pv.head_dim, v_tile, ld);
    __syncthreads();
    for (int n = 0; n < kPerLane; ++n) {
      const int c = lane + kRowLanes * n;
      float dS = 0.0f;
      if (j0 + c < visible) {  // visible also excludes empty rows, whose LSE is -inf
        const float P = expf(pv.scale * dot_shared(q_tile + r * ld, k_tile + c * ld, pv.head_dim) - lse_i);
        dS = P * (dot_shared(do_tile + r * ld, v_tile + c * ld, pv.head_dim) - delta_i);
      }
      ds_tile[r * (kTile + 1) + c] = dS;
    }
    __syncthreads();
    for (int c = 0; c < kTile; ++c) accumulate_row<kMaxDim>(acc, ds_tile[r * (kTile + 1) + c], k_tile + c * ld, lane, pv.head_dim);
  }
  if (r < rows) store_row<T, kMaxDim>(dq + pv.q_offset(b, h, i), acc, pv.scale, lane, pv.head_dim);
}

// dK and dV for 32 keys (blockIdx.x) of one (batch, KV head) (blockIdx.y), walking every query row of every
// query head of the group that sees them: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij q_i. Each key's
// gradient is owned by one block: no atomics, and the GQA sum stays in registers.
template <class T, int kMaxDim>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(ProblemView pv, const T* q, const T* k, const T* v, const T* d_o,
                                                        const float* lse, const float* delta, T* dk, T* dv) {
  extern __shared__ float shared[];
  const int ld = pv.head_dim + 1;
  float* k_tile = shared;
  float* v_tile = k_tile + kTile * ld;
  float* q_tile = v_tile + kTile * ld;
  float* do_tile = q_tile + kTile * ld;
  float* p_tile = do_tile + kTile * ld;        // [key][row], kTile x (kTile + 1)
  float* ds_tile = p_tile + kTile * (kTile + 1);
  float* lse_tile = ds_tile + kTile * (kTile + 1);
  float* delta_tile = lse_tile + kTile;

  const int kv_pair = blockIdx.y, kv_heads = pv.q_heads / pv.group;
  const int b = kv_pair / kv_heads, kv_head = kv_pair % kv_heads;
  const int key0 = blockIdx.x * kTile;
  const int keys = min(kTile, pv.seq_k - key0);
  const int c = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;  // this thread's key, its row lane
  const int j = key0 + c;

  load_tile(k + pv.kv_offset(b, kv_head, key0), pv.kv_strides.seq, keys, pv.head_dim, k_tile, ld);
  load_tile(v + pv.kv_offset(b, kv_head, key0), pv.kv_strides.seq, keys, pv.head_dim, v_tile, ld);
  // Causal: query row i sees key key0 iff i >= key0 - (Nk - Nq); earlier rows see none of this block's keys.
  const int first_row = pv.causal ? max(0, key0 - (pv.seq_k - pv.seq_q)) : 0;
  float dk_acc[kMaxDim / kRowLanes] = {};
  float dv_acc[kMaxDim / kRowLanes] = {};
  for (int h = kv_head * pv.group; h < (kv_head + 1) * pv.group; ++h) {
    const long long lse_base = (static_cast<long long>(b) * pv.q_heads + h) * pv.seq_q;
    for (int i0 = first_row; i0 < pv.seq_q; i0 += kTile) {
      const int rows = min(kTile, pv.seq_q - i0);
      __syncthreads();
      load_tile(q + pv.q_offset(b, h, i0), pv.q_strides.seq, rows, pv.head_dim, q_tile, ld);
      load_tile(d_o + pv.q_offset(b, h, i0), pv.q_strides.seq, rows, pv.head_dim, do_tile, ld);
      if (threadIdx.x < kTile) {
        lse_tile[threadIdx.x] = threadIdx.x < rows ? lse[lse_base + i0 + threadIdx.x] : 0.0f;
        delta_tile[threadIdx.x] = threadIdx.x < rows ? delta[lse_base + i0 + threadIdx.x] : 0.0f;
      }
      __syncthreads();
      for (int n = 0; n < kPerLane; ++n) {
        const int r = lane + kRowLanes * n;
        float P = 0.0f, dS = 0.0f;
        if (r < rows && c < keys && j < pv.visible_keys(i0 + r)) {
          P = expf(pv.scale * dot_shared(q_tile + r * ld, k_tile + c * ld, pv.head_dim) - lse_tile[r]);
          dS = P * (dot_shared(do_tile + r * ld, v_tile + c * ld, pv.head_dim) - delta_tile[r]);
        }
        p_tile[c * (kTile + 1) + r] = P;
        ds_tile[c * (kTile + 1) + r] = dS;
      }
      __syncthreads();
      for (int r = 0; r < kTile; ++r) {
        accumulate_row<kMaxDim>(dv_acc, p_tile[c * (kTile + 1) + r], do_tile + r * ld, lane, pv.head_dim);
        accumulate_row<kMaxDim>(dk_acc, ds_tile[c * (kTile + 1) + r], q_tile + r * ld, lane, pv.head_dim);
      }
    }
  }
  if (c >= keys) return;
  store_row<T, kMaxDim>(dk + pv.kv_offset(b, kv_head, j), dk_acc, pv.scale, lane, pv.head_dim);
  store_row<T, kMaxDim>(dv + pv.kv_offset(b, kv_head, j), dv_acc, 1.0f, lane, pv.head_dim);
}

// ---- host side ---------------------------------------------------------------------------------------------

std::int64_t ceil_div64(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Calls body(std::integral_constant<int, kMaxDim>) with the smallest of 64, 128, 256 that holds head_dim.
template <class Body>
void dispatch_head_dim(std::int64_t head_dim, Body&& body) {
  if (head_dim <= 64) return body(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return body(std::integral_constant<int, 128>{});
  body(std::integral_constant<int, 256>{});
}

// Dynamic shared memory of a kernel with `row_tiles` kTile x (D + 1) tiles and `score_tiles` kTile x (kTile + 1)
// tiles (plus `extra` floats); opts the kernel in above the default 48 KB.
template <class Kernel>
std::size_t prepare_shared(Kernel kernel, std::int64_t head_dim, int row_tiles, int score_tiles, int extra = 0) {
  const std::size_t bytes =
      sizeof(float) * (static_cast<std::size_t>(row_tiles) * kTile * (head_dim + 1) + score_tiles * kTile * (kTile + 1) + extra);
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

void require_device_pointer(const void* pointer, const char* name) {
  cudaPointerAttributes attributes{};
  ATTN_CUDA_CHECK(cudaPointerGetAttributes(&attributes, pointer));
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(name) + ": pointer is not device memory (memory_efficient/gpu reads and "
                                                    "writes its tensors on the GPU)");
}

void validate_gpu_call(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks, bool backward) {
  validate_call(p, t, gpu_caps(), "memory_efficient/gpu", backward);
  validate_chunks(chunks);
  if (p.batch * p.q_heads > 65535)  // the kernels put batch x heads on a grid dimension
    throw std::invalid_argument("batch: batch x q_heads = " + std::to_string(p.batch * p.q_heads) +
                                " exceeds the limit 65535 of memory_efficient/gpu");
  for (auto [pointer, name] : {std::pair<const void*, const char*>{t.q, "q"}, {t.k, "k"}, {t.v, "v"}, {t.o, "o"}, {t.lse, "lse"}})
    require_device_pointer(pointer, name);
  if (backward)
    for (auto [pointer, name] : {std::pair<const void*, const char*>{t.d_o, "d_o"}, {t.dq, "dq"}, {t.dk, "dk"}, {t.dv, "dv"}})
      require_device_pointer(pointer, name);
}

struct GpuChunkPlan {
  std::int64_t Cq, Ck, query_chunks, key_chunks;
};

GpuChunkPlan plan_chunks(const AttentionProblem& p, const Chunks& chunks) {
  GpuChunkPlan plan;
  plan.Cq = std::min(chunks.query, p.seq_q);
  plan.Ck = std::min(chunks.key, p.seq_k);
  plan.query_chunks = ceil_div64(p.seq_q, plan.Cq);
  plan.key_chunks = ceil_div64(p.seq_k, plan.Ck);
  return plan;
}

template <class T>
void forward_typed(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks) {
  const GpuChunkPlan plan = plan_chunks(p, chunks);
  const ProblemView pv = view_of(p, t);
  const std::int64_t heads = p.batch * p.q_heads;
  const std::int64_t D = p.head_dim;
  // The scratch: one query chunk's summaries for every (batch, head), reused chunk after chunk (the paper's
  // sequential map over query chunks). B Hq Cq (Nk / Ck) (D + 2) floats: linear in Nk, never Nq x Nk.
  const std::int64_t slots = heads * plan.key_chunks * plan.Cq;
  DeviceBuffer<float> scratch(static_cast<std::size_t>(slots * (D + 2)));
  const SummaryView summaries{scratch.data(), scratch.data() + slots * D, scratch.data() + slots * (D + 1),
                              static_cast<int>(plan.key_chunks), static_cast<int>(plan.Cq)};

  for (std::int64_t qc = 0; qc < plan.query_chunks; ++qc) {
    const ChunkLaunch launch{static_cast<int>(qc * plan.Cq), static_cast<int>(std::min(plan.Cq, p.seq_q - qc * plan.Cq)),
                             static_cast<int>(plan.Ck)};
    // Key chunks no row of this query chunk sees (causal) are neither summarised nor combined.
    const std::int64_t key_chunks_seen = ceil_div64(p.visible_keys(launch.q_begin + launch.rows - 1), plan.Ck);
    if (key_chunks_seen > 0) {
      dispatch_head_dim(D, [&](auto max_dim) {
        auto kernel = summarize_kernel<T, decltype(max_dim)::value>;
        const std::size_t shared = prepare_shared(kernel, D, 3, 1);
        const dim3 grid(static_cast<unsigned>(key_chunks_seen), cuda::ceil_div(launch.rows, kTile), static_cast<unsigned>(heads));
        kernel<<<grid, kThreads, shared>>>(pv, static_cast<const T*>(t.q), static_cast<const T*>(t.k),
                                           static_cast<const T*>(t.v), launch, summaries);
        ATTN_CUDA_CHECK_LAUNCH();
      });
    }
    const dim3 grid(cuda::ceil_div(launch.rows, kThreads / 32), static_cast<unsigned>(heads));
    combine_kernel<T><<<grid, kThreads>>>(pv, static_cast<T*>(t.o), t.lse, launch, static_cast<int>(key_chunks_seen), summaries);
    ATTN_CUDA_CHECK_LAUNCH();
  }
}

template <class T>
void backward_typed(const AttentionProblem& p, const AttentionTensors& t) {
  const ProblemView pv = view_of(p, t);
  const std::int64_t D = p.head_dim;
  const auto* q = static_cast<const T*>(t.q);
  const auto* k = static_cast<const T*>(t.k);
  const auto* v = static_cast<const T*>(t.v);
  const auto* d_o = static_cast<const T*>(t.d_o);
  DeviceBuffer<float> delta(static_cast<std::size_t>(p.lse_elements()));  // O(N), like the LSE

  const long long rows = p.lse_elements();
  delta_kernel<T><<<cuda::ceil_div(rows, kThreads / 32), kThreads>>>(pv, static_cast<const T*>(t.o), d_o, delta.data(), rows);
  ATTN_CUDA_CHECK_LAUNCH();
  dispatch_head_dim(D, [&](auto max_dim) {
    constexpr int kMaxDim = decltype(max_dim)::value;
    auto dq = dq_kernel<T, kMaxDim>;
    const std::size_t dq_shared = prepare_shared(dq, D, 4, 1);
    dq<<<dim3(cuda::ceil_div(p.seq_q, kTile), static_cast<unsigned>(p.batch * p.q_heads)), kThreads, dq_shared>>>(
        pv, q, k, v, d_o, t.lse, delta.data(), static_cast<T*>(t.dq));
    ATTN_CUDA_CHECK_LAUNCH();
    auto dkdv = dkdv_kernel<T, kMaxDim>;
    const std::size_t dkdv_shared = prepare_shared(dkdv, D, 4, 2, 2 * kTile);
    dkdv<<<dim3(cuda::ceil_div(p.seq_k, kTile), static_cast<unsigned>(p.batch * p.kv_heads)), kThreads, dkdv_shared>>>(
        pv, q, k, v, d_o, t.lse, delta.data(), static_cast<T*>(t.dk), static_cast<T*>(t.dv));
    ATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

TierCaps gpu_caps() { return TierCaps{{DType::f32, DType::bf16, DType::f16}, 256, {}, true, 0}; }

std::size_t gpu_extra_bytes(const AttentionProblem& p, const Chunks& chunks, bool backward) {
  const GpuChunkPlan plan = plan_chunks(p, chunks);
  if (backward) return static_cast<std::size_t>(p.lse_elements()) * sizeof(float);
  return static_cast<std::size_t>(p.batch * p.q_heads * plan.key_chunks * plan.Cq * (p.head_dim + 2)) * sizeof(float);
}

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks) {
  validate_gpu_call(p, t, chunks, false);
  cuda::dispatch_dtype(t.dtype, [&](auto element) { forward_typed<decltype(element)>(p, t, chunks); });
}

void backward_gpu(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks) {
  validate_gpu_call(p, t, chunks, true);
  cuda::dispatch_dtype(t.dtype, [&](auto element) { backward_typed<decltype(element)>(p, t); });
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    const Chunks chunks = read_chunks(options);
    forward_gpu(p, t, chunks);
    options.counters["Tc"] = static_cast<double>((p.seq_k + chunks.key - 1) / chunks.key);  // key chunks per row
  };
  gpu.ladder_options = {{"key_chunk", 1024}};  // the GPU ladder's N = 4096 in Tc = 4 key chunks, not one
  gpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    backward_gpu(p, t, read_chunks(options));
  };
  gpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward, const StageOptions& options) {
    const Chunks chunks = read_chunks(options);
    return std::max(gpu_extra_bytes(p, chunks, false), backward ? gpu_extra_bytes(p, chunks, true) : 0);
  };
  gpu.option_names = {"query_chunk", "key_chunk"};
  return gpu;
}

}  // namespace attn::memory_efficient
