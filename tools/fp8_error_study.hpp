// attn fp8-error: FA3's Table 3 (RMSE against fp64 of fp16 / bf16 and FP8 attention) measured on the CPU.
#pragma once

#include <string>
#include <vector>

namespace attn::tools {

/// Runs the study with the command's flags (after "fp8-error") and prints one row per method; 0 on success.
/// Throws std::invalid_argument for a bad flag.
int fp8_error_study(const std::vector<std::string>& args);

}  // namespace attn::tools
