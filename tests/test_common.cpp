// common/: the validator's rules, fp16/bf16 rounding, the error metric, the random fill and the memory tracker.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "common/memory.hpp"
#include "common/numeric.hpp"
#include "common/progress.hpp"
#include "common/registry.hpp"
#include "common/simd.hpp"
#include "common/tile_layout.hpp"
#include "common/validate.hpp"
#include "test_support.hpp"

using namespace attn;

namespace {

AttentionProblem small_problem() {
  AttentionProblem p;
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.seq_q = 8;
  p.seq_k = 9;
  p.head_dim = 16;
  return p;
}

// Host tensors for small_problem(), valid unless a test breaks one thing.
struct ValidCall {
  AttentionProblem p = small_problem();
  std::vector<float> q, k, v, o, lse, d_o, dq, dk, dv;
  AttentionTensors t;
  ValidCall() {
    q.resize(p.q_elements());
    o.resize(p.q_elements());
    d_o.resize(p.q_elements());
    dq.resize(p.q_elements());
    k.resize(p.kv_elements());
    v.resize(p.kv_elements());
    dk.resize(p.kv_elements());
    dv.resize(p.kv_elements());
    lse.resize(p.lse_elements());
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

// Runs the validator and returns its message, or "" when it accepted the call.
std::string rejection(const ValidCall& call, const TierCaps& caps = TierCaps{}, bool backward = true) {
  try {
    validate_call(call.p, call.t, caps, "test/cpu", backward);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

bool starts_with(const std::string& text, const std::string& prefix) { return text.rfind(prefix, 0) == 0; }

}  // namespace

TEST_CASE("validator accepts a valid call in both layouts", "[common][validate]") {
  ValidCall call;
  CHECK(rejection(call) == "");
  call.t.q_strides = make_strides(Layout::bnhd, call.p.q_heads, call.p.seq_q, call.p.head_dim);
  call.t.kv_strides = make_strides(Layout::bnhd, call.p.kv_heads, call.p.seq_k, call.p.head_dim);
  CHECK(rejection(call) == "");
}

TEST_CASE("validator: every size must be at least 1", "[common][validate]") {
  for (std::int64_t AttentionProblem::*field : {&AttentionProblem::batch, &AttentionProblem::q_heads,
                                                 &AttentionProblem::kv_heads, &AttentionProblem::seq_q,
                                                 &AttentionProblem::seq_k, &AttentionProblem::head_dim}) {
    ValidCall call;
    call.p.*field = 0;
    const std::string message = rejection(call);
    INFO(message);
    CHECK(message.find("must be >= 1") != std::string::npos);
  }
}

TEST_CASE("validator: q_heads must be a multiple of kv_heads", "[common][validate]") {
  ValidCall call;
  call.p.kv_heads = 3;
  CHECK(starts_with(rejection(call), "q_heads: 4 must be a multiple of kv_heads (3)"));
}

TEST_CASE("validator: the scale must be finite and non-negative", "[common][validate]") {
  ValidCall call;
  call.p.scale = std::numeric_limits<double>::quiet_NaN();
  CHECK(starts_with(rejection(call), "scale:"));
  call.p.scale = -1.0;
  CHECK(starts_with(rejection(call), "scale:"));
}

TEST_CASE("validator: size products that would wrap 64-bit counts are rejected, naming the largest size",
          "[common][validate]") {
  // These wrapped to tiny element counts, passed the memory checks and crashed flash_v1, flash_v2 and paged.
  AttentionProblem p;
  p.q_heads = p.kv_heads = 4;
  p.seq_q = 1;
  p.seq_k = 4611686018427387905;  // 4 x 4 x this x 1 wraps to a small count
  p.head_dim = 1;
  std::string message = testing::invalid_argument_message([&] { validate_problem(p); });
  CHECK(starts_with(message, "seq_k: 4611686018427387905 is too large"));
  CHECK(message.find("2^58") != std::string::npos);
  p = AttentionProblem{};
  p.batch = 7;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 7905747460161236407;
  p.head_dim = 1;
  CHECK(starts_with(testing::invalid_argument_message([&] { validate_problem(p); }), "seq_q:"));
  p = AttentionProblem{};
  p.head_dim = 9223372036854775807;
  CHECK(starts_with(testing::invalid_argument_message([&] { validate_problem(p); }), "head_dim:"));
  // The scores B x Hq x Nq x Nk count too (naive's N x N matrices), even when every tensor is small.
  p = AttentionProblem{};
  p.seq_q = p.seq_k = std::int64_t{1} << 32;
  p.head_dim = 1;
  CHECK(testing::invalid_argument_message([&] { validate_problem(p); }).find("the scores") != std::string::npos);
  p.seq_k = std::int64_t{1} << 20;  // 2^52 scores: accepted
  CHECK(testing::invalid_argument_message([&] { validate_problem(p); }) == "");
}

TEST_CASE("validator: a scale that is finite as a double but infinite as fp32 is rejected", "[common][validate]") {
  AttentionProblem p = small_problem();
  p.scale = 3.5e38;
  CHECK(starts_with(testing::invalid_argument_message([&] { validate_problem(p); }), "scale: 3.5e+38 overflows fp32"));
  p.scale = 3.4e38;
  CHECK(testing::invalid_argument_message([&] { validate_problem(p); }) == "");
}

TEST_CASE("visible_pairs counts the causal triangle in closed form, for any sizes", "[common][problem]") {
  for (std::int64_t nq : {1, 2, 7, 64, 65})
    for (std::int64_t nk : {1, 3, 7, 64, 100}) {
      AttentionProblem p;
      p.seq_q = nq;
      p.seq_k = nk;
      p.causal = true;
      double loop = 0;
      for (std::int64_t i = 0; i < nq; ++i) loop += static_cast<double>(p.visible_keys(i));
      CHECK(p.visible_pairs() == loop);
    }
  AttentionProblem huge;  // a loop over 10^15 rows would not finish
  huge.seq_q = huge.seq_k = 1000000000000000;
  huge.causal = true;
  CHECK(huge.visible_pairs() == Approx(5e29));
}

TEST_CASE("validator: head dim above the tier's limit, or not in its list, is rejected", "[common][validate]") {
  ValidCall call;
  TierCaps caps;
  caps.max_head_dim = 8;
  CHECK(rejection(call, caps) == "head_dim: 16 exceeds the limit 8 of test/cpu");
  caps.max_head_dim = 256;
  caps.head_dims = {64, 128};
  CHECK(rejection(call, caps) == "head_dim: 16 is not supported by test/cpu (supported: 64, 128)");
}

TEST_CASE("validator: a dtype the tier lacks is rejected, naming the ones it has", "[common][validate]") {
  ValidCall call;
  call.t.dtype = DType::bf16;
  CHECK(rejection(call) == "dtype: bf16 is not supported by test/cpu (supported: f32)");
}

TEST_CASE("validator: null pointers are rejected by name", "[common][validate]") {
  for (const char* name : {"q", "k", "v", "o", "lse", "d_o", "dq", "dk", "dv"}) {
    ValidCall call;
    const std::string n = name;
    if (n == "q") call.t.q = nullptr;
    if (n == "k") call.t.k = nullptr;
    if (n == "v") call.t.v = nullptr;
    if (n == "o") call.t.o = nullptr;
    if (n == "lse") call.t.lse = nullptr;
    if (n == "d_o") call.t.d_o = nullptr;
    if (n == "dq") call.t.dq = nullptr;
    if (n == "dk") call.t.dk = nullptr;
    if (n == "dv") call.t.dv = nullptr;
    CHECK(rejection(call) == n + ": null pointer");
  }
  ValidCall forward_only;
  forward_only.t.d_o = nullptr;  // the forward pass does not need the backward's tensors
  CHECK(rejection(forward_only, TierCaps{}, false) == "");
}

TEST_CASE("validator: misaligned pointers are rejected", "[common][validate]") {
  ValidCall call;
  call.t.k = reinterpret_cast<const char*>(call.k.data()) + 2;
  CHECK(rejection(call) == "k: pointer is not aligned to 4 bytes");
  ValidCall vector_aligned;
  TierCaps caps;
  caps.pointer_alignment = 16;
  vector_aligned.t.q = vector_aligned.q.data() + 1;  // 4-byte aligned, not 16
  CHECK(rejection(vector_aligned, caps) == "q: pointer is not aligned to 16 bytes");
}

TEST_CASE("validator: strides that make rows overlap are rejected", "[common][validate]") {
  ValidCall call;
  call.t.q_strides.seq = 8;  // head_dim is 16: consecutive rows would overlap
  CHECK(starts_with(rejection(call), "q_strides: stride 8 makes rows overlap"));
  ValidCall zero;
  zero.t.kv_strides.head = 0;
  CHECK(starts_with(rejection(zero), "kv_strides: strides must be >= 1"));
  ValidCall heads;
  heads.t.q_strides.head = heads.t.q_strides.seq;  // heads alias the second row
  CHECK(starts_with(rejection(heads), "q_strides:"));
}

TEST_CASE("validator: a tier that copies rows in 16-byte chunks rejects strides not a multiple of 8", "[common][validate]") {
  TierCaps caps;
  caps.stride_multiple = 8;
  ValidCall padded;  // rows padded to 24 elements: every stride a multiple of 8, accepted
  padded.t.q_strides = {24 * padded.p.seq_q * padded.p.q_heads, 24 * padded.p.seq_q, 24};
  CHECK(rejection(padded, caps) == "");
  ValidCall odd;  // rows 20 elements apart (80 bytes): not 16-byte aligned
  odd.t.kv_strides = {20 * odd.p.seq_k * odd.p.kv_heads, 20 * odd.p.seq_k, 20};
  const std::string message = rejection(odd, caps);
  INFO(message);
  CHECK(starts_with(message, "kv_strides: every stride must be a multiple of 8 elements for test/cpu"));
}

TEST_CASE("validator: sequences longer than the tier's limit are rejected, naming which", "[common][validate]") {
  ValidCall call;
  TierCaps caps;
  caps.max_seq = call.p.seq_k - 1;
  CHECK(starts_with(rejection(call, caps), call.p.seq_q > caps.max_seq ? "seq_q: " : "seq_k: "));
  caps.max_seq = std::max(call.p.seq_q, call.p.seq_k);
  CHECK(rejection(call, caps) == "");
}

TEST_CASE("validator: backward on a tier without one is rejected", "[common][validate]") {
  ValidCall call;
  TierCaps caps;
  caps.has_backward = false;
  CHECK(rejection(call, caps, true) == "backward: test/cpu has no backward pass");
}

TEST_CASE("parse_dtype and parse_tier reject unknown names", "[common]") {
  CHECK(parse_dtype("bf16") == DType::bf16);
  CHECK_THROWS_AS(parse_dtype("int8"), std::invalid_argument);
  CHECK(parse_tier("gpu") == Tier::gpu);
  CHECK_THROWS_AS(parse_tier("tpu"), std::invalid_argument);
}

TEST_CASE("bf16 conversion rounds to nearest even and keeps specials", "[common][numeric]") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80);
  // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
  CHECK(float_to_bf16_bits(1.0f + 0x1.0p-8f) == 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to even.
  CHECK(float_to_bf16_bits(1.0f + 3 * 0x1.0p-8f) == 0x3f82);
  CHECK(float_to_bf16_bits(1.0f + 0x1.0p-8f + 0x1.0p-20f) == 0x3f81);  // above halfway: up
  CHECK(std::isinf(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::infinity()))));
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::max()))));
  CHECK(bf16_bits_to_float(float_to_bf16_bits(-2.5f)) == -2.5f);
}

