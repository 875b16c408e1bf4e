// flash_v2, CPU tier: FlashAttention-2's Algorithm 1 (forward) and Algorithm 2 (backward), docs/papers/flash_v2.md.
// Forward: OpenMP threads own (batch, head, Q block) work items ("split-Q"); option split = 1 instead splits
// each Q block's K/V blocks across threads and merges their partial (O, m, l). Backward: threads own K/V blocks.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/cpu_tiles.hpp"
#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "flash_v2/flash_v2.hpp"

namespace attn::flash_v2 {
namespace {

using tiles::kNegInf;
using tiles::MatrixView;
using tiles::Update;

// Defaults measured on the 2-core EPYC dev machine (README, "Block sizes"). The forward re-reads K_j and V_j
// (2 Bc d floats) for every Q block, 4 Br Bc d FLOPs: 2 / Br bytes per FLOP, so Br should be large; with
// Br = Bc = 128 the tiles Q_i^T, S_ij and O_i (64 KiB each at d = 128) stay in the core's L2.
constexpr std::int64_t kDefaultBr = 128;
constexpr std::int64_t kDefaultBc = 128;

enum class Split { query = 0, key = 1 };
enum class DqAccumulation { thread_buffers = 0, atomics = 1 };

struct Settings {
  std::int64_t Br = 0;
  std::int64_t Bc = 0;
  Split split = Split::query;
  DqAccumulation dq = DqAccumulation::thread_buffers;
};

std::int64_t positive_option(const StageOptions& options, const char* name, std::int64_t fallback) {
  const std::int64_t value = options.get(name, fallback);
  if (value < 1)
    throw std::invalid_argument(std::string(name) + ": must be >= 1 (a block has at least one row), got " + std::to_string(value));
  return value;
}

std::int64_t choice_option(const StageOptions& options, const char* name, const char* meaning) {
  const std::int64_t value = options.get(name, 0);
  if (value != 0 && value != 1)
    throw std::invalid_argument(std::string(name) + ": must be 0 or 1 (" + meaning + "), got " + std::to_string(value));
  return value;
}

// Block sizes never exceed the sequence: a 10^6-row block on a 37-row problem is one 37-row block.
Settings read_settings(const AttentionProblem& p, const StageOptions& options) {
  Settings s;
  s.Br = std::min(positive_option(options, "block_rows", kDefaultBr), p.seq_q);
  s.Bc = std::min(positive_option(options, "block_cols", kDefaultBc), p.seq_k);
  s.split = static_cast<Split>(choice_option(options, "split", "0 = split-Q, 1 = split-K"));
  s.dq = static_cast<DqAccumulation>(choice_option(options, "dq_atomic", "0 = per-thread dQ buffers, 1 = atomic adds"));
  return s;
}

std::int64_t blocks_of(std::int64_t n, std::int64_t block) { return (n + block - 1) / block; }

// Causal: the K/V blocks a Q block of rows [row0, row0 + rows) must visit. Its last row sees the most keys;
// blocks past them lie entirely above the diagonal and are skipped (FA2's causal block skipping).
std::int64_t kv_blocks_for_rows(const AttentionProblem& p, std::int64_t row0, std::int64_t rows, std::int64_t Bc) {
  return blocks_of(p.visible_keys(row0 + rows - 1), Bc);
}

// ---- forward: one Q block's on-chip state and the three phases of Algorithm 1 ------------------------------

// What FA2 keeps on chip for Q block i (FA2 Alg. 1 lines 4-5). S is stored key-major (row = key, column = query;
// see common/cpu_tiles.hpp) so that m_i and l_i are updated with vertical SIMD operations.
struct QueryBlock {
  QueryBlock(std::int64_t Br, std::int64_t Bc, std::int64_t D)
      : padded(tiles::round_up_to_lanes(Br)), Qt(D * padded), S(Bc * padded), O(Br * D), m(padded), l(padded),
        m_new(padded), shift(padded), alpha(padded) {}
  std::int64_t padded;          // Br rounded up to the SIMD width: the column count (and row stride) of Q_i^T and S
  std::int64_t row0 = 0, rows = 0;
  HostBuffer<float> Qt;         // D x padded: scale * Q_i^T (the softmax scale folded into Q once)
  HostBuffer<float> S;          // Bc x padded: S_ij^T, overwritten by P~_ij^T
  HostBuffer<float> O;          // Br x D: the unnormalised output O_i^(j)
  HostBuffer<float> m, l;       // m_i^(j), l_i^(j), one per query
  HostBuffer<float> m_new, shift, alpha;
};

// FA2 Alg. 1 lines 4-5: load Q_i, set O_i = 0, l_i = 0, m_i = -inf.
void start_query_block(const AttentionProblem& p, const float* q_rows, std::int64_t q_seq_stride, std::int64_t row0,
                       std::int64_t rows, QueryBlock& block) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 4-5: load Q_i; O_i = 0, m_i = -inf, l_i = 0
  const std::int64_t D = p.head_dim;
  block.row0 = row0;
  block.rows = rows;
  tiles::pack_transposed(q_rows + row0 * q_seq_stride, rows, D, q_seq_stride, p.softmax_scale(), block.Qt.data(), block.padded, block.padded);
  std::fill(block.O.begin(), block.O.begin() + rows * D, 0.0f);
  std::fill(block.m.begin(), block.m.end(), kNegInf);
  std::fill(block.l.begin(), block.l.end(), 0.0f);
  // LAB END flash-v2-forward
}

// Causal mask on a block that straddles the diagonal: query r sees keys below visible_keys(row0 + r).
void mask_above_diagonal(const AttentionProblem& p, QueryBlock& block, std::int64_t key0, std::int64_t keys) {
  for (std::int64_t r = 0; r < block.rows; ++r) {
    const std::int64_t first_hidden = std::max<std::int64_t>(p.visible_keys(block.row0 + r) - key0, 0);
    for (std::int64_t k = first_hidden; k < keys; ++k) block.S[k * block.padded + r] = kNegInf;
  }
}

// FA2 Alg. 1 lines 7-10 for K/V block j (keys [key0, key0 + keys)): S = Q_i K_j^T, the online softmax update of m_i
// and l_i, and O_i = diag(exp(m_old - m_new)) O_i + P~ V_j. O_i stays unnormalised (FA2's first tweak).
void attend_kv_block(const AttentionProblem& p, QueryBlock& block, const float* k_rows, const float* v_rows,
                     std::int64_t kv_seq_stride, std::int64_t key0, std::int64_t keys) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 7-10: S, the online softmax, O_i rescaled, O_i += P~ V_j
  const std::int64_t D = p.head_dim, padded = block.padded;
  // Line 8: S_ij^T = K_j (scale Q_i^T), keys x padded.
  tiles::matmul(Update::overwrite, keys, padded, D, MatrixView{k_rows + key0 * kv_seq_stride, kv_seq_stride, 1},
                block.Qt.data(), padded, block.S.data(), padded);
  if (p.causal && key0 + keys > p.visible_keys(block.row0)) mask_above_diagonal(p, block, key0, keys);
  // Line 9: m_new = max(m_old, rowmax(S)); P~ = exp(S - m_new); l = exp(m_old - m_new) l + rowsum(P~).
  std::copy(block.m.begin(), block.m.end(), block.m_new.begin());
  tiles::max_over_keys(block.S.data(), keys, padded, padded, block.m_new.data());
  for (std::int64_t r = 0; r < padded; ++r) {
    // A query that has seen only masked keys keeps m = -inf; shifting by 0 then gives exp(-inf) = 0, not NaN.
    block.shift[r] = block.m_new[r] == kNegInf ? 0.0f : block.m_new[r];
    block.alpha[r] = std::exp(block.m[r] - block.shift[r]);
    block.l[r] *= block.alpha[r];
    block.m[r] = block.m_new[r];
  }
  tiles::exp_over_keys(block.S.data(), keys, padded, padded, block.shift.data(), block.l.data());
  // Line 10: O_i = diag(alpha) O_i + P~_ij V_j (P~ read transposed out of the key-major tile).
  tiles::scale_rows(block.O.data(), block.rows, D, D, block.alpha.data());
  tiles::matmul(Update::accumulate, block.rows, D, keys, tiles::transposed(block.S.data(), padded),
                v_rows + key0 * kv_seq_stride, kv_seq_stride, block.O.data(), D);
  // LAB END flash-v2-forward
}

