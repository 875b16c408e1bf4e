// naive (standard attention), GPU tier: both versions (hand-written GEMM kernel and cuBLAS) against the fp64
// oracle and against the naive CPU tier, forward and backward, in f32, bf16 and f16, on the awkward shapes in
// both layouts; plus large logits, rows that see no key, the extra-memory prediction and the GPU's input rules.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.hpp"
#include "naive/naive.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

struct Tolerance {
  double output;    // O, relative Frobenius
  double lse;       // LSE, relative Frobenius
  double gradient;  // worst of dQ, dK, dV
};

// Why these bounds (u = unit roundoff: 2^-24 fp32, 2^-11 f16, 2^-8 bf16):
// - f32: cuBLAS runs with CUBLAS_COMPUTE_32F in the default math mode (no TF32) and the hand-written GEMM in
//   fp32 FMA, so the GPU is as exact as the CPU tier: the CPU tier's bounds, 1e-5 forward and 1e-4 backward
//   (fp32 sums over up to 300 terms, and the cancellation in dP - rowsum(dP * P)).
// - f16 / bf16: the inputs are already rounded (the oracle sees the same values); what adds error is that P,
//   dS and the outputs O, dQ, dK, dV are stored in the input dtype. Each rounding is a relative error of at
//   most u, about u / sqrt(3) in RMS, and the errors are independent, so a few such roundings give a relative
//   Frobenius error of 1-2 u. Bounds of about 4 u (f16: 2e-3 forward, 3e-3 backward) and 2.5 u (bf16: 1e-2)
//   sit well above that and far below what an indexing or masking mistake gives (errors near 1).
// - LSE comes from the fp32 scores in every dtype: 1e-5 in f32; 1e-4 with half inputs, whose GEMMs run on
//   tensor cores that accumulate in fp32 in an order of their own.
Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32: return {1e-5, 1e-5, 1e-4};
    case DType::f16: return {2e-3, 1e-4, 3e-3};
    case DType::bf16: return {1e-2, 1e-4, 1e-2};
  }
  return {0, 0, 0};
}

const char* version_name(naive::GpuKernels kernels) {
  return kernels == naive::GpuKernels::handwritten ? "handwritten" : "cublas";
}

RunSettings settings_for(naive::GpuKernels kernels, bool backward) {
  RunSettings settings;
  settings.backward = backward;
  settings.options.values["handwritten"] = kernels == naive::GpuKernels::handwritten ? 1 : 0;
  return settings;
}

const naive::GpuKernels kVersions[] = {naive::GpuKernels::handwritten, naive::GpuKernels::cublas};
const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

void check_within(const Errors& e, const Tolerance& tol, bool backward) {
  CHECK(e.o.rel_frobenius < tol.output);
  CHECK(e.lse.rel_frobenius < tol.lse);
  if (backward) {
    CHECK(e.dq.rel_frobenius < tol.gradient);
    CHECK(e.dk.rel_frobenius < tol.gradient);
    CHECK(e.dv.rel_frobenius < tol.gradient);
  }
}

}  // namespace

TEST_CASE("naive/gpu, both versions, matches the fp64 oracle and the CPU tier on awkward shapes, forward and backward",
          "[naive][gpu]") {
  const Stage stage = naive::describe();
  RunSettings cpu_settings;
  cpu_settings.backward = true;
  std::uint64_t seed = 500;
  for (const Shape& shape : awkward_shapes()) {
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      for (DType dtype : kDtypes) {
        const ProblemData data = make_problem_data(shape.problem, dtype, layout, ++seed);
        const oracle::Result exact = oracle::attention(data, true);
        // The CPU tier computes in fp32 on the same (rounded) inputs: the GPU's result without its roundings.
        const StageRun cpu = run_stage(stage, Tier::cpu, data, cpu_settings);
        for (naive::GpuKernels kernels : kVersions) {
          INFO(label(shape) << " layout " << layout_name(layout) << " dtype " << dtype_name(dtype) << " version "
                            << version_name(kernels));
          const StageRun gpu = run_stage(stage, Tier::gpu, data, settings_for(kernels, true));
          const Errors vs_oracle = compare_with_oracle(gpu, exact);
          const Errors vs_cpu = compare_runs(gpu, cpu);
          INFO("vs oracle: O " << vs_oracle.o.rel_frobenius << " LSE " << vs_oracle.lse.rel_frobenius << " dQ "
                               << vs_oracle.dq.rel_frobenius << " dK " << vs_oracle.dk.rel_frobenius << " dV "
                               << vs_oracle.dv.rel_frobenius);
          INFO("vs CPU tier: O " << vs_cpu.o.rel_frobenius << " LSE " << vs_cpu.lse.rel_frobenius << " worst gradient "
                                 << vs_cpu.worst_gradient());
          check_within(vs_oracle, tolerance(dtype), true);
          // The CPU tier is itself within 1e-5 (forward) and 1e-4 (backward) of the oracle: same bounds.
          check_within(vs_cpu, tolerance(dtype), true);
        }
      }
    }
  }
}

