// One warpgroup, one tile, every wrapper of common/hopper.cuh that flash_v3 uses: tensor maps and TMA loads
// completing on an mbarrier, wgmma SS (S = A B^T) and RS (C = bf16(S) V with V MN-major), the accumulator
// turned into an A operand, the swizzled staging of a result and its TMA store.
#include <stdexcept>
#include <string>

#include "common/cuda_utils.hpp"
#include "common/hopper.cuh"
#include "hopper_gemm_check.cuh"

namespace attn::testing {
namespace {

using namespace attn::hopper;
constexpr int M = 64;

template <int K, int N1, int N2>
struct TileShape {
  static constexpr int kABytes = M * K * 2, kBBytes = N1 * K * 2, kVBytes = N1 * N2 * 2;
  static constexpr int kSmem = kABytes + kBBytes + kVBytes + M * N2 * 2 + 64 + kSwizzleAtomBytes;
};

template <int K, int N1, int N2>
__global__ void __launch_bounds__(128, 1) gemm_tile_kernel(const __grid_constant__ CUtensorMap a_map,
                                                           const __grid_constant__ CUtensorMap b_map,
                                                           const __grid_constant__ CUtensorMap v_map,
                                                           const __grid_constant__ CUtensorMap c_map, float* s_out,
                                                           float* c_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = TileShape<K, N1, N2>;
  extern __shared__ unsigned char shared_bytes[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(shared_bytes) + kSwizzleAtomBytes - 1) & ~std::uintptr_t(kSwizzleAtomBytes - 1));
  unsigned char* a_tile = smem;
  unsigned char* b_tile = a_tile + Shape::kABytes;
  unsigned char* v_tile = b_tile + Shape::kBBytes;
  unsigned char* c_tile = v_tile + Shape::kVBytes;
  auto* loaded = reinterpret_cast<std::uint64_t*>(c_tile + M * N2 * 2);

  if (threadIdx.x == 0) {
    mbarrier_init(loaded, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(loaded, Shape::kABytes + Shape::kBBytes + Shape::kVBytes);
    for (int panel = 0; panel < K / 64; ++panel) {
      tma_load(a_tile + panel * M * kPanelRowBytes, &a_map, loaded, panel * 64, 0, 0, 0);
      tma_load(b_tile + panel * N1 * kPanelRowBytes, &b_map, loaded, panel * 64, 0, 0, 0);
    }
    for (int panel = 0; panel < N2 / 64; ++panel)
      tma_load(v_tile + panel * N1 * kPanelRowBytes, &v_map, loaded, panel * 64, 0, 0, 0);
  }
  mbarrier_wait(loaded, 0);

  // S = A B^T: K / 16 wgmmas, both operands K-major.
  float s[N1 / 2];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const int panel = kk / 4, byte_in_row = (kk % 4) * 32;
    wgmma_ss<N1, __nv_bfloat16>(s, smem_descriptor(a_tile + panel * M * kPanelRowBytes + byte_in_row, 16, 1024),
                                smem_descriptor(b_tile + panel * N1 * kPanelRowBytes + byte_in_row, 16, 1024),
                                kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(s);

  // C = bf16(S) V: N1 / 16 wgmmas, A from S's registers, V MN-major (next 64 columns one panel further).
  float c[N2 / 2];
#pragma unroll
  for (int i = 0; i < N2 / 2; ++i) c[i] = 0.0f;
  std::uint32_t a[N1 / 16][4];
#pragma unroll
  for (int kk = 0; kk < N1 / 16; ++kk) to_a_operand<__nv_bfloat16>(a[kk], s, kk);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < N1 / 16; ++kk)
    wgmma_rs<N2, __nv_bfloat16>(c, a[kk], smem_descriptor(v_tile + kk * 16 * kPanelRowBytes, N1 * kPanelRowBytes, 1024),
                                true);
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(c);

  // Both accumulators out in the documented layout; C also through swizzled shared memory and a TMA store.
  const int warp = threadIdx.x / 32, group = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  for (int half = 0; half < 2; ++half) {
    const int row = warp * 16 + group + 8 * half;
    for (int i = 0; i < N1 / 8; ++i)
      for (int e = 0; e < 2; ++e) s_out[row * N1 + 8 * i + 2 * t + e] = s[4 * i + 2 * half + e];
    for (int i = 0; i < N2 / 8; ++i) {
      for (int e = 0; e < 2; ++e) c_out[row * N2 + 8 * i + 2 * t + e] = c[4 * i + 2 * half + e];
      const int column = 8 * i + 2 * t;
      *reinterpret_cast<std::uint32_t*>(c_tile + (column / 64) * M * kPanelRowBytes + swizzled_offset(row, column % 64)) =
          mma::pack2<__nv_bfloat16>(c[4 * i + 2 * half], c[4 * i + 2 * half + 1]);
    }
  }
  fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int panel = 0; panel < N2 / 64; ++panel) tma_store(&c_map, c_tile + panel * M * kPanelRowBytes, panel * 64, 0, 0, 0);
    tma_store_commit();
    tma_store_wait_read();
  }
#endif
}

