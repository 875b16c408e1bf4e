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
#include "common/flash_cpu.hpp"
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
using flash_cpu::Head;
using flash_cpu::head_pointers;

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

// ---- forward: the three phases of Algorithm 1 (the steps are in common/flash_cpu.hpp) ----------------------

using flash_cpu::QueryBlock;

// Causal mask on a block that straddles the diagonal: query r sees keys below visible_keys(row0 + r).
void mask_above_diagonal(const AttentionProblem& p, QueryBlock& block, std::int64_t key0, std::int64_t keys) {
  for (std::int64_t r = 0; r < block.rows; ++r) {
    const std::int64_t first_hidden = std::max<std::int64_t>(p.visible_keys(block.row0 + r) - key0, 0);
    for (std::int64_t k = first_hidden; k < keys; ++k) block.S[k * block.padded + r] = kNegInf;
  }
}

// FA2 Alg. 1 lines 7-10 for K/V block j (keys [key0, key0 + keys)): S = Q_i K_j^T, the causal mask where the
// block straddles the diagonal, then the online softmax update of m_i, l_i and O_i.
void attend_kv_block(const AttentionProblem& p, QueryBlock& block, const float* k_rows, const float* v_rows,
                     std::int64_t kv_seq_stride, std::int64_t key0, std::int64_t keys) {
  flash_cpu::score_tile(block, k_rows, kv_seq_stride, key0, keys, p.head_dim);
  if (p.causal && key0 + keys > p.visible_keys(block.row0)) mask_above_diagonal(p, block, key0, keys);
  flash_cpu::softmax_update(block, v_rows, kv_seq_stride, key0, keys, p.head_dim);
}

void start_query_block(const AttentionProblem& p, const float* q_rows, std::int64_t q_seq_stride, std::int64_t row0,
                       std::int64_t rows, QueryBlock& block) {
  flash_cpu::start_query_block(q_rows, q_seq_stride, row0, rows, p.head_dim, p.softmax_scale(), block);
}

// FA2 Alg. 1 lines 12-15: O_i = diag(l_i)^-1 O_i and L_i = m_i + log(l_i), written once. A row that saw no key
// (causal, Nq > Nk) has l = 0: O = 0, L = -inf.
void finish_query_block(const AttentionProblem& p, const QueryBlock& block, float* o_rows, std::int64_t o_seq_stride,
                        float* lse) {
  for (std::int64_t r = 0; r < block.rows; ++r)
    lse[block.row0 + r] = flash_cpu::finish_row(block, r, p.head_dim, o_rows + (block.row0 + r) * o_seq_stride);
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

using flash_cpu::KeyBlockTiles;

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
          flash_cpu::start_key_block(k_rows + key0 * kv_seq, v_rows + key0 * kv_seq, kv_seq, keys, D, tile);
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
              // Line 10: S = (scale Q_i) K_j^T (the scale on Q, as in the forward: see flash_cpu::score_rows).
              flash_cpu::score_rows(q_rows + row0 * q_seq, q_seq, rows, keys, D, scale, tile);
              // Line 11: P = exp(S - L_i), with the causal mask on blocks that straddle the diagonal.
              for (std::int64_t r = 0; r < rows; ++r) {
                float* p_row = tile.P.data() + r * ld;
                const std::int64_t visible = p.causal ? std::clamp<std::int64_t>(p.visible_keys(row0 + r) - key0, 0, keys) : keys;
                tiles::exp_shifted(p_row, lse[row0 + r], visible);
                std::fill(p_row + visible, p_row + keys, 0.0f);
              }
              // Lines 12-14: dV_j += P^T dO_i; dP = dO_i V_j^T; dS = P * (dP - D_i) (times the scale).
              flash_cpu::value_and_score_gradients(do_rows + row0 * q_seq, q_seq, Di + row0, rows, keys, D, scale, tile);
              // Line 15: dQ_i += dS K_j (into the thread's buffer, or atomically into dQ).
              add_dq(target, tile, k_rows + key0 * kv_seq, kv_seq, row0, rows, keys, ld, D);
              // Line 16: dK_j += dS^T Q_i.
              flash_cpu::key_gradient(q_rows + row0 * q_seq, q_seq, rows, keys, D, tile);
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
