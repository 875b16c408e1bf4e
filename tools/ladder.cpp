// The ladder: every stage in the order the chapters build on each other. This is the one place that names
// them; tests, benchmarks and the `attn` program walk this list. CMake defines ATTN_STAGE_<name> for each
// stage it built (see ATTN_STAGES in the top-level CMakeLists.txt).
#include <stdexcept>

#include "common/registry.hpp"
#ifdef ATTN_STAGE_naive
#include "naive/naive.hpp"
#endif
#ifdef ATTN_STAGE_memory_efficient
#include "memory_efficient/memory_efficient.hpp"
#endif
#ifdef ATTN_STAGE_flash_v1
#include "flash_v1/flash_v1.hpp"
#endif
#ifdef ATTN_STAGE_flash_v2
#include "flash_v2/flash_v2.hpp"
#endif
#ifdef ATTN_STAGE_flash_v3
#include "flash_v3/flash_v3.hpp"
#endif
#ifdef ATTN_STAGE_paged
#include "paged/paged.hpp"
#endif
#ifdef ATTN_STAGE_sparse
#include "sparse/sparse.hpp"
#endif

namespace attn {

const std::vector<Stage>& ladder() {
  static const std::vector<Stage> stages = {
#ifdef ATTN_STAGE_naive
      naive::describe(),
#endif
#ifdef ATTN_STAGE_memory_efficient
      memory_efficient::describe(),
#endif
#ifdef ATTN_STAGE_flash_v1
      flash_v1::describe(),
#endif
#ifdef ATTN_STAGE_flash_v2
      flash_v2::describe(),
#endif
#ifdef ATTN_STAGE_flash_v3
      flash_v3::describe(),
#endif
#ifdef ATTN_STAGE_paged
      paged::describe(),
#endif
#ifdef ATTN_STAGE_sparse
      sparse::describe(),
#endif
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
