// The stage registry: each stage describes itself (name, paper, tiers, entry points) with a Stage value, and
// tools/ladder.cpp lists them in ladder order. Tests, benchmarks and the `attn` CLI walk that list.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/problem.hpp"
#include "common/validate.hpp"

namespace attn {

/// Runs one pass. GPU entry points may return before the device finishes (the caller synchronises).
using PassFn = std::function<void(const AttentionProblem&, const AttentionTensors&, StageOptions&)>;
/// Extra bytes the pass will allocate for this problem (its scratch, not inputs or outputs), so that a
/// caller can refuse a problem that cannot fit before trying. A stage whose scratch depends on its options
/// (block or chunk sizes) gives a function that also takes the StageOptions; one that does not, a function of
/// (problem, dtype, backward). Either way the caller passes the options the run will use.
class ExtraBytesFn {
 public:
  using Full = std::function<std::size_t(const AttentionProblem&, DType, bool backward, const StageOptions&)>;
  ExtraBytesFn() = default;
  template <class F>
    requires std::invocable<const F&, const AttentionProblem&, DType, bool, const StageOptions&>
  ExtraBytesFn(F f) : fn_(std::move(f)) {}
  template <class F>
    requires(std::invocable<const F&, const AttentionProblem&, DType, bool> &&
             !std::invocable<const F&, const AttentionProblem&, DType, bool, const StageOptions&>)
  ExtraBytesFn(F f)
      : fn_([f = std::move(f)](const AttentionProblem& p, DType dtype, bool backward, const StageOptions&) {
          return f(p, dtype, backward);
        }) {}
  std::size_t operator()(const AttentionProblem& p, DType dtype, bool backward, const StageOptions& options = {}) const {
    return fn_(p, dtype, backward, options);
  }
  explicit operator bool() const { return static_cast<bool>(fn_); }

 private:
  Full fn_;
};

struct TierEntry {
  Tier tier = Tier::cpu;
  TierCaps caps;
  PassFn forward;
  PassFn backward;  ///< empty when the tier has no backward
  ExtraBytesFn extra_bytes;
  /// The names of the StageOptions values this tier reads ("block_rows", ...). The harness refuses any other
  /// name, so that a misspelled option is an error instead of being ignored.
  std::vector<std::string> option_names;
  /// Options `attn ladder` runs this tier with (block sizes pinned so that the ladder's problem spans several
  /// K/V tiles on any machine); empty: the tier's defaults.
  std::map<std::string, std::int64_t> ladder_options;
  /// What the tier's device code was compiled for, where it matters ("sm_90a"); `attn list` prints it.
  std::string target;
  /// Why a tier without a backward has none, for the ladder's note (empty: "no backward pass").
  std::string no_backward_note;
};

/// Throws std::invalid_argument naming the first option in `options` that `entry` does not read, and the
/// names it does read. `who` is "stage/tier".
void check_option_names(const TierEntry& entry, const StageOptions& options, const std::string& who);

struct Stage {
  std::string name;    ///< directory name: "naive", "memory_efficient", ...
  std::string paper;   ///< short citation
  std::string adds;    ///< one line: what this stage adds over the previous one
  std::vector<TierEntry> tiers;

  /// The entry for `tier`, or nullptr when the stage has no such tier (or it was not built).
  const TierEntry* find(Tier tier) const;
};

/// Every built stage, in ladder order (defined in tools/ladder.cpp).
const std::vector<Stage>& ladder();
/// The stage called `name`; throws std::invalid_argument listing the known names otherwise.
const Stage& find_stage(const std::string& name);
/// The stage before `name` in the ladder that has `tier`, or nullptr for the first.
const Stage* previous_stage(const std::string& name, Tier tier);

}  // namespace attn
