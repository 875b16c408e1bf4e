// naive, CPU tier: the three steps of standard attention, each a full pass over [B, Hq, Nq, Nk] matrices.
// OpenMP over (batch, head); xsimd in the inner products. Step through forward_cpu to watch S and P fill up.
#include <cmath>
#include <limits>

#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "naive/naive.hpp"

namespace attn::naive {
namespace {

const float kNegInf = -std::numeric_limits<float>::infinity();

// The masked logits are -inf: softmax gives them probability 0 and they never touch O.
void compute_scores(const AttentionProblem& p, const float* q, const float* k, const Strides& qs, const Strides& ks,
                    std::int64_t b, std::int64_t h, float* scores) {
  const float scale = p.softmax_scale();
  const std::int64_t kv_head = p.kv_head_of(h);
  for (std::int64_t i = 0; i < p.seq_q; ++i) {
    const float* q_row = row_pointer(q, qs, b, h, i);
    const std::int64_t visible = p.visible_keys(i);
    float* s_row = scores + i * p.seq_k;
    for (std::int64_t j = 0; j < visible; ++j)
      s_row[j] = scale * simd::dot(q_row, row_pointer(k, ks, b, kv_head, j), p.head_dim);
    for (std::int64_t j = visible; j < p.seq_k; ++j) s_row[j] = kNegInf;
  }
}

}  // namespace

TierCaps cpu_caps() { return TierCaps{{DType::f32}, 256, {}, true, 0}; }

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t) {
  validate_call(p, t, cpu_caps(), "naive/cpu", false);
  // LAB BEGIN naive: forward per (batch, head): S = scale Q K^T, P = softmax(S), O = P V, LSE
  const auto* q = static_cast<const float*>(t.q);
  const auto* k = static_cast<const float*>(t.k);
  const auto* v = static_cast<const float*>(t.v);
  auto* o = static_cast<float*>(t.o);
  const std::int64_t matrix = p.seq_q * p.seq_k;
  // Standard attention writes S and P to memory in full: that is this stage's O(N^2) extra memory.
  HostBuffer<float> S(p.batch * p.q_heads * matrix);
  HostBuffer<float> P(p.batch * p.q_heads * matrix);
  progress::expect(static_cast<double>(p.batch * p.q_heads));

#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t bh = b * p.q_heads + h;
      progress::advance();
      float* s = S.data() + bh * matrix;
      float* prob = P.data() + bh * matrix;
      // Step 1: S = scale * Q K^T.
      compute_scores(p, q, k, t.q_strides, t.kv_strides, b, h, s);
      // Step 2: P = softmax(S) row by row, subtracting the row max so that exp never overflows.
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        const float* s_row = s + i * p.seq_k;
        float* p_row = prob + i * p.seq_k;
        const float row_max = simd::max(s_row, p.seq_k);
        float* lse = t.lse + bh * p.seq_q + i;
        if (row_max == kNegInf) {  // a causal row that sees no key: P = 0, LSE = -inf
          for (std::int64_t j = 0; j < p.seq_k; ++j) p_row[j] = 0.0f;
          *lse = kNegInf;
          continue;
        }
        for (std::int64_t j = 0; j < p.seq_k; ++j) p_row[j] = s_row[j];
        const float row_sum = simd::exp_shifted_sum(p_row, row_max, p.seq_k);
        simd::scale(1.0f / row_sum, p_row, p.seq_k);
        *lse = row_max + std::log(row_sum);
      }
      // Step 3: O = P V.
      const std::int64_t kv_head = p.kv_head_of(h);
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        float* o_row = row_pointer(o, t.q_strides, b, h, i);
        for (std::int64_t d = 0; d < p.head_dim; ++d) o_row[d] = 0.0f;
        const float* p_row = prob + i * p.seq_k;
        for (std::int64_t j = 0; j < p.visible_keys(i); ++j)
          simd::axpy(p_row[j], row_pointer(v, t.kv_strides, b, kv_head, j), o_row, p.head_dim);
      }
    }
  }
  // LAB END naive
}