// FA2 Alg. 1 lines 12-15: O_i = diag(l_i)^-1 O_i and L_i = m_i + log(l_i), written once. A row that saw no key
// (causal, Nq > Nk) has l = 0: O = 0, L = -inf.
void finish_query_block(const AttentionProblem& p, const QueryBlock& block, float* o_rows, std::int64_t o_seq_stride,
                        float* lse) {
  // LAB BEGIN flash-v2-forward: FA2 Alg. 1 lines 12-15: O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i)
  const std::int64_t D = p.head_dim;
  for (std::int64_t r = 0; r < block.rows; ++r) {
    float* out = o_rows + (block.row0 + r) * o_seq_stride;
    const float l = block.l[r];
    const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
    for (std::int64_t d = 0; d < D; ++d) out[d] = inverse * block.O[r * D + d];
    lse[block.row0 + r] = l > 0.0f ? block.m[r] + std::log(l) : kNegInf;
  }
  // LAB END flash-v2-forward
}

struct Head {
  const float *q, *k, *v;  // row 0 of this (batch, head)'s Q and of its KV head's K, V
  float* o;
  float* lse;
};

Head head_pointers(const AttentionProblem& p, const AttentionTensors& t, std::int64_t b, std::int64_t h) {
  const std::int64_t kv_head = p.kv_head_of(h);
  return Head{row_pointer(static_cast<const float*>(t.q), t.q_strides, b, h, 0),
              row_pointer(static_cast<const float*>(t.k), t.kv_strides, b, kv_head, 0),
              row_pointer(static_cast<const float*>(t.v), t.kv_strides, b, kv_head, 0),
              row_pointer(static_cast<float*>(t.o), t.q_strides, b, h, 0), t.lse + (b * p.q_heads + h) * p.seq_q};
}

