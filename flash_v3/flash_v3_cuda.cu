// flash_v3, GPU tier (placeholder while the kernels are written).
#include <stdexcept>

#include "common/validate.hpp"
#include "flash_v3/flash_v3.hpp"

namespace attn::flash_v3 {

TierCaps gpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::bf16, DType::f16};
  caps.head_dims = {64, 128, 256};
  caps.has_backward = false;
  caps.pointer_alignment = 16;
  caps.stride_multiple = 8;
  return caps;
}

std::string gpu_build_target() { return "sm_90a"; }

void forward_gpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions&) {
  validate_call(p, t, gpu_caps(), "flash_v3/gpu", false);
  throw std::runtime_error("flash_v3/gpu: not implemented yet");
}

TierEntry gpu_tier() {
  TierEntry gpu;
  gpu.tier = Tier::gpu;
  gpu.caps = gpu_caps();
  gpu.forward = forward_gpu;
  gpu.extra_bytes = [](const AttentionProblem&, DType, bool) { return std::size_t{0}; };
  return gpu;
}

}  // namespace attn::flash_v3
