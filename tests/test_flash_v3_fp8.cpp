// flash_v3 FP8, CPU side: the e4m3 conversion (every code, and against CUDA's own conversion where the CUDA
// headers are there), the Walsh-Hadamard rotation of incoherent processing, block quantization, and the FP8
// forward against the fp64 oracle within a bound derived from e4m3's precision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "catch.hpp"
#include "common/e4m3.hpp"
#include "common/numeric.hpp"
#include "flash_v3/fp8.hpp"
#include "test_support.hpp"
#ifdef ATTN_HAVE_CUDA
#include <cuda_fp8.h>  // the conversions in cuda_fp8.h are host-callable
#endif

using namespace attn;
namespace fp8 = attn::flash_v3::fp8;

namespace {

/// The value of an e4m3 code from the format's definition, written independently of e4m3::to_float.
double value_by_definition(int code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  const double magnitude = exponent == 0 ? mantissa / 8.0 * std::ldexp(1.0, -6) : (1.0 + mantissa / 8.0) * std::ldexp(1.0, exponent - 7);
  return sign ? -magnitude : magnitude;
}

std::vector<float> normal_values(std::size_t count, std::uint64_t seed) {
  std::vector<float> values(count);
  fill_normal(values, seed);
  return values;
}

}  // namespace

TEST_CASE("every e4m3 code decodes to its value, and every finite value encodes back to its code", "[fp8]") {
  for (int code = 0; code < 256; ++code) {
    INFO("code " << code);
    const float value = e4m3::to_float(static_cast<std::uint8_t>(code));
    if ((code & 0x7F) == 0x7F) {  // the only NaN pattern (no infinities in e4m3)
      CHECK(std::isnan(value));
      continue;
    }
    CHECK(static_cast<double>(value) == value_by_definition(code));
    CHECK(e4m3::from_float(value) == code);
  }
  CHECK(e4m3::to_float(0x7E) == 448.0f);
  CHECK(e4m3::to_float(0x01) == std::ldexp(1.0f, -9));
}

TEST_CASE("e4m3 rounds to nearest with ties to even, saturates to 448 and maps NaN to 0x7F", "[fp8]") {
  // Midpoints between consecutive positive codes go to the even code; a hair either side goes to the nearer one.
  for (int code = 0; code < 0x7E; ++code) {
    INFO("between codes " << code << " and " << code + 1);
    const float low = e4m3::to_float(static_cast<std::uint8_t>(code));
    const float high = e4m3::to_float(static_cast<std::uint8_t>(code + 1));
    const float middle = (low + high) / 2;  // exact in fp32
    CHECK(e4m3::from_float(middle) == (code % 2 == 0 ? code : code + 1));
    CHECK(e4m3::from_float(std::nextafter(middle, 0.0f)) == code);
    CHECK(e4m3::from_float(std::nextafter(middle, 1e9f)) == code + 1);
    CHECK(e4m3::from_float(-middle) == (0x80 | (code % 2 == 0 ? code : code + 1)));
  }
  CHECK(e4m3::from_float(460.0f) == 0x7E);
  CHECK(e4m3::from_float(1e30f) == 0x7E);
  CHECK(e4m3::from_float(std::numeric_limits<float>::infinity()) == 0x7E);
  CHECK(e4m3::from_float(-std::numeric_limits<float>::infinity()) == 0xFE);
  CHECK(e4m3::from_float(std::numeric_limits<float>::quiet_NaN()) == 0x7F);
  CHECK(e4m3::from_float(-0.0f) == 0x80);
  CHECK(e4m3::from_float(std::ldexp(1.0f, -11)) == 0x00);  // a quarter of the smallest subnormal
}