// Split-Q (the default; FA2 Sec. 3.2-3.3): each thread takes whole (batch, head, Q block) items and runs the
// entire inner loop over K/V blocks for them; no thread ever needs another's partial results.
void forward_split_query(const AttentionProblem& p, const AttentionTensors& t, const Settings& s) {
  const std::int64_t Tr = blocks_of(p.seq_q, s.Br);
  const std::int64_t items = p.batch * p.q_heads * Tr;
  progress::expect(static_cast<double>(items));
#pragma omp parallel
  {
    QueryBlock block(s.Br, s.Bc, p.head_dim);
    // Causal items differ in cost (early Q blocks see few keys): hand them out dynamically.
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t bh = item / Tr, i = item % Tr;  // FA2 Alg. 1 line 3: for each Q block i (in parallel)
      progress::advance();
      const Head head = head_pointers(p, t, bh / p.q_heads, bh % p.q_heads);
      const std::int64_t row0 = i * s.Br, rows = std::min(s.Br, p.seq_q - row0);
      start_query_block(p, head.q, t.q_strides.seq, row0, rows, block);
      const std::int64_t Tc = p.causal ? kv_blocks_for_rows(p, row0, rows, s.Bc) : blocks_of(p.seq_k, s.Bc);
      for (std::int64_t j = 0; j < Tc; ++j)  // FA2 Alg. 1 line 6
        attend_kv_block(p, block, head.k, head.v, t.kv_strides.seq, j * s.Bc, std::min(s.Bc, p.seq_k - j * s.Bc));
      finish_query_block(p, block, head.o, t.q_strides.seq, head.lse);
    }
  }
}