TEST_CASE("fp16 conversion rounds to nearest even, with subnormals and overflow", "[common][numeric]") {
  CHECK(float_to_f16_bits(1.0f) == 0x3c00);
  CHECK(float_to_f16_bits(65504.0f) == 0x7bff);
  CHECK(float_to_f16_bits(65519.0f) == 0x7bff);      // below the rounding boundary
  CHECK(float_to_f16_bits(65520.0f) == 0x7c00);      // rounds to infinity
  CHECK(float_to_f16_bits(0x1.0p-24f) == 0x0001);    // smallest subnormal
  CHECK(float_to_f16_bits(0x1.0p-25f) == 0x0000);    // half of it: tie to even (zero)
  CHECK(float_to_f16_bits(0x1.8p-24f) == 0x0002);    // 1.5 ulp: tie to even (2)
  CHECK(float_to_f16_bits(1.0f + 0x1.0p-11f) == 0x3c00);  // halfway: even
  CHECK(float_to_f16_bits(-2.0f) == 0xc000);
  // Every fp16 value survives a round trip through fp32.
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    if ((bits & 0x7c00) == 0x7c00 && (bits & 0x3ff) != 0) continue;  // NaN payloads
    const auto h = static_cast<std::uint16_t>(bits);
    REQUIRE(float_to_f16_bits(f16_bits_to_float(h)) == h);
  }
}

