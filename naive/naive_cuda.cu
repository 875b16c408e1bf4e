// naive, GPU tier: standard attention as separate kernels, S and P written to device memory in full, as
// PyTorch's math path does. Two versions compute the same thing: every matrix product goes either to a
// hand-written tiled GEMM (to read) or to cuBLAS (the realistic baseline); softmax and dS are our kernels in both.
#include <cublas_v2.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/cuda_device.cuh"
#include "common/cuda_utils.hpp"
#include "common/validate.hpp"
#include "naive/naive.hpp"

namespace attn::naive {
namespace {

// ---- error checks -----------------------------------------------------------------------------------

void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")");
}
#define ATTN_CUBLAS_CHECK(call) check_cublas((call), #call, __FILE__, __LINE__)

// ---- storage: what the three steps keep in device memory -------------------------------------------
//
// S (and, in the backward, dP) is fp32: it is what the GEMM accumulated, kept exactly. P and dS are stored in
// the input dtype, because they are the left operand of the next GEMM, whose operands must share one type
// (cuBLAS has no bf16 x fp32 product); PyTorch's math path rounds P the same way. With bf16 inputs that is
// 4 + 2 = 6 bytes per (query, key) pair in the forward and 4 + 2 + 2 = 8 in the backward, plus fp32
// accumulators for dK and dV (summed over the query heads of a group).

std::int64_t score_elements(const AttentionProblem& p) { return p.batch * p.q_heads * p.seq_q * p.seq_k; }

std::size_t forward_scratch_bytes(const AttentionProblem& p, DType dtype) {
  return static_cast<std::size_t>(score_elements(p)) * (sizeof(float) + dtype_size(dtype));
}

std::size_t backward_scratch_bytes(const AttentionProblem& p, DType dtype) {
  return static_cast<std::size_t>(score_elements(p)) * (sizeof(float) + 2 * dtype_size(dtype)) +
         static_cast<std::size_t>(2 * p.kv_elements()) * sizeof(float);
}

// ---- one batched row-major GEMM, two engines ---------------------------------------------------------

/// A row-major matrix operand of a batched GEMM: element (r, c) of batch entry z is at
/// data[z * batch_stride + r * ld + c], or at data[z * batch_stride + c * ld + r] when transposed.
template <class T>
struct Operand {
  T* data = nullptr;
  std::int64_t ld = 0;
  std::int64_t batch_stride = 0;
  bool transposed = false;
};

/// C_z = alpha * op(A_z) op(B_z) + beta * C_z for z in [0, count); op(A) is M x K, op(B) is K x N.
/// With beta = 0, C is not read (it may hold NaN poison).
struct GemmShape {
  std::int64_t M = 0, N = 0, K = 0, count = 1;
  float alpha = 1.0f;
  float beta = 0.0f;
};

template <class T>
cudaDataType_t cuda_type();
template <>
cudaDataType_t cuda_type<float>() { return CUDA_R_32F; }
template <>
cudaDataType_t cuda_type<__nv_bfloat16>() { return CUDA_R_16BF; }
template <>
cudaDataType_t cuda_type<__half>() { return CUDA_R_16F; }

