// flash_v3, CPU tier: FlashAttention-3's producer/consumer pipeline written with threads (to be filled in).
#include <stdexcept>

#include "common/validate.hpp"
#include "flash_v3/flash_v3.hpp"

namespace attn::flash_v3 {

TierCaps cpu_caps() {
  TierCaps caps;
  caps.has_backward = false;
  return caps;
}

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions&) {
  validate_call(p, t, cpu_caps(), "flash_v3/cpu", false);
  throw std::runtime_error("flash_v3/cpu: not implemented yet");
}

Stage describe() {
  Stage stage;
  stage.name = "flash_v3";
  stage.paper = "FlashAttention-3 (Shah et al. 2024)";
  stage.adds = "Hopper: TMA producer, wgmma consumers, pingpong, GEMM-softmax overlap (forward only)";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = forward_cpu;
  cpu.extra_bytes = [](const AttentionProblem&, DType, bool) { return std::size_t{0}; };
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::flash_v3