TEST_CASE("compare: relative Frobenius error, exact infinities and NaN", "[common][numeric]") {
  const std::vector<float> ref{3.0f, 4.0f};
  const std::vector<float> off{3.0f, 4.5f};
  const ErrorStats e = compare(off, ref);
  CHECK(e.max_abs == Approx(0.5));
  CHECK(e.rel_frobenius == Approx(0.1));
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(compare(std::vector<float>{-inf, 1.0f}, std::vector<float>{-inf, 1.0f}).rel_frobenius == 0.0);
  CHECK(compare(std::vector<float>{-inf, 1.0f}, std::vector<float>{0.0f, 1.0f}).bad_values == 1);
  CHECK(std::isinf(compare(std::vector<float>{std::nanf(""), 1.0f}, std::vector<float>{0.0f, 1.0f}).rel_frobenius));
}

TEST_CASE("fill_normal is deterministic, seed-dependent and roughly standard normal", "[common][numeric]") {
  std::vector<float> a(100001), b(100001), c(100001);
  fill_normal(a, 5);
  fill_normal(b, 5);
  fill_normal(c, 6);
  CHECK(a == b);
  CHECK(a != c);
  double sum = 0, sum_sq = 0;
  for (float x : a) {
    sum += x;
    sum_sq += static_cast<double>(x) * x;
  }
  const double mean = sum / a.size();
  CHECK(std::fabs(mean) < 0.02);
  CHECK(std::fabs(sum_sq / a.size() - mean * mean - 1.0) < 0.02);
}

