// The check that proves common/hopper.cuh before attention uses it: one warpgroup runs attention's two GEMMs on
// a single tile with TMA loads, wgmma and a TMA store, and hands the results back for comparison on the CPU.
#pragma once

#include <vector>

namespace attn::testing {

/// Results of one tile: S = A B^T (fp32, M x N1, wgmma SS with A and B K-major, loaded by TMA), then
/// C = bf16(S) V (fp32, M x N2, wgmma RS: S's accumulator turned into the A operand in registers, V MN-major),
/// and C rounded to bf16 written back by a TMA store (as bf16 bits).
struct HopperGemmResult {
  std::vector<float> s;               // M x N1
  std::vector<float> c;               // M x N2
  std::vector<unsigned short> c_tma;  // M x N2, bf16 bits
};

/// Runs the check for M = 64 and (K, N1, N2) one of (64, 128, 64), (128, 128, 128), (256, 64, 256) (attention's
/// head dims 64, 128, 256 with their key-block sizes). a is M x K, b is N1 x K, v is N1 x N2, each row-major
/// bf16 bits. Throws std::runtime_error when the kernels were not built for sm_90a or the GPU is not Hopper.
HopperGemmResult run_hopper_gemm_tile(int k, int n1, int n2, const std::vector<unsigned short>& a,
                                      const std::vector<unsigned short>& b, const std::vector<unsigned short>& v);

}  // namespace attn::testing