cublasHandle_t cublas_handle() {
  static cublasHandle_t handle = [] {
    cublasHandle_t created = nullptr;
    ATTN_CUBLAS_CHECK(cublasCreate(&created));
    // fp32 accumulation throughout: no TF32 for fp32 inputs (the default math mode), and no split-K
    // reduction in half precision when the output is bf16/fp16.
    ATTN_CUBLAS_CHECK(cublasSetMathMode(created, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    return created;
  }();
  return handle;
}

int as_int(std::int64_t value, const char* what) {
  if (value > std::numeric_limits<int>::max()) throw std::invalid_argument(std::string(what) + ": too large for cuBLAS");
  return static_cast<int>(value);
}

// cuBLAS is column-major; a row-major M x N matrix is a column-major N x M one. So row-major
// C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands (and M with N), keep the flags.
template <class T, class TC>
void gemm_cublas(const GemmShape& g, Operand<const T> a, Operand<const T> b, Operand<TC> c) {
  ATTN_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      cublas_handle(), b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N, a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      as_int(g.N, "N"), as_int(g.M, "M"), as_int(g.K, "K"), &g.alpha, b.data, cuda_type<T>(), as_int(b.ld, "ldb"),
      b.batch_stride, a.data, cuda_type<T>(), as_int(a.ld, "lda"), a.batch_stride, &g.beta, c.data, cuda_type<TC>(),
      as_int(c.ld, "ldc"), c.batch_stride, as_int(g.count, "batch count"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The hand-written GEMM: each thread block computes a kTile x kTile tile of C, walking K in steps of kTileK.
// Per step, the block copies the A and B tiles to shared memory (converted to fp32), then each of the 16 x 16
// threads accumulates a 4 x 4 set of outputs from them in registers. Plain fp32 FMA, no tensor cores.
constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kThreadsPerSide = 16;
constexpr int kPerThread = kTile / kThreadsPerSide;  // 4 rows and 4 columns of C per thread
constexpr int kGemmThreads = kThreadsPerSide * kThreadsPerSide;

template <class T>
__device__ __forceinline__ float load_element(const Operand<const T>& m, std::int64_t row, std::int64_t col) {
  return cuda::to_float(m.transposed ? m.data[col * m.ld + row] : m.data[row * m.ld + col]);
}

template <class T, class TC>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_tiled_kernel(GemmShape g, Operand<const T> a, Operand<const T> b, Operand<TC> c) {
  // LAB BEGIN naive-gpu: the tiled GEMM through shared memory, one C tile per block
  // One float of padding per row: threads that store down a column of a tile then hit different banks.
  __shared__ float a_tile[kTileK][kTile + 1];  // a_tile[k][m] = op(A)(tile_row + m, k0 + k)
  __shared__ float b_tile[kTileK][kTile + 1];  // b_tile[k][n] = op(B)(k0 + k, tile_col + n)
  const std::int64_t z = blockIdx.z;
  a.data += z * a.batch_stride;
  b.data += z * b.batch_stride;
  c.data += z * c.batch_stride;
  const std::int64_t tile_row = static_cast<std::int64_t>(blockIdx.y) * kTile;
  const std::int64_t tile_col = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % kThreadsPerSide;  // this thread owns columns tile_col + tx + 16 j
  const int ty = threadIdx.x / kThreadsPerSide;  // and rows tile_row + ty + 16 i

  float acc[kPerThread][kPerThread] = {};
  for (std::int64_t k0 = 0; k0 < g.K; k0 += kTileK) {
    // Copy the tiles; the index order follows the operand's storage so that neighbouring threads read
    // neighbouring addresses. Out-of-range elements read as 0 and add nothing.
    for (int e = threadIdx.x; e < kTile * kTileK; e += kGemmThreads) {
      const int m = a.transposed ? e % kTile : e / kTileK;
      const int k = a.transposed ? e / kTile : e % kTileK;
      const bool inside = tile_row + m < g.M && k0 + k < g.K;
      a_tile[k][m] = inside ? load_element(a, tile_row + m, k0 + k) : 0.0f;
    }
    for (int e = threadIdx.x; e < kTile * kTileK; e += kGemmThreads) {
      const int n = b.transposed ? e / kTileK : e % kTile;
      const int k = b.transposed ? e % kTileK : e / kTile;
      const bool inside = tile_col + n < g.N && k0 + k < g.K;
      b_tile[k][n] = inside ? load_element(b, k0 + k, tile_col + n) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a_col[kPerThread], b_row[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a_col[i] = a_tile[k][ty + kThreadsPerSide * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b_row[j] = b_tile[k][tx + kThreadsPerSide * j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a_col[i], b_row[j], acc[i][j]);
    }
    __syncthreads();  // before the next step overwrites the tiles
  }
  for (int i = 0; i < kPerThread; ++i) {
    const std::int64_t row = tile_row + ty + kThreadsPerSide * i;
    if (row >= g.M) continue;
    for (int j = 0; j < kPerThread; ++j) {
      const std::int64_t col = tile_col + tx + kThreadsPerSide * j;
      if (col >= g.N) continue;
      TC& out = c.data[row * c.ld + col];
      const float previous = g.beta != 0.0f ? cuda::to_float(out) : 0.0f;
      out = cuda::from_float<TC>(g.alpha * acc[i][j] + g.beta * previous);
    }
  }
  // LAB END naive-gpu
}

template <class T, class TC>
void gemm_handwritten(const GemmShape& g, Operand<const T> a, Operand<const T> b, Operand<TC> c) {
  const dim3 grid(cuda::ceil_div(g.N, kTile), cuda::ceil_div(g.M, kTile), static_cast<unsigned>(g.count));
  gemm_tiled_kernel<T, TC><<<grid, kGemmThreads>>>(g, a, b, c);
  ATTN_CUDA_CHECK_LAUNCH();
}

template <class T, class TC>
void gemm(GpuKernels kernels, const GemmShape& g, Operand<const T> a, Operand<const T> b, Operand<TC> c) {
  if (g.M == 0 || g.N == 0 || g.count == 0) return;
  if (kernels == GpuKernels::cublas)
    gemm_cublas(g, a, b, c);
  else
    gemm_handwritten(g, a, b, c);
}

// ---- which heads one batched GEMM covers -------------------------------------------------------------
//
// A batched GEMM steps every operand by one fixed stride. Query heads g, g + G, g + 2G, ... (G = group size)
// read KV heads 0, 1, 2, ..., so one batch of Hkv entries covers them with fixed strides in both layouts.
// Looping over (batch b, position g in the group) covers every query head once: B * G launches per GEMM
// (B for multi-head attention).
struct HeadSlice {
  std::int64_t b = 0;  ///< batch entry
  std::int64_t g = 0;  ///< position in the group: query heads g + G z for z in [0, Hkv)
};

template <class Body>
void for_each_head_slice(const AttentionProblem& p, Body&& body) {
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t g = 0; g < p.group_size(); ++g) body(HeadSlice{b, g});
}

/// A Q-shaped tensor (q, o, d_o, dq): the [seq_q, head_dim] matrix of query head g + G z.
template <class T>
Operand<T> q_matrix(T* base, const AttentionProblem& p, const Strides& s, HeadSlice slice, bool transposed = false) {
  return {base + slice.b * s.batch + slice.g * s.head, s.seq, p.group_size() * s.head, transposed};
}
/// A K-shaped tensor (k, v): the [seq_k, head_dim] matrix of KV head z.
template <class T>
Operand<T> kv_matrix(T* base, const Strides& s, HeadSlice slice, bool transposed = false) {
  return {base + slice.b * s.batch, s.seq, s.head, transposed};
}
/// An [seq_q, seq_k] matrix of S, P, dP or dS for query head g + G z; these are contiguous [B, Hq, Nq, Nk].
template <class T>
Operand<T> score_matrix(T* base, const AttentionProblem& p, HeadSlice slice, bool transposed = false) {
  const std::int64_t matrix = p.seq_q * p.seq_k;
  return {base + (slice.b * p.q_heads + slice.g) * matrix, p.seq_k, p.group_size() * matrix, transposed};
}
/// The fp32 dK or dV accumulator of KV head z, contiguous [B, Hkv, Nk, D].
Operand<float> kv_accumulator(float* base, const AttentionProblem& p, HeadSlice slice) {
  return {base + slice.b * p.kv_heads * p.seq_k * p.head_dim, p.head_dim, p.seq_k * p.head_dim, false};
}

template <class T>
Operand<const T> as_const(Operand<T> m) {
  return {m.data, m.ld, m.batch_stride, m.transposed};
}

// ---- the row kernels: one thread block per row of S ---------------------------------------------------

constexpr int kRowThreads = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// Keys [0, visible_keys) are visible to query row i (AttentionProblem::visible_keys, bottom-right causal).
__device__ __forceinline__ std::int64_t visible_keys(std::int64_t i, std::int64_t seq_q, std::int64_t seq_k, bool causal) {
  if (!causal) return seq_k;
  const std::int64_t visible = i + seq_k - seq_q + 1;
  return visible < 0 ? 0 : (visible > seq_k ? seq_k : visible);
}

struct MaxOp {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
struct SumOp {
  __device__ float operator()(float x, float y) const { return x + y; }
};

/// Reduces one value per thread over the block (blockDim.x a multiple of 32, at most 1024); every thread
/// gets the result. Warps reduce with shuffles, then warp 0 reduces the warps' partial results.
template <class Op>
__device__ float block_reduce(float value, Op op, float identity) {
  __shared__ float partial[33];
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : identity;
    for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    if (lane == 0) partial[32] = value;
  }
  __syncthreads();
  const float result = partial[32];
  __syncthreads();  // a later call may overwrite partial[]
  return result;
}

/// Step 2 of the forward: P = softmax(S) along each row, with LSE = m + log(l) saved for the backward.
/// Masked keys (beyond visible_keys) get P = 0; a row that sees no key gets P = 0 and LSE = -inf.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    softmax_rows_kernel(const float* S, T* P, float* lse, std::int64_t seq_q, std::int64_t seq_k, bool causal) {
  // LAB BEGIN naive-gpu: one block per row: m, l by block reductions, P and LSE
  const std::int64_t row = blockIdx.x;  // (b, h, i) flattened, matching lse's [B, Hq, Nq] layout
  const std::int64_t visible = visible_keys(row % seq_q, seq_q, seq_k, causal);
  const float* s_row = S + row * seq_k;
  T* p_row = P + row * seq_k;
  // m = rowmax(S), over the visible keys.
  float m = kNegInf;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, s_row[j]);
  m = block_reduce(m, MaxOp{}, kNegInf);
  // l = rowsum(exp(S - m)): subtracting the max keeps every exponent <= 0, so nothing overflows.
  float l = 0.0f;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) l += expf(s_row[j] - m);
  l = block_reduce(l, SumOp{}, 0.0f);
  const float inverse_l = visible > 0 ? 1.0f / l : 0.0f;
  for (std::int64_t j = threadIdx.x; j < seq_k; j += blockDim.x)
    p_row[j] = cuda::from_float<T>(j < visible ? expf(s_row[j] - m) * inverse_l : 0.0f);
  if (threadIdx.x == 0) lse[row] = visible > 0 ? m + logf(l) : kNegInf;
  // LAB END naive-gpu
}

/// Backward, P recomputed from the scores and the saved LSE: P = exp(S - LSE) (0 where masked).
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    probabilities_from_lse_kernel(const float* S, const float* lse, T* P, std::int64_t seq_q, std::int64_t seq_k,
                                  bool causal) {
  const std::int64_t row = blockIdx.x;
  const std::int64_t visible = visible_keys(row % seq_q, seq_q, seq_k, causal);
  const float row_lse = lse[row];
  for (std::int64_t j = threadIdx.x; j < seq_k; j += blockDim.x)
    P[row * seq_k + j] = cuda::from_float<T>(j < visible ? expf(S[row * seq_k + j] - row_lse) : 0.0f);
}

/// Backward: dS = P * (dP - rowsum(dP * P)), the softmax's Jacobian applied to dP row by row.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    softmax_gradient_kernel(const float* dP, const T* P, T* dS, std::int64_t seq_k) {
  const std::int64_t row = blockIdx.x;
  const float* dp_row = dP + row * seq_k;
  const T* p_row = P + row * seq_k;
  float weighted = 0.0f;
  for (std::int64_t j = threadIdx.x; j < seq_k; j += blockDim.x) weighted += dp_row[j] * cuda::to_float(p_row[j]);
  weighted = block_reduce(weighted, SumOp{}, 0.0f);
  for (std::int64_t j = threadIdx.x; j < seq_k; j += blockDim.x)
    dS[row * seq_k + j] = cuda::from_float<T>(cuda::to_float(p_row[j]) * (dp_row[j] - weighted));
}

/// Copies the fp32 dK / dV accumulator ([B, Hkv, Nk, D] contiguous) to the output in its dtype and strides.
template <class T>
__global__ void store_kv_gradient_kernel(const float* accumulator, T* out, Strides s, std::int64_t kv_heads,
                                         std::int64_t seq_k, std::int64_t head_dim, std::int64_t count) {
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  const std::int64_t d = e % head_dim;
  const std::int64_t n = (e / head_dim) % seq_k;
  const std::int64_t h = (e / (head_dim * seq_k)) % kv_heads;
  const std::int64_t b = e / (head_dim * seq_k * kv_heads);
  out[b * s.batch + h * s.head + n * s.seq + d] = cuda::from_float<T>(accumulator[e]);
}

// ---- validation beyond the common rules ---------------------------------------------------------------

void require_device_pointer(const void* pointer, const char* name) {
  cudaPointerAttributes attributes{};
  ATTN_CUDA_CHECK(cudaPointerGetAttributes(&attributes, pointer));
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(name) + ": pointer is not device memory (naive/gpu reads and writes "
                                                    "its tensors on the GPU)");
}