TEST_CASE("memory tracker: a peak scope sees scratch allocated and freed inside it", "[common][memory]") {
  memory::PeakScope scope(memory::Space::host);
  {
    HostBuffer<float> scratch(1000);
    HostBuffer<double> more(10);
  }
  HostBuffer<char> after(5);
  CHECK(scope.extra_bytes() == 1000 * sizeof(float) + 10 * sizeof(double));
}

TEST_CASE("causal masking is aligned to the bottom-right corner", "[common][problem]") {
  AttentionProblem p;
  p.seq_q = 3;
  p.seq_k = 5;
  p.causal = true;
  CHECK(p.visible_keys(0) == 3);
  CHECK(p.visible_keys(2) == 5);
  p.seq_q = 5;
  p.seq_k = 3;
  CHECK(p.visible_keys(1) == 0);
  CHECK(p.visible_keys(2) == 1);
  CHECK(p.visible_pairs() == 0 + 0 + 1 + 2 + 3);
}

TEST_CASE("every stage refuses an option name it does not read, naming it and the ones it reads",
          "[common][registry][validate]") {
  // A misspelled option (dq_accumulation for dq_atomic) used to be ignored: the run silently used the default.
  AttentionProblem p = small_problem();
  const ProblemData data = make_problem_data(p);
  RunSettings settings;
  settings.options.values["dq_accumulation"] = 1;
  const std::string message = testing::invalid_argument_message([&] { run_stage(find_stage("flash_v2"), Tier::cpu, data, settings); });
  CHECK(message == "option dq_accumulation: not an option of flash_v2/cpu (its options: block_rows, block_cols, split, dq_atomic)");
  // Each option a tier declares is accepted by name (values are the tier's business), and naive takes none.
  settings.options.values.clear();
  settings.options.values["sram_bytes"] = 1;
  CHECK(testing::invalid_argument_message([&] { run_stage(find_stage("naive"), Tier::cpu, data, settings); }) ==
        "option sram_bytes: not an option of naive/cpu (it takes none)");
  for (const Stage& stage : ladder())
    for (const TierEntry& entry : stage.tiers)
      for (const std::string& name : entry.option_names) {
        StageOptions one;
        one.values[name] = 1;
        CHECK_NOTHROW(check_option_names(entry, one, stage.name));
      }
}