// The same shapes, layouts, dtypes and versions against the oracle alone: the course lab's grade, which must not
// depend on the CPU tier.
TEST_CASE("naive/gpu, both versions, matches the fp64 oracle on awkward shapes, forward and backward (oracle only)",
          "[naive][gpu][lab]") {
  const Stage stage = naive::describe();
  std::uint64_t seed = 700;
  for (const Shape& shape : awkward_shapes()) {
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      for (DType dtype : kDtypes) {
        const ProblemData data = make_problem_data(shape.problem, dtype, layout, ++seed);
        const oracle::Result exact = oracle::attention(data, true);
        for (naive::GpuKernels kernels : kVersions) {
          INFO(label(shape) << " layout " << layout_name(layout) << " dtype " << dtype_name(dtype) << " version "
                            << version_name(kernels));
          check_within(compare_with_oracle(run_stage(stage, Tier::gpu, data, settings_for(kernels, true)), exact),
                       tolerance(dtype), true);
        }
      }
    }
  }
}

TEST_CASE("naive/gpu: logits near 1e3 do not overflow (the softmax subtracts the row max)", "[naive][gpu][small]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.seq_q = 70;
  p.seq_k = 90;
  p.head_dim = 64;
  p.causal = true;
  for (DType dtype : kDtypes) {
    // Q ~ N(0, 40^2): logits reach about 1e3, where exp() without the max subtracted overflows fp32 (at 88.7).
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 31, 40.0f);
    const oracle::Result exact = oracle::attention(data, true);
    for (naive::GpuKernels kernels : kVersions) {
      INFO("dtype " << dtype_name(dtype) << " version " << version_name(kernels));
      const StageRun gpu = run_stage(naive::describe(), Tier::gpu, data, settings_for(kernels, true));
      const Errors e = compare_with_oracle(gpu, exact);
      INFO("O " << e.o.rel_frobenius << " LSE " << e.lse.rel_frobenius << " dV " << e.dv.rel_frobenius);
      CHECK(e.o.bad_values == 0);
      CHECK(e.o.rel_frobenius < tolerance(dtype).output);
      CHECK(e.lse.rel_frobenius < tolerance(dtype).lse);
      // dV = P^T dO stays well conditioned. dQ and dK are not checked here: with P nearly one-hot,
      // dS = P (dP - rowsum(dP * P)) is a difference of nearly equal numbers, tiny next to its rounding in any
      // precision below the oracle's fp64, so a relative bound would test the conditioning, not the code.
      CHECK(e.dv.bad_values == 0);
      CHECK(e.dv.rel_frobenius < tolerance(dtype).gradient);
    }
  }
}

TEST_CASE("naive/gpu: causal rows that see no key give zero output, -inf log-sum-exp and zero dQ", "[naive][gpu][small]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = 10;
  p.seq_k = 4;  // bottom-right aligned: rows 0..5 see nothing, row 6 sees key 0, ..., row 9 sees keys 0..3
  p.head_dim = 16;
  p.causal = true;
  for (DType dtype : kDtypes) {
    const ProblemData data = make_problem_data(p, dtype, Layout::bhnd, 7);
    for (naive::GpuKernels kernels : kVersions) {
      const StageRun run = run_stage(naive::describe(), Tier::gpu, data, settings_for(kernels, true));
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        INFO("dtype " << dtype_name(dtype) << " version " << version_name(kernels) << " row " << i);
        if (i < 6) {
          CHECK(std::isinf(run.lse[i]));
          CHECK(run.lse[i] < 0);
          for (std::int64_t d = 0; d < p.head_dim; ++d) {
            CHECK(run.o[i * p.head_dim + d] == 0.0f);
            CHECK(run.dq[i * p.head_dim + d] == 0.0f);
          }
        } else {
          CHECK(std::isfinite(run.lse[i]));
        }
      }
      // Row 6 sees exactly one key: P = 1 there, so O is V's first row (rounded to the dtype, like V already is).
      for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[6 * p.head_dim + d] == data.v[d]);
    }
  }
}

TEST_CASE("naive/gpu extra memory: S in fp32 and P in the input dtype (forward), S/dP, P, dS and fp32 dK, dV (backward)",
          "[naive][gpu][memory]") {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 6;
  p.kv_heads = 2;
  p.seq_q = 100;
  p.seq_k = 120;
  p.head_dim = 32;
  const TierEntry* gpu = naive::describe().find(Tier::gpu);
  REQUIRE(gpu != nullptr);
  const std::size_t scores = 2 * 6 * 100 * 120;
  const std::size_t kv = 2 * 2 * 120 * 32;
  for (DType dtype : kDtypes) {
    const std::size_t element = dtype_size(dtype);
    const std::size_t forward = scores * (4 + element);
    const std::size_t backward = scores * (4 + 2 * element) + 2 * kv * 4;
    for (naive::GpuKernels kernels : kVersions) {
      INFO("dtype " << dtype_name(dtype) << " version " << version_name(kernels));
      const StageRun run = run_stage(naive::describe(), Tier::gpu, make_problem_data(p, dtype), settings_for(kernels, true));
      CHECK(run.forward_extra_bytes == forward);
      CHECK(run.backward_extra_bytes == backward);
      // The prediction `attn run` uses to refuse a problem before allocating.
      CHECK(gpu->extra_bytes(p, dtype, false) == forward);
      CHECK(gpu->extra_bytes(p, dtype, true) == backward);
    }
  }
}

