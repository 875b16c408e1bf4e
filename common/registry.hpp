// The stage registry: each stage describes itself (name, paper, tiers, entry points) with a Stage value, and
// tools/ladder.cpp lists them in ladder order. Tests, benchmarks and the `attn` CLI walk that list.
#pragma once

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
/// caller can refuse a problem that cannot fit before trying.
using ExtraBytesFn = std::function<std::size_t(const AttentionProblem&, DType, bool backward)>;

struct TierEntry {
  Tier tier = Tier::cpu;
  TierCaps caps;
  PassFn forward;
  PassFn backward;  ///< empty when the tier has no backward
  ExtraBytesFn extra_bytes;
  /// Options `attn ladder` runs this tier with (block sizes pinned so that the ladder's problem spans several
  /// K/V tiles on any machine); empty: the tier's defaults.
  std::map<std::string, std::int64_t> ladder_options;
};

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