TEST_CASE("check_can_run refuses a problem before any input exists, in the name of the stage asked for",
          "[common][harness][validate]") {
  AttentionProblem p = small_problem();
  p.seq_q = 1000003;  // paged decodes one query token per sequence
  CHECK(starts_with(testing::invalid_argument_message([&] { check_can_run(find_stage("paged"), Tier::cpu, p, DType::f32, false); }),
                    "seq_q: 1000003 exceeds the limit 1 of paged/cpu"));
  p = small_problem();
  p.head_dim = 257;
  CHECK(testing::invalid_argument_message([&] { check_can_run(find_stage("flash_v2"), Tier::cpu, p, DType::f32, false); })
            .find("of flash_v2/cpu") != std::string::npos);
  // A GPU tier on a machine (or a build) without a CUDA device says so, as a usage error.
  if (available_bytes(Tier::gpu) == 0)
    CHECK(testing::invalid_argument_message([&] { check_can_run(find_stage("naive"), Tier::gpu, small_problem(), DType::bf16, false); })
              .find("no CUDA device") != std::string::npos);
  // Too large: the bytes it would need, before anything is allocated.
  p = small_problem();
  p.q_heads = p.kv_heads = 64;
  p.seq_q = p.seq_k = 10000000;
  CHECK_THROWS_AS(check_can_run(find_stage("naive"), Tier::cpu, p, DType::f32, false), ProblemTooLarge);
}

TEST_CASE("paged refuses block sizes and contexts whose counts would wrap, naming the option or seq_k",
          "[common][paged][validate]") {
  // block_size = 2^55 wrapped the pool's element count and crashed; 2^40 ended in std::bad_alloc; a context
  // needing 2^31 blocks was refused as "num_blocks", a quantity the user never set.
  AttentionProblem p;
  p.seq_q = 1;
  p.seq_k = 256;
  StageOptions options;
  options.values["block_size"] = std::int64_t{1} << 55;
  CHECK(starts_with(testing::invalid_argument_message([&] { check_can_run(find_stage("paged"), Tier::cpu, p, DType::f32, false, options); }),
                    "block_size: 36028797018963968 must be in [1, 2^20]"));
  options.values["block_size"] = std::int64_t{1} << 20;  // accepted by name, refused by size with the bytes
  p.batch = 4096;
  p.q_heads = p.kv_heads = 64;
  CHECK_THROWS_AS(check_can_run(find_stage("paged"), Tier::cpu, p, DType::f32, false, options), ProblemTooLarge);
  p = AttentionProblem{};
  p.seq_q = 1;
  p.seq_k = std::int64_t{1} << 31;
  p.head_dim = 1;
  CHECK(starts_with(testing::invalid_argument_message([&] { check_can_run(find_stage("paged"), Tier::cpu, p, DType::f32, false); }),
                    "seq_k: 2147483648 exceeds 2^31 - 1"));
  p.seq_k = 2000000000;
  p.batch = 2;
  options.values["block_size"] = 1;
  CHECK(starts_with(testing::invalid_argument_message([&] { check_can_run(find_stage("paged"), Tier::cpu, p, DType::f32, false, options); }),
                    "seq_k: batch x ceil(seq_k / block_size)"));
}

TEST_CASE("StageRun counts NaN and infinite outputs, but not the -inf LSE of a row that sees no key", "[common][harness]") {
  StageRun run;
  run.o = HostBuffer<float>(4, 1.0f);
  run.lse = HostBuffer<float>(2, -std::numeric_limits<float>::infinity());
  CHECK(run.nonfinite_values() == 0);
  run.o[1] = std::nanf("");
  run.o[2] = std::numeric_limits<float>::infinity();
  run.lse[0] = std::nanf("");
  CHECK(run.nonfinite_values() == 3);
}

namespace {

// Inputs whose logits are all near `offset` (+- a few units): Q = c u for one direction u, K = u + sigma noise.
// The softmax stays spread over many keys (not one-hot), so fp32's rounding of S (an ulp of |S|) shows in P.
ProblemData logits_near(double offset, bool causal) {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = 37;
  p.seq_k = 53;
  p.head_dim = 64;
  p.causal = causal;
  ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 7);
  HostBuffer<float> u(static_cast<std::size_t>(p.head_dim));
  fill_normal(u.span(), 99);
  double uu = 0;
  for (float x : u) uu += static_cast<double>(x) * x;
  const double c = offset / (p.softmax_scale() * uu);
  const double sigma = 3.0 / (p.softmax_scale() * c * std::sqrt(uu) * 1.4);  // logits spread by ~3
  for (std::size_t i = 0; i < data.q.size(); ++i) data.q[i] = static_cast<float>(c * u[i % u.size()]);
  for (std::size_t i = 0; i < data.k.size(); ++i) data.k[i] = static_cast<float>(u[i % u.size()] + sigma * data.k[i]);
  return data;
}

}  // namespace