#ifdef ATTN_HAVE_CUDA
TEST_CASE("e4m3 conversion equals CUDA's __nv_cvt_float_to_fp8 (SATFINITE) and its decoding", "[fp8]") {
  for (int code = 0; code < 256; ++code) {
    const __half_raw raw = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
    const float cuda_value = __half2float(__half(raw));
    const float ours = e4m3::to_float(static_cast<std::uint8_t>(code));
    INFO("code " << code);
    CHECK((cuda_value == ours || (std::isnan(cuda_value) && std::isnan(ours))));
  }
  // A sweep: random bit patterns (every exponent, NaN and infinity included) and random values around e4m3's
  // range, where all the rounding and saturation happens.
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
  };
  int mismatches = 0;
  for (int i = 0; i < 4'000'000; ++i) {
    float x;
    if (i % 2 == 0) {
      const std::uint32_t bits = static_cast<std::uint32_t>(next());
      std::memcpy(&x, &bits, sizeof x);
    } else {
      const std::uint64_t r = next();
      x = std::ldexp(static_cast<float>(r % 1'000'000) / 1e6f, static_cast<int>((r >> 20) % 26) - 16) * ((r >> 40) & 1 ? -1.0f : 1.0f);
    }
    const int cuda_code = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    if (cuda_code != e4m3::from_float(x) && ++mismatches <= 5) FAIL_CHECK("x = " << x << ": CUDA " << cuda_code << ", ours " << int(e4m3::from_float(x)));
  }
  CHECK(mismatches == 0);
}
#endif

TEST_CASE("M = diag(signs) H / sqrt(d) is orthogonal: M M^T = I to fp32 rounding", "[fp8]") {
  for (int d : {16, 32, 64, 128, 256}) {
    INFO("d = " << d);
    const std::vector<float> signs = fp8::random_signs(d, 7);
    std::vector<float> m(static_cast<std::size_t>(d * d), 0.0f);  // row i = e_i M
    for (int i = 0; i < d; ++i) m[static_cast<std::size_t>(i * d + i)] = 1.0f;
    fp8::rotate_rows(m, d, signs);
    double worst = 0.0;
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c) dot += double(m[i * d + c]) * m[j * d + c];
        worst = std::max(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
      }
    CHECK(worst < 1e-6);  // the entries are +-1/sqrt(d) up to one fp32 rounding
  }
}

TEST_CASE("incoherent processing leaves Q K^T unchanged and spreads an outlier", "[fp8]") {
  const int d = 128, rows = 33;
  std::vector<float> q = normal_values(rows * d, 1), k = normal_values(rows * d, 2);
  q[5 * d + 17] = 300.0f;  // an outlier channel entry
  const std::vector<float> signs = fp8::random_signs(d, 3);
  std::vector<float> q_rot = q, k_rot = k;
  fp8::rotate_rows(q_rot, d, signs);
  fp8::rotate_rows(k_rot, d, signs);
  double worst = 0.0;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < rows; ++j) {
      double exact = 0.0, rotated = 0.0, magnitude = 0.0;
      for (int c = 0; c < d; ++c) {
        exact += double(q[i * d + c]) * k[j * d + c];
        rotated += double(q_rot[i * d + c]) * k_rot[j * d + c];
        magnitude += std::fabs(double(q[i * d + c]) * k[j * d + c]);
      }
      worst = std::max(worst, std::fabs(rotated - exact) / magnitude);
    }
  CHECK(worst < 1e-5);  // log2(d) = 7 rounded additions per entry, then the dot product
  float largest = 0.0f;
  for (int c = 0; c < d; ++c) largest = std::max(largest, std::fabs(q_rot[5 * d + c]));
  CHECK(largest < 300.0f / std::sqrt(float(d)) + 5.0f);  // the outlier is spread over all d entries
}