void validate_gpu_call(const AttentionProblem& p, const AttentionTensors& t, bool backward) {
  validate_call(p, t, gpu_caps(), "naive/gpu", backward);
  require_device_pointer(t.q, "q");
  require_device_pointer(t.k, "k");
  require_device_pointer(t.v, "v");
  require_device_pointer(t.o, "o");
  require_device_pointer(t.lse, "lse");
  if (backward) {
    require_device_pointer(t.d_o, "d_o");
    require_device_pointer(t.dq, "dq");
    require_device_pointer(t.dk, "dk");
    require_device_pointer(t.dv, "dv");
  }
}

GpuKernels kernels_from_options(const StageOptions& options) {
  const std::int64_t handwritten = options.get("handwritten", 0);
  if (handwritten != 0 && handwritten != 1)
    throw std::invalid_argument("handwritten: " + std::to_string(handwritten) +
                                " must be 0 (cuBLAS GEMMs) or 1 (hand-written GEMM kernel)");
  return handwritten == 1 ? GpuKernels::handwritten : GpuKernels::cublas;
}

// ---- the two passes -------------------------------------------------------------------------------------

template <class T>
void forward_typed(const AttentionProblem& p, const AttentionTensors& t, GpuKernels kernels) {
  const auto* q = static_cast<const T*>(t.q);
  const auto* k = static_cast<const T*>(t.k);
  const auto* v = static_cast<const T*>(t.v);
  auto* o = static_cast<T*>(t.o);
  // Standard attention writes S and P to device memory in full: this stage's O(N^2) extra memory.
  DeviceBuffer<float> S(score_elements(p));
  DeviceBuffer<T> P(score_elements(p));

  // Step 1: S = scale * Q K^T, [Nq, Nk] per (batch, query head).
  for_each_head_slice(p, [&](HeadSlice slice) {
    GemmShape g{p.seq_q, p.seq_k, p.head_dim, p.kv_heads, p.softmax_scale(), 0.0f};
    gemm(kernels, g, q_matrix(q, p, t.q_strides, slice), kv_matrix(k, t.kv_strides, slice, /*transposed=*/true),
         score_matrix(S.data(), p, slice));
  });
  // Step 2: P = softmax(S) row by row; LSE saved for the backward.
  const std::int64_t rows = p.batch * p.q_heads * p.seq_q;
  softmax_rows_kernel<T><<<static_cast<unsigned>(rows), kRowThreads>>>(S.data(), P.data(), t.lse, p.seq_q, p.seq_k, p.causal);
  ATTN_CUDA_CHECK_LAUNCH();
  // Step 3: O = P V, [Nq, D] per (batch, query head).
  for_each_head_slice(p, [&](HeadSlice slice) {
    GemmShape g{p.seq_q, p.head_dim, p.seq_k, p.kv_heads, 1.0f, 0.0f};
    gemm(kernels, g, as_const(score_matrix(P.data(), p, slice)), kv_matrix(v, t.kv_strides, slice),
         q_matrix(o, p, t.q_strides, slice));
  });
}

