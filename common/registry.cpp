#include "common/registry.hpp"

namespace attn {

const TierEntry* Stage::find(Tier tier) const {
  for (const TierEntry& entry : tiers)
    if (entry.tier == tier) return &entry;
  return nullptr;
}

}  // namespace attn
