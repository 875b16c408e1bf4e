// Wall-clock timing for the CPU tier. (The GPU tier uses CudaEventTimer from common/cuda_utils.hpp.)
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace attn {

class CpuTimer {
 public:
  void start() { begin_ = std::chrono::steady_clock::now(); }
  /// Milliseconds since start().
  double stop_ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin_).count();
  }

 private:
  std::chrono::steady_clock::time_point begin_;
};

/// Median of a non-empty set of timings.
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace attn
