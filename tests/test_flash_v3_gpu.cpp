// flash_v3, GPU tier (TMA + wgmma kernels, Hopper only): every schedule of the chapter's build-up against the
// fp64 oracle and against the previous GPU stage (flash_v2), in bf16 and fp16, on awkward shapes in both
// layouts and on shapes that span many tiles; rows that see no key, large logits, and the input rules.
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cuda_utils.hpp"
#include "flash_v3/flash_v3.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// Why these bounds (u = unit roundoff: 2^-11 f16, 2^-8 bf16): the inputs are already rounded to the dtype and
// the oracle sees the same values; the kernels round P~ to the dtype before O += P V and round O on the way
// out, each a relative error of at most u, about u / sqrt(3) RMS, independent from element to element: a
// relative Frobenius error of 1-2 u. The bounds, about 4 u (f16 2e-3) and 2.5 u (bf16 1e-2), are those of
// flash_v2's GPU tests and sit far below what an indexing, swizzle, barrier or masking mistake gives (errors
// near 1, or NaN from the poisoned outputs). LSE comes from fp32 scores: 1e-4.
struct Tolerance {
  double output, lse;
};
Tolerance tolerance(DType dtype) { return dtype == DType::f16 ? Tolerance{2e-3, 1e-4} : Tolerance{1e-2, 1e-4}; }

const DType kDtypes[] = {DType::bf16, DType::f16};

// The chapter's build-up: schedules 0-3 (one thread block per tile), and schedule 3 with the persistent grid.
struct Variant {
  int schedule;
  int persistent;
};
const Variant kVariants[] = {{0, 0}, {1, 0}, {2, 0}, {3, 0}, {3, 1}};
std::string name(const Variant& v) { return "schedule " + std::to_string(v.schedule) + (v.persistent ? " persistent" : ""); }

bool gpu_runs(const AttentionProblem& p) { return p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256; }

RunSettings with_variant(const Variant& v) {
  RunSettings settings;
  settings.options.values["schedule"] = v.schedule;
  settings.options.values["persistent"] = v.persistent;
  return settings;
}

void check_within(const Errors& e, const Tolerance& tol, double factor = 1.0) {
  CHECK(e.o.bad_values == 0);
  CHECK(e.o.rel_frobenius < factor * tol.output);
  CHECK(e.lse.rel_frobenius < factor * tol.lse);
}

std::string summary(const Errors& e) {
  return "O " + std::to_string(e.o.rel_frobenius) + " LSE " + std::to_string(e.lse.rel_frobenius);
}

// Every schedule against the oracle; the default schedule also against the previous GPU stage (flash_v2, within
// the same bounds of the oracle, so within twice them of each other) and every other schedule against it.
void check_against_references(const ProblemData& data) {
  const Stage stage = flash_v3::describe();
  const Tolerance tol = tolerance(data.dtype);
  const oracle::Result exact = oracle::attention(data, false);
  const StageRun reference = run_stage(stage, Tier::gpu, data, RunSettings{});
  for (const Variant& variant : kVariants) {
    const StageRun run = run_stage(stage, Tier::gpu, data, with_variant(variant));
    const Errors vs_oracle = compare_with_oracle(run, exact);
    INFO(name(variant) << " vs oracle: " << summary(vs_oracle));
    check_within(vs_oracle, tol);
    const Errors vs_default = compare_runs(run, reference);
    INFO(name(variant) << " vs the default: " << summary(vs_default));
    check_within(vs_default, tol, 2.0);
  }
  const Stage* previous = previous_stage("flash_v3", Tier::gpu);
  REQUIRE(previous != nullptr);
  try {
    const StageRun other = run_stage(*previous, Tier::gpu, data, RunSettings{});
    const Errors vs_previous = compare_runs(reference, other);
    INFO("vs " << previous->name << "/gpu: " << summary(vs_previous));
    check_within(vs_previous, tol, 2.0);
  } catch (const std::invalid_argument& e) {
    WARN("not compared with " << previous->name << "/gpu: " << e.what());
  }
}

}  // namespace

TEST_CASE("flash_v3/gpu, every schedule, matches the oracle and flash_v2/gpu on the awkward shapes",
          "[flash_v3][gpu]") {
  std::uint64_t seed = 3100;
  for (const Shape& shape : awkward_shapes()) {
    if (!gpu_runs(shape.problem)) {
      WARN("not run (head dim outside flash_v3/gpu's 64, 128, 256): " << label(shape));
      continue;
    }
    for (Layout layout : {Layout::bhnd, Layout::bnhd})
      for (DType dtype : kDtypes) {
        INFO(label(shape) << " layout " << layout_name(layout) << " dtype " << dtype_name(dtype));
        check_against_references(make_problem_data(shape.problem, dtype, layout, ++seed));
      }
  }
}