TEST_CASE("block quantization: one scale amax / 448 per block, each element within half an e4m3 step", "[fp8]") {
  const std::int64_t batch_heads = 3, seq = 300, d = 64, block = 128;
  std::vector<float> x = normal_values(static_cast<std::size_t>(batch_heads * seq * d), 4);
  x[(1 * seq + 200) * d + 3] = -90.0f;  // an outlier in block 1 of head 1
  const fp8::Quantized q = fp8::quantize(x, batch_heads, seq, static_cast<int>(d), block);
  REQUIRE(q.scales.size() == static_cast<std::size_t>(batch_heads * 3));
  CHECK(q.scale_of(1, 200) == 90.0f / 448.0f);
  CHECK(q.codes[static_cast<std::size_t>((1 * seq + 200) * d + 3)] == 0xFE);  // -448: the block's amax
  for (std::int64_t bh = 0; bh < batch_heads; ++bh)
    for (std::int64_t row = 0; row < seq; ++row)
      for (std::int64_t c = 0; c < d; ++c) {
        const std::size_t i = static_cast<std::size_t>((bh * seq + row) * d + c);
        const float scale = q.scale_of(bh, row);
        const float back = e4m3::to_float(q.codes[i]) * scale;
        // Half a step: 2^-4 relative in the normal range, half of 2^-9 (times the scale) among the subnormals.
        const float allowed = std::max(std::fabs(x[i]) / 16.0f, scale * std::ldexp(1.0f, -10)) * 1.0001f;
        if (std::fabs(back - x[i]) > allowed) FAIL("element " << i << ": " << x[i] << " came back as " << back);
      }
  const fp8::Quantized whole = fp8::quantize(x, batch_heads, seq, static_cast<int>(d), block, true);
  CHECK(whole.scales.size() == 1);
  CHECK(whole.scale_of(2, 299) == 90.0f / 448.0f);
}

TEST_CASE("power-of-two block scales: the smallest power of two >= amax / 448, elements within half an e4m3 step",
          "[fp8]") {
  CHECK(fp8::block_scale(90.0f, fp8::ScaleRule::power_of_two).scale == 0.25f);   // 90 / 448 = 0.2009
  CHECK(fp8::block_scale(112.0f, fp8::ScaleRule::power_of_two).scale == 0.25f);  // exactly 0.25 stays
  CHECK(fp8::block_scale(112.5f, fp8::ScaleRule::power_of_two).scale == 0.5f);
  CHECK(fp8::block_scale(0.0f, fp8::ScaleRule::power_of_two).scale == 1.0f);
  const std::int64_t batch_heads = 2, seq = 300, d = 64, block = 128;
  std::vector<float> x = normal_values(static_cast<std::size_t>(batch_heads * seq * d), 6);
  x[(1 * seq + 10) * d + 7] = 70.0f;
  const fp8::Quantized q = fp8::quantize(x, batch_heads, seq, static_cast<int>(d), block, false, fp8::ScaleRule::power_of_two);
  CHECK(q.scale_of(1, 10) == 0.25f);  // 70 / 448 = 0.156 -> 0.25: the outlier is 280 in codes, which rounds to 288
  CHECK(e4m3::to_float(q.codes[static_cast<std::size_t>((1 * seq + 10) * d + 7)]) == 288.0f);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float scale = q.scale_of(static_cast<std::int64_t>(i) / (seq * d), static_cast<std::int64_t>(i) / d % seq);
    CHECK(std::exp2(std::round(std::log2(scale))) == scale);
    const float back = e4m3::to_float(q.codes[i]) * scale;
    const float allowed = std::max(std::fabs(x[i]) / 16.0f, scale * std::ldexp(1.0f, -10)) * 1.0001f;
    if (std::fabs(back - x[i]) > allowed) FAIL("element " << i << ": " << x[i] << " came back as " << back);
  }
}

