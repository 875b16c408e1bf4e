// flash_v2, GPU tier (mma.sync kernels): forward and backward against the fp64 oracle, against flash_v2's CPU
// tier and against the previous GPU stage, in bf16 and fp16, on the awkward shapes in both layouts and on shapes
// that span many blocks; rows that see no key, large logits, the deterministic dQ option, and the input rules.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cuda_utils.hpp"
#include "flash_v2/flash_v2.hpp"
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
// few of them give a relative Frobenius error of 1-2 u; the fp32 accumulation adds nothing visible. Bounds of
// about 4 u (f16: 2e-3 forward, 3e-3 backward) and 2.5 u (bf16: 1e-2) sit above that and far below what an
// indexing, masking or synchronisation mistake gives (errors near 1, or NaN from the poisoned outputs).
// LSE is computed from fp32 scores (exp2 by MUFU, relative error ~2^-22): 1e-4 in both dtypes.
Tolerance tolerance(DType dtype) { return dtype == DType::f16 ? Tolerance{2e-3, 1e-4, 3e-3} : Tolerance{1e-2, 1e-4, 1e-2}; }

const DType kDtypes[] = {DType::bf16, DType::f16};

bool gpu_runs(const AttentionProblem& p) {
  const TierCaps caps = flash_v2::gpu_caps();
  for (int d : caps.head_dims)
    if (d == p.head_dim) return true;
  return false;
}

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

RunSettings with_backward(bool backward, bool deterministic = false) {
  RunSettings settings;
  settings.backward = backward;
  if (deterministic) settings.options.values["deterministic"] = 1;
  return settings;
}

// Runs the GPU tier on data and checks it against the oracle; returns the run.
StageRun check_against_oracle(const ProblemData& data, bool deterministic = false) {
  const bool backward = gpu_runs(data.problem);
  StageRun gpu = run_stage(flash_v2::describe(), Tier::gpu, data, with_backward(backward, deterministic));
  const Errors vs_oracle = compare_with_oracle(gpu, oracle::attention(data, backward));
  INFO("vs oracle: " << summary(vs_oracle));
  check_within(vs_oracle, tolerance(data.dtype), backward);
  return gpu;
}