TEST_CASE("flash_v3/gpu is right across many tiles and blocks: tails, causal with Nq != Nk both ways, GQA 8:1, MQA",
          "[flash_v3][gpu]") {
  // Lengths that are not multiples of any tile (Br = 64 or 128, Bc = 128 or 64) and long enough for the K/V ring
  // to wrap several times, so that barrier parities, stage reuse, the masked/unmasked split and the drain all run.
  const AttentionProblem cases[] = {
      problem_of(1, 4, 4, 515, 515, 128, true),  problem_of(1, 4, 4, 515, 515, 128, false),
      problem_of(2, 16, 2, 333, 777, 128, true), problem_of(1, 8, 1, 700, 190, 64, true),
      problem_of(1, 2, 2, 190, 700, 64, true),   problem_of(2, 3, 3, 259, 1000, 64, false),
      problem_of(1, 2, 1, 390, 450, 256, true),  problem_of(1, 2, 2, 129, 513, 256, false),
      problem_of(1, 8, 1, 1, 1037, 128, true),
      // More tiles than SMs, so that the persistent grid walks several per thread block (ring positions and the Q
      // barriers carried from tile to tile), with empty tiles among them (causal, Nq > Nk).
      problem_of(2, 16, 4, 1500, 700, 128, true), problem_of(4, 16, 16, 1000, 1000, 64, false),
  };
  std::uint64_t seed = 3900;
  for (const AttentionProblem& p : cases)
    for (DType dtype : kDtypes) {
      INFO(p.describe() << " dtype " << dtype_name(dtype));
      check_against_references(make_problem_data(p, dtype, Layout::bhnd, ++seed));
    }
}

TEST_CASE("flash_v3/gpu: causal rows that see no key give zero output and -inf log-sum-exp in every schedule",
          "[flash_v3][gpu][small][sanitize]") {
  // Bottom-right aligned: rows 0..229 see nothing (whole Q tiles of 64 and 128, and part of one).
  const AttentionProblem p = problem_of(1, 2, 2, 300, 70, 64, true);
  const std::int64_t empty_rows = p.seq_q - p.seq_k;
  for (const Variant& variant : kVariants)
    for (DType dtype : kDtypes) {
      const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 7);
      const StageRun run = run_stage(flash_v3::describe(), Tier::gpu, data, with_variant(variant));
      std::int64_t wrong = 0;
      for (std::int64_t h = 0; h < p.q_heads; ++h)
        for (std::int64_t i = 0; i < p.seq_q; ++i) {
          const std::int64_t row = h * p.seq_q + i;
          if (i < empty_rows) {
            wrong += !(std::isinf(run.lse[row]) && run.lse[row] < 0);
            for (std::int64_t d = 0; d < p.head_dim; ++d) wrong += run.o[row * p.head_dim + d] != 0.0f;
          } else {
            wrong += !std::isfinite(run.lse[row]);
          }
        }
      INFO(name(variant) << " dtype " << dtype_name(dtype));
      CHECK(wrong == 0);
      // Row empty_rows sees exactly key 0: P = 1, so O is V's first row (already rounded to the dtype).
      for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[empty_rows * p.head_dim + d] == data.v[d]);
    }
}

TEST_CASE("flash_v3/gpu: logits near 1e3 do not overflow (the running max is subtracted)", "[flash_v3][gpu][small]") {
  const AttentionProblem p = problem_of(2, 4, 2, 170, 390, 128, true);
  for (DType dtype : kDtypes) {
    // Q ~ N(0, 40^2): logits reach about 1e3, where exp() without the max subtracted overflows fp32 (at 88.7).
    const ProblemData data = make_problem_data(p, dtype, Layout::bnhd, 31, 40.0f);
    const oracle::Result exact = oracle::attention(data, false);
    for (const Variant& variant : kVariants) {
      const Errors e = compare_with_oracle(run_stage(flash_v3::describe(), Tier::gpu, data, with_variant(variant)), exact);
      INFO(name(variant) << " dtype " << dtype_name(dtype) << ": " << summary(e));
      check_within(e, tolerance(dtype));
    }
  }
}

