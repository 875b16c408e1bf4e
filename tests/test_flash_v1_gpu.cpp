// flash_v1, GPU tier (mma.sync kernels, FlashAttention-1's loop order): forward and backward against the fp64
// oracle, against flash_v1's CPU tier and against the previous GPU stage, in bf16 and fp16, on the awkward shapes
// in both layouts and on shapes that span many blocks; rows that see no key, large logits, and the input rules.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.hpp"
#include "flash_v1/flash_v1.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

struct Tolerance {
  double output;    // O, relative Frobenius
  double lse;       // LSE, relative Frobenius
  double gradient;  // each of dQ, dK, dV
};

// Why these bounds (u = unit roundoff: 2^-11 f16, 2^-8 bf16). The inputs are already rounded to the dtype and
// the oracle sees the same values, so the error comes from the roundings the kernels make: P~ (forward) and
// P, dS (backward) are rounded to the dtype to enter the tensor cores, and O, dQ, dK, dV are stored in it. Each
// rounding is a relative error of at most u, about u / sqrt(3) RMS, independent from element to element, so a
// few of them give a relative Frobenius error of 1-2 u; the fp32 accumulation adds nothing visible (O is kept in
// fp32 in "HBM" between steps, so its Tc re-reads do not round it). Bounds of
// about 4 u (f16: 2e-3 forward, 3e-3 backward) and 2.5 u (bf16: 1e-2) sit above that and far below what an
// indexing, masking or synchronisation mistake gives (errors near 1, or NaN from the poisoned outputs).
// LSE is computed from fp32 scores (exp2 by MUFU, relative error ~2^-22): 1e-4 in both dtypes.
Tolerance tolerance(DType dtype) { return dtype == DType::f16 ? Tolerance{2e-3, 1e-4, 3e-3} : Tolerance{1e-2, 1e-4, 1e-2}; }

const DType kDtypes[] = {DType::bf16, DType::f16};

bool gpu_runs(const AttentionProblem& p) {
  const TierCaps caps = flash_v1::gpu_caps();
  for (int d : caps.head_dims)
    if (d == p.head_dim) return true;
  return false;
}
bool gpu_runs_backward(const AttentionProblem& p) { return gpu_runs(p); }

// compare_qk = false skips dQ and dK: where every row sees a single key, P = 1 and dS = P (dP - D) = 0 exactly, so
// dQ and dK are pure rounding noise (about 1e-7 of dV's size) in both runs of a run-to-run comparison, and a
// relative error of one noise against another says nothing. The oracle comparison still bounds them.
void check_within(const Errors& e, const Tolerance& tol, bool backward, double factor = 1.0, bool compare_qk = true) {
  CHECK(e.o.rel_frobenius < factor * tol.output);
  CHECK(e.lse.rel_frobenius < factor * tol.lse);
  if (backward) {
    if (compare_qk) {
      CHECK(e.dq.rel_frobenius < factor * tol.gradient);
      CHECK(e.dk.rel_frobenius < factor * tol.gradient);
    }
    CHECK(e.dv.rel_frobenius < factor * tol.gradient);
  }
}

std::string summary(const Errors& e) {
  return "O " + std::to_string(e.o.rel_frobenius) + " LSE " + std::to_string(e.lse.rel_frobenius) + " dQ " +
         std::to_string(e.dq.rel_frobenius) + " dK " + std::to_string(e.dk.rel_frobenius) + " dV " +
         std::to_string(e.dv.rel_frobenius);
}

RunSettings with_backward(bool backward) {
  RunSettings settings;
  settings.backward = backward;
  return settings;
}

// Runs the GPU tier on data and checks it against the oracle; returns the run.
StageRun check_against_oracle(const ProblemData& data) {
  const bool backward = gpu_runs_backward(data.problem);
  StageRun gpu = run_stage(flash_v1::describe(), Tier::gpu, data, with_backward(backward));
  const Errors vs_oracle = compare_with_oracle(gpu, oracle::attention(data, backward));
  INFO("vs oracle: " << summary(vs_oracle));
  check_within(vs_oracle, tolerance(data.dtype), backward);
  return gpu;
}