TEST_CASE("every CPU stage with a backward is accurate to 2e-3 at logits of 1e4, the edge of the supported range",
          "[common][logits]") {
  // fp32 rounds each logit S to about 2^-24 |S|, and P = exp(S - L) inherits that as a relative error: the
  // error in O and in the gradients grows as ~1e-7 |S| in every stage (naive included). Measured on this
  // problem: 1e-6 at |S| = 10, 8e-5 at 1e3, 9e-4 at 1e4, 1.4e-2 at 1e5 (O), a quarter of that in the gradients.
  // The supported range is |S| <= 1e4: errors below 2e-3. The gradients are measured against the size of the
  // terms they sum (oracle::gradient_error), which stays meaningful when the softmax saturates.
  for (bool causal : {false, true}) {
    const ProblemData data = logits_near(1e4, causal);
    const oracle::Result exact = oracle::attention(data, true);
    for (const Stage& stage : ladder()) {
      const TierEntry* entry = stage.find(Tier::cpu);
      if (entry == nullptr || !entry->backward) continue;
      INFO(stage.name << (causal ? " causal" : ""));
      RunSettings settings;
      settings.backward = true;
      const StageRun run = run_stage(stage, Tier::cpu, data, settings);
      CHECK(compare(run.o.span(), std::span<const double>(exact.o)).rel_frobenius < 2e-3);
      CHECK(oracle::worst_gradient_error(run, exact) < 2e-3);
      CHECK(run.nonfinite_values() == 0);
    }
  }
}

TEST_CASE("saturated softmax (logits near 1e30): the exact dQ and dK cancel to ~0 and the gradient error stays at rounding",
          "[common][logits]") {
  // --q-std 1e30 used to be reported as a backward error of 9.5e24 (the relative error of dK, whose exact value is
  // 0). The O(N) stages form dS = P (dP - delta) with delta = rowsum(dO * O), which matches P . dP only to fp32
  // rounding; times |q| = 1e30 that is 1e24 in dK, a rounding of 1e-7 against the terms' size (1e31).
  AttentionProblem p;
  p.q_heads = p.kv_heads = 2;
  p.seq_q = p.seq_k = 64;
  p.head_dim = 64;
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 1, 1e30f);
  const oracle::Result exact = oracle::attention(data, true);
  for (const Stage& stage : ladder()) {
    const TierEntry* entry = stage.find(Tier::cpu);
    if (entry == nullptr || !entry->backward) continue;
    INFO(stage.name);
    RunSettings settings;
    settings.backward = true;
    const StageRun run = run_stage(stage, Tier::cpu, data, settings);
    CHECK(run.nonfinite_values() == 0);
    CHECK(oracle::worst_gradient_error(run, exact) < 1e-6);
  }
}

TEST_CASE("run_stage reports each counter as its median over the timed runs, the backward's apart from the forward's",
          "[common][counters]") {
  // A stage that reports, from each pass, how many passes of its kind have run (1, 2, ... forward; 101, 102, ...
  // backward). One warmup and three timed runs: the forward's timed values are 2, 3, 4 and the backward's 102,
  // 103, 104, so the medians are 3 and 103; the warmup's and the other pass's values must not leak in.
  Stage stage = find_stage("naive");
  TierEntry& cpu = stage.tiers.front();
  REQUIRE(cpu.tier == Tier::cpu);
  int forwards = 0, backwards = 0;
  const PassFn forward = cpu.forward, backward = cpu.backward;
  cpu.forward = [&](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward(p, t, options);
    options.counters["passes"] = ++forwards;
  };
  cpu.backward = [&](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    backward(p, t, options);
    options.counters["passes"] = 100 + ++backwards;
  };
  AttentionProblem p;
  p.seq_q = p.seq_k = 16;
  p.head_dim = 16;
  RunSettings settings;
  settings.backward = true;
  settings.warmup = 1;
  settings.repeats = 3;
  const StageRun run = run_stage(stage, Tier::cpu, make_problem_data(p, DType::f32, Layout::bhnd, 1), settings);
  CHECK(forwards == 4);
  CHECK(run.counters.at("passes") == 3.0);
  CHECK(run.counters.at("backward_passes") == 103.0);
}

