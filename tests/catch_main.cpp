// The one main() of every test program. GPU test programs (built with ATTN_GPU_TESTS) exit with status 77,
// which ctest reports as "skipped", when this machine has no CUDA device. Listing the test cases
// (--list-tests, --list-test-names-only: what catch_discover_tests runs at build time) needs no device and
// prints nothing but the list, so that every case is registered with ctest on any machine and each one is
// then skipped (exit 77) where there is no device.
#if !__has_include(<catch2/catch_test_macros.hpp>)
#define CATCH_CONFIG_RUNNER
#endif
#include <cstdio>
#include <cstring>

#include "catch.hpp"
#ifdef ATTN_GPU_TESTS
#include "common/cuda_utils.hpp"

namespace {
bool listing_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) return true;
  return false;
}
}  // namespace
#endif

int main(int argc, char** argv) {
#ifdef ATTN_GPU_TESTS
  if (!listing_only(argc, argv)) {
    if (!attn::cuda::device_available()) {
      std::printf("SKIPPED: no CUDA device on this machine; GPU tests compiled but not run\n");
      return 77;
    }
    std::printf("GPU: %s\n", attn::cuda::device_description().c_str());
  }
#endif
  return Catch::Session().run(argc, argv);
}