// The bound for the FP8 forward. e4m3 keeps 3 mantissa bits: rounding to nearest errs by at most u = 2^-4
// relative, and on values spread over a binade by about 2^-3 / sqrt(12) ~ 0.036 rms. Q, K, V and P are rounded
// once each. The logit error is the sum of D products each off by ~sqrt(2) x 0.036 relative: with N(0,1) inputs
// and scale 1/sqrt(D) it is ~0.05 (in the logits' units, and exp turns it into ~0.05 relative in P); P's own
// rounding and V's add 0.036 each. Independent, they give ~sqrt(0.05^2 + 2 x 0.036^2) ~ 0.07 relative per term of
// O, and O's relative Frobenius error is about that. The test allows 0.1; measured: 0.025-0.052 on the shapes below
// (O averages many terms whose errors partly cancel).
TEST_CASE("FP8 forward (CPU emulation) matches the fp64 oracle within e4m3's precision on awkward shapes", "[fp8]") {
  for (const testing::Shape& shape : testing::awkward_shapes()) {
    const AttentionProblem& p = shape.problem;
    if (p.head_dim < 16) continue;
    INFO(testing::label(shape));
    const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 11);
    const oracle::Result exact = oracle::attention(data, false);
    const auto q = fp8::quantize(data.q.span(), p.batch * p.q_heads, p.seq_q, int(p.head_dim), fp8::kBlockRows);
    const auto k = fp8::quantize(data.k.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols);
    // V's scales by either rule: amax / 448 (the ratios v_j / v_ref that go into P are then not powers of two)
    // and powers of two (the GPU's).
    for (const fp8::ScaleRule rule : {fp8::ScaleRule::amax, fp8::ScaleRule::power_of_two}) {
      const auto v = fp8::quantize(data.v.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols, false, rule);
      std::vector<float> o(static_cast<std::size_t>(p.q_elements())), lse(static_cast<std::size_t>(p.lse_elements()));
      fp8::forward_cpu(p, q, k, v, o, lse);
      const ErrorStats o_error = compare(o, exact.o), lse_error = compare(lse, exact.lse);
      CHECK(o_error.bad_values == 0);
      CHECK(lse_error.bad_values == 0);
      CHECK(o_error.rel_frobenius < 0.1);
      CHECK(lse_error.rel_frobenius < 0.02);  // LSE is dominated by the row max, off by the logit error ~0.05
    }
  }
}

TEST_CASE("FP8 forward keeps O right when V's block scales differ widely (an outlier in one K/V block)", "[fp8]") {
  // 4 K/V blocks; V's block 1 holds a 60, so its scale is ~15x the others': P~ of blocks 0, 2, 3 carry
  // v_j / v_ref ~ 1/16 (forward_cpu). Getting that factor wrong, or its inverse in l, is off by up to 16x.
  const AttentionProblem p = testing::problem_of(1, 2, 2, 130, 400, 64, false);
  ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 13);
  data.v[(0 * p.seq_k + 150) * p.head_dim + 5] = 60.0f;
  data.v[(1 * p.seq_k + 140) * p.head_dim + 9] = -60.0f;
  const oracle::Result exact = oracle::attention(data, false);
  const auto q = fp8::quantize(data.q.span(), p.batch * p.q_heads, p.seq_q, int(p.head_dim), fp8::kBlockRows);
  const auto k = fp8::quantize(data.k.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols);
  for (const fp8::ScaleRule rule : {fp8::ScaleRule::amax, fp8::ScaleRule::power_of_two}) {
    const auto v = fp8::quantize(data.v.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols, false, rule);
    REQUIRE(v.scale_of(0, 128) > 10.0f * v.scale_of(0, 0));
    std::vector<float> o(static_cast<std::size_t>(p.q_elements())), lse(static_cast<std::size_t>(p.lse_elements()));
    fp8::forward_cpu(p, q, k, v, o, lse);
    const ErrorStats o_error = compare(o, exact.o), lse_error = compare(lse, exact.lse);
    INFO("O vs oracle " << o_error.rel_frobenius << ", LSE " << lse_error.rel_frobenius);
    CHECK(o_error.rel_frobenius < 0.1);  // the bound of the test above
    CHECK(lse_error.rel_frobenius < 0.02);
  }
}

