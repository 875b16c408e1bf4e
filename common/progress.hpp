// Progress of long work, for a person watching a terminal: stages and long loops report how far they are
// (a fraction of their work units), and a reporter thread prints one line to stderr every few seconds once a
// phase has run longer than a few seconds: "attn: flash_v2/cpu forward: 37% after 12 s, about 20 s left".
// Reporting costs one relaxed atomic add per call to advance(); nothing is printed unless a Reporter is live.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace attn::progress {

/// Starts a phase of work called `label` (the previous phase, if any, ends). Its size is unknown until
/// expect() is called; until then the line shows the elapsed time only.
void begin(const std::string& label);
/// The current phase has `total` work units (a stage calls this at the start of a pass).
void expect(double total);
/// `units` more work units of the current phase are done (thread-safe, cheap: call it per block or row).
void advance(double units = 1.0);

/// While one lives, a thread prints the current phase's progress to stderr every `interval_s` seconds once
/// the phase has run `after_s` seconds. One at a time. The environment variable ATTN_PROGRESS_SECONDS, when
/// set to a positive number, replaces both (tests use it to see lines from short work).
class Reporter {
 public:
  explicit Reporter(double after_s = 3.0, double interval_s = 2.0);
  ~Reporter();
  Reporter(const Reporter&) = delete;
  Reporter& operator=(const Reporter&) = delete;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

/// The line the reporter prints for a phase: label, fraction done (when known), elapsed and estimated time left.
std::string format_line(const std::string& label, double done, double total, double elapsed_s);

}  // namespace attn::progress