// Runs the GPU tier on data and checks it against the oracle, the CPU tier and the previous GPU stage.
void check_against_references(const ProblemData& data, bool deterministic = false) {
  const Stage stage = flash_v2::describe();
  const bool backward = gpu_runs(data.problem);
  const Tolerance tol = tolerance(data.dtype);
  const StageRun gpu = check_against_oracle(data, deterministic);

  // The CPU tier computes in fp32 on the same rounded inputs (within 1e-4 of the oracle): the same bounds hold.
  const StageRun cpu = run_stage(stage, Tier::cpu, data, with_backward(backward));
  const Errors vs_cpu = compare_runs(gpu, cpu);
  INFO("vs CPU tier: " << summary(vs_cpu));
  const bool gradients_not_zero = data.problem.seq_k > 1;
  check_within(vs_cpu, tol, backward, 1.0, gradients_not_zero);

  // The previous GPU stage is within the same bounds of the oracle, so the two differ by at most twice them.
  const Stage* previous = previous_stage("flash_v2", Tier::gpu);
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

TEST_CASE("flash_v2/gpu matches the oracle, its CPU tier and the previous GPU stage on awkward shapes, forward and backward",
          "[flash_v2][gpu]") {
  std::uint64_t seed = 900;
  for (const Shape& shape : awkward_shapes()) {
    if (!gpu_runs(shape.problem)) {
      WARN("not run (head dim outside flash_v2/gpu's 32, 64, 96, 128, 256): " << label(shape));
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

TEST_CASE("flash_v2/gpu is right across many Q and K/V blocks: causal, Nq != Nk both ways, GQA, MQA",
          "[flash_v2][gpu]") {
  struct Case {
    std::int64_t batch, q_heads, kv_heads, seq_q, seq_k, head_dim;
    bool causal;
  };
  // Lengths that are not multiples of the blocks (Br = 128 or 64, Bc = 64) and many blocks long, so that the
  // double buffering, the causal block skipping and the diagonal mask all run several times; and two GQA shapes
  // whose N_q is a multiple of every B_r, where the backward's steps pass from one query head's last Q block to
  // the next head's first exactly at N_q.
  const Case cases[] = {
      {1, 4, 2, 515, 515, 128, true},  {1, 4, 2, 515, 515, 128, false}, {2, 2, 1, 200, 700, 64, true},
      {1, 3, 1, 700, 190, 64, true},   {1, 2, 2, 333, 333, 96, true},   {1, 2, 2, 260, 300, 32, false},
      {1, 2, 1, 190, 250, 256, true},  {2, 4, 2, 256, 300, 64, false},  {1, 6, 2, 384, 384, 128, true},
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
TEST_CASE("flash_v2/gpu matches the fp64 oracle on awkward shapes and across many blocks (oracle only)",
          "[flash_v2][gpu][lab]") {
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
                                    problem_of(1, 3, 1, 700, 190, 64, true), problem_of(1, 2, 2, 260, 300, 32, false),
                                    problem_of(1, 4, 1, 300, 211, 256, false)})
    for (DType dtype : kDtypes) {
      INFO(p.describe() << " dtype " << dtype_name(dtype));
      check_against_oracle(make_problem_data(p, dtype, Layout::bhnd, ++seed));
    }
}

TEST_CASE("flash_v2/gpu: causal rows that see no key give zero output, -inf log-sum-exp and zero dQ",
          "[flash_v2][gpu][small]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = 300;
  p.seq_k = 70;  // bottom-right aligned: rows 0..229 see nothing (whole Q blocks of 128, and part of one)
  p.head_dim = 64;
  p.causal = true;
  const std::int64_t empty_rows = p.seq_q - p.seq_k;
  for (DType dtype : kDtypes) {
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 7);
    const StageRun run = run_stage(flash_v2::describe(), Tier::gpu, data, with_backward(true));
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

TEST_CASE("flash_v2/gpu: logits near 1e3 do not overflow (the running max is subtracted)", "[flash_v2][gpu][small]") {
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
    const StageRun gpu = run_stage(flash_v2::describe(), Tier::gpu, data, with_backward(true));
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

TEST_CASE("flash_v2/gpu with deterministic = 1 gives the same dQ bit for bit on every run, within the same bounds",
          "[flash_v2][gpu]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 6;
  p.kv_heads = 2;
  p.seq_q = 333;
  p.seq_k = 411;
  p.causal = true;
  for (std::int64_t head_dim : {64, 128, 256}) {  // D = 64: the backward kernel of 128 query rows per step
    p.head_dim = head_dim;
    for (DType dtype : kDtypes) {
      INFO("D " << head_dim << " dtype " << dtype_name(dtype));
      const ProblemData data = make_problem_data(p, dtype, Layout::bnhd, 77);
      const StageRun first = run_stage(flash_v2::describe(), Tier::gpu, data, with_backward(true, true));
      const StageRun second = run_stage(flash_v2::describe(), Tier::gpu, data, with_backward(true, true));
      REQUIRE(first.dq.size() == second.dq.size());
      CHECK(std::memcmp(first.dq.data(), second.dq.data(), first.dq.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(first.dk.data(), second.dk.data(), first.dk.size() * sizeof(float)) == 0);
      const Errors e = compare_with_oracle(first, oracle::attention(data, true));
      INFO(summary(e));
      check_within(e, tolerance(dtype), true);
    }
  }
}

TEST_CASE("flash_v2/gpu gives the same answers with the other block sizes: block_cols = 64 (and 32 at D = 128), "
          "backward_block_cols = 64, backward_block_rows = 64 and 128 (D <= 64)",
          "[flash_v2][gpu]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.seq_q = 301;
  p.seq_k = 333;
  p.causal = true;
  std::uint64_t seed = 4000;
  const std::pair<std::int64_t, std::int64_t> head_dim_and_cols[] = {{32, 64}, {64, 64}, {128, 64}, {128, 32}};
  for (const auto& [head_dim, block_cols] : head_dim_and_cols) {
    p.head_dim = head_dim;
    for (DType dtype : kDtypes) {
      RunSettings settings = with_backward(true);
      settings.options.values["block_cols"] = block_cols;  // the default is 128 for D <= 64
      settings.options.values["backward_block_cols"] = 64;
      const ProblemData data = make_problem_data(p, dtype, Layout::bnhd, ++seed);
      const Errors e = compare_with_oracle(run_stage(flash_v2::describe(), Tier::gpu, data, settings),
                                           oracle::attention(data, true));
      INFO(p.describe() << " block_cols " << block_cols << " dtype " << dtype_name(dtype) << ": " << summary(e));
      check_within(e, tolerance(dtype), true);
    }
  }
  // D <= 64: backward steps of 64 query rows (128 is the default there, run by every other test case) with 128
  // and 64 keys per thread block, and of 128 rows with 64 keys; N not a multiple of any of them.
  const std::pair<std::int64_t, std::int64_t> rows_and_cols[] = {{64, 128}, {64, 64}, {128, 64}};
  for (std::int64_t head_dim : {32, 64})
    for (const auto& [backward_rows, backward_cols] : rows_and_cols) {
      p.head_dim = head_dim;
      for (DType dtype : kDtypes) {
        RunSettings settings = with_backward(true);
        settings.options.values["backward_block_rows"] = backward_rows;
        settings.options.values["backward_block_cols"] = backward_cols;
        const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, ++seed);
        const Errors e = compare_with_oracle(run_stage(flash_v2::describe(), Tier::gpu, data, settings),
                                             oracle::attention(data, true));
        INFO(p.describe() << " backward_block_rows " << backward_rows << ", backward_block_cols " << backward_cols
                          << " dtype " << dtype_name(dtype) << ": " << summary(e));
        check_within(e, tolerance(dtype), true);
      }
    }
}

// FlashAttention-2's backward keeps two scratch arrays: dQ's fp32 accumulator and D_i (one fp32 per query row); with
// GQA it also writes dK, dV per query head and sums them afterwards. flash_v2 may take no more: L_i is converted to
// log2 units as it is loaded, and dK, dV are summed over the group in registers.
TEST_CASE("flash_v2/gpu's backward allocates no more scratch than FlashAttention-2's: the fp32 dQ accumulator and "
          "one fp32 per query row, with GQA too",
          "[flash_v2][gpu][small][memory]") {
  const Stage& stage = find_stage("flash_v2");
  for (std::int64_t kv_heads : {4, 1}) {
    AttentionProblem p;
    p.batch = 2;
    p.q_heads = 4;
    p.kv_heads = kv_heads;
    p.seq_q = 200;
    p.seq_k = 150;
    p.head_dim = 64;
    p.causal = true;
    const StageRun run = run_stage(stage, Tier::gpu, make_problem_data(p, DType::bf16, Layout::bhnd, 12), with_backward(true));
    const std::size_t accumulator = static_cast<std::size_t>(p.q_elements()) * sizeof(float);
    const std::size_t per_row = static_cast<std::size_t>(p.lse_elements()) * sizeof(float);
    INFO(p.describe() << ": forward " << run.forward_extra_bytes << " bytes, backward " << run.backward_extra_bytes
                      << " bytes; dQ accumulator " << accumulator << ", one fp32 per row " << per_row);
    CHECK(run.forward_extra_bytes == 0);
    CHECK(run.backward_extra_bytes <= accumulator + per_row);
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

TEST_CASE("flash_v2/gpu rejects what its kernels cannot take, naming the argument", "[flash_v2][gpu][validation]") {
  StageOptions options;
  const AttentionProblem p = small_problem(64);

  const std::string dtype = invalid_argument_message([&] { flash_v2::forward_gpu(p, fake_tensors(p, DType::f32), options); });
  INFO(dtype);
  CHECK(dtype.rfind("dtype: ", 0) == 0);

  const AttentionProblem odd = small_problem(48);
  const std::string head_dim = invalid_argument_message([&] { flash_v2::forward_gpu(odd, fake_tensors(odd, DType::bf16), options); });
  INFO(head_dim);
  CHECK(head_dim.rfind("head_dim: ", 0) == 0);

  AttentionTensors unaligned_rows = fake_tensors(p, DType::bf16);
  unaligned_rows.q_strides.seq = 68;  // rows 136 bytes apart: not 16-byte aligned
  unaligned_rows.q_strides.head = 68 * p.seq_q;
  unaligned_rows.q_strides.batch = 68 * p.seq_q * p.q_heads;
  const std::string strides = invalid_argument_message([&] { flash_v2::forward_gpu(p, unaligned_rows, options); });
  INFO(strides);
  CHECK(strides.rfind("q_strides: ", 0) == 0);
  CHECK(strides.find("multiple of 8") != std::string::npos);

  auto with_option = [](const char* name, std::int64_t value) {
    StageOptions o;
    o.values[name] = value;
    return o;
  };
  StageOptions odd_cols = with_option("block_cols", 96);
  const std::string cols = invalid_argument_message([&] { flash_v2::forward_gpu(p, fake_tensors(p, DType::bf16), odd_cols); });
  INFO(cols);
  CHECK(cols.rfind("block_cols: ", 0) == 0);
  const AttentionProblem d128 = small_problem(128);
  StageOptions wide_cols = with_option("block_cols", 128);  // S_ij of 32 x 128 per warp next to O of 32 x 128
  const std::string cols128 = invalid_argument_message([&] { flash_v2::forward_gpu(d128, fake_tensors(d128, DType::bf16), wide_cols); });
  INFO(cols128);
  CHECK(cols128.rfind("block_cols: ", 0) == 0);
  StageOptions narrow_cols = with_option("block_cols", 32);  // offered at D = 128 only
  const std::string cols32 = invalid_argument_message([&] { flash_v2::forward_gpu(p, fake_tensors(p, DType::bf16), narrow_cols); });
  INFO(cols32);
  CHECK(cols32.rfind("block_cols: ", 0) == 0);
  StageOptions odd_backward_cols = with_option("backward_block_cols", 32);
  const std::string backward_cols =
      invalid_argument_message([&] { flash_v2::backward_gpu(p, fake_tensors(p, DType::bf16), odd_backward_cols); });
  INFO(backward_cols);
  CHECK(backward_cols.rfind("backward_block_cols: ", 0) == 0);
  const AttentionProblem wide = small_problem(256);  // 128 keys by D = 256 do not fit one block's shared memory
  StageOptions wide_backward_cols = with_option("backward_block_cols", 128);
  const std::string backward_wide =
      invalid_argument_message([&] { flash_v2::backward_gpu(wide, fake_tensors(wide, DType::bf16), wide_backward_cols); });
  INFO(backward_wide);
  CHECK(backward_wide.rfind("backward_block_cols: ", 0) == 0);
  const AttentionProblem d128_backward = small_problem(128);  // 128 query rows per step: only up to D = 64
  StageOptions tall_backward_rows = with_option("backward_block_rows", 128);
  const std::string backward_rows = invalid_argument_message(
      [&] { flash_v2::backward_gpu(d128_backward, fake_tensors(d128_backward, DType::bf16), tall_backward_rows); });
  INFO(backward_rows);
  CHECK(backward_rows.rfind("backward_block_rows: ", 0) == 0);
  StageOptions odd_backward_rows = with_option("backward_block_rows", 96);
  const std::string backward_rows96 =
      invalid_argument_message([&] { flash_v2::backward_gpu(p, fake_tensors(p, DType::bf16), odd_backward_rows); });
  INFO(backward_rows96);
  CHECK(backward_rows96.rfind("backward_block_rows: ", 0) == 0);

  AttentionProblem huge = small_problem(64);
  huge.seq_q = huge.seq_k = (std::int64_t{1} << 30) + 1;  // row indices are 32-bit inside the kernels
  const std::string long_sequence =
      invalid_argument_message([&] { flash_v2::forward_gpu(huge, fake_tensors(huge, DType::bf16), options); });
  INFO(long_sequence);
  CHECK(long_sequence.rfind("seq_q: ", 0) == 0);

  AttentionTensors unaligned_pointer = fake_tensors(p, DType::bf16);
  unaligned_pointer.k = static_cast<const unsigned char*>(unaligned_pointer.k) + 8;
  const std::string pointer = invalid_argument_message([&] { flash_v2::forward_gpu(p, unaligned_pointer, options); });
  INFO(pointer);
  CHECK(pointer.rfind("k: ", 0) == 0);
  CHECK(pointer.find("16 bytes") != std::string::npos);
}
