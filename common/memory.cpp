#include "common/memory.hpp"

#include <atomic>

namespace attn::memory {
namespace {

struct Counters {
  std::atomic<std::size_t> live{0};
  std::atomic<std::size_t> peak{0};
};

Counters& counters(Space space) {
  static Counters host;
  static Counters device;
  return space == Space::host ? host : device;
}

}  // namespace

void record_allocation(Space space, std::size_t bytes) {
  Counters& c = counters(space);
  const std::size_t now = c.live.fetch_add(bytes) + bytes;
  std::size_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
}

void record_release(Space space, std::size_t bytes) { counters(space).live.fetch_sub(bytes); }

std::size_t live_bytes(Space space) { return counters(space).live.load(); }

PeakScope::PeakScope(Space space) : space_(space), baseline_(live_bytes(space)) {
  counters(space_).peak.store(baseline_);
}

PeakScope::~PeakScope() = default;

std::size_t PeakScope::extra_bytes() const {
  const std::size_t peak = counters(space_).peak.load();
  return peak > baseline_ ? peak - baseline_ : 0;
}

}  // namespace attn::memory
