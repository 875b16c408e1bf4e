// The ladder: every stage in the order the chapters build on each other. This is the one place that names
// them; tests, benchmarks and the `attn` program walk this list.
#include <stdexcept>

#include "common/registry.hpp"
// #include "memory_efficient/memory_efficient.hpp"
#include "naive/naive.hpp"

namespace attn {

const std::vector<Stage>& ladder() {
  static const std::vector<Stage> stages = {
      naive::describe(),
      // memory_efficient::describe(),
  };
  return stages;
}

const Stage& find_stage(const std::string& name) {
  std::string known;
  for (const Stage& stage : ladder()) {
    if (stage.name == name) return stage;
    known += (known.empty() ? "" : ", ") + stage.name;
  }
  throw std::invalid_argument("stage: '" + name + "' is not one of " + known);
}

const Stage* previous_stage(const std::string& name, Tier tier) {
  const Stage* previous = nullptr;
  for (const Stage& stage : ladder()) {
    if (stage.name == name) return previous;
    if (stage.find(tier) != nullptr) previous = &stage;
  }
  return nullptr;
}

}  // namespace attn