// Split-K (FlashAttention-1's partitioning, kept to measure it): all threads work on the same Q block, each on
// its share of the K/V blocks, then merge their partial (O, m, l): m = max_t m_t,
// l = sum_t exp(m_t - m) l_t, O = sum_t exp(m_t - m) O_t / l. Two barriers per Q block.
void forward_split_key(const AttentionProblem& p, const AttentionTensors& t, const Settings& s) {
  const std::int64_t D = p.head_dim;
  const std::int64_t Tr = blocks_of(p.seq_q, s.Br);
  const int threads = omp_get_max_threads();
  HostBuffer<float> partial_O(threads * s.Br * D), partial_m(threads * s.Br), partial_l(threads * s.Br);
#pragma omp parallel num_threads(threads)
  {
    QueryBlock block(s.Br, s.Bc, D);
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    for (std::int64_t item = 0; item < p.batch * p.q_heads * Tr; ++item) {
      const std::int64_t bh = item / Tr, i = item % Tr;
      const Head head = head_pointers(p, t, bh / p.q_heads, bh % p.q_heads);
      const std::int64_t row0 = i * s.Br, rows = std::min(s.Br, p.seq_q - row0);
      start_query_block(p, head.q, t.q_strides.seq, row0, rows, block);
      const std::int64_t Tc = p.causal ? kv_blocks_for_rows(p, row0, rows, s.Bc) : blocks_of(p.seq_k, s.Bc);
      for (std::int64_t j = me * Tc / team; j < (me + 1) * Tc / team; ++j)  // this thread's share of the K/V blocks
        attend_kv_block(p, block, head.k, head.v, t.kv_strides.seq, j * s.Bc, std::min(s.Bc, p.seq_k - j * s.Bc));
      std::copy(block.O.begin(), block.O.begin() + rows * D, partial_O.begin() + me * s.Br * D);
      std::copy(block.m.begin(), block.m.begin() + rows, partial_m.begin() + me * s.Br);
      std::copy(block.l.begin(), block.l.begin() + rows, partial_l.begin() + me * s.Br);
#pragma omp barrier
      // The exchange split-Q avoids: each thread merges some rows from every thread's partial results.
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        float m = kNegInf;
        for (int u = 0; u < team; ++u) m = std::max(m, partial_m[u * s.Br + r]);
        float l = 0.0f;
        float* out = head.o + (row0 + r) * t.q_strides.seq;
        std::fill(out, out + D, 0.0f);
        if (m != kNegInf)
          for (int u = 0; u < team; ++u) {
            const float weight = std::exp(partial_m[u * s.Br + r] - m);
            l += weight * partial_l[u * s.Br + r];
            simd::axpy(weight, partial_O.data() + (u * s.Br + r) * D, out, D);
          }
        if (l > 0.0f) simd::scale(1.0f / l, out, D);
        head.lse[row0 + r] = l > 0.0f ? m + std::log(l) : kNegInf;
      }  // implicit barrier: the partial buffers are free again
    }
  }
}

// ---- backward: Algorithm 2 -----------------------------------------------------------------------------------

// One thread's on-chip tiles for K/V block j (FA2 Alg. 2 lines 6-7) and for the current Q block. Query-major here:
// K_j^T and V_j^T are packed once per K/V block and reused by every Q block of the inner loop.
struct KeyBlockTiles {
  KeyBlockTiles(std::int64_t Br, std::int64_t Bc, std::int64_t D)
      : Qs(Br * D), Kt(D * Bc), Vt(D * Bc), dK(Bc * D), dV(Bc * D), P(Br * Bc), dS(Br * Bc), dQ(Br * D) {}
  HostBuffer<float> Qs;      // Br x D: scale * Q_i, rounded as the forward's, for S = (scale Q_i) K_j^T
  HostBuffer<float> Kt, Vt;  // D x Bc: K_j^T and V_j^T (Bc here is the row stride: the block rounded up to lanes)
  HostBuffer<float> dK, dV;  // Bc x D: the accumulators of FA2 Alg. 2 line 7
  HostBuffer<float> P, dS;   // Br x Bc: P_ij, and dP_ij overwritten by dS_ij (which includes the softmax scale)
  HostBuffer<float> dQ;      // Br x D: dS_ij K_j before it is added to dQ_i (atomic mode only)
};

// Where a thread's contribution to dQ goes. FA2 Alg. 2 line 15 is a read-modify-write of dQ_i that several
// threads (owning different K/V blocks) do to the same rows: either each thread adds into its own copy of dQ
// for the current KV head's query heads, summed after the loop, or it adds straight into dQ with atomic adds.
struct DqTarget {
  DqAccumulation mode;
  float* rows;            // row 0 of this thread's buffer (thread_buffers) or of dQ itself (atomics)
  std::int64_t seq_stride;
};