TEST_CASE("progress lines name the phase, the fraction done and the time left", "[common][progress]") {
  CHECK(progress::format_line("flash_v2/cpu forward", 25, 100, 10) ==
        "attn: flash_v2/cpu forward: 25% after 10 s, about 30 s left");
  CHECK(progress::format_line("generating inputs", 0, 0, 4) == "attn: generating inputs: running for 4 s");
}

TEST_CASE("the ladder lists stages once each, naive first, with a CPU tier each", "[common][registry]") {
  REQUIRE(!ladder().empty());
  CHECK(ladder().front().name == "naive");
  for (const Stage& stage : ladder()) {
    CHECK(stage.find(Tier::cpu) != nullptr);
    CHECK(&find_stage(stage.name) == &stage);
  }
  CHECK_THROWS_AS(find_stage("no_such_stage"), std::invalid_argument);
}

TEST_CASE("the softmax's exp: within 3e-7 + 8e-8 |x| relative of exp where the passes use it, exactly 0 far below",
          "[common][numeric]") {
  // simd::exp_shifted_sum computes x[i] = e^(x[i] - shift) with simd::exp_of_nonpositive, the exp of every CPU
  // softmax pass. Its arguments are <= 0 (a score minus a maximum), a little above 0 after rounding, or -inf
  // (masked). A fine grid of [-87, 0.5] (e^x is normal down to -87.3), then the edges. The bound: 2^f and 2^n
  // are good to about 2 ulp; rounding t = x log2(e) to fp32 moves t by up to |t| 2^-24, which scales e^x by
  // up to a relative |t| ln(2) 2^-24 = |x| 6e-8, and log2(e) in fp32 is itself off by 1.7e-8 relative: |x| 8e-8
  // in all. (Where that is large, e^x is tiny: the softmax's sums barely feel it.)
  std::vector<float> x;
  for (double t = -87.0; t <= 0.5; t += 1.0 / 4096.0 + 1e-7) x.push_back(static_cast<float>(t));
  std::vector<float> e = x;
  const float sum = simd::exp_shifted_sum(e.data(), 0.0f, static_cast<std::int64_t>(e.size()));
  double worst = 0.0, exact_sum = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double exact = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(e[i] - exact) / exact / (3e-7 + 8e-8 * std::abs(x[i])));
    exact_sum += exact;
  }
  CHECK(worst < 1.0);
  CHECK(std::abs(sum - exact_sum) < 1e-5 * exact_sum);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> edges{0.0f, -1.0f, -inf, -88.5f, -100.0f, -1e30f};
  edges.resize(2 * simd::lanes, -inf);  // whole vectors, so that the SIMD path (not the scalar tail) runs
  simd::exp_shifted_sum(edges.data(), 0.0f, static_cast<std::int64_t>(edges.size()));
  CHECK(edges[0] == 1.0f);
  CHECK(std::abs(edges[1] - std::exp(-1.0)) < 3e-7 * std::exp(-1.0));
  for (std::size_t i = 2; i < edges.size(); ++i) CHECK(edges[i] == 0.0f);
}

namespace {

/// Whether the 8 rows row0..row0+7 of a tile, read at column col (a multiple of 8) as one ldmatrix phase reads
/// them, start in 8 different groups of 4 banks (16 bytes of the 128 that the 32 banks cover): no bank conflict.
template <class Layout>
bool eight_rows_in_eight_bank_groups(int stride, int row0, int col) {
  bool seen[8] = {};
  for (int r = row0; r < row0 + 8; ++r) {
    const int group = Layout::offset(stride, r, col) * 2 % 128 / 16;  // 2 bytes per element
    if (seen[group]) return false;
    seen[group] = true;
  }
  return true;
}

}  // namespace

