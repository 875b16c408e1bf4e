// What the stage tests share: the awkward shapes every stage must handle, and comparisons of a stage's
// outputs with the previous stage's and with the fp64 oracle.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "catch.hpp"
#include "common/harness.hpp"
#include "common/numeric.hpp"
#include "oracle.hpp"

namespace attn::testing {

/// Relative Frobenius errors of each output against a reference run (or the oracle).
struct Errors {
  ErrorStats o, lse, dq, dk, dv;
  double worst_gradient() const { return std::max({dq.rel_frobenius, dk.rel_frobenius, dv.rel_frobenius}); }
};

Errors compare_runs(const StageRun& actual, const StageRun& reference);
Errors compare_with_oracle(const StageRun& actual, const oracle::Result& reference);

/// A problem from its sizes: batch, query heads, KV heads, query rows, keys, head dim, causal.
AttentionProblem problem_of(std::int64_t batch, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t seq_q,
                            std::int64_t seq_k, std::int64_t head_dim, bool causal);

/// A named problem for a test table.
struct Shape {
  std::string name;
  AttentionProblem problem;
};

/// The awkward shapes every stage is tested on, small enough for CI: N = 1, N not a multiple of any chunk or
/// tile, Nq != Nk both ways, causal with Nq > Nk (rows that see no key), D in {16, 32, 64, 128, 256},
/// GQA and MQA, B * H > 1.
std::vector<Shape> awkward_shapes();

/// "B=1 Hq=2 ... D=64 causal" plus the shape's name, for Catch2 sections and failure messages.
std::string label(const Shape& shape);

/// The message of the std::invalid_argument that `call` throws ("" when it throws none), for tests that check
/// a rule's message names the argument.
template <class Call>
std::string invalid_argument_message(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

/// Q's rows in every odd block of `block_rows` rows (per batch and head) times `factor`, through the data's own
/// strides: neighbouring blocks then take quantization scales `factor` apart, for tests that a kernel applies
/// each block's own scale.
void scale_odd_q_blocks(ProblemData& data, std::int64_t block_rows, float factor);

/// Tensors for `problem` (bhnd strides) whose pointers are 256-byte aligned stand-ins, never dereferenced: for
/// tests of rules that a tier checks before touching memory.
AttentionTensors fake_tensors(const AttentionProblem& problem, DType dtype);

}  // namespace attn::testing