TEST_CASE("naive/gpu refuses a problem whose N x N matrices cannot fit the device, before allocating them",
          "[naive][gpu][memory]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = p.seq_k = 400000;  // S and P: 1.6e11 pairs x 6 bytes = 960 GB in bf16
  p.head_dim = 16;
  const ProblemData data = make_problem_data(p, DType::bf16);
  try {
    run_stage(naive::describe(), Tier::gpu, data, RunSettings{});
    FAIL("expected ProblemTooLarge");
  } catch (const ProblemTooLarge& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("naive/gpu") != std::string::npos);
    CHECK(std::string(e.what()).find("extra memory") != std::string::npos);
  }
}

namespace {

// Device tensors for a direct call of forward_gpu / backward_gpu (the bad-input tests bypass the harness).
struct DeviceTensors {
  DeviceBuffer<float> q, k, v, o, lse, d_o, dq, dk, dv;
  AttentionTensors t;
  explicit DeviceTensors(const AttentionProblem& p)
      : q(p.q_elements()), k(p.kv_elements()), v(p.kv_elements()), o(p.q_elements()), lse(p.lse_elements()),
        d_o(p.q_elements()), dq(p.q_elements()), dk(p.kv_elements()), dv(p.kv_elements()) {
    t.dtype = DType::f32;
    t.q_strides = make_strides(Layout::bhnd, p.q_heads, p.seq_q, p.head_dim);
    t.kv_strides = make_strides(Layout::bhnd, p.kv_heads, p.seq_k, p.head_dim);
    t.q = q.data();
    t.k = k.data();
    t.v = v.data();
    t.o = o.data();
    t.lse = lse.data();
    t.d_o = d_o.data();
    t.dq = dq.data();
    t.dk = dk.data();
    t.dv = dv.data();
  }
};

AttentionProblem small_problem() {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 8;
  p.head_dim = 16;
  return p;
}


}  // namespace

TEST_CASE("naive/gpu rejects host pointers, naming the tensor", "[naive][gpu][validation]") {
  const AttentionProblem p = small_problem();
  DeviceTensors device(p);
  HostBuffer<float> host_q(p.q_elements()), host_dk(p.kv_elements());
  AttentionTensors t = device.t;
  t.q = host_q.data();
  const std::string forward = invalid_argument_message([&] { naive::forward_gpu(p, t); });
  INFO(forward);
  CHECK(forward.rfind("q: ", 0) == 0);
  CHECK(forward.find("device memory") != std::string::npos);
  t = device.t;
  t.dk = host_dk.data();
  const std::string backward = invalid_argument_message([&] { naive::backward_gpu(p, t, naive::GpuKernels::handwritten); });
  INFO(backward);
  CHECK(backward.rfind("dk: ", 0) == 0);
  CHECK(backward.find("device memory") != std::string::npos);
}

TEST_CASE("naive/gpu rejects a dtype outside f32, bf16, f16 and a head dim above 256", "[naive][gpu][validation]") {
  AttentionProblem p = small_problem();
  DeviceTensors device(p);
  AttentionTensors t = device.t;
  t.dtype = static_cast<DType>(7);  // e.g. a newer enum value this tier was not built for
  const std::string dtype = invalid_argument_message([&] { naive::forward_gpu(p, t); });
  INFO(dtype);
  CHECK(dtype.rfind("dtype: ", 0) == 0);
  CHECK(dtype.find("naive/gpu") != std::string::npos);

  p.head_dim = 300;
  DeviceTensors wide(p);
  const std::string head_dim = invalid_argument_message([&] { naive::forward_gpu(p, wide.t); });
  INFO(head_dim);
  CHECK(head_dim.rfind("head_dim: ", 0) == 0);
}

TEST_CASE("naive/gpu rejects an option handwritten other than 0 or 1", "[naive][gpu][validation]") {
  const ProblemData data = make_problem_data(small_problem(), DType::bf16);
  RunSettings settings;
  settings.options.values["handwritten"] = 2;
  const std::string message = invalid_argument_message([&] { run_stage(naive::describe(), Tier::gpu, data, settings); });
  INFO(message);
  CHECK(message.rfind("handwritten: ", 0) == 0);
}
