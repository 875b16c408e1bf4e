// cp_async_wavefronts: what a warp's 16-byte cp.async copies cost on the shared-memory side, by the layout of the
// tile they fill. Each thread block copies 128 x 64 tiles of 16-bit elements (128-byte rows) from global memory
// into shared memory, 4 copies per thread, one tile after another, for every variant:
//   - rows 144 bytes apart (16 bytes of padding, as the kernels' RowMajor tiles), 160, or 128 (none);
//   - the row's 16-byte chunks in order, or XOR-swizzled by the row (mma::Swizzled);
//   - consecutive lanes on the chunks of one row (8 lanes a row), or on 4, 2, 1 chunks of consecutive rows;
//   - the zero-fill operand (src-size) or none.
// It prints each variant's time and copy rate. The wavefronts per instruction come from Nsight Compute:
//   ncu --section SourceCounters -k regex:copy_tiles -o cp build/bin/cp_async_wavefronts --profile
//   ncu --import cp.ncu-rep --page source --print-source sass --csv   (column "L1 Wavefronts Shared")
// (--profile: one launch per variant, for the profiler; docs/measurements/2026-11-29-h200-cp-async-wavefronts.txt).
#include <cstdio>
#include <cstring>

#include "common/cuda_utils.hpp"
#include "common/mma.cuh"

namespace {

constexpr int kRows = 128, kChunks = 8, kThreads = 256;  // a 128 x 64 tile of 16-bit elements
constexpr int kTileBytes = kRows * kChunks * 16;

template <int RowBytes, bool Swizzle, int LanesPerRow, bool ZeroFill>
__global__ void __launch_bounds__(kThreads) copy_tiles(const uint4* source, int tiles, int valid_rows, float* sink) {
  extern __shared__ __align__(16) unsigned char tile[];
  float keep = 0;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const uint4* from = source + static_cast<long long>(t) * kRows * kChunks;
#pragma unroll
    for (int pass = 0; pass < kRows * kChunks / kThreads; ++pass) {
      // LanesPerRow lanes on consecutive chunks of a row, then the next row; the chunk groups one after another.
      const int linear = pass * kThreads + static_cast<int>(threadIdx.x);
      const int group = linear / (kRows * LanesPerRow), within = linear % (kRows * LanesPerRow);
      const int row = within / LanesPerRow, chunk = group * LanesPerRow + within % LanesPerRow;
      const int stored = Swizzle ? chunk ^ (row % 8) : chunk;
      unsigned char* to = tile + row * RowBytes + stored * 16;
      if constexpr (ZeroFill)
        attn::mma::cp_async_16(to, from + row * kChunks + chunk, row < valid_rows);  // (all valid)
      else
        attn::mma::cp_async_16(to, from + row * kChunks + chunk);
    }
    attn::mma::cp_async_commit();
    attn::mma::cp_async_wait<0>();
    __syncthreads();
    keep += reinterpret_cast<const float*>(tile)[threadIdx.x * 9 % (kTileBytes / 4)];
    __syncthreads();
  }
  if (keep == 1.0f) sink[0] = keep;  // (never true: the copies are not optimised away)
}

template <int RowBytes, bool Swizzle, int LanesPerRow, bool ZeroFill>
void run(const char* name, const uint4* source, int tiles, float* sink, int repeats) {
  auto kernel = copy_tiles<RowBytes, Swizzle, LanesPerRow, ZeroFill>;
  const int bytes = kRows * RowBytes;
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const int blocks = 4 * 132;
  kernel<<<blocks, kThreads, bytes>>>(source, tiles, kRows, sink);  // warm-up (the one launch under --profile)
  ATTN_CUDA_CHECK_LAUNCH();
  if (repeats == 0) return;
  cudaEvent_t start, stop;
  ATTN_CUDA_CHECK(cudaEventCreate(&start));
  ATTN_CUDA_CHECK(cudaEventCreate(&stop));
  float best = 1e30f;
  for (int r = 0; r < repeats; ++r) {
    ATTN_CUDA_CHECK(cudaEventRecord(start));
    kernel<<<blocks, kThreads, bytes>>>(source, tiles, kRows, sink);
    ATTN_CUDA_CHECK_LAUNCH();
    ATTN_CUDA_CHECK(cudaEventRecord(stop));
    ATTN_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    ATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (ms < best) best = ms;
  }
  ATTN_CUDA_CHECK(cudaEventDestroy(start));
  ATTN_CUDA_CHECK(cudaEventDestroy(stop));
  std::printf("%-40s %8.3f ms %7.0f GB/s\n", name, best, static_cast<double>(tiles) * kTileBytes / best / 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  const bool profile = argc > 1 && std::strcmp(argv[1], "--profile") == 0;
  const int repeats = profile ? 0 : 5, tiles = 65536;  // 1 GiB read per launch
  uint4* source = nullptr;
  float* sink = nullptr;
  ATTN_CUDA_CHECK(cudaMalloc(&source, static_cast<size_t>(tiles) * kTileBytes));
  ATTN_CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  ATTN_CUDA_CHECK(cudaMemset(source, 1, static_cast<size_t>(tiles) * kTileBytes));
  run<144, false, 8, true>("rows 144 B, in order, 8 lanes/row, zero-fill", source, tiles, sink, repeats);
  run<144, false, 8, false>("rows 144 B, in order, 8 lanes/row", source, tiles, sink, repeats);
  run<144, false, 4, false>("rows 144 B, in order, 4 lanes/row", source, tiles, sink, repeats);
  run<144, false, 2, false>("rows 144 B, in order, 2 lanes/row", source, tiles, sink, repeats);
  run<144, false, 1, false>("rows 144 B, in order, 1 lane/row", source, tiles, sink, repeats);
  run<160, false, 8, false>("rows 160 B, in order, 8 lanes/row", source, tiles, sink, repeats);
  run<128, false, 8, false>("rows 128 B, in order, 8 lanes/row", source, tiles, sink, repeats);
  run<128, true, 8, true>("rows 128 B, swizzled, 8 lanes/row, zero-fill", source, tiles, sink, repeats);
  run<128, true, 8, false>("rows 128 B, swizzled, 8 lanes/row", source, tiles, sink, repeats);
  ATTN_CUDA_CHECK(cudaDeviceSynchronize());
  ATTN_CUDA_CHECK(cudaFree(source));
  ATTN_CUDA_CHECK(cudaFree(sink));
  return 0;
}