void add_dq(const DqTarget& target, KeyBlockTiles& tile, const float* k_rows, std::int64_t kv_seq_stride,
            std::int64_t row0, std::int64_t rows, std::int64_t keys, std::int64_t ld, std::int64_t D) {
  const MatrixView dS{tile.dS.data(), ld, 1};
  float* dq_rows = target.rows + row0 * target.seq_stride;
  if (target.mode == DqAccumulation::thread_buffers) {
    tiles::matmul(Update::accumulate, rows, D, keys, dS, k_rows, kv_seq_stride, dq_rows, target.seq_stride);
    return;
  }
  float* scratch = tile.dQ.data();
  tiles::matmul(Update::overwrite, rows, D, keys, dS, k_rows, kv_seq_stride, scratch, D);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t d = 0; d < D; ++d)
      std::atomic_ref<float>(dq_rows[r * target.seq_stride + d]).fetch_add(scratch[r * D + d], std::memory_order_relaxed);
}

}  // namespace

TierCaps cpu_caps() { return TierCaps{{DType::f32}, 256, {}, true, 0}; }

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "flash_v2/cpu", false);
  const Settings s = read_settings(p, options);
  if (s.split == Split::query)
    forward_split_query(p, t, s);
  else
    forward_split_key(p, t, s);
}

void backward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "flash_v2/cpu", true);
  // LAB BEGIN flash-v2-backward: FA2 Alg. 2: D once, K/V blocks in parallel, dQ by buffers or atomics
  const Settings s = read_settings(p, options);
  const std::int64_t D = p.head_dim, Br = s.Br, Bc = s.Bc, group = p.group_size();
  const float scale = p.softmax_scale();
  const auto* q = static_cast<const float*>(t.q);
  const auto* k = static_cast<const float*>(t.k);
  const auto* v = static_cast<const float*>(t.v);
  const auto* o = static_cast<const float*>(t.o);
  const auto* d_o = static_cast<const float*>(t.d_o);
  auto* dq = static_cast<float*>(t.dq);
  auto* dk = static_cast<float*>(t.dk);
  auto* dv = static_cast<float*>(t.dv);
  const std::int64_t q_seq = t.q_strides.seq, kv_seq = t.kv_strides.seq;

  // FA2 Alg. 2 line 4: D = rowsum(dO * O), once for every query row (FA1 recomputed it in every inner step).
  HostBuffer<float> Dsum(p.batch * p.q_heads * p.seq_q);
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t bh = 0; bh < p.batch * p.q_heads; ++bh)
    for (std::int64_t i = 0; i < p.seq_q; ++i) {
      const std::int64_t b = bh / p.q_heads, h = bh % p.q_heads;
      Dsum[bh * p.seq_q + i] = simd::dot(row_pointer(d_o, t.q_strides, b, h, i), row_pointer(o, t.q_strides, b, h, i), D);
    }

  const int threads = omp_get_max_threads();
  const std::int64_t head_block = p.seq_q * D;  // one query head's dQ in a thread buffer
  HostBuffer<float> dq_buffers(s.dq == DqAccumulation::thread_buffers ? threads * group * head_block : 0);
  const std::int64_t Tc = blocks_of(p.seq_k, Bc);
  // Key-indexed tiles have a row stride of Bc rounded up to the SIMD width, so that S = (scale Q_i) K_j^T runs
  // through the SIMD micro-kernel for every key, as the forward's S does for every query: the two passes then
  // round S the same way (the scalar tail may fuse the multiply-add where the vector code does not, or not).
  const std::int64_t ld = tiles::round_up_to_lanes(Bc);
  double reduction_seconds = 0;
  progress::expect(static_cast<double>(p.batch * p.kv_heads * Tc));

  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
      const float* k_rows = row_pointer(k, t.kv_strides, b, kv_head, 0);
      const float* v_rows = row_pointer(v, t.kv_strides, b, kv_head, 0);
      const std::int64_t h0 = kv_head * group;  // the query heads that read this KV head (GQA)
      // FA2 Alg. 2 line 3: dQ = 0 (in the thread buffers, or in dQ itself for atomic adds).
      if (s.dq == DqAccumulation::atomics)
        for (std::int64_t g = 0; g < group; ++g)
          for (std::int64_t i = 0; i < p.seq_q; ++i) std::fill_n(row_pointer(dq, t.q_strides, b, h0 + g, i), D, 0.0f);