// Runs the GPU tier on data and checks it against the oracle, the CPU tier and the previous GPU stage.
void check_against_references(const ProblemData& data) {
  const Stage stage = flash_v1::describe();
  const bool backward = gpu_runs_backward(data.problem);
  const Tolerance tol = tolerance(data.dtype);
  const StageRun gpu = check_against_oracle(data);

  // The CPU tier computes in fp32 on the same rounded inputs (within 1e-4 of the oracle): the same bounds hold.
  const StageRun cpu = run_stage(stage, Tier::cpu, data, with_backward(backward));
  const Errors vs_cpu = compare_runs(gpu, cpu);
  INFO("vs CPU tier: " << summary(vs_cpu));
  const bool gradients_not_zero = data.problem.seq_k > 1;
  check_within(vs_cpu, tol, backward, 1.0, gradients_not_zero);

  // The previous GPU stage is within the same bounds of the oracle, so the two differ by at most twice them.
  const Stage* previous = previous_stage("flash_v1", Tier::gpu);
  if (previous == nullptr) return;
  const TierEntry* entry = previous->find(Tier::gpu);
  const bool previous_backward = backward && static_cast<bool>(entry->backward);
  try {
    const StageRun other = run_stage(*previous, Tier::gpu, data, with_backward(previous_backward));
    const Errors vs_previous = compare_runs(gpu, other);
    INFO("vs " << previous->name << "/gpu: " << summary(vs_previous));
    check_within(vs_previous, tol, previous_backward, 2.0, gradients_not_zero);
  } catch (const std::invalid_argument& e) {
    // The previous stage does not take this problem (its head dims or dtypes): nothing to compare, said aloud.
    WARN("not compared with " << previous->name << "/gpu: " << e.what());
  }
}

}  // namespace

TEST_CASE("flash_v1/gpu matches the oracle, its CPU tier and the previous GPU stage on awkward shapes, forward and backward",
          "[flash_v1][gpu]") {
  std::uint64_t seed = 900;
  for (const Shape& shape : awkward_shapes()) {
    if (!gpu_runs(shape.problem)) {
      WARN("not run (head dim outside flash_v1/gpu's 32, 64, 96, 128): " << label(shape));
      continue;
    }
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      for (DType dtype : kDtypes) {
        INFO(label(shape) << " layout " << layout_name(layout) << " dtype " << dtype_name(dtype));
        check_against_references(make_problem_data(shape.problem, dtype, layout, ++seed));
      }
    }
  }
}

TEST_CASE("flash_v1/gpu is right across many Q and K/V blocks: causal, Nq != Nk both ways, GQA, MQA",
          "[flash_v1][gpu]") {
  struct Case {
    std::int64_t batch, q_heads, kv_heads, seq_q, seq_k, head_dim;
    bool causal;
  };
  // Lengths that are not multiples of the blocks (Br = 128, Bc = 128 forward; 64 and 64 backward) and many
  // blocks long, so that the O / l / m updates in HBM, the Q double buffering, the causal block skipping and the
  // diagonal mask all run several times.
  const Case cases[] = {
      {1, 4, 2, 515, 515, 128, true},  {1, 4, 2, 515, 515, 128, false}, {2, 2, 1, 200, 700, 64, true},
      {1, 3, 1, 700, 190, 64, true},   {1, 2, 2, 333, 333, 96, true},   {1, 2, 2, 260, 300, 32, false},
  };
  std::uint64_t seed = 1900;
  for (const Case& c : cases) {
    AttentionProblem p;
    p.batch = c.batch;
    p.q_heads = c.q_heads;
    p.kv_heads = c.kv_heads;
    p.seq_q = c.seq_q;
    p.seq_k = c.seq_k;
    p.head_dim = c.head_dim;
    p.causal = c.causal;
    for (DType dtype : kDtypes) {
      INFO(p.describe() << " dtype " << dtype_name(dtype));
      check_against_references(make_problem_data(p, dtype, Layout::bhnd, ++seed));
    }
  }
}

// The awkward shapes and a few problems of many blocks against the oracle alone: the course lab's grade, which
// must not depend on the CPU tier or on another stage.
TEST_CASE("flash_v1/gpu matches the fp64 oracle on awkward shapes and across many blocks (oracle only)",
          "[flash_v1][gpu][lab]") {
  std::uint64_t seed = 2900;
  for (const Shape& shape : awkward_shapes()) {
    if (!gpu_runs(shape.problem)) continue;
    for (Layout layout : {Layout::bhnd, Layout::bnhd})
      for (DType dtype : kDtypes) {
        INFO(label(shape) << " layout " << layout_name(layout) << " dtype " << dtype_name(dtype));
        check_against_oracle(make_problem_data(shape.problem, dtype, layout, ++seed));
      }
  }
  for (const AttentionProblem& p : {problem_of(1, 4, 2, 515, 515, 128, true), problem_of(2, 2, 1, 200, 700, 64, true),
                                    problem_of(1, 3, 1, 700, 190, 64, true), problem_of(1, 2, 2, 260, 300, 32, false)})
    for (DType dtype : kDtypes) {
      INFO(p.describe() << " dtype " << dtype_name(dtype));
      check_against_oracle(make_problem_data(p, dtype, Layout::bhnd, ++seed));
    }
}

