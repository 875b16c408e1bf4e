// Host-side CUDA helpers for the GPU tier: error checking that names the call, file and line; an RAII
// device buffer counted by the memory tracker; an event timer. Compiles with g++ (only the runtime API).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

#include "common/memory.hpp"

namespace attn::cuda {

/// Throws std::runtime_error("cudaMalloc(...) failed at file:line: out of memory") when status != success.
void check(cudaError_t status, const char* call, const char* file, int line);

/// True when a CUDA device is present and usable (false, not an error, on machines without a GPU).
bool device_available();
/// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)", or "" when there is none.
std::string device_description();
/// An attribute of the current device (cudaDevAttrMultiProcessorCount, cudaDevAttrL2CacheSize, ...).
int device_attribute(cudaDeviceAttr attribute);

/// Allocates `bytes` of device memory. Freed blocks are kept for reuse, so that timed loops do not pay for
/// cudaMalloc; the memory tracker counts bytes handed out, not bytes held in the cache.
void* allocate(std::size_t bytes);
void release(void* pointer, std::size_t bytes);
/// Returns every cached block to the driver.
void release_cached();

}  // namespace attn::cuda

/// Checks a CUDA runtime call: ATTN_CUDA_CHECK(cudaMemcpy(...)). A macro so that the message can quote the call.
#define ATTN_CUDA_CHECK(call) ::attn::cuda::check((call), #call, __FILE__, __LINE__)
/// Checks the launch just made (bad configuration, missing kernel image) without synchronising.
#define ATTN_CUDA_CHECK_LAUNCH() ::attn::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace attn {

/// Owning device array of T (uninitialised), counted by the memory tracker as device memory.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count_ > 0) data_ = static_cast<T*>(cuda::allocate(count_ * sizeof(T)));
  }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }

 private:
  void reset() {
    if (data_ != nullptr) cuda::release(data_, count_ * sizeof(T));
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

/// Times device work between start() and stop_ms() on a stream with CUDA events.
class CudaEventTimer {
 public:
  CudaEventTimer();
  ~CudaEventTimer();
  CudaEventTimer(const CudaEventTimer&) = delete;
  CudaEventTimer& operator=(const CudaEventTimer&) = delete;
  void start(cudaStream_t stream = nullptr);
  /// Records the stop event, waits for it and returns the elapsed milliseconds.
  float stop_ms(cudaStream_t stream = nullptr);

 private:
  cudaEvent_t begin_ = nullptr;
  cudaEvent_t end_ = nullptr;
};

}  // namespace attn