#pragma omp parallel num_threads(threads)
      {
        KeyBlockTiles tile(Br, ld, D);
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        float* my_dq = s.dq == DqAccumulation::thread_buffers ? dq_buffers.data() + me * group * head_block : nullptr;
        if (my_dq != nullptr) std::fill_n(my_dq, group * head_block, 0.0f);
        // FA2 Alg. 2 line 5: for each K/V block j, in parallel (FA2's parallelism over the sequence in the backward).
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t j = 0; j < Tc; ++j) {
          progress::advance();
          const std::int64_t key0 = j * Bc, keys = std::min(Bc, p.seq_k - key0);
          // Lines 6-7: load K_j, V_j (transposed, for S and dP); dK_j = dV_j = 0.
          tiles::pack_transposed(k_rows + key0 * kv_seq, keys, D, kv_seq, 1.0f, tile.Kt.data(), ld, ld);
          tiles::pack_transposed(v_rows + key0 * kv_seq, keys, D, kv_seq, 1.0f, tile.Vt.data(), ld, ld);
          std::fill_n(tile.dK.data(), keys * D, 0.0f);
          std::fill_n(tile.dV.data(), keys * D, 0.0f);
          // Causal: Q rows before first_row see none of these keys; their blocks are skipped.
          const std::int64_t first_row = p.causal ? std::max<std::int64_t>(key0 + p.seq_q - p.seq_k, 0) : 0;
          for (std::int64_t g = 0; g < group; ++g) {  // GQA: dK_j, dV_j sum over the group's query heads
            const std::int64_t h = h0 + g, bh = b * p.q_heads + h;
            const float* q_rows = row_pointer(q, t.q_strides, b, h, 0);
            const float* do_rows = row_pointer(d_o, t.q_strides, b, h, 0);
            const float* lse = t.lse + bh * p.seq_q;
            const float* Di = Dsum.data() + bh * p.seq_q;
            const DqTarget target = my_dq != nullptr ? DqTarget{s.dq, my_dq + g * head_block, D}
                                                     : DqTarget{s.dq, row_pointer(dq, t.q_strides, b, h, 0), q_seq};
            for (std::int64_t row0 = first_row / Br * Br; row0 < p.seq_q; row0 += Br) {  // line 8
              const std::int64_t rows = std::min(Br, p.seq_q - row0);
              const MatrixView Qi{q_rows + row0 * q_seq, q_seq, 1}, dOi{do_rows + row0 * q_seq, q_seq, 1};
              // Line 10: S = (scale Q_i) K_j^T, with the causal mask on blocks that straddle the diagonal. The scale
              // goes on Q, as in the forward, so that S is rounded the same way there and here: P = exp(S - L) then
              // stays <= 1. (Scaling K instead shifts S by an ulp of S, which at logits near 1e4 is 1e-3: P and dV
              // were off by that much.)
              for (std::int64_t r = 0; r < rows; ++r)
                for (std::int64_t d = 0; d < D; ++d) tile.Qs[r * D + d] = scale * Qi.at(r, d);
              tiles::matmul(Update::overwrite, rows, tiles::round_up_to_lanes(keys), D, MatrixView{tile.Qs.data(), D, 1},
                            tile.Kt.data(), ld, tile.P.data(), ld);
              // Line 11: P = exp(S - L_i).
              for (std::int64_t r = 0; r < rows; ++r) {
                float* p_row = tile.P.data() + r * ld;
                const std::int64_t visible = p.causal ? std::clamp<std::int64_t>(p.visible_keys(row0 + r) - key0, 0, keys) : keys;
                tiles::exp_shifted(p_row, lse[row0 + r], visible);
                std::fill(p_row + visible, p_row + keys, 0.0f);
              }
              // Line 12: dV_j += P^T dO_i.
              tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.P.data(), ld), do_rows + row0 * q_seq,
                            q_seq, tile.dV.data(), D);
              // Line 13: dP = dO_i V_j^T.
              tiles::matmul(Update::overwrite, rows, keys, D, dOi, tile.Vt.data(), ld, tile.dS.data(), ld);
              // Line 14: dS = P * (dP - D_i), times the softmax scale that both dQ and dK need.
              for (std::int64_t r = 0; r < rows; ++r)
                tiles::softmax_gradient_row(tile.P.data() + r * ld, tile.dS.data() + r * ld, Di[row0 + r], scale, keys);
              // Line 15: dQ_i += dS K_j (into the thread's buffer, or atomically into dQ).
              add_dq(target, tile, k_rows + key0 * kv_seq, kv_seq, row0, rows, keys, ld, D);
              // Line 16: dK_j += dS^T Q_i.
              tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.dS.data(), ld), q_rows + row0 * q_seq,
                            q_seq, tile.dK.data(), D);
            }
          }
          // Line 18: write dK_j, dV_j (this thread owns these key rows: no race).
          tiles::copy_rows(tile.dK.data(), keys, D, D, row_pointer(dk, t.kv_strides, b, kv_head, key0), kv_seq);
          tiles::copy_rows(tile.dV.data(), keys, D, D, row_pointer(dv, t.kv_strides, b, kv_head, key0), kv_seq);
        }  // implicit barrier: every thread's dQ contributions are in its buffer
        if (my_dq != nullptr) {
          // The reduction of the per-thread dQ buffers, rows split across the threads (timed by thread 0 for
          // the counter "dq_reduction_ms": the price of this choice over atomics).
          const double start = omp_get_wtime();
#pragma omp for schedule(static)
          for (std::int64_t row = 0; row < group * p.seq_q; ++row) {
            float* out = row_pointer(dq, t.q_strides, b, h0 + row / p.seq_q, row % p.seq_q);
            std::copy_n(dq_buffers.data() + row * D, D, out);
            for (int u = 1; u < team; ++u) simd::axpy(1.0f, dq_buffers.data() + u * group * head_block + row * D, out, D);
          }  // implicit barrier
          if (me == 0) reduction_seconds += omp_get_wtime() - start;
        }
      }
    }
  if (s.dq == DqAccumulation::thread_buffers) options.counters["dq_reduction_ms"] = 1e3 * reduction_seconds;
  // LAB END flash-v2-backward
}

