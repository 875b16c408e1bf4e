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

std::vector<Shape> awkward_shapes() {
  auto make = [](std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t nq, std::int64_t nk, std::int64_t d,
                 bool causal) {
    AttentionProblem p;
    p.batch = b;
    p.q_heads = hq;
    p.kv_heads = hkv;
    p.seq_q = nq;
    p.seq_k = nk;
    p.head_dim = d;
    p.causal = causal;
    return p;
  };
  return {
      {"single query and key", make(1, 1, 1, 1, 1, 64, false)},
      {"single query, causal", make(1, 1, 1, 1, 37, 32, true)},
      {"odd lengths", make(1, 2, 2, 77, 101, 64, false)},
      {"odd lengths, causal", make(1, 2, 2, 77, 101, 64, true)},
      {"more queries than keys, causal (empty rows)", make(1, 2, 2, 130, 45, 32, true)},
      {"more queries than keys", make(2, 1, 1, 130, 45, 16, false)},
      {"head dim 16", make(1, 2, 2, 65, 65, 16, true)},
      {"head dim 128", make(1, 2, 2, 100, 129, 128, false)},
      {"head dim 256", make(1, 1, 1, 67, 90, 256, true)},
      {"GQA 6:2", make(2, 6, 2, 50, 83, 64, true)},
      {"MQA 4:1", make(1, 4, 1, 61, 61, 32, false)},
      {"batch x heads > 1, long", make(2, 2, 2, 300, 300, 64, true)},
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

}  // namespace attn::testing
