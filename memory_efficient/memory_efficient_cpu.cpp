// memory_efficient, CPU tier: Rabe & Staats' chunked attention (RS Alg. 2 and 3) as plain loops.
// Forward: per (batch, head, query chunk) a summary of every key chunk, then one combine through the global max.
// Backward: the summaries' scores recomputed chunk by chunk from the saved log-sum-exp. OpenMP + xsimd.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "memory_efficient/memory_efficient.hpp"

namespace attn::memory_efficient {
namespace {

const float kNegInf = -std::numeric_limits<float>::infinity();

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

void require_chunk(std::int64_t value, const char* name) {
  if (value < 1) throw std::invalid_argument(std::string(name) + ": " + std::to_string(value) + " must be >= 1");
}

// Chunk sizes as used on one problem: a chunk never exceeds its sequence, so a chunk size larger than N
// means one chunk (and no scratch wasted on rows that do not exist).
struct ChunkPlan {
  std::int64_t Cq = 1;           // query rows per chunk
  std::int64_t Ck = 1;           // keys per chunk
  std::int64_t query_chunks = 1;  // ceil(Nq / Cq)
  std::int64_t key_chunks = 1;    // ceil(Nk / Ck)
};

ChunkPlan plan_chunks(const AttentionProblem& p, const Chunks& chunks) {
  ChunkPlan plan;
  plan.Cq = std::min(chunks.query, p.seq_q);
  plan.Ck = std::min(chunks.key, p.seq_k);
  plan.query_chunks = ceil_div(p.seq_q, plan.Cq);
  plan.key_chunks = ceil_div(p.seq_k, plan.Ck);
  return plan;
}

// Worker threads that get scratch: never more than there are work items.
std::int64_t worker_threads(std::int64_t work_items) {
  return std::max<std::int64_t>(1, std::min<std::int64_t>(omp_get_max_threads(), work_items));
}

// Floats of one forward worker's scratch: the score block of one (query chunk, key chunk), the key chunk
// transposed for the score kernel, and the summaries of all key chunks for one query chunk.
std::int64_t forward_scratch_floats(const AttentionProblem& p, const ChunkPlan& plan) {
  return plan.Cq * plan.Ck + p.head_dim * plan.Ck + plan.key_chunks * plan.Cq * (p.head_dim + 2);
}

// Floats of one backward worker's scratch: the recomputed P and dS blocks and K, V of the key chunk transposed.
std::int64_t backward_scratch_floats(const AttentionProblem& p, const ChunkPlan& plan) {
  return 2 * plan.Cq * plan.Ck + 2 * p.head_dim * plan.Ck;
}

// ---- vector inner loops (xsimd): the two shapes of product this stage needs --------------------------------
//
// Both work on R = 4 rows at once (R = 1 for a remainder), so that every vector loaded from a key or value
// chunk feeds R fused multiply-adds: with one row at a time the loops wait on loads from L2, not on arithmetic.

constexpr int kRowBlock = 4;

// Calls body(r, std::integral_constant<int, R>) for row groups [r, r + R) covering [0, count).
template <class Body>
void for_row_groups(std::int64_t count, Body&& body) {
  std::int64_t r = 0;
  for (; r + kRowBlock <= count; r += kRowBlock) body(r, std::integral_constant<int, kRowBlock>{});
  for (; r < count; ++r) body(r, std::integral_constant<int, 1>{});
}

// packed[d * ld + n] = rows[n * row_stride + d] for n < count: a key chunk transposed, so that the same
// coordinate d of consecutive keys is one vector load.
void pack_transposed(const float* rows, std::int64_t row_stride, std::int64_t count, std::int64_t D, float* packed,
                     std::int64_t ld) {
  for (std::int64_t n = 0; n < count; ++n)
    for (std::int64_t d = 0; d < D; ++d) packed[d * ld + n] = rows[n * row_stride + d];
}

// out[r * out_row + j] = alpha * sum_d x_r[d] packed[d * ld + j] for r < R, j < count, with x_r = x + r *
// x_stride: R rows of Q (or dO) against `count` transposed keys (or values), a block of Q K^T, 2 x lanes keys
// per step and no horizontal sums.
template <int R>
void rows_times_packed(const float* x, std::int64_t x_stride, const float* packed, std::int64_t ld, std::int64_t D,
                       std::int64_t count, float alpha, float* out, std::int64_t out_row) {
  using simd::batch;
  using simd::lanes;
  std::int64_t j = 0;
  for (; j + 2 * lanes <= count; j += 2 * lanes) {
    batch acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = batch(0.0f);
    for (std::int64_t d = 0; d < D; ++d) {
      const batch k0 = batch::load_unaligned(packed + d * ld + j), k1 = batch::load_unaligned(packed + d * ld + j + lanes);
      for (int r = 0; r < R; ++r) {
        const batch x_rd(x[r * x_stride + d]);
        acc[r][0] = xsimd::fma(x_rd, k0, acc[r][0]);
        acc[r][1] = xsimd::fma(x_rd, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      (acc[r][0] * batch(alpha)).store_unaligned(out + r * out_row + j);
      (acc[r][1] * batch(alpha)).store_unaligned(out + r * out_row + j + lanes);
    }
  }
  for (; j < count; ++j) {
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (std::int64_t d = 0; d < D; ++d) sum += x[r * x_stride + d] * packed[d * ld + j];
      out[r * out_row + j] = alpha * sum;
    }
  }
}

// out_r[d] += sum_n weights[r * weight_row + n * weight_step] rows[n * row_stride + d] for r < R, n < count,
// with out_r = out + r * out_stride: R weighted sums of the same rows, a block of P V (or dS K, P^T dO,
// dS^T Q), 2 x lanes coordinates of each out_r in registers while the rows stream past.
template <int R>
void add_weighted_rows(const float* weights, std::int64_t weight_row, std::int64_t weight_step, const float* rows,
                       std::int64_t row_stride, std::int64_t count, std::int64_t D, float* out, std::int64_t out_stride) {
  using simd::batch;
  using simd::lanes;
  std::int64_t d0 = 0;
  for (; d0 + 2 * lanes <= D; d0 += 2 * lanes) {
    batch acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = batch::load_unaligned(out + r * out_stride + d0);
      acc[r][1] = batch::load_unaligned(out + r * out_stride + d0 + lanes);
    }
    for (std::int64_t n = 0; n < count; ++n) {
      const float* row = rows + n * row_stride + d0;
      const batch v0 = batch::load_unaligned(row), v1 = batch::load_unaligned(row + lanes);
      for (int r = 0; r < R; ++r) {
        const batch w(weights[r * weight_row + n * weight_step]);
        acc[r][0] = xsimd::fma(w, v0, acc[r][0]);
        acc[r][1] = xsimd::fma(w, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r][0].store_unaligned(out + r * out_stride + d0);
      acc[r][1].store_unaligned(out + r * out_stride + d0 + lanes);
    }
  }
  for (; d0 < D; ++d0)  // head dims that are not a multiple of 2 x lanes
    for (int r = 0; r < R; ++r)
      for (std::int64_t n = 0; n < count; ++n)
        out[r * out_stride + d0] += weights[r * weight_row + n * weight_step] * rows[n * row_stride + d0];
}

// The rows, of one (batch, query head) and its KV head, that the loops below read and write.
struct HeadSlice {
  const AttentionProblem* p;
  const AttentionTensors* t;
  std::int64_t b, h, kv_head;

  const float* q(std::int64_t i) const { return row_pointer(static_cast<const float*>(t->q), t->q_strides, b, h, i); }
  const float* k(std::int64_t j) const { return row_pointer(static_cast<const float*>(t->k), t->kv_strides, b, kv_head, j); }
  const float* v(std::int64_t j) const { return row_pointer(static_cast<const float*>(t->v), t->kv_strides, b, kv_head, j); }
  const float* o(std::int64_t i) const { return row_pointer(static_cast<const float*>(t->o), t->q_strides, b, h, i); }
  const float* d_o(std::int64_t i) const { return row_pointer(static_cast<const float*>(t->d_o), t->q_strides, b, h, i); }
  float* o_out(std::int64_t i) const { return row_pointer(static_cast<float*>(t->o), t->q_strides, b, h, i); }
  float* dq(std::int64_t i) const { return row_pointer(static_cast<float*>(t->dq), t->q_strides, b, h, i); }
  float* dk(std::int64_t j) const { return row_pointer(static_cast<float*>(t->dk), t->kv_strides, b, kv_head, j); }
  float* dv(std::int64_t j) const { return row_pointer(static_cast<float*>(t->dv), t->kv_strides, b, kv_head, j); }
  float& lse(std::int64_t i) const { return t->lse[(b * p->q_heads + h) * p->seq_q + i]; }
  // Keys of [k_begin, k_begin + keys) that query row i sees (causal masking is a prefix of the keys): 0 when none.
  std::int64_t visible_in(std::int64_t i, std::int64_t k_begin, std::int64_t keys) const {
    return std::clamp<std::int64_t>(p->visible_keys(i) - k_begin, 0, keys);
  }
  // The first query row that sees key j (all later rows see it too): j <= i + Nk - Nq.
  std::int64_t first_row_seeing(std::int64_t j) const {
    return p->causal ? std::max<std::int64_t>(0, j - (p->seq_k - p->seq_q)) : 0;
  }
};

// A range of rows or keys: [begin, begin + count).
struct Range {
  std::int64_t begin = 0;
  std::int64_t count = 0;
};

// The summaries of all key chunks of one query chunk (the paper's stacked chunk_values, chunk_weights,
// chunk_max), indexed [key chunk][row].
struct Summaries {
  float* values;   // [key chunk][row][D]: sum_j exp(s_j - m_c) v_j
  float* weights;  // [key chunk][row]:    sum_j exp(s_j - m_c)
  float* maxes;    // [key chunk][row]:    m_c = max_j s_j (-inf when the row sees no key of the chunk)
  std::int64_t Cq, D;

  float* values_of(std::int64_t c, std::int64_t r) const { return values + (c * Cq + r) * D; }
  float& weight_of(std::int64_t c, std::int64_t r) const { return weights[c * Cq + r]; }
  float& max_of(std::int64_t c, std::int64_t r) const { return maxes[c * Cq + r]; }
};

// Keys per step of the block loops: a [D x key_tile] slice of the transposed chunk (about 128 KB) stays in L2
// while every row of the query chunk passes over it.
std::int64_t key_tile(std::int64_t D) { return std::max<std::int64_t>(16, 32768 / D); }

// Calls body(j0, count) for the key tiles [j0, j0 + count) of [0, visible).
template <class Body>
void for_key_tiles(std::int64_t visible, std::int64_t D, Body&& body) {
  for (std::int64_t j0 = 0; j0 < visible; j0 += key_tile(D)) body(j0, std::min(key_tile(D), visible - j0));
}

// Keys of the chunk that the last (so the most-seeing) row of rows [r, r + R) sees.
std::int64_t group_visible(const HeadSlice& x, Range rows, Range keys, std::int64_t r, int R) {
  return x.visible_in(rows.begin + r + R - 1, keys.begin, keys.count);
}

// S = scale * Q_chunk K_chunk^T, block is rows x Ck row-major; kt receives K_chunk transposed (D x Ck). Each
// row group is computed up to the keys its last row sees; entries past a row's own visible keys are later
// overwritten with 0 (summarize_chunk, recompute_block).
void chunk_scores(const HeadSlice& x, Range rows, Range keys, std::int64_t Ck, float* kt, float* block) {
  const std::int64_t D = x.p->head_dim;
  pack_transposed(x.k(keys.begin), x.t->kv_strides.seq, keys.count, D, kt, Ck);
  for_key_tiles(keys.count, D, [&](std::int64_t j0, std::int64_t tile) {
    for_row_groups(rows.count, [&](std::int64_t r, auto R) {
      const std::int64_t count = std::min(group_visible(x, rows, keys, r, R), j0 + tile) - j0;
      if (count > 0)
        rows_times_packed<R>(x.q(rows.begin + r), x.t->q_strides.seq, kt + j0, Ck, D, count, x.p->softmax_scale(),
                             block + r * Ck + j0, Ck);
    });
  });
}

// The paper's summarize_chunk for one (query chunk, key chunk) pair, summary number c:
//   m_c = max_j s_ij,  w_ij = exp(s_ij - m_c),  weights_c = sum_j w_ij,  values_c = sum_j w_ij v_j.
// Subtracting the chunk's own max keeps every exponent <= 0: exp never overflows, whatever the logits.
void summarize_chunk(const HeadSlice& x, Range rows, Range keys, std::int64_t c, std::int64_t Ck, float* kt,
                     float* block, const Summaries& out) {
  // LAB BEGIN memory-efficient: summarise a (query chunk, key chunk): m_c, sum exp(s - m_c), sum exp(s - m_c) v
  const std::int64_t D = x.p->head_dim;
  chunk_scores(x, rows, keys, Ck, kt, block);
  for (std::int64_t r = 0; r < rows.count; ++r) {
    const std::int64_t visible = x.visible_in(rows.begin + r, keys.begin, keys.count);
    float* w_row = block + r * Ck;  // scores in, exp weights out
    std::fill(w_row + visible, w_row + keys.count, 0.0f);  // masked keys weigh nothing
    std::fill(out.values_of(c, r), out.values_of(c, r) + D, 0.0f);
    if (visible == 0) {  // causal: this row sees none of these keys; the combine gives the chunk weight 0
      out.max_of(c, r) = kNegInf;
      out.weight_of(c, r) = 0.0f;
      continue;
    }
    const float chunk_max = simd::max(w_row, visible);                        // m_c (a constant for differentiation)
    out.weight_of(c, r) = simd::exp_shifted_sum(w_row, chunk_max, visible);  // w_ij = exp(s_ij - m_c), summed
    out.max_of(c, r) = chunk_max;
  }
  // values_c = sum_j w_ij v_j, the exp-weighted values: a (rows x keys) by (keys x D) product.
  for_key_tiles(keys.count, D, [&](std::int64_t j0, std::int64_t tile) {
    for_row_groups(rows.count, [&](std::int64_t r, auto R) {
      const std::int64_t count = std::min(group_visible(x, rows, keys, r, R), j0 + tile) - j0;
      if (count > 0)
        add_weighted_rows<R>(block + r * Ck + j0, Ck, 1, x.v(keys.begin + j0), x.t->kv_strides.seq, count, D,
                             out.values_of(c, r), D);
    });
  });
  // LAB END memory-efficient
}

// The paper's combine: M = max_c m_c; every chunk's values and weights rescaled by exp(m_c - M) and summed;
// O = values / weights, LSE = M + log(weights). A row that saw no key at all gets O = 0, LSE = -inf.
void combine_summaries(const HeadSlice& x, Range rows, std::int64_t key_chunks, const Summaries& in) {
  // LAB BEGIN memory-efficient: combine the summaries of each row into O and LSE
  const std::int64_t D = x.p->head_dim;
  for (std::int64_t r = 0; r < rows.count; ++r) {
    const std::int64_t i = rows.begin + r;
    float* o_row = x.o_out(i);
    std::fill(o_row, o_row + D, 0.0f);
    float global_max = kNegInf;
    for (std::int64_t c = 0; c < key_chunks; ++c) global_max = std::max(global_max, in.max_of(c, r));
    if (global_max == kNegInf) {
      x.lse(i) = kNegInf;
      continue;
    }
    float all_weights = 0.0f;
    for (std::int64_t c = 0; c < key_chunks; ++c) {
      if (in.max_of(c, r) == kNegInf) continue;  // exp(-inf - M) = 0: the chunk adds nothing
      const float max_diff = std::exp(in.max_of(c, r) - global_max);
      simd::axpy(max_diff, in.values_of(c, r), o_row, D);
      all_weights += max_diff * in.weight_of(c, r);
    }
    simd::scale(1.0f / all_weights, o_row, D);
    x.lse(i) = global_max + std::log(all_weights);
  }
  // LAB END memory-efficient
}

// Number of key chunks that query rows [rows.begin, rows.begin + rows.count) see at all (causal: the later
// key chunks are entirely masked for the whole query chunk and are skipped).
std::int64_t key_chunks_seen(const AttentionProblem& p, Range rows, std::int64_t Ck) {
  return ceil_div(p.visible_keys(rows.begin + rows.count - 1), Ck);
}

// Backward: P_ij = exp(s_ij - LSE_i) for one (query chunk, key chunk), into P. This is the forward's summary
// recomputed (its checkpoint) and normalised by the saved LSE in one step: exp(s - m_c) exp(m_c - M) / l =
// exp(s - LSE). Then dS_ij = P_ij (dP_ij - delta_i) with dP_ij = dO_i . v_j, into dS. Masked entries of
// both blocks are 0, so the gradient products may run over whole row groups and columns.
void recompute_block(const HeadSlice& x, Range rows, Range keys, std::int64_t Ck, const float* delta, float* kt,
                     float* vt, float* P, float* dS) {
  const std::int64_t D = x.p->head_dim;
  chunk_scores(x, rows, keys, Ck, kt, P);
  pack_transposed(x.v(keys.begin), x.t->kv_strides.seq, keys.count, D, vt, Ck);
  for_row_groups(rows.count, [&](std::int64_t r, auto R) {  // dP = dO_chunk V_chunk^T, into dS
    const std::int64_t count = group_visible(x, rows, keys, r, R);
    if (count > 0) rows_times_packed<R>(x.d_o(rows.begin + r), x.t->q_strides.seq, vt, Ck, D, count, 1.0f, dS + r * Ck, Ck);
  });
  for (std::int64_t r = 0; r < rows.count; ++r) {
    const std::int64_t i = rows.begin + r;
    const std::int64_t visible = x.visible_in(i, keys.begin, keys.count);
    float* P_row = P + r * Ck;
    float* dS_row = dS + r * Ck;
    if (visible > 0) simd::exp_shifted_sum(P_row, x.lse(i), visible);
    for (std::int64_t j = 0; j < visible; ++j) dS_row[j] = P_row[j] * (dS_row[j] - delta[i]);
    std::fill(P_row + visible, P_row + keys.count, 0.0f);
    std::fill(dS_row + visible, dS_row + keys.count, 0.0f);
  }
}

}  // namespace

Chunks read_chunks(const StageOptions& options) {
  Chunks chunks;
  chunks.query = options.get("query_chunk", kDefaultQueryChunk);
  chunks.key = options.get("key_chunk", kDefaultKeyChunk);
  validate_chunks(chunks);
  return chunks;
}

void validate_chunks(const Chunks& chunks) {
  require_chunk(chunks.query, "query_chunk");
  require_chunk(chunks.key, "key_chunk");
}

TierCaps cpu_caps() { return TierCaps{{DType::f32}, 256, {}, true, 0}; }

std::size_t cpu_extra_bytes(const AttentionProblem& p, const Chunks& chunks, bool backward) {
  const ChunkPlan plan = plan_chunks(p, chunks);
  if (!backward) {
    const std::int64_t threads = worker_threads(p.batch * p.q_heads * plan.query_chunks);
    return static_cast<std::size_t>(threads * forward_scratch_floats(p, plan)) * sizeof(float);
  }
  const std::int64_t threads =
      worker_threads(std::max(p.batch * p.q_heads * plan.query_chunks, p.batch * p.kv_heads * plan.key_chunks));
  return static_cast<std::size_t>(threads * backward_scratch_floats(p, plan) + p.lse_elements()) * sizeof(float);
}

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks) {
  validate_call(p, t, cpu_caps(), "memory_efficient/cpu", false);
  validate_chunks(chunks);
  const ChunkPlan plan = plan_chunks(p, chunks);
  const std::int64_t Cq = plan.Cq, Ck = plan.Ck, D = p.head_dim;
  // Each worker owns one query chunk at a time: its scratch is one score block, one transposed key chunk and
  // the summaries of all key chunks for that query chunk, O(Cq * Nk / Ck * D) floats, never O(Nq * Nk).
  const std::int64_t threads = worker_threads(p.batch * p.q_heads * plan.query_chunks);
  const std::int64_t per_thread = forward_scratch_floats(p, plan);
  HostBuffer<float> scratch(threads * per_thread);
  progress::expect(static_cast<double>(p.batch * p.q_heads * plan.query_chunks));

#pragma omp parallel num_threads(threads)
  {
    float* block = scratch.data() + omp_get_thread_num() * per_thread;  // Cq x Ck scores, then exp weights
    float* kt = block + Cq * Ck;                                           // D x Ck: K_chunk transposed
    float* summary_base = kt + D * Ck;
    const Summaries summaries{summary_base, summary_base + plan.key_chunks * Cq * D,
                              summary_base + plan.key_chunks * Cq * (D + 1), Cq, D};
    // The paper's outer lax.map over query chunks, here parallel together with batch and heads.
#pragma omp for collapse(3) schedule(dynamic)
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        for (std::int64_t qc = 0; qc < plan.query_chunks; ++qc) {
          const HeadSlice x{&p, &t, b, h, p.kv_head_of(h)};
          progress::advance();
          const Range rows{qc * Cq, std::min(Cq, p.seq_q - qc * Cq)};
          // The inner map over key chunks: one summary each (chunks no row of this query chunk sees are skipped).
          const std::int64_t key_chunks = key_chunks_seen(p, rows, Ck);
          for (std::int64_t kc = 0; kc < key_chunks; ++kc) {
            const Range keys{kc * Ck, std::min(Ck, p.seq_k - kc * Ck)};
            summarize_chunk(x, rows, keys, kc, Ck, kt, block, summaries);
          }
          combine_summaries(x, rows, key_chunks, summaries);
        }
      }
    }
  }
}

