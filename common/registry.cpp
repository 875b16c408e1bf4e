#include "common/registry.hpp"

#include <algorithm>
#include <stdexcept>

namespace attn {

const TierEntry* Stage::find(Tier tier) const {
  for (const TierEntry& entry : tiers)
    if (entry.tier == tier) return &entry;
  return nullptr;
}

void check_option_names(const TierEntry& entry, const StageOptions& options, const std::string& who) {
  for (const auto& [name, value] : options.values) {
    if (std::find(entry.option_names.begin(), entry.option_names.end(), name) != entry.option_names.end()) continue;
    std::string known;
    for (const std::string& option : entry.option_names) known += (known.empty() ? "" : ", ") + option;
    throw std::invalid_argument("option " + name + ": not an option of " + who +
                                (known.empty() ? " (it takes none)" : " (its options: " + known + ")"));
  }
}

}  // namespace attn
