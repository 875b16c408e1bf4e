// The reference mask of sparse attention (sparse.hpp): each row's fate decided on its own, straight from the
// rules of sparsity.hpp, for the fp64 oracle. Deliberately independent of the tiers' planning (sparse_plan.cpp).
#include "sparse/sparse.hpp"
#include "sparse/sparsity.hpp"

namespace attn::sparse {

ReferenceMask::ReferenceMask(const AttentionProblem& p, const float* q, const Strides& q_strides, const float* k,
                             const Strides& kv_strides, const Settings& s, const KeepLists* lists)
    : problem_(p), query_bucket_(p.batch * p.q_heads * p.seq_q, -1), key_bucket_(p.batch * p.kv_heads * p.seq_k, -2) {
  std::vector<float> projection;
  const int half = s.buckets / 2;
  for (int d = 0; d < p.head_dim; ++d)
    for (int c = 0; c < half; ++c) projection.push_back(projection_entry(s.seed, d, c));
  const bool hash = lists == nullptr && s.mode == Mode::hash;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t x = b * p.q_heads + h;
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        if (hash)
          query_bucket_[x * p.seq_q + i] = bucket_of(q + b * q_strides.batch + h * q_strides.head + i * q_strides.seq,
                                                     static_cast<int>(p.head_dim), s.buckets, projection.data());
        else if (lists == nullptr)
          query_bucket_[x * p.seq_q + i] = keep_row(s.seed, query_stream(p.batch, p.q_heads, b, h), i, s.drop_q_permille) ? 0 : -1;
      }
      if (lists != nullptr)
        for (std::int64_t e = lists->query_offsets[x]; e < lists->query_offsets[x + 1]; ++e)
          query_bucket_[x * p.seq_q + lists->query_indices[e]] = 0;
    }
    for (std::int64_t h = 0; h < p.kv_heads; ++h) {
      const std::int64_t x = b * p.kv_heads + h;
      for (std::int64_t j = 0; j < p.seq_k; ++j) {
        if (hash)
          key_bucket_[x * p.seq_k + j] = bucket_of(k + b * kv_strides.batch + h * kv_strides.head + j * kv_strides.seq,
                                                   static_cast<int>(p.head_dim), s.buckets, projection.data());
        else if (lists == nullptr)
          key_bucket_[x * p.seq_k + j] = keep_row(s.seed, key_stream(p.batch, p.kv_heads, b, h), j, s.drop_k_permille) ? 0 : -2;
      }
      if (lists != nullptr)
        for (std::int64_t e = lists->key_offsets[x]; e < lists->key_offsets[x + 1]; ++e)
          key_bucket_[x * p.seq_k + lists->key_indices[e]] = 0;
    }
  }
}

bool ReferenceMask::operator()(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
  const AttentionProblem& p = problem_;
  return query_bucket_[(b * p.q_heads + h) * p.seq_q + i] ==
         key_bucket_[(b * p.kv_heads + p.kv_head_of(h)) * p.seq_k + j];
}

}  // namespace attn::sparse
