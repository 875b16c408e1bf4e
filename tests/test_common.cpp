// common/: the validator's rules, fp16/bf16 rounding, the error metric, the random fill and the memory tracker.
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/memory.hpp"
#include "common/numeric.hpp"
#include "common/registry.hpp"
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

TEST_CASE("the ladder lists stages once each, naive first, with a CPU tier each", "[common][registry]") {
  REQUIRE(!ladder().empty());
  CHECK(ladder().front().name == "naive");
  for (const Stage& stage : ladder()) {
    CHECK(stage.find(Tier::cpu) != nullptr);
    CHECK(&find_stage(stage.name) == &stage);
  }
  CHECK_THROWS_AS(find_stage("no_such_stage"), std::invalid_argument);
}