void backward_cpu(const AttentionProblem& p, const AttentionTensors& t, const Chunks& chunks) {
  validate_call(p, t, cpu_caps(), "memory_efficient/cpu", true);
  validate_chunks(chunks);
  const ChunkPlan plan = plan_chunks(p, chunks);
  const std::int64_t Cq = plan.Cq, Ck = plan.Ck, D = p.head_dim;
  const float scale = p.softmax_scale();
  const std::int64_t threads =
      worker_threads(std::max(p.batch * p.q_heads * plan.query_chunks, p.batch * p.kv_heads * plan.key_chunks));
  const std::int64_t per_thread = backward_scratch_floats(p, plan);
  HostBuffer<float> scratch(threads * per_thread);
  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax backward's row term: O(N), like the LSE.
  HostBuffer<float> delta(p.lse_elements());
  progress::expect(static_cast<double>(p.batch * (p.q_heads * plan.query_chunks + p.kv_heads * plan.key_chunks)));

#pragma omp parallel num_threads(threads)
  {
    float* P = scratch.data() + omp_get_thread_num() * per_thread;  // Cq x Ck recomputed probabilities
    float* dS = P + Cq * Ck;                                         // Cq x Ck: P * (dP - delta)
    float* kt = dS + Cq * Ck;                                        // D x Ck: K_chunk transposed
    float* vt = kt + D * Ck;                                         // D x Ck: V_chunk transposed

#pragma omp for collapse(2) schedule(static)
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        const HeadSlice x{&p, &t, b, h, p.kv_head_of(h)};
        for (std::int64_t i = 0; i < p.seq_q; ++i) delta[(b * p.q_heads + h) * p.seq_q + i] = simd::dot(x.d_o(i), x.o(i), D);
      }
    }

    // Pass 1: dQ, owned by query chunks. dQ_i = scale sum_j dS_ij k_j.
