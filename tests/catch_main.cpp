// The one main() of every test program. GPU test programs (built with ATTN_GPU_TESTS) exit with status 77,
// which ctest reports as "skipped", when this machine has no CUDA device.
#if !__has_include(<catch2/catch_test_macros.hpp>)
#define CATCH_CONFIG_RUNNER
#endif
#include <cstdio>

#include "catch.hpp"
#ifdef ATTN_GPU_TESTS
#include "common/cuda_utils.hpp"
#endif

int main(int argc, char** argv) {
#ifdef ATTN_GPU_TESTS
  if (!attn::cuda::device_available()) {
    std::printf("SKIPPED: no CUDA device on this machine; GPU tests compiled but not run\n");
    return 77;
  }
  std::printf("GPU: %s\n", attn::cuda::device_description().c_str());
#endif
  return Catch::Session().run(argc, argv);
}