template <class T>
void backward_typed(const AttentionProblem& p, const AttentionTensors& t, GpuKernels kernels) {
  const auto* q = static_cast<const T*>(t.q);
  const auto* k = static_cast<const T*>(t.k);
  const auto* v = static_cast<const T*>(t.v);
  const auto* d_o = static_cast<const T*>(t.d_o);
  auto* dq = static_cast<T*>(t.dq);
  const float scale = p.softmax_scale();
  DeviceBuffer<float> scores(score_elements(p));  // S, then dP
  DeviceBuffer<T> P(score_elements(p));
  DeviceBuffer<T> dS(score_elements(p));
  DeviceBuffer<float> dK(p.kv_elements());  // fp32 sums over the query heads of each group
  DeviceBuffer<float> dV(p.kv_elements());
  const std::int64_t rows = p.batch * p.q_heads * p.seq_q;

  // P is recomputed, not kept from the forward: S = scale Q K^T, then P = exp(S - LSE).
  for_each_head_slice(p, [&](HeadSlice slice) {
    GemmShape g{p.seq_q, p.seq_k, p.head_dim, p.kv_heads, scale, 0.0f};
    gemm(kernels, g, q_matrix(q, p, t.q_strides, slice), kv_matrix(k, t.kv_strides, slice, true),
         score_matrix(scores.data(), p, slice));
  });
  probabilities_from_lse_kernel<T><<<static_cast<unsigned>(rows), kRowThreads>>>(scores.data(), t.lse, P.data(), p.seq_q,
                                                                                  p.seq_k, p.causal);
  ATTN_CUDA_CHECK_LAUNCH();
  for_each_head_slice(p, [&](HeadSlice slice) {
    // dV = P^T dO, [Nk, D]; the slices with g > 0 add to what g = 0 wrote (beta = 1): the GQA sum.
    const float beta = slice.g == 0 ? 0.0f : 1.0f;
    GemmShape g{p.seq_k, p.head_dim, p.seq_q, p.kv_heads, 1.0f, beta};
    gemm(kernels, g, as_const(score_matrix(P.data(), p, slice, true)), q_matrix(d_o, p, t.q_strides, slice),
         kv_accumulator(dV.data(), p, slice));
    // dP = dO V^T, [Nq, Nk], over S (no longer needed).
    GemmShape g2{p.seq_q, p.seq_k, p.head_dim, p.kv_heads, 1.0f, 0.0f};
    gemm(kernels, g2, q_matrix(d_o, p, t.q_strides, slice), kv_matrix(v, t.kv_strides, slice, true),
         score_matrix(scores.data(), p, slice));
  });
  // dS = P * (dP - rowsum(dP * P)).
  softmax_gradient_kernel<T><<<static_cast<unsigned>(rows), kRowThreads>>>(scores.data(), P.data(), dS.data(), p.seq_k);
  ATTN_CUDA_CHECK_LAUNCH();
  for_each_head_slice(p, [&](HeadSlice slice) {
    // dQ = scale dS K, [Nq, D].
    GemmShape g{p.seq_q, p.head_dim, p.seq_k, p.kv_heads, scale, 0.0f};
    gemm(kernels, g, as_const(score_matrix(dS.data(), p, slice)), kv_matrix(k, t.kv_strides, slice),
         q_matrix(dq, p, t.q_strides, slice));
    // dK = scale dS^T Q, [Nk, D], summed over the group like dV.
    GemmShape g2{p.seq_k, p.head_dim, p.seq_q, p.kv_heads, scale, slice.g == 0 ? 0.0f : 1.0f};
    gemm(kernels, g2, as_const(score_matrix(dS.data(), p, slice, true)), q_matrix(q, p, t.q_strides, slice),
         kv_accumulator(dK.data(), p, slice));
  });
  const std::int64_t count = p.kv_elements();
  const int blocks = cuda::ceil_div(count, 256);
  store_kv_gradient_kernel<T><<<blocks, 256>>>(dK.data(), static_cast<T*>(t.dk), t.kv_strides, p.kv_heads, p.seq_k,
                                               p.head_dim, count);
  ATTN_CUDA_CHECK_LAUNCH();
  store_kv_gradient_kernel<T><<<blocks, 256>>>(dV.data(), static_cast<T*>(t.dv), t.kv_strides, p.kv_heads, p.seq_k,
                                               p.head_dim, count);
  ATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

TierCaps gpu_caps() { return TierCaps{{DType::f32, DType::bf16, DType::f16}, 256, {}, true, 0}; }

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, GpuKernels kernels) {
  validate_gpu_call(p, t, false);
  cuda::dispatch_dtype(t.dtype, [&](auto element) { forward_typed<decltype(element)>(p, t, kernels); });
}

void backward_gpu(const AttentionProblem& p, const AttentionTensors& t, GpuKernels kernels) {
  validate_gpu_call(p, t, true);
  cuda::dispatch_dtype(t.dtype, [&](auto element) { backward_typed<decltype(element)>(p, t, kernels); });
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_gpu(p, t, kernels_from_options(options));
    options.counters["Tc"] = 1;  // no K/V tiles: S is computed whole
  };
  gpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    backward_gpu(p, t, kernels_from_options(options));
  };
  gpu.extra_bytes = [](const AttentionProblem& p, DType dtype, bool backward) {
    return backward ? std::max(forward_scratch_bytes(p, dtype), backward_scratch_bytes(p, dtype))
                    : forward_scratch_bytes(p, dtype);
  };
  gpu.option_names = {"handwritten"};
  return gpu;
}

}  // namespace attn::naive
