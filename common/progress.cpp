#include "common/progress.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

namespace attn::progress {
namespace {

using Clock = std::chrono::steady_clock;

struct State {
  std::mutex mutex;  // guards label and start
  std::string label;
  Clock::time_point start = Clock::now();
  std::atomic<double> total{0.0};
  std::atomic<double> done{0.0};
};

State& state() {
  static State s;
  return s;
}

}  // namespace

void begin(const std::string& label) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.label = label;
  s.start = Clock::now();
  s.total.store(0.0, std::memory_order_relaxed);
  s.done.store(0.0, std::memory_order_relaxed);
}

void expect(double total) {
  state().done.store(0.0, std::memory_order_relaxed);
  state().total.store(total, std::memory_order_relaxed);
}

void advance(double units) {
  std::atomic<double>& done = state().done;
  double now = done.load(std::memory_order_relaxed);
  while (!done.compare_exchange_weak(now, now + units, std::memory_order_relaxed)) {
  }
}

std::string format_line(const std::string& label, double done, double total, double elapsed_s) {
  char text[256];
  if (total > 0 && done > 0) {
    const double fraction = std::min(1.0, done / total);
    const double left = elapsed_s * (1.0 - fraction) / fraction;
    std::snprintf(text, sizeof text, "attn: %s: %.0f%% after %.0f s, about %.0f s left", label.c_str(), 100 * fraction,
                  elapsed_s, left);
  } else {
    std::snprintf(text, sizeof text, "attn: %s: running for %.0f s", label.c_str(), elapsed_s);
  }
  return text;
}

class Reporter::Impl {
 public:
  Impl(double after_s, double interval_s) : thread_([this, after_s, interval_s] { loop(after_s, interval_s); }) {}
  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

 private:
  void loop(double after_s, double interval_s) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!wake_.wait_for(lock, std::chrono::duration<double>(interval_s), [this] { return stop_; })) {
      State& s = state();
      std::string label;
      double elapsed = 0;
      {
        std::lock_guard<std::mutex> state_lock(s.mutex);
        label = s.label;
        elapsed = std::chrono::duration<double>(Clock::now() - s.start).count();
      }
      if (label.empty() || elapsed < after_s) continue;
      const std::string line = format_line(label, s.done.load(std::memory_order_relaxed),
                                           s.total.load(std::memory_order_relaxed), elapsed);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

namespace {

double seconds_from_environment(double fallback) {
  const char* text = std::getenv("ATTN_PROGRESS_SECONDS");
  if (text == nullptr) return fallback;
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  return end != text && *end == '\0' && value > 0.0 && value < 1e6 ? value : fallback;
}

}  // namespace

Reporter::Reporter(double after_s, double interval_s)
    : impl_(std::make_unique<Impl>(seconds_from_environment(after_s), seconds_from_environment(interval_s))) {}
Reporter::~Reporter() = default;

}  // namespace attn::progress