TEST_CASE("FP8 forward over 71 K/V blocks whose K and V scales differ block to block, and a stale window of them fails",
          "[fp8]") {
  // The fixture of the GPU test that checks the consumers' per-block factors past 32 blocks (they hold them 32
  // blocks at a time, one block per lane, fp8_cuda.cu: factors_at): every block's keys and values times its own
  // power of two (V: 1/4 .. 4, K: 1/4 .. 1). Here: the emulation passes the bounds on it, and fails them when the
  // second window's blocks take the first window's scales (the kernel visits blocks last to first: visit order
  // it = 32 .. 63 is block 38 .. 7, which would then get the scales of blocks 70 .. 39), the mistake of a window
  // not reloaded.
  for (int d : {128, 256}) {
    INFO("d = " << d);
    const std::int64_t nk = 70 * 128 + 33;
    const AttentionProblem p = testing::problem_of(1, 1, 1, 130, nk, d, false);
    ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 29);
    for (std::int64_t key = 0; key < nk; ++key) {
      const int block = static_cast<int>(key / 128);
      const float v_factor = std::ldexp(1.0f, block * 7 % 5 - 2), k_factor = std::ldexp(1.0f, -(block % 3));
      for (int c = 0; c < d; ++c) {
        data.v[key * d + c] *= v_factor;
        data.k[key * d + c] *= k_factor;
      }
    }
    const oracle::Result exact = oracle::attention(data, false);
    const auto q = fp8::quantize(data.q.span(), 1, p.seq_q, d, fp8::kBlockRows);
    auto k = fp8::quantize(data.k.span(), 1, nk, d, fp8::kBlockCols);
    auto v = fp8::quantize(data.v.span(), 1, nk, d, fp8::kBlockCols, false, fp8::ScaleRule::power_of_two);
    std::vector<float> o(static_cast<std::size_t>(p.q_elements())), lse(static_cast<std::size_t>(p.lse_elements()));
    fp8::forward_cpu(p, q, k, v, o, lse);
    const ErrorStats o_error = compare(o, exact.o), lse_error = compare(lse, exact.lse);
    REQUIRE(k.scales.size() == 71);
    REQUIRE(v.scales.size() == 71);
    for (int block = 7; block <= 38; ++block) {
      k.scales[static_cast<std::size_t>(block)] = k.scales[static_cast<std::size_t>(block + 32)];
      v.scales[static_cast<std::size_t>(block)] = v.scales[static_cast<std::size_t>(block + 32)];
    }
    fp8::forward_cpu(p, q, k, v, o, lse);
    const ErrorStats stale = compare(o, exact.o);
    INFO("O vs oracle " << o_error.rel_frobenius << ", LSE " << lse_error.rel_frobenius << "; with a stale window: O "
                        << stale.rel_frobenius);
    CHECK(o_error.rel_frobenius < 0.1);  // the bounds of the tests above
    CHECK(lse_error.rel_frobenius < 0.02);
    CHECK(stale.rel_frobenius > 0.1);  // measured 0.81 at d = 128 (LSE, set by the row maxima, moves little: 0.001)
  }
}