TEST_CASE("flash_v1/gpu: the Q blocks shared among any number of thread blocks per head (the option splits) "
          "give the same output bit for bit", "[flash_v1][gpu]") {
  // Each Q block goes through the same (j, i) steps whichever thread block runs it, so every split must give
  // exactly the output of one thread block per head (splits = 1, the paper's grid). Lengths of several Q blocks
  // (Br = 128) that are not multiples of it; causal with seq_q > seq_k (a first Q block that sees no key and is
  // never visited), seq_q < seq_k, GQA.
  const AttentionProblem problems[] = {problem_of(1, 4, 2, 1100, 1100, 64, true),
                                       problem_of(1, 2, 2, 900, 1300, 128, false),
                                       problem_of(2, 2, 1, 1000, 300, 64, true),
                                       problem_of(1, 2, 1, 640, 900, 96, true)};
  std::uint64_t seed = 3900;
  for (const AttentionProblem& p : problems) {
    for (DType dtype : kDtypes) {
      const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, ++seed);
      RunSettings paper_grid;
      paper_grid.options.values["splits"] = 1;
      const StageRun one = run_stage(flash_v1::describe(), Tier::gpu, data, paper_grid);
      const Errors e = compare_with_oracle(one, oracle::attention(data, false));
      INFO(p.describe() << " dtype " << dtype_name(dtype) << " splits 1: " << summary(e));
      check_within(e, tolerance(dtype), false);
      REQUIRE(one.counters.at("splits") == 1.0);
      for (std::int64_t splits : {2, 3, 5, 100, 0}) {  // 100: cut to Tr; 0: chosen by the tier
        RunSettings settings;
        settings.options.values["splits"] = splits;
        const StageRun run = run_stage(flash_v1::describe(), Tier::gpu, data, settings);
        INFO("splits " << splits << " (ran with " << run.counters.at("splits") << ")");
        CHECK(std::memcmp(run.o.data(), one.o.data(), one.o.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(run.lse.data(), one.lse.data(), one.lse.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("flash_v1/gpu: causal rows that see no key give zero output, -inf log-sum-exp and zero dQ",
          "[flash_v1][gpu][small]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = 300;
  p.seq_k = 70;  // bottom-right aligned: rows 0..229 see nothing (never visited: O, l, m keep their initial values)
  p.head_dim = 64;
  p.causal = true;
  const std::int64_t empty_rows = p.seq_q - p.seq_k;
  for (DType dtype : kDtypes) {
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 7);
    const StageRun run = run_stage(flash_v1::describe(), Tier::gpu, data, with_backward(true));
    std::int64_t wrong = 0;
    for (std::int64_t h = 0; h < p.q_heads; ++h)
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        const std::int64_t row = h * p.seq_q + i;
        if (i < empty_rows) {
          wrong += !(std::isinf(run.lse[row]) && run.lse[row] < 0);
          for (std::int64_t d = 0; d < p.head_dim; ++d)
            wrong += run.o[row * p.head_dim + d] != 0.0f || run.dq[row * p.head_dim + d] != 0.0f;
        } else {
          wrong += !std::isfinite(run.lse[row]);
        }
      }
    INFO("dtype " << dtype_name(dtype));
    CHECK(wrong == 0);
    // Row empty_rows sees exactly key 0: P = 1, so O is V's first row (already rounded to the dtype).
    for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[empty_rows * p.head_dim + d] == data.v[d]);
  }
}

TEST_CASE("flash_v1/gpu: logits near 1e3 do not overflow (the running max is subtracted)", "[flash_v1][gpu][small]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.seq_q = 170;
  p.seq_k = 190;
  p.head_dim = 64;
  p.causal = true;
  for (DType dtype : kDtypes) {
    // Q ~ N(0, 40^2): logits reach about 1e3, where exp() without the max subtracted overflows fp32 (at 88.7).
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 31, 40.0f);
    const StageRun gpu = run_stage(flash_v1::describe(), Tier::gpu, data, with_backward(true));
    const Errors e = compare_with_oracle(gpu, oracle::attention(data, true));
    INFO("dtype " << dtype_name(dtype) << ": " << summary(e));
    CHECK(e.o.bad_values == 0);
    CHECK(e.o.rel_frobenius < tolerance(dtype).output);
    CHECK(e.lse.rel_frobenius < tolerance(dtype).lse);
    // dV = P^T dO stays well conditioned. dQ and dK are not bounded here: with P nearly one-hot,
    // dS = P (dP - D) is a difference of nearly equal numbers, tiny next to its rounding in any precision below
    // the oracle's, so a relative bound would test the conditioning rather than the code. They must be finite.
    CHECK(e.dv.rel_frobenius < tolerance(dtype).gradient);
    CHECK(e.dq.bad_values == 0);
    CHECK(e.dk.bad_values == 0);
  }
}

TEST_CASE("flash_v1/gpu gives the same dQ, dK, dV bit for bit on every run (no atomics)", "[flash_v1][gpu]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 6;
  p.kv_heads = 2;
  p.seq_q = 333;
  p.seq_k = 411;
  p.head_dim = 128;
  p.causal = true;
  for (DType dtype : kDtypes) {
    INFO("dtype " << dtype_name(dtype));
    const ProblemData data = make_problem_data(p, dtype, Layout::bnhd, 77);
    const StageRun first = run_stage(flash_v1::describe(), Tier::gpu, data, with_backward(true));
    const StageRun second = run_stage(flash_v1::describe(), Tier::gpu, data, with_backward(true));
    REQUIRE(first.dq.size() == second.dq.size());
    CHECK(std::memcmp(first.dq.data(), second.dq.data(), first.dq.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(first.dk.data(), second.dk.data(), first.dk.size() * sizeof(float)) == 0);
    const Errors e = compare_with_oracle(first, oracle::attention(data, true));
    INFO(summary(e));
    check_within(e, tolerance(dtype), true);
  }
}

namespace {


AttentionProblem small_problem(std::int64_t head_dim) {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 8;
  p.head_dim = head_dim;
  return p;
}


}  // namespace

TEST_CASE("flash_v1/gpu rejects what its kernels cannot take, naming the argument", "[flash_v1][gpu][validation]") {
  StageOptions options;
  const AttentionProblem p = small_problem(64);

  const std::string dtype = invalid_argument_message([&] { flash_v1::forward_gpu(p, fake_tensors(p, DType::f32), options); });
  INFO(dtype);
  CHECK(dtype.rfind("dtype: ", 0) == 0);

  const AttentionProblem odd = small_problem(48);
  const std::string head_dim = invalid_argument_message([&] { flash_v1::forward_gpu(odd, fake_tensors(odd, DType::bf16), options); });
  INFO(head_dim);
  CHECK(head_dim.rfind("head_dim: ", 0) == 0);

  const AttentionProblem wide = small_problem(256);
  const std::string too_wide = invalid_argument_message([&] { flash_v1::forward_gpu(wide, fake_tensors(wide, DType::bf16), options); });
  INFO(too_wide);
  CHECK(too_wide.rfind("head_dim: ", 0) == 0);

  AttentionTensors unaligned_rows = fake_tensors(p, DType::bf16);
  unaligned_rows.q_strides.seq = 68;  // rows 136 bytes apart: not 16-byte aligned
  unaligned_rows.q_strides.head = 68 * p.seq_q;
  unaligned_rows.q_strides.batch = 68 * p.seq_q * p.q_heads;
  const std::string strides = invalid_argument_message([&] { flash_v1::forward_gpu(p, unaligned_rows, options); });
  INFO(strides);
  CHECK(strides.rfind("q_strides: ", 0) == 0);
  CHECK(strides.find("multiple of 8") != std::string::npos);

  AttentionProblem huge = small_problem(64);
  huge.seq_q = huge.seq_k = (std::int64_t{1} << 30) + 1;  // row indices are 32-bit inside the kernels
  const std::string long_sequence =
      invalid_argument_message([&] { flash_v1::forward_gpu(huge, fake_tensors(huge, DType::bf16), options); });
  INFO(long_sequence);
  CHECK(long_sequence.rfind("seq_q: ", 0) == 0);

  StageOptions negative_splits;
  negative_splits.values["splits"] = -1;
  const std::string splits =
      invalid_argument_message([&] { flash_v1::forward_gpu(p, fake_tensors(p, DType::bf16), negative_splits); });
  INFO(splits);
  CHECK(splits.rfind("splits: ", 0) == 0);

  AttentionTensors unaligned_pointer = fake_tensors(p, DType::bf16);
  unaligned_pointer.k = static_cast<const unsigned char*>(unaligned_pointer.k) + 8;
  const std::string pointer = invalid_argument_message([&] { flash_v1::forward_gpu(p, unaligned_pointer, options); });
  INFO(pointer);
  CHECK(pointer.rfind("k: ", 0) == 0);
  CHECK(pointer.find("16 bytes") != std::string::npos);
}