#pragma omp for collapse(3) schedule(dynamic)
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        for (std::int64_t qc = 0; qc < plan.query_chunks; ++qc) {
          const HeadSlice x{&p, &t, b, h, p.kv_head_of(h)};
          progress::advance();
          const float* delta_bh = delta.data() + (b * p.q_heads + h) * p.seq_q;
          const Range rows{qc * Cq, std::min(Cq, p.seq_q - qc * Cq)};
          for (std::int64_t r = 0; r < rows.count; ++r) std::fill(x.dq(rows.begin + r), x.dq(rows.begin + r) + D, 0.0f);
          const std::int64_t key_chunks = key_chunks_seen(p, rows, Ck);
          for (std::int64_t kc = 0; kc < key_chunks; ++kc) {
            const Range keys{kc * Ck, std::min(Ck, p.seq_k - kc * Ck)};
            recompute_block(x, rows, keys, Ck, delta_bh, kt, vt, P, dS);
            for_row_groups(rows.count, [&](std::int64_t r, auto R) {  // dQ_chunk += dS K_chunk
              add_weighted_rows<R>(dS + r * Ck, Ck, 1, x.k(keys.begin), t.kv_strides.seq,
                                   group_visible(x, rows, keys, r, R), D, x.dq(rows.begin + r), t.q_strides.seq);
            });
          }
          for (std::int64_t r = 0; r < rows.count; ++r) simd::scale(scale, x.dq(rows.begin + r), D);
        }
      }
    }

    // Pass 2: dK and dV, owned by key chunks and summed over every query head of the KV head and every query
    // chunk: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij q_i. (Pass 1 and 2 recompute the same blocks:
    // the price of writing every gradient row from exactly one thread, with no atomics and no per-thread
    // copies of dK and dV.)
