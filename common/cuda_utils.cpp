#include "common/cuda_utils.hpp"

#include <map>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace attn::cuda {

void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

bool device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" / "no driver" status
    return false;
  }
  return count > 0;
}

std::string device_description() {
  if (!device_available()) return "";
  int device = 0;
  ATTN_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  ATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs)";
}

namespace {

struct BlockCache {
  std::mutex mutex;
  std::multimap<std::size_t, void*> free_blocks;  // size -> pointer
};

BlockCache& cache() {
  static BlockCache instance;
  return instance;
}

}  // namespace

int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  ATTN_CUDA_CHECK(cudaGetDevice(&device));
  ATTN_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

void* allocate(std::size_t bytes) {
  {
    std::lock_guard lock(cache().mutex);
    auto it = cache().free_blocks.find(bytes);
    if (it != cache().free_blocks.end()) {
      void* pointer = it->second;
      cache().free_blocks.erase(it);
      memory::record_allocation(memory::Space::device, bytes);
      return pointer;
    }
  }
  void* pointer = nullptr;
  if (cudaMalloc(&pointer, bytes) != cudaSuccess) {
    cudaGetLastError();
    release_cached();  // the cache may hold what we need in other sizes
    ATTN_CUDA_CHECK(cudaMalloc(&pointer, bytes));
  }
  memory::record_allocation(memory::Space::device, bytes);
  return pointer;
}

void release(void* pointer, std::size_t bytes) {
  memory::record_release(memory::Space::device, bytes);
  std::lock_guard lock(cache().mutex);
  cache().free_blocks.emplace(bytes, pointer);
}

void release_cached() {
  std::lock_guard lock(cache().mutex);
  for (auto& [bytes, pointer] : cache().free_blocks) cudaFree(pointer);
  cache().free_blocks.clear();
}

}  // namespace attn::cuda

namespace attn {

CudaEventTimer::CudaEventTimer() {
  ATTN_CUDA_CHECK(cudaEventCreate(&begin_));
  ATTN_CUDA_CHECK(cudaEventCreate(&end_));
}

CudaEventTimer::~CudaEventTimer() {
  cudaEventDestroy(begin_);
  cudaEventDestroy(end_);
}

void CudaEventTimer::start(cudaStream_t stream) { ATTN_CUDA_CHECK(cudaEventRecord(begin_, stream)); }

float CudaEventTimer::stop_ms(cudaStream_t stream) {
  ATTN_CUDA_CHECK(cudaEventRecord(end_, stream));
  ATTN_CUDA_CHECK(cudaEventSynchronize(end_));
  float ms = 0;
  ATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, begin_, end_));
  return ms;
}

}  // namespace attn