template <int K, int N1, int N2>
HopperGemmResult run(const std::vector<unsigned short>& a, const std::vector<unsigned short>& b,
                     const std::vector<unsigned short>& v) {
#ifndef ATTN_FLASH_V3_SM90A
  throw std::runtime_error("hopper wrappers: this build has no sm_90a kernels");
#endif
  int device = 0, major = 0;
  ATTN_CUDA_CHECK(cudaGetDevice(&device));
  ATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9) throw std::runtime_error("hopper wrappers: needs a Hopper GPU (sm_90a)");
  DeviceBuffer<unsigned short> a_d(a.size()), b_d(b.size()), v_d(v.size()), c_tma_d(M * N2);
  DeviceBuffer<float> s_d(M * N1), c_d(M * N2);
  ATTN_CUDA_CHECK(cudaMemcpy(a_d.data(), a.data(), a_d.bytes(), cudaMemcpyHostToDevice));
  ATTN_CUDA_CHECK(cudaMemcpy(b_d.data(), b.data(), b_d.bytes(), cudaMemcpyHostToDevice));
  ATTN_CUDA_CHECK(cudaMemcpy(v_d.data(), v.data(), v_d.bytes(), cudaMemcpyHostToDevice));
  ATTN_CUDA_CHECK(cudaMemset(c_tma_d.data(), 0xff, c_tma_d.bytes()));  // poison: NaN in bf16
  ATTN_CUDA_CHECK(cudaMemset(s_d.data(), 0xff, s_d.bytes()));
  ATTN_CUDA_CHECK(cudaMemset(c_d.data(), 0xff, c_d.bytes()));
  auto matrix = [](const void* base, int rows, int columns, int box_rows) {
    return make_tensor_map(base, DType::bf16, 1, 1, rows, columns, Strides{rows * columns, rows * columns, columns},
                           box_rows);
  };
  const CUtensorMap a_map = matrix(a_d.data(), M, K, M), b_map = matrix(b_d.data(), N1, K, N1),
                    v_map = matrix(v_d.data(), N1, N2, N1), c_map = matrix(c_tma_d.data(), M, N2, M);
  auto kernel = gemm_tile_kernel<K, N1, N2>;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TileShape<K, N1, N2>::kSmem));
  kernel<<<1, 128, TileShape<K, N1, N2>::kSmem>>>(a_map, b_map, v_map, c_map, s_d.data(), c_d.data());
  ATTN_CUDA_CHECK_LAUNCH();
  ATTN_CUDA_CHECK(cudaDeviceSynchronize());
  HopperGemmResult result{std::vector<float>(M * N1), std::vector<float>(M * N2), std::vector<unsigned short>(M * N2)};
  ATTN_CUDA_CHECK(cudaMemcpy(result.s.data(), s_d.data(), s_d.bytes(), cudaMemcpyDeviceToHost));
  ATTN_CUDA_CHECK(cudaMemcpy(result.c.data(), c_d.data(), c_d.bytes(), cudaMemcpyDeviceToHost));
  ATTN_CUDA_CHECK(cudaMemcpy(result.c_tma.data(), c_tma_d.data(), c_tma_d.bytes(), cudaMemcpyDeviceToHost));
  return result;
}

}  // namespace

HopperGemmResult run_hopper_gemm_tile(int k, int n1, int n2, const std::vector<unsigned short>& a,
                                      const std::vector<unsigned short>& b, const std::vector<unsigned short>& v) {
  if (a.size() != static_cast<std::size_t>(M * k) || b.size() != static_cast<std::size_t>(n1 * k) ||
      v.size() != static_cast<std::size_t>(n1 * n2))
    throw std::invalid_argument("run_hopper_gemm_tile: a, b, v must be 64 x k, n1 x k and n1 x n2");
  if (k == 64 && n1 == 128 && n2 == 64) return run<64, 128, 64>(a, b, v);
  if (k == 128 && n1 == 128 && n2 == 128) return run<128, 128, 128>(a, b, v);
  if (k == 256 && n1 == 64 && n2 == 256) return run<256, 64, 256>(a, b, v);
  throw std::invalid_argument("run_hopper_gemm_tile: (k, n1, n2) must be (64,128,64), (128,128,128) or (256,64,256)");
}

}  // namespace attn::testing
