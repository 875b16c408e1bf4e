// The harness every test, benchmark and the CLI share: make random inputs for a problem, run one stage's tier
// on them (poisoned outputs, warm-up, timed repeats, extra memory measured), and hand back fp32 host copies.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/memory.hpp"
#include "common/problem.hpp"
#include "common/registry.hpp"

namespace attn {

/// Host fp32 copies of a problem's inputs in one layout, already rounded to `dtype`, so that every tier and
/// the oracle see exactly the same values whatever precision a tier computes in.
struct ProblemData {
  AttentionProblem problem;
  DType dtype = DType::f32;
  Layout layout = Layout::bhnd;
  HostBuffer<float> q, k, v, d_o;

  Strides q_strides() const { return make_strides(layout, problem.q_heads, problem.seq_q, problem.head_dim); }
  Strides kv_strides() const { return make_strides(layout, problem.kv_heads, problem.seq_k, problem.head_dim); }
};

/// Random normal inputs (q, k, v, d_o), seeded. `q_stddev` scales Q alone: with q_stddev = 40 and D = 64 the
/// logits reach about 1e3, which overflows a softmax that does not subtract the row max.
ProblemData make_problem_data(const AttentionProblem& problem, DType dtype = DType::f32, Layout layout = Layout::bhnd,
                              std::uint64_t seed = 1, float q_stddev = 1.0f);

struct RunSettings {
  bool backward = false;
  int warmup = 1;   ///< untimed runs first
  int repeats = 1;  ///< timed runs; the median is reported
  StageOptions options;
};

/// What one stage's tier produced: outputs in the data's layout (fp32 host copies) and its figures.
struct StageRun {
  HostBuffer<float> o, lse, dq, dk, dv;  ///< dq, dk, dv are empty without backward
  double forward_ms = 0;
  double backward_ms = 0;
  std::size_t forward_extra_bytes = 0;   ///< peak bytes the pass allocated beyond inputs and outputs
  std::size_t backward_extra_bytes = 0;
  /// What the stage reported (IO bytes, skipped blocks...): per counter the median over the timed runs; those of
  /// the backward pass named "backward_" + name.
  std::map<std::string, double> counters;

  /// NaN or infinite values in o, dq, dk, dv, plus NaN or +inf in lse (-inf is the LSE of a row that sees no
  /// key). The stages propagate non-finite inputs and overflow as PyTorch does; callers report this count.
  std::int64_t nonfinite_values() const;
};

/// Thrown when a problem needs more memory than the machine has; the message gives both figures.
class ProblemTooLarge : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Bytes that can still be allocated on the tier's memory (host: available RAM; GPU: free device memory).
std::size_t available_bytes(Tier tier);

/// Host bytes of a problem's ProblemData (fp32 q, k, v, d_o).
std::size_t problem_data_bytes(const AttentionProblem& problem);
/// Host bytes run_stage holds at its peak for this stage: the fp32 outputs it hands back, plus (CPU tier) the
/// stage's scratch for these options. The GPU tier's device bytes are checked separately, on the device.
std::size_t run_host_bytes(const TierEntry& entry, const AttentionProblem& problem, DType dtype, bool backward,
                           const StageOptions& options = {});

/// Everything that can be known before making inputs: the stage has the tier in this build (and, for the GPU
/// tier, the machine has a CUDA device), the problem passes the tier's rules, the options are ones the tier
/// reads, and the tensors plus the stage's scratch fit the tier's memory. Throws std::invalid_argument (naming
/// the argument; "no CUDA device" for a GPU tier without one) or ProblemTooLarge (with the bytes needed).
/// `dtype` is the data's dtype (the CPU tier computes in f32 whatever it is).
void check_can_run(const Stage& stage, Tier tier, const AttentionProblem& problem, DType dtype, bool backward,
                   const StageOptions& options = {});

/// A stage's tier set up on one problem's data (device copies made, outputs allocated) so that passes can be
/// run and timed repeatedly: run_stage uses it once, the benchmarks in their loops.
class PreparedRun {
 public:
  /// check_can_run (validates, checks that the problem fits), then allocates and uploads. `options` are the
  /// ones the passes will get (for the scratch estimate; every pass checks its options' names again).
  PreparedRun(const Stage& stage, Tier tier, const ProblemData& data, bool backward, const StageOptions& options = {});
  ~PreparedRun();
  PreparedRun(const PreparedRun&) = delete;
  PreparedRun& operator=(const PreparedRun&) = delete;

  /// Poisons O and LSE, runs one forward pass and returns its time in ms (CUDA events on the GPU tier).
  double forward(StageOptions& options);
  /// Poisons dQ, dK, dV, runs one backward pass (on the last forward's O and LSE) and returns its time.
  double backward(StageOptions& options);
  /// Peak extra bytes seen over the passes run so far.
  std::size_t forward_extra_bytes() const { return forward_extra_; }
  std::size_t backward_extra_bytes() const { return backward_extra_; }
  /// Copies the outputs back to fp32 host buffers (dq, dk, dv only after a backward).
  StageRun outputs() const;
  /// The same, moving the CPU tier's buffers out instead of copying them (no more passes can run after it).
  StageRun take_outputs();

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
  const TierEntry* entry_ = nullptr;
  std::string who_;
  std::size_t forward_extra_ = 0;
  std::size_t backward_extra_ = 0;
};

/// Runs stage/tier on data. The GPU tier runs in data.dtype; the CPU tier computes in fp32 on the same
/// (rounded) inputs. Outputs are poisoned (NaN) before every run, so an element a stage forgets to write shows
/// up in compare(). Throws what check_can_run throws, before allocating anything. While it runs, the
/// progress phase (common/progress.hpp) names the stage, tier and pass.
StageRun run_stage(const Stage& stage, Tier tier, const ProblemData& data, const RunSettings& settings);

/// "1.23 GB", "512 KB" for tables.
std::string format_bytes(double bytes);

}  // namespace attn
