#include "oracle.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/progress.hpp"

namespace attn::oracle {

Result attention(const ProblemData& data, bool backward) { return attention(data, backward, PairMask{}); }

Result attention(const ProblemData& data, bool backward, const PairMask& mask) {
  const AttentionProblem& p = data.problem;
  const Strides qs = data.q_strides();
  const Strides ks = data.kv_strides();
  const std::int64_t D = p.head_dim;
  const double scale = p.softmax_scale();
  Result r;
  r.o.assign(p.q_elements(), 0.0);
  r.lse.assign(p.lse_elements(), -std::numeric_limits<double>::infinity());
  if (backward) {
    r.dq.assign(p.q_elements(), 0.0);
    r.dk.assign(p.kv_elements(), 0.0);
    r.dv.assign(p.kv_elements(), 0.0);
    r.dq_mag.assign(p.q_elements(), 0.0);
    r.dk_mag.assign(p.kv_elements(), 0.0);
    r.dv_mag.assign(p.kv_elements(), 0.0);
  }
  progress::begin("fp64 oracle");
  progress::expect(static_cast<double>(p.batch * p.kv_heads));
  auto at = [](const Strides& s, std::int64_t b, std::int64_t h, std::int64_t n) { return b * s.batch + h * s.head + n * s.seq; };

  // One (batch, KV head) per iteration, so that the dk/dv sums over the group's query heads stay in one thread.
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
      progress::advance();
      std::vector<double> prob(p.seq_k), dprob(p.seq_k);
      std::vector<std::int64_t> keys(p.seq_k);  // the keys row i attends to: keys[0..visible)
      for (std::int64_t h = kv_head * p.group_size(); h < (kv_head + 1) * p.group_size(); ++h) {
        for (std::int64_t i = 0; i < p.seq_q; ++i) {
          std::int64_t visible = 0;
          for (std::int64_t j = 0; j < p.visible_keys(i); ++j)
            if (!mask || mask(b, h, i, j)) keys[visible++] = j;
          if (visible == 0) continue;  // O = 0, LSE = -inf, no gradient
          const float* q = data.q.data() + at(qs, b, h, i);
          // s_j = scale * q . k_j ; m = max_j s_j ; p_j = exp(s_j - m) / sum
          double row_max = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < visible; ++j) {
            const float* k = data.k.data() + at(ks, b, kv_head, keys[j]);
            double s = 0;
            for (std::int64_t d = 0; d < D; ++d) s += static_cast<double>(q[d]) * k[d];
            prob[j] = s * scale;
            row_max = std::max(row_max, prob[j]);
          }
          double sum = 0;
          for (std::int64_t j = 0; j < visible; ++j) sum += (prob[j] = std::exp(prob[j] - row_max));
          for (std::int64_t j = 0; j < visible; ++j) prob[j] /= sum;
          r.lse[(b * p.q_heads + h) * p.seq_q + i] = row_max + std::log(sum);
          double* o = r.o.data() + at(qs, b, h, i);
          for (std::int64_t j = 0; j < visible; ++j) {
            const float* v = data.v.data() + at(ks, b, kv_head, keys[j]);
            for (std::int64_t d = 0; d < D; ++d) o[d] += prob[j] * v[d];
          }
          if (!backward) continue;
          // dP_j = dO . v_j ; dS_j = P_j (dP_j - sum_l P_l dP_l) ; dQ = scale sum_j dS_j k_j ;
          // dK_j += scale dS_j q ; dV_j += P_j dO
          const float* d_o = data.d_o.data() + at(qs, b, h, i);
          double weighted = 0;
          for (std::int64_t j = 0; j < visible; ++j) {
            const float* v = data.v.data() + at(ks, b, kv_head, keys[j]);
            double dp = 0;
            for (std::int64_t d = 0; d < D; ++d) dp += static_cast<double>(d_o[d]) * v[d];
            dprob[j] = dp;
            weighted += prob[j] * dp;
          }
          double* dq = r.dq.data() + at(qs, b, h, i);
          double* dq_mag = r.dq_mag.data() + at(qs, b, h, i);
          for (std::int64_t j = 0; j < visible; ++j) {
            const double ds = prob[j] * (dprob[j] - weighted) * scale;
            const double ds_mag = prob[j] * (std::fabs(dprob[j]) + std::fabs(weighted)) * std::fabs(scale);
            const float* k = data.k.data() + at(ks, b, kv_head, keys[j]);
            double* dk = r.dk.data() + at(ks, b, kv_head, keys[j]);
            double* dv = r.dv.data() + at(ks, b, kv_head, keys[j]);
            double* dk_mag = r.dk_mag.data() + at(ks, b, kv_head, keys[j]);
            double* dv_mag = r.dv_mag.data() + at(ks, b, kv_head, keys[j]);
            for (std::int64_t d = 0; d < D; ++d) {
              dq[d] += ds * k[d];
              dk[d] += ds * q[d];
              dv[d] += prob[j] * d_o[d];
              dq_mag[d] += ds_mag * std::fabs(k[d]);
              dk_mag[d] += ds_mag * std::fabs(q[d]);
              dv_mag[d] += prob[j] * std::fabs(d_o[d]);
            }
          }
        }
      }
    }
  }
  return r;
}

namespace {

template <class Reference>
double scaled_error(std::span<const float> actual, std::span<const Reference> reference, std::span<const double> magnitude) {
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    if (!std::isfinite(actual[i])) return std::numeric_limits<double>::infinity();
    const double e = static_cast<double>(actual[i]) - static_cast<double>(reference[i]);
    diff += e * e;
    scale += magnitude[i] * magnitude[i];
  }
  if (diff == 0.0) return 0.0;
  return scale > 0.0 ? std::sqrt(diff / scale) : std::numeric_limits<double>::infinity();
}

}  // namespace

double gradient_error(std::span<const float> actual, std::span<const double> reference, std::span<const double> magnitude) {
  return scaled_error(actual, reference, magnitude);
}

double gradient_error(std::span<const float> actual, std::span<const float> reference, std::span<const double> magnitude) {
  return scaled_error(actual, reference, magnitude);
}

double worst_gradient_error(const StageRun& run, const Result& exact) {
  return std::max({gradient_error(run.dq.span(), std::span<const double>(exact.dq), exact.dq_mag),
                   gradient_error(run.dk.span(), std::span<const double>(exact.dk), exact.dk_mag),
                   gradient_error(run.dv.span(), std::span<const double>(exact.dv), exact.dv_mag)});
}

double worst_gradient_error(const StageRun& run, const StageRun& reference, const Result& exact) {
  return std::max({gradient_error(run.dq.span(), reference.dq.span(), exact.dq_mag),
                   gradient_error(run.dk.span(), reference.dk.span(), exact.dk_mag),
                   gradient_error(run.dv.span(), reference.dv.span(), exact.dv_mag)});
}

}  // namespace attn::oracle
