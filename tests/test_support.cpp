#include "test_support.hpp"

namespace attn::testing {

Errors compare_runs(const StageRun& actual, const StageRun& reference) {
  Errors e;
  e.o = compare(actual.o.span(), reference.o.span());
  e.lse = compare(actual.lse.span(), reference.lse.span());
  if (actual.dq.size() > 0 && reference.dq.size() > 0) {
    e.dq = compare(actual.dq.span(), reference.dq.span());
    e.dk = compare(actual.dk.span(), reference.dk.span());
    e.dv = compare(actual.dv.span(), reference.dv.span());
  }
  return e;
}

Errors compare_with_oracle(const StageRun& actual, const oracle::Result& reference) {
  Errors e;
  e.o = compare(actual.o.span(), std::span<const double>(reference.o));
  e.lse = compare(actual.lse.span(), std::span<const double>(reference.lse));
  if (actual.dq.size() > 0 && !reference.dq.empty()) {
    e.dq = compare(actual.dq.span(), std::span<const double>(reference.dq));
    e.dk = compare(actual.dk.span(), std::span<const double>(reference.dk));
    e.dv = compare(actual.dv.span(), std::span<const double>(reference.dv));
  }
  return e;
}

AttentionProblem problem_of(std::int64_t batch, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t seq_q,
                            std::int64_t seq_k, std::int64_t head_dim, bool causal) {
  AttentionProblem p;
  p.batch = batch;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.head_dim = head_dim;
  p.causal = causal;
  return p;
}

std::vector<Shape> awkward_shapes() {
  return {
      {"single query and key", problem_of(1, 1, 1, 1, 1, 64, false)},
      {"single query, causal", problem_of(1, 1, 1, 1, 37, 32, true)},
      {"odd lengths", problem_of(1, 2, 2, 77, 101, 64, false)},
      {"odd lengths, causal", problem_of(1, 2, 2, 77, 101, 64, true)},
      {"more queries than keys, causal (empty rows)", problem_of(1, 2, 2, 130, 45, 32, true)},
      {"more queries than keys", problem_of(2, 1, 1, 130, 45, 16, false)},
      {"head dim 16", problem_of(1, 2, 2, 65, 65, 16, true)},
      {"head dim 128", problem_of(1, 2, 2, 100, 129, 128, false)},
      {"head dim 256", problem_of(1, 1, 1, 67, 90, 256, true)},
      {"GQA 6:2", problem_of(2, 6, 2, 50, 83, 64, true)},
      {"MQA 4:1", problem_of(1, 4, 1, 61, 61, 32, false)},
      {"batch x heads > 1, long", problem_of(2, 2, 2, 300, 300, 64, true)},
  };
}

std::string label(const Shape& shape) { return shape.name + " [" + shape.problem.describe() + "]"; }

AttentionTensors fake_tensors(const AttentionProblem& p, DType dtype) {
  alignas(256) static unsigned char fake_memory[8][256];
  AttentionTensors t;
  t.dtype = dtype;
  t.q_strides = make_strides(Layout::bhnd, p.q_heads, p.seq_q, p.head_dim);
  t.kv_strides = make_strides(Layout::bhnd, p.kv_heads, p.seq_k, p.head_dim);
  t.q = fake_memory[0];
  t.k = fake_memory[1];
  t.v = fake_memory[2];
  t.o = fake_memory[3];
  t.lse = reinterpret_cast<float*>(fake_memory[4]);
  t.d_o = fake_memory[5];
  t.dq = fake_memory[6];
  t.dk = fake_memory[7];
  t.dv = fake_memory[7] + 128;
  return t;
}

void scale_odd_q_blocks(ProblemData& data, std::int64_t block_rows, float factor) {
  const AttentionProblem& p = data.problem;
  const Strides strides = data.q_strides();
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < p.q_heads; ++h)
      for (std::int64_t row = 0; row < p.seq_q; ++row)
        if (row / block_rows % 2 == 1)
          for (std::int64_t c = 0; c < p.head_dim; ++c)
            data.q[b * strides.batch + h * strides.head + row * strides.seq + c] *= factor;
}

}  // namespace attn::testing
