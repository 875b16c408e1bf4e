// Extra-memory accounting and the owning host buffer every stage allocates its scratch from.
// Stages allocate through HostBuffer / DeviceBuffer, which report here, so that the harness can measure a
// stage's extra memory as the peak of live bytes during the call minus what was live before it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <span>
#include <utility>

namespace attn::memory {

enum class Space { host, device };

void record_allocation(Space space, std::size_t bytes);
void record_release(Space space, std::size_t bytes);
std::size_t live_bytes(Space space);

/// Measures the peak extra bytes allocated in one space while the scope lives.
/// Not re-entrant: one scope per space at a time (the harness runs one stage call at a time).
class PeakScope {
 public:
  explicit PeakScope(Space space);
  ~PeakScope();
  PeakScope(const PeakScope&) = delete;
  PeakScope& operator=(const PeakScope&) = delete;
  /// Peak of (live bytes - live bytes at construction) so far.
  std::size_t extra_bytes() const;

 private:
  Space space_;
  std::size_t baseline_;
};

}  // namespace attn::memory

namespace attn {

/// Owning, 64-byte aligned host array of trivially copyable T, counted by the memory tracker.
/// Contents are uninitialised after construction.
template <class T>
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(std::size_t count) : count_(count) {
    if (count_ == 0) return;
    const std::size_t bytes = (count_ * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    memory::record_allocation(memory::Space::host, count_ * sizeof(T));
  }
  HostBuffer(std::size_t count, T fill_value) : HostBuffer(count) { fill(fill_value); }
  ~HostBuffer() { reset(); }
  HostBuffer(HostBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  HostBuffer& operator=(HostBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + count_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + count_; }
  std::span<T> span() { return {data_, count_}; }
  std::span<const T> span() const { return {data_, count_}; }
  void fill(T value) {
    for (std::size_t i = 0; i < count_; ++i) data_[i] = value;
  }

 private:
  void reset() {
    if (data_ != nullptr) {
      memory::record_release(memory::Space::host, count_ * sizeof(T));
      std::free(data_);
    }
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace attn
