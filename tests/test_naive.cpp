// naive (standard attention), CPU tier: checked against the fp64 oracle, forward and backward, and the
// backward also against finite differences of the forward.
#include <cmath>

#include "naive/naive.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// fp32 with max subtraction: per-element rounding ~6e-8, growing with sqrt(Nk) and D in the sums; 1e-5 is
// a loose bound that still catches any indexing or masking mistake (those give errors near 1).
constexpr double kForwardTolerance = 1e-5;
// The backward multiplies more rounded terms (dS = P (dP - D)) and cancels in dP - D: 1e-4.
constexpr double kBackwardTolerance = 1e-4;

}  // namespace

TEST_CASE("naive/cpu matches the fp64 oracle on awkward shapes, forward and backward", "[naive][cpu]") {
  const Stage stage = naive::describe();
  RunSettings settings;
  settings.backward = true;
  std::uint64_t seed = 100;
  for (const Shape& shape : awkward_shapes()) {
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      INFO(label(shape) << " layout " << layout_name(layout));
      const ProblemData data = make_problem_data(shape.problem, DType::f32, layout, ++seed);
      const StageRun run = run_stage(stage, Tier::cpu, data, settings);
      const Errors e = compare_with_oracle(run, oracle::attention(data, true));
      CHECK(e.o.rel_frobenius < kForwardTolerance);
      CHECK(e.lse.rel_frobenius < kForwardTolerance);
      CHECK(e.worst_gradient() < kBackwardTolerance);
    }
  }
}

TEST_CASE("naive/cpu: rows that see no key give zero output and -inf log-sum-exp", "[naive][cpu]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = 10;
  p.seq_k = 4;  // bottom-right aligned: rows 0..5 see nothing, row 6 sees key 0, ..., row 9 sees keys 0..3
  p.head_dim = 16;
  p.causal = true;
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 7);
  const StageRun run = run_stage(naive::describe(), Tier::cpu, data, RunSettings{});
  for (std::int64_t i = 0; i < p.seq_q; ++i) {
    INFO("row " << i);
    if (i < 6) {
      CHECK(std::isinf(run.lse[i]));
      CHECK(run.lse[i] < 0);
      for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[i * p.head_dim + d] == 0.0f);
    } else {
      CHECK(std::isfinite(run.lse[i]));
    }
  }
  // Row 6 sees exactly one key: softmax of one logit is 1, so O equals V's first row.
  for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[6 * p.head_dim + d] == Approx(data.v[d]).epsilon(1e-6));
}

TEST_CASE("naive/cpu: logits near 1e3 do not overflow (the softmax subtracts the row max)", "[naive][cpu]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 64;
  p.head_dim = 64;
  // Q ~ N(0, 40^2), K ~ N(0, 1), scale 1/8: logits have standard deviation 40 * 8 / 8 * ... about 300, with
  // extremes past 1e3, where exp() alone overflows fp32 (at 88.7).
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 11, 40.0f);
  const StageRun run = run_stage(naive::describe(), Tier::cpu, data, RunSettings{});
  const Errors e = compare_with_oracle(run, oracle::attention(data, false));
  CHECK(e.o.bad_values == 0);
  CHECK(e.o.rel_frobenius < kForwardTolerance);
}

TEST_CASE("naive/cpu backward agrees with central finite differences of the forward", "[naive][cpu]") {
  // Loss L = sum(dO * O). dL/dX[e] ~ (L(X + h e) - L(X - h e)) / 2h, evaluated in fp64 by the oracle's forward
  // on perturbed fp32 inputs: the analytic gradient comes from the stage under test.
  AttentionProblem p;
  p.batch = 1;
  p.q_heads = 2;
  p.kv_heads = 1;
  p.seq_q = 5;
  p.seq_k = 7;
  p.head_dim = 16;
  p.causal = true;
  ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 23);
  RunSettings settings;
  settings.backward = true;
  const StageRun run = run_stage(naive::describe(), Tier::cpu, data, settings);

  auto loss = [&]() {
    const oracle::Result r = oracle::attention(data, false);
    double total = 0;
    for (std::size_t i = 0; i < r.o.size(); ++i) total += r.o[i] * data.d_o[i];
    return total;
  };
  const float h = 1e-2f;
  auto check_gradient = [&](HostBuffer<float>& input, const HostBuffer<float>& gradient, const char* name) {
    for (std::size_t e = 0; e < input.size(); e += 7) {  // a spread of elements keeps the test fast
      const float saved = input[e];
      input[e] = saved + h;
      const double plus = loss();
      input[e] = saved - h;
      const double minus = loss();
      input[e] = saved;
      const double numeric = (plus - minus) / (2.0 * static_cast<double>(h));
      INFO(name << "[" << e << "] analytic " << gradient[e] << " numeric " << numeric);
      CHECK(std::fabs(gradient[e] - numeric) < 2e-3 + 2e-3 * std::fabs(numeric));
    }
  };
  check_gradient(data.q, run.dq, "dq");
  check_gradient(data.k, run.dk, "dk");
  check_gradient(data.v, run.dv, "dv");
}

TEST_CASE("naive/cpu extra memory is the two N x N matrices S and P", "[naive][cpu][memory]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = p.kv_heads = 3;
  p.seq_q = 100;
  p.seq_k = 120;
  p.head_dim = 32;
  const StageRun run = run_stage(naive::describe(), Tier::cpu, make_problem_data(p), RunSettings{});
  CHECK(run.forward_extra_bytes == 2u * 2 * 3 * 100 * 120 * sizeof(float));
}