void backward_cpu(const AttentionProblem& p, const AttentionTensors& t) {
  validate_call(p, t, cpu_caps(), "naive/cpu", true);
  // LAB BEGIN naive: backward: P = exp(S - LSE), dP, dS = P (dP - D), dQ, then dK and dV per KV head
  const auto* q = static_cast<const float*>(t.q);
  const auto* k = static_cast<const float*>(t.k);
  const auto* v = static_cast<const float*>(t.v);
  const auto* d_o = static_cast<const float*>(t.d_o);
  auto* dq = static_cast<float*>(t.dq);
  auto* dk = static_cast<float*>(t.dk);
  auto* dv = static_cast<float*>(t.dv);
  const std::int64_t matrix = p.seq_q * p.seq_k;
  const std::int64_t D = p.head_dim;
  const float scale = p.softmax_scale();
  HostBuffer<float> P(p.batch * p.q_heads * matrix);
  HostBuffer<float> dS(p.batch * p.q_heads * matrix);

  // Phase 1, per (batch, query head): P, dP and dS in full, then dQ = scale dS K.
  progress::expect(static_cast<double>(p.batch * p.q_heads));
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t bh = b * p.q_heads + h;
      progress::advance();
      const std::int64_t kv_head = p.kv_head_of(h);
      float* prob = P.data() + bh * matrix;
      float* ds = dS.data() + bh * matrix;
      // P = exp(S - LSE): the forward's log-sum-exp normalises the recomputed scores directly.
      compute_scores(p, q, k, t.q_strides, t.kv_strides, b, h, prob);
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        const float lse = t.lse[bh * p.seq_q + i];
        float* p_row = prob + i * p.seq_k;
        float* ds_row = ds + i * p.seq_k;
        const std::int64_t visible = p.visible_keys(i);
        for (std::int64_t j = 0; j < visible; ++j) p_row[j] = std::exp(p_row[j] - lse);
        for (std::int64_t j = visible; j < p.seq_k; ++j) p_row[j] = 0.0f;
        // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)).
        const float* d_o_row = row_pointer(d_o, t.q_strides, b, h, i);
        float weighted = 0.0f;
        for (std::int64_t j = 0; j < visible; ++j) {
          ds_row[j] = simd::dot(d_o_row, row_pointer(v, t.kv_strides, b, kv_head, j), D);
          weighted += ds_row[j] * p_row[j];
        }
        for (std::int64_t j = 0; j < visible; ++j) ds_row[j] = p_row[j] * (ds_row[j] - weighted);
        for (std::int64_t j = visible; j < p.seq_k; ++j) ds_row[j] = 0.0f;
        // dQ = scale dS K.
        float* dq_row = row_pointer(dq, t.q_strides, b, h, i);
        for (std::int64_t d = 0; d < D; ++d) dq_row[d] = 0.0f;
        for (std::int64_t j = 0; j < visible; ++j)
          simd::axpy(scale * ds_row[j], row_pointer(k, t.kv_strides, b, kv_head, j), dq_row, D);
      }
    }
  }

  // Phase 2, per (batch, KV head, key row): dK = scale dS^T Q and dV = P^T dO, summed over the group's heads.
#pragma omp parallel for collapse(3) schedule(static)
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
      for (std::int64_t j = 0; j < p.seq_k; ++j) {
        float* dk_row = row_pointer(dk, t.kv_strides, b, kv_head, j);
        float* dv_row = row_pointer(dv, t.kv_strides, b, kv_head, j);
        for (std::int64_t d = 0; d < D; ++d) dk_row[d] = dv_row[d] = 0.0f;
        for (std::int64_t h = kv_head * p.group_size(); h < (kv_head + 1) * p.group_size(); ++h) {
          const std::int64_t bh = b * p.q_heads + h;
          for (std::int64_t i = 0; i < p.seq_q; ++i) {
            const float p_ij = P[bh * matrix + i * p.seq_k + j];
            if (p_ij == 0.0f) continue;  // masked (or underflowed): contributes nothing
            simd::axpy(scale * dS[bh * matrix + i * p.seq_k + j], row_pointer(q, t.q_strides, b, h, i), dk_row, D);
            simd::axpy(p_ij, row_pointer(d_o, t.q_strides, b, h, i), dv_row, D);
          }
        }
      }
    }
  }
  // LAB END naive
}

}  // namespace attn::naive

namespace attn::naive {

Stage describe() {
  Stage stage;
  stage.name = "naive";
  stage.paper = "Standard attention (Dao et al. 2022, Sec. 2)";
  stage.adds = "the baseline: S and P materialised in memory";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_cpu(p, t);
    options.counters["Tc"] = 1;  // no K/V tiles: S is computed whole
  };
  cpu.backward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions&) { backward_cpu(p, t); };
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool) {
    return static_cast<std::size_t>(2 * p.batch * p.q_heads * p.seq_q * p.seq_k) * sizeof(float);
  };
  cpu.option_names = {};  // none
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::naive
