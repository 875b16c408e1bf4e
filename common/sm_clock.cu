// The SM clock as the kernels see it: one thread counts clock64() cycles against %globaltimer nanoseconds while it
// spins. A benchmark calls it right after a timed pass, so that a figure that moves from run to run can be checked
// against the clock the GPU ran at then (its power management changes the clock within milliseconds).
#include <cstdint>

#include "common/cuda_utils.hpp"
#include "common/sm_clock.hpp"

namespace attn::cuda {
namespace {

__device__ __forceinline__ std::uint64_t global_nanoseconds() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// Spins for `nanoseconds` of the global timer; writes the cycles and nanoseconds it counted.
__global__ void spin_kernel(std::uint64_t nanoseconds, long long* cycles_and_ns) {
  const std::uint64_t t0 = global_nanoseconds();
  const long long c0 = clock64();
  std::uint64_t t1 = t0;
  while (t1 - t0 < nanoseconds) t1 = global_nanoseconds();
  const long long c1 = clock64();
  cycles_and_ns[0] = c1 - c0;
  cycles_and_ns[1] = static_cast<long long>(t1 - t0);
}

}  // namespace

double sm_clock_mhz(double microseconds) {
  DeviceBuffer<long long> counts(2);
  spin_kernel<<<1, 1>>>(static_cast<std::uint64_t>(microseconds * 1e3), counts.data());
  ATTN_CUDA_CHECK_LAUNCH();
  long long host[2] = {0, 0};
  ATTN_CUDA_CHECK(cudaMemcpy(host, counts.data(), sizeof(host), cudaMemcpyDeviceToHost));
  return host[1] > 0 ? static_cast<double>(host[0]) / static_cast<double>(host[1]) * 1e3 : 0.0;
}

}  // namespace attn::cuda