TEST_CASE("flash_v3/gpu gives the same answers with the wider key blocks (block_cols 192 at D = 64, 176 at D = 128)",
          "[flash_v3][gpu]") {
  std::uint64_t seed = 5100;
  for (auto [head_dim, block_cols] : {std::pair<std::int64_t, std::int64_t>{64, 192}, {128, 176}})
    for (bool causal : {false, true}) {
      const AttentionProblem p = problem_of(2, 4, 2, 301, 533, head_dim, causal);
      for (DType dtype : kDtypes) {
        const ProblemData data = make_problem_data(p, dtype, Layout::bnhd, ++seed);
        for (int persistent : {0, 1}) {
          if (persistent == 1 && block_cols == 176) continue;  // not offered
          RunSettings settings = with_variant({3, persistent});
          settings.options.values["block_cols"] = block_cols;
          const Errors e = compare_with_oracle(run_stage(flash_v3::describe(), Tier::gpu, data, settings),
                                               oracle::attention(data, false));
          INFO(p.describe() << " block_cols " << block_cols << " persistent " << persistent << " dtype "
                            << dtype_name(dtype) << ": " << summary(e));
          check_within(e, tolerance(dtype));
        }
      }
    }
}

TEST_CASE("flash_v3/gpu rejects what its kernels cannot take, naming the argument", "[flash_v3][gpu][validation]") {
  AttentionProblem p = problem_of(1, 2, 2, 8, 8, 64, false);
  StageOptions options;
  auto message = [&](const AttentionProblem& problem, const AttentionTensors& tensors, StageOptions& o) {
    return invalid_argument_message([&] { flash_v3::forward_gpu(problem, tensors, o); });
  };

  const std::string dtype = message(p, fake_tensors(p, DType::f32), options);
  INFO(dtype);
  CHECK(dtype.rfind("dtype: ", 0) == 0);

  for (std::int64_t head_dim : {32, 96, 16, 512}) {
    const AttentionProblem odd = problem_of(1, 2, 2, 8, 8, head_dim, false);
    const std::string text = message(odd, fake_tensors(odd, DType::bf16), options);
    INFO(text);
    CHECK(text.rfind("head_dim: ", 0) == 0);
  }

  AttentionTensors unaligned_rows = fake_tensors(p, DType::bf16);
  unaligned_rows.kv_strides.seq = 68;  // rows 136 bytes apart: TMA needs strides that are multiples of 16 bytes
  unaligned_rows.kv_strides.head = 68 * p.seq_k;
  unaligned_rows.kv_strides.batch = 68 * p.seq_k * p.kv_heads;
  const std::string strides = message(p, unaligned_rows, options);
  INFO(strides);
  CHECK(strides.rfind("kv_strides: ", 0) == 0);

  AttentionTensors unaligned_pointer = fake_tensors(p, DType::bf16);
  unaligned_pointer.q = static_cast<const unsigned char*>(unaligned_pointer.q) + 8;
  const std::string pointer = message(p, unaligned_pointer, options);
  INFO(pointer);
  CHECK(pointer.rfind("q: ", 0) == 0);

  AttentionTensors null_output = fake_tensors(p, DType::bf16);
  null_output.o = nullptr;
  const std::string null_o = message(p, null_output, options);
  INFO(null_o);
  CHECK(null_o.rfind("o: ", 0) == 0);

  for (std::int64_t schedule : {-1, 4}) {
    StageOptions bad;
    bad.values["schedule"] = schedule;
    const std::string text = message(p, fake_tensors(p, DType::bf16), bad);
    INFO(text);
    CHECK(text.rfind("schedule: ", 0) == 0);
  }

  for (auto [schedule, block_cols] : {std::pair<std::int64_t, std::int64_t>{3, 176}, {3, 100}, {2, 192}}) {
    StageOptions bad;
    bad.values["schedule"] = schedule;
    bad.values["block_cols"] = block_cols;  // 176 is offered at D = 128 only, 192 with schedule 3 only
    const std::string text = message(p, fake_tensors(p, DType::bf16), bad);
    INFO(text);
    CHECK(text.rfind("block_cols: ", 0) == 0);
  }

  for (auto [schedule, persistent] : {std::pair<std::int64_t, std::int64_t>{3, 2}, {2, 1}}) {
    StageOptions bad;
    bad.values["schedule"] = schedule;
    bad.values["persistent"] = persistent;
    const std::string text = message(p, fake_tensors(p, DType::bf16), bad);
    INFO(text);
    CHECK(text.rfind("persistent: ", 0) == 0);
  }

  AttentionProblem huge = p;
  huge.seq_q = huge.seq_k = (std::int64_t{1} << 30) + 1;  // TMA coordinates and row indices are 32-bit
  const std::string long_sequence = message(huge, fake_tensors(huge, DType::bf16), options);
  INFO(long_sequence);
  CHECK(long_sequence.rfind("seq_q: ", 0) == 0);
}