TEST_CASE("tile layouts: Swizzled permutes each row's chunks, and ldmatrix's 8 rows fall in 8 bank groups",
          "[common][layout]") {
  using attn::mma::RowMajor;
  using attn::mma::Swizzled;
  for (const int columns : {64, 128, 256}) {
    CAPTURE(columns);
    const int rows = 32;
    // Swizzled: unpadded rows; every element of the tile has its own place, in its own row.
    std::vector<int> hits(static_cast<size_t>(rows) * columns, 0);
    bool in_row = true;
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < columns; ++c) {
        const int at = Swizzled::offset(columns, r, c);
        in_row = in_row && at / columns == r;
        if (at >= 0 && at < rows * columns) ++hits[static_cast<size_t>(at)];
      }
    CHECK(in_row);
    CHECK(std::count(hits.begin(), hits.end(), 1) == rows * columns);
    // Both layouts in use are conflict-free for ldmatrix: padded rows in order, unpadded rows swizzled.
    bool swizzled_free = true, padded_free = true, unpadded_free = true;
    for (int row0 = 0; row0 < rows; row0 += 8)
      for (int c = 0; c < columns; c += 8) {
        swizzled_free = swizzled_free && eight_rows_in_eight_bank_groups<Swizzled>(columns, row0, c);
        padded_free = padded_free && eight_rows_in_eight_bank_groups<RowMajor>(columns + 8, row0, c);
        unpadded_free = unpadded_free && eight_rows_in_eight_bank_groups<RowMajor>(columns, row0, c);
      }
    CHECK(swizzled_free);
    CHECK(padded_free);
    CHECK_FALSE(unpadded_free);  // the bad fixture: rows in order without padding, 8 rows in one bank group
    // The ldmatrix form (a lane's row and 8-column step apart) addresses the same element as offset().
    bool same = true;
    for (int row0 = 0; row0 < rows; row0 += 8)
      for (int lane_row = 0; lane_row < 16 && row0 + lane_row < rows; ++lane_row)
        for (int col0 = 0; col0 < columns; col0 += 16)
          for (int lane_chunk = 0; lane_chunk < 2; ++lane_chunk) {
            same = same && Swizzled::fragment_offset(columns, row0, lane_row, col0, lane_chunk) ==
                               Swizzled::offset(columns, row0 + lane_row, col0 + 8 * lane_chunk);
            same = same && RowMajor::fragment_offset(columns + 8, row0, lane_row, col0, lane_chunk) ==
                               RowMajor::offset(columns + 8, row0 + lane_row, col0 + 8 * lane_chunk);
          }
    CHECK(same);
  }
}

TEST_CASE("dQ's accumulator rows: a permutation inside each 16-column group, a lane's four values adjacent",
          "[common][layout]") {
  using attn::mma::DqAccumulatorRow;
  for (const int columns : {32, 64, 96, 128, 256}) {
    CAPTURE(columns);
    std::vector<int> hits(static_cast<size_t>(columns), 0);
    bool in_group = true;
    for (int c = 0; c < columns; ++c) {
      const int at = DqAccumulatorRow::position(c);
      in_group = in_group && at / 16 == c / 16;
      if (at >= 0 && at < columns) ++hits[static_cast<size_t>(at)];
    }
    CHECK(in_group);
    CHECK(std::count(hits.begin(), hits.end(), 1) == columns);
    // Lane t of a quad holds columns 16 g + 2 t + {0, 1} and 16 g + 8 + 2 t + {0, 1} (two 8-column mma tiles):
    // one 16-byte-aligned run of four, in that order, for one 16-byte atomic.
    bool adjacent = true, plain_adjacent = true;
    for (int g = 0; g < columns / 16; ++g)
      for (int t = 0; t < 4; ++t) {
        const int first = 16 * g + 2 * t, lane_columns[4] = {first, first + 1, first + 8, first + 9};
        const int start = DqAccumulatorRow::position(first);
        adjacent = adjacent && start % 4 == 0;
        plain_adjacent = plain_adjacent && first % 4 == 0;
        for (int e = 0; e < 4; ++e) {
          adjacent = adjacent && DqAccumulatorRow::position(lane_columns[e]) == start + e;
          plain_adjacent = plain_adjacent && lane_columns[e] == first + e;
        }
      }
    CHECK(adjacent);
    CHECK_FALSE(plain_adjacent);  // the bad fixture: columns in order, where a lane's four are not adjacent
  }
}