TEST_CASE("FP8 forward per 64-row group with Q blocks' scales 2x apart, and a group given its neighbour block's scale fails",
          "[fp8]") {
  // The fixture of the GPU test of the d = 128 kernel's three consumer warpgroups per tile (each with its own Q
  // block's scale): Q's rows times 1/2 in the odd 128-row blocks. Here: every 64-row group passes the bounds, and
  // every group of an odd block fails them when that block takes the even block's scale before it (what a
  // consumer given the wrong block's scale computes).
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    const AttentionProblem p = testing::problem_of(1, 4, 2, 450, 450, 128, causal);
    ProblemData data = make_problem_data(p, DType::bf16, Layout::bhnd, 31);
    testing::scale_odd_q_blocks(data, fp8::kBlockRows, 0.5f);
    const oracle::Result exact = oracle::attention(data, false);
    auto q = fp8::quantize(data.q.span(), p.batch * p.q_heads, p.seq_q, int(p.head_dim), fp8::kBlockRows);
    const auto k = fp8::quantize(data.k.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols);
    const auto v = fp8::quantize(data.v.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols, false,
                                 fp8::ScaleRule::power_of_two);
    std::vector<float> o(static_cast<std::size_t>(p.q_elements())), wrong(o.size()), lse(static_cast<std::size_t>(p.lse_elements()));
    fp8::forward_cpu(p, q, k, v, o, lse);
    const std::int64_t q_blocks = (p.seq_q + fp8::kBlockRows - 1) / fp8::kBlockRows;
    for (std::int64_t b = 0; b < static_cast<std::int64_t>(q.scales.size()); ++b)
      if (b % q_blocks % 2 == 1) q.scales[static_cast<std::size_t>(b)] = q.scales[static_cast<std::size_t>(b - 1)];
    fp8::forward_cpu(p, q, k, v, wrong, lse);
    double worst = 0.0, wrong_best = 1e9;
    for (std::int64_t bh = 0; bh < p.batch * p.q_heads; ++bh)
      for (std::int64_t row0 = 0; row0 < p.seq_q; row0 += 64) {
        const std::size_t first = static_cast<std::size_t>((bh * p.seq_q + row0) * p.head_dim);
        const std::size_t count = static_cast<std::size_t>(std::min<std::int64_t>(64, p.seq_q - row0) * p.head_dim);
        const std::span<const double> reference = std::span<const double>(exact.o).subspan(first, count);
        worst = std::max(worst, compare(std::span<const float>(o).subspan(first, count), reference).rel_frobenius);
        if (row0 / fp8::kBlockRows % 2 == 1)
          wrong_best = std::min(wrong_best, compare(std::span<const float>(wrong).subspan(first, count), reference).rel_frobenius);
      }
    INFO("worst group vs oracle " << worst << "; with the neighbour's scale, the best group " << wrong_best);
    CHECK(worst < 0.1);  // the bound of the tests above
    CHECK(wrong_best > 0.1);
  }
}

TEST_CASE("FP8 forward with per-tensor scales and incoherent processing also matches the oracle", "[fp8]") {
  const AttentionProblem p = testing::problem_of(1, 4, 2, 200, 333, 128, true);
  ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 12);
  const oracle::Result exact = oracle::attention(data, false);
  const std::vector<float> signs = fp8::random_signs(int(p.head_dim), 5);
  fp8::rotate_rows(data.q.span(), int(p.head_dim), signs);
  fp8::rotate_rows(data.k.span(), int(p.head_dim), signs);
  const auto q = fp8::quantize(data.q.span(), p.batch * p.q_heads, p.seq_q, int(p.head_dim), fp8::kBlockRows, true);
  const auto k = fp8::quantize(data.k.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols, true);
  const auto v = fp8::quantize(data.v.span(), p.batch * p.kv_heads, p.seq_k, int(p.head_dim), fp8::kBlockCols, true);
  std::vector<float> o(static_cast<std::size_t>(p.q_elements())), lse(static_cast<std::size_t>(p.lse_elements()));
  fp8::forward_cpu(p, q, k, v, o, lse);
  CHECK(compare(o, exact.o).rel_frobenius < 0.1);  // the bound of the test above
}

TEST_CASE("FP8 forward refuses K and V quantized with different blocks", "[fp8]") {
  const AttentionProblem p = testing::problem_of(1, 1, 1, 10, 10, 16, false);
  const std::vector<float> x = normal_values(160, 1);
  const auto a = fp8::quantize(x, 1, 10, 16, 128), b = fp8::quantize(x, 1, 10, 16, 64);
  std::vector<float> o(160), lse(10);
  CHECK(testing::invalid_argument_message([&] { fp8::forward_cpu(p, a, a, b, o, lse); }).find("k, v") == 0);
}
