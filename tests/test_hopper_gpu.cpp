// common/hopper.cuh on one tile (tests/hopper_gemm_check.cu): TMA loads, wgmma SS and RS, the accumulator as an
// A operand, the swizzled staging and the TMA store, each against a CPU GEMM, for the shapes of flash_v3's head
// dims 64, 128 and 256. These run before the attention tests so that a wrong descriptor is reported as such.
#include <cstdint>
#include <vector>

#include "common/numeric.hpp"
#include "hopper_gemm_check.cuh"
#include "test_support.hpp"

using namespace attn;

namespace {

std::vector<unsigned short> random_bf16(std::size_t count, std::uint64_t seed) {
  std::vector<float> values(count);
  fill_normal(values, seed);
  std::vector<unsigned short> bits(count);
  for (std::size_t i = 0; i < count; ++i) bits[i] = float_to_bf16_bits(values[i]);
  return bits;
}

// out (rows x columns) = x (rows x inner) * y, with y indexed y(inner, column) by `y_at`.
template <class YAt>
std::vector<double> cpu_gemm(int rows, int columns, int inner, const std::vector<float>& x, YAt y_at) {
  std::vector<double> out(static_cast<std::size_t>(rows) * columns, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < columns; ++c) {
      double sum = 0.0;
      for (int k = 0; k < inner; ++k) sum += static_cast<double>(x[r * inner + k]) * y_at(k, c);
      out[r * columns + c] = sum;
    }
  return out;
}

std::vector<float> to_float(const std::vector<unsigned short>& bits) {
  std::vector<float> values(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) values[i] = bf16_bits_to_float(bits[i]);
  return values;
}

}  // namespace

TEST_CASE("hopper wrappers: TMA + wgmma SS/RS + TMA store reproduce a CPU GEMM on one tile", "[hopper][gpu][small]") {
  struct Dims {
    int k, n1, n2;
  };
  const Dims shapes[] = {{64, 128, 64}, {128, 128, 128}, {256, 64, 256}};
  std::uint64_t seed = 77;
  for (const Dims& d : shapes) {
    INFO("K = " << d.k << ", N1 = " << d.n1 << ", N2 = " << d.n2);
    const auto a = random_bf16(64 * d.k, ++seed), b = random_bf16(d.n1 * d.k, ++seed), v = random_bf16(d.n1 * d.n2, ++seed);
    const testing::HopperGemmResult gpu = testing::run_hopper_gemm_tile(d.k, d.n1, d.n2, a, b, v);

    // S = A B^T: products of bf16 values are exact in fp32; only the fp32 sums round (K <= 256 terms): 1e-5.
    const std::vector<float> a_f = to_float(a), b_f = to_float(b), v_f = to_float(v);
    const std::vector<double> s_ref = cpu_gemm(64, d.n1, d.k, a_f, [&](int k, int c) { return b_f[c * d.k + k]; });
    const ErrorStats s_error = compare(gpu.s, s_ref);
    INFO("S error " << s_error.rel_frobenius);
    CHECK(s_error.rel_frobenius < 1e-5);

    // C = bf16(S) V, with bf16(S) taken from the GPU's own S so that both sides round the same values: 1e-5.
    std::vector<float> s_rounded(gpu.s);
    round_to_dtype(s_rounded, DType::bf16);
    const std::vector<double> c_ref = cpu_gemm(64, d.n2, d.n1, s_rounded, [&](int k, int c) { return v_f[k * d.n2 + c]; });
    const ErrorStats c_error = compare(gpu.c, c_ref);
    INFO("C error " << c_error.rel_frobenius);
    CHECK(c_error.rel_frobenius < 1e-5);

    // The TMA store wrote bf16(C) through the swizzled staging: equal to rounding C (one bf16 ulp at most where the
    // fp32 sums differ in the last bit): 4e-3 relative.
    const ErrorStats store_error = compare(to_float(gpu.c_tma), c_ref);
    INFO("stored C error " << store_error.rel_frobenius);
    CHECK(store_error.bad_values == 0);
    CHECK(store_error.rel_frobenius < 4e-3);
  }
}