#pragma omp for collapse(3) schedule(dynamic)
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
        for (std::int64_t kc = 0; kc < plan.key_chunks; ++kc) {
          const Range keys{kc * Ck, std::min(Ck, p.seq_k - kc * Ck)};
          const HeadSlice first_head{&p, &t, b, kv_head * p.group_size(), kv_head};
          progress::advance();
          for (std::int64_t j = keys.begin; j < keys.begin + keys.count; ++j) {
            std::fill(first_head.dk(j), first_head.dk(j) + D, 0.0f);
            std::fill(first_head.dv(j), first_head.dv(j) + D, 0.0f);
          }
          for (std::int64_t h = kv_head * p.group_size(); h < (kv_head + 1) * p.group_size(); ++h) {
            const HeadSlice x{&p, &t, b, h, kv_head};
            const float* delta_bh = delta.data() + (b * p.q_heads + h) * p.seq_q;
            for (std::int64_t qc = 0; qc < plan.query_chunks; ++qc) {
              const Range rows{qc * Cq, std::min(Cq, p.seq_q - qc * Cq)};
              if (key_chunks_seen(p, rows, Ck) <= kc) continue;  // causal: no row of this chunk sees these keys
              recompute_block(x, rows, keys, Ck, delta_bh, kt, vt, P, dS);
              // dV_chunk += P^T dO_chunk and dK_chunk += dS^T Q_chunk, R keys (columns of P and dS) at a time, over
              // the rows from the first one that sees the group's first key (later masked entries are 0).
              for_row_groups(keys.count, [&](std::int64_t c, auto R) {
                const std::int64_t j = keys.begin + c;
                const std::int64_t first = std::clamp<std::int64_t>(x.first_row_seeing(j) - rows.begin, 0, rows.count);
                const std::int64_t at = first * Ck + c;
                add_weighted_rows<R>(P + at, 1, Ck, x.d_o(rows.begin + first), t.q_strides.seq, rows.count - first, D,
                                     x.dv(j), t.kv_strides.seq);
                add_weighted_rows<R>(dS + at, 1, Ck, x.q(rows.begin + first), t.q_strides.seq, rows.count - first, D,
                                     x.dk(j), t.kv_strides.seq);
              });
            }
          }
          for (std::int64_t j = keys.begin; j < keys.begin + keys.count; ++j) simd::scale(scale, first_head.dk(j), D);
        }
      }
    }
  }
}

Stage describe() {
  Stage stage;
  stage.name = "memory_efficient";
  stage.paper = "Rabe & Staats 2021 (arXiv 2112.05682)";
  stage.adds = "chunked summaries combined through a global max: O(N) extra memory, no N x N matrix";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    const Chunks chunks = read_chunks(options);
    forward_cpu(p, t, chunks);
    options.counters["Tc"] = static_cast<double>((p.seq_k + chunks.key - 1) / chunks.key);  // key chunks per row
  };
  // The paper's default key chunk (4096) would make the ladder's N = 2048 one chunk, and the combine through the
  // global max (RS Alg. 2 lines 9-10) would have nothing to combine: 512 gives Tc = 4.
  cpu.ladder_options = {{"key_chunk", 512}};
  cpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    backward_cpu(p, t, read_chunks(options));
  };
  // The harness asks before a run (forward, and backward after it) whether the problem fits, for the chunks
  // the run will use.
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool backward, const StageOptions& options) {
    const Chunks chunks = read_chunks(options);
    return std::max(cpu_extra_bytes(p, chunks, false), backward ? cpu_extra_bytes(p, chunks, true) : 0);
  };
  cpu.option_names = {"query_chunk", "key_chunk"};
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::memory_efficient
