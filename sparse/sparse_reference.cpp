// The reference mask of sparse attention (sparse.hpp): each row's fate decided on its own, straight from the
// rules of sparsity.hpp, for the fp64 oracle. Deliberately independent of the tiers' planning (sparse_plan.cpp).
#include <functional>

#include "sparse/sparse.hpp"
#include "sparse/sparsity.hpp"

namespace attn::sparse {

namespace {

// One side (queries or keys): the bucket of row n of (batch b, head h), at out[(b * heads + h) * length + n];
// `dropped` for a row QK-sparse does not keep. Hash-sparse hashes every row of x; QK-sparse draws keep_row on
// `stream(b, h)`, or keeps exactly the caller's listed rows.
void classify_side(std::vector<std::int32_t>& out, std::int32_t dropped, const AttentionProblem& p, const float* x,
                   const Strides& strides, std::int64_t heads, std::int64_t length, const Settings& s,
                   const std::vector<float>& projection, const std::function<std::uint64_t(std::int64_t, std::int64_t)>& stream,
                   int drop_permille, const std::vector<std::int64_t>* offsets, const std::vector<std::int32_t>* indices) {
  out.assign(p.batch * heads * length, dropped);
  const bool hash = offsets == nullptr && s.mode == Mode::hash;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h) {
      std::int32_t* row_bucket = out.data() + (b * heads + h) * length;
      if (offsets != nullptr) {
        for (std::int64_t e = (*offsets)[b * heads + h]; e < (*offsets)[b * heads + h + 1]; ++e) row_bucket[(*indices)[e]] = 0;
        continue;
      }
      for (std::int64_t n = 0; n < length; ++n)
        if (hash)
          row_bucket[n] = bucket_of(x + b * strides.batch + h * strides.head + n * strides.seq, static_cast<int>(p.head_dim),
                                    s.buckets, projection.data());
        else if (keep_row(s.seed, stream(b, h), n, drop_permille))
          row_bucket[n] = 0;
    }
}

}  // namespace

ReferenceMask::ReferenceMask(const AttentionProblem& p, const float* q, const Strides& q_strides, const float* k,
                             const Strides& kv_strides, const Settings& s, const KeepLists* lists)
    : problem_(p) {
  std::vector<float> projection;
  for (int d = 0; d < p.head_dim; ++d)
    for (int c = 0; c < s.buckets / 2; ++c) projection.push_back(projection_entry(s.seed, d, c));
  // A dropped query (-1) never equals a dropped key (-2) nor any bucket.
  classify_side(query_bucket_, -1, p, q, q_strides, p.q_heads, p.seq_q, s, projection,
                [&](std::int64_t b, std::int64_t h) { return query_stream(p.batch, p.q_heads, b, h); }, s.drop_q_permille,
                lists ? &lists->query_offsets : nullptr, lists ? &lists->query_indices : nullptr);
  classify_side(key_bucket_, -2, p, k, kv_strides, p.kv_heads, p.seq_k, s, projection,
                [&](std::int64_t b, std::int64_t h) { return key_stream(p.batch, p.kv_heads, b, h); }, s.drop_k_permille,
                lists ? &lists->key_offsets : nullptr, lists ? &lists->key_indices : nullptr);
}

bool ReferenceMask::operator()(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
  const AttentionProblem& p = problem_;
  return query_bucket_[(b * p.q_heads + h) * p.seq_q + i] ==
         key_bucket_[(b * p.kv_heads + p.kv_head_of(h)) * p.seq_k + j];
}

}  // namespace attn::sparse