Stage describe() {
  Stage stage;
  stage.name = "flash_v2";
  stage.paper = "FlashAttention-2 (Dao 2023)";
  stage.adds = "loops swapped (Q blocks outer), unscaled O, only L saved, causal blocks skipped, split-Q";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_cpu(p, t, options);
    options.counters["Tc"] = static_cast<double>(blocks_of(p.seq_k, read_settings(p, options).Bc));
  };
  cpu.backward = backward_cpu;
  // Per-thread tiles are O(Br Bc + (Br + Bc) D); the backward adds D = rowsum(dO * O) and, with the default
  // per-thread dQ buffers, threads x group x Nq x D floats: all O(N).
  // (An estimate for the default block sizes: the harness uses it only to refuse problems that cannot fit.)
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward, const StageOptions& options) {
    const std::int64_t threads = omp_get_max_threads(), D = p.head_dim;
    const Settings s = read_settings(p, options);  // the block sizes the run will use
    const std::int64_t Br = s.Br, Bc = s.Bc;
    const std::int64_t forward_tiles = threads * (D * Br + Bc * Br + Br * D + 5 * Br);
    const std::int64_t ld = tiles::round_up_to_lanes(Bc);
    const std::int64_t backward_tiles = threads * (4 * D * ld + 2 * Br * ld + 2 * Br * D);
    const std::int64_t floats = backward ? backward_tiles + p.batch * p.q_heads * p.seq_q + threads * p.group_size() * p.seq_q * D
                                         : forward_tiles;
    return static_cast<std::size_t>(floats) * sizeof(float);
  };
  cpu.option_names = {"block_rows", "block_cols", "split", "dq_atomic"};
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::flash_v2
