// attn: the command-line entry point to the ladder.
//   attn list                      the stages in ladder order and the tiers built
//   attn run --stage S [...]       one stage on one problem: time, TFLOP/s, extra memory, errors
//   attn ladder [--tier ...]       every stage on one default problem, one row each (the main job)
// Small defaults for `run`, so that `gdb --args build/bin/attn run --stage naive` stops in a readable problem.
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "common/harness.hpp"
#include "common/numeric.hpp"
#include "common/progress.hpp"
#include "common/registry.hpp"
#include "tests/oracle.hpp"
#ifdef ATTN_HAVE_CUDA
#include "common/cuda_utils.hpp"
#endif
#ifdef ATTN_STAGE_flash_v3
#include "tools/fp8_error_study.hpp"
#define FP8_ERROR_NAME ", fp8-error"
#else
#define FP8_ERROR_NAME ""
#endif
#ifdef ATTN_STAGE_sparse
#include "sparse/sparse.hpp"
#endif
#ifdef ATTN_STAGE_paged
#include "paged/paged.hpp"
#define PAGED_SIM_NAME ", paged-sim"
#else
#define PAGED_SIM_NAME ""
#endif

namespace {

using namespace attn;

struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

const char* kUsage =
    "usage: attn list\n"
    "       attn run --stage NAME [--tier cpu|gpu] [problem] [--backward] [--json] [--repeats N] [--seed N]\n"
    "                [--layout bhnd|bnhd] [--opt NAME=VALUE]... [--sram-bytes N] [--io] [--progress]\n"
    "       attn ladder [--tier cpu|gpu|all] [problem] [--backward] [--json] [--repeats N] [--progress]\n"
    "       attn paged-sim [--help]   (with the paged stage: the KV-cache serving simulation)\n"
    "       attn fp8-error [--help]   (with flash_v3: FA3 Table 3, RMSE of fp16/bf16/FP8 attention vs fp64)\n"
    "       attn run --help, attn ladder --help: each command's flags\n"
    "problem: --batch N --heads N --kv-heads N --seq-q N --seq-k N (or --seq N) --head-dim N --causal\n"
    "         --scale X --dtype f32|bf16|f16 --q-std X (scale of Q's entries; large values give large logits)\n";

const char* kProblemFlags =
    "  --batch N          batch size B (default 1)\n"
    "  --heads N          query heads Hq\n"
    "  --kv-heads N       K/V heads Hkv (default: Hq; Hq must be a multiple)\n"
    "  --seq N            Nq = Nk = N; --seq-q N and --seq-k N set each\n"
    "  --head-dim N       D\n"
    "  --causal           causal mask, aligned to the bottom-right corner\n"
    "  --scale X          softmax scale (default 1/sqrt(D); finite in fp32)\n"
    "  --dtype T          f32, bf16 or f16: the GPU tier's dtype; inputs are rounded to it for both tiers\n";

const char* kRunUsage =
    "usage: attn run --stage NAME [flags]   one stage on one problem: time, TFLOP/s, extra memory, errors\n"
    "  --stage NAME       a stage of `attn list`\n"
    "  --tier cpu|gpu     default cpu\n"
    "%s"
    "  --q-std X          standard deviation of Q's entries (default 1; large values give large logits)\n"
    "  --layout L         bhnd (default) or bnhd\n"
    "  --backward         also run and time the backward pass\n"
    "  --repeats N        timed runs, the median is reported (default 3, at most 1000000)\n"
    "  --seed N           seed of the random inputs (default 1)\n"
    "  --opt NAME=VALUE   a stage option (repeatable); each stage refuses names it does not read\n"
    "  --sram-bytes N     flash_v1/cpu's on-chip memory M (the option sram_bytes)\n"
    "  --io               flash_v1/cpu: count the bytes moved (the option count_io)\n"
    "  --json             one JSON object instead of the table\n"
    "  --progress         progress lines on stderr even with --json (they are on by default otherwise)\n"
    "The error columns compare with the previous stage of the ladder and the fp64 oracle; a comparison that\n"
    "cannot be made (the previous stage refuses the problem, or memory is short) is shown as '-' with a note.\n"
    "The speedup is the previous stage's median forward time over this one's, both timed alike (--repeats).\n"
    "sparse: --opt mode=0|1 (QK-sparse, hash-sparse), drop_q_permille=N, drop_k_permille=N, buckets=N, seed=N;\n"
    "its fp64 error is against the oracle under the same mask, its 'err prev' is sparse with nothing dropped\n"
    "against flash_v2, and its speedup is against dense flash_v2.\n";

const char* kLadderUsage =
    "usage: attn ladder [flags]   every stage on one default problem (or the one given), one row each\n"
    "  --tier cpu|gpu|all default all (gpu only when a CUDA device is present)\n"
    "%s"
    "  --backward         also run the backward passes\n"
    "  --repeats N        timed runs per stage, the median is reported (default 3)\n"
    "  --json             one JSON object per row\n"
    "  --progress         progress lines on stderr even with --json\n";

// Command-line flags, parsed once; every value is checked when it is read.
struct Flags {
  std::vector<std::string> args;
  std::vector<bool> used;

  explicit Flags(std::vector<std::string> list) : args(std::move(list)), used(args.size(), false) {}

  std::optional<std::string> value(const std::string& name) {
    std::vector<std::string> found = values(name);
    if (found.size() > 1) throw UsageError(name + ": given " + std::to_string(found.size()) + " times (once at most)");
    if (found.empty()) return std::nullopt;
    return found.front();
  }
  std::vector<std::string> values(const std::string& name) {
    std::vector<std::string> found;
    for (std::size_t i = 0; i < args.size(); ++i) {
      if (args[i] != name) continue;
      if (i + 1 >= args.size()) throw UsageError(name + ": needs a value");
      used[i] = used[i + 1] = true;
      found.push_back(args[i + 1]);
    }
    return found;
  }
  bool flag(const std::string& name) {
    bool seen = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
      if (args[i] != name) continue;
      if (seen) throw UsageError(name + ": given twice (once at most)");
      seen = used[i] = true;
    }
    return seen;
  }
  /// An integer in [minimum, maximum].
  std::int64_t integer(const std::string& name, std::int64_t fallback, std::int64_t minimum, std::int64_t maximum) {
    const std::int64_t parsed = integer(name, fallback);
    if (parsed < minimum || parsed > maximum)
      throw UsageError(name + ": " + std::to_string(parsed) + " is outside [" + std::to_string(minimum) + ", " +
                       std::to_string(maximum) + "]");
    return parsed;
  }
  std::int64_t integer(const std::string& name, std::int64_t fallback) {
    auto text = value(name);
    if (!text) return fallback;
    std::size_t end = 0;
    long long parsed = 0;
    try {
      parsed = std::stoll(*text, &end);
    } catch (const std::out_of_range&) {
      throw UsageError(name + ": '" + *text + "' is outside the 64-bit integer range");
    } catch (const std::exception&) {
      end = 0;
    }
    if (end == 0 || end != text->size()) throw UsageError(name + ": '" + *text + "' is not an integer");
    return parsed;
  }
  double real(const std::string& name, double fallback) {
    auto text = value(name);
    if (!text) return fallback;
    std::size_t end = 0;
    double parsed = 0;
    try {
      parsed = std::stod(*text, &end);
    } catch (const std::exception&) {
      end = 0;
    }
    if (end == 0 || end != text->size()) throw UsageError(name + ": '" + *text + "' is not a number");
    return parsed;
  }
  /// A real number that is finite, > 0 and representable in fp32 (for values the stages use as floats).
  double positive_float(const std::string& name, double fallback) {
    const double parsed = real(name, fallback);
    if (!std::isfinite(parsed) || parsed <= 0.0 || parsed > std::numeric_limits<float>::max())
      throw UsageError(name + ": " + *value(name) + " must be finite, > 0 and at most 3.4e38 (fp32)");
    return parsed;
  }
  void reject_unknown() const {
    for (std::size_t i = 0; i < args.size(); ++i)
      if (!used[i]) throw UsageError("unknown or misplaced argument '" + args[i] + "'");
  }
  bool help() const { return std::find(args.begin(), args.end(), "--help") != args.end() ||
                             std::find(args.begin(), args.end(), "-h") != args.end(); }
};

AttentionProblem read_problem(Flags& flags, AttentionProblem p) {
  p.batch = flags.integer("--batch", p.batch);
  p.q_heads = flags.integer("--heads", p.q_heads);
  p.kv_heads = flags.integer("--kv-heads", p.q_heads);
  const std::int64_t seq = flags.integer("--seq", p.seq_k);
  p.seq_q = flags.integer("--seq-q", flags.args.end() != std::find(flags.args.begin(), flags.args.end(), "--seq") ? seq : p.seq_q);
  p.seq_k = flags.integer("--seq-k", seq);
  p.head_dim = flags.integer("--head-dim", p.head_dim);
  p.scale = flags.real("--scale", p.scale);
  p.causal = flags.flag("--causal") || p.causal;
  validate_problem(p);
  return p;
}

StageOptions read_options(Flags& flags) {
  StageOptions options;
  for (const std::string& pair : flags.values("--opt")) {
    const auto eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) throw UsageError("--opt: '" + pair + "' is not NAME=VALUE");
    Flags one({"--opt", pair.substr(eq + 1)});
    options.values[pair.substr(0, eq)] = one.integer("--opt", 0);
  }
  if (auto sram = flags.value("--sram-bytes")) {
    Flags one({"--sram-bytes", *sram});
    options.values["sram_bytes"] = one.integer("--sram-bytes", 0);
  }
  if (flags.flag("--io")) options.values["count_io"] = 1;
  return options;
}

// null: not computed (no previous stage, no oracle, a comparison not made). A computed value that is not
// finite (an error against NaN outputs) is the string "NaN", "Infinity" or "-Infinity", as JSON has no such
// numbers: a reader can tell "not computed" from "computed and not finite".
std::string json_number(std::optional<double> value) {
  if (!value) return "null";
  if (std::isnan(*value)) return "\"NaN\"";
  if (std::isinf(*value)) return *value > 0 ? "\"Infinity\"" : "\"-Infinity\"";
  std::ostringstream out;
  out.precision(6);
  out << *value;
  return out.str();
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// One row of `run` or `ladder`: a stage's figures and its errors against the previous stage and the oracle.
struct Row {
  std::string stage, tier, dtype, problem, note;
  std::optional<double> time_ms, tflops, extra_bytes, speedup_prev, rel_err_prev, rel_err_oracle;
  std::optional<double> bwd_ms, bwd_tflops, bwd_extra_bytes, bwd_rel_err_prev, bwd_rel_err_oracle;
  std::map<std::string, double> counters;
  std::optional<double> nonfinite_values;                       ///< NaN or inf in the outputs (StageRun::nonfinite_values)
  std::optional<double> host_estimate_bytes, host_peak_bytes;  ///< `run` only: planned and measured host memory
};

void add_note(Row& row, const std::string& note) { row.note += (row.note.empty() ? "" : "; ") + note; }

void print_json(const Row& r) {
  std::cout << "{\"stage\":" << json_string(r.stage) << ",\"tier\":" << json_string(r.tier)
            << ",\"dtype\":" << json_string(r.dtype) << ",\"problem\":" << json_string(r.problem)
            << ",\"time_ms\":" << json_number(r.time_ms) << ",\"tflops\":" << json_number(r.tflops)
            << ",\"extra_bytes\":" << json_number(r.extra_bytes) << ",\"speedup_prev\":" << json_number(r.speedup_prev)
            << ",\"rel_err_prev\":" << json_number(r.rel_err_prev) << ",\"rel_err_oracle\":" << json_number(r.rel_err_oracle)
            << ",\"bwd_time_ms\":" << json_number(r.bwd_ms) << ",\"bwd_tflops\":" << json_number(r.bwd_tflops)
            << ",\"bwd_extra_bytes\":" << json_number(r.bwd_extra_bytes)
            << ",\"bwd_rel_err_prev\":" << json_number(r.bwd_rel_err_prev)
            << ",\"bwd_rel_err_oracle\":" << json_number(r.bwd_rel_err_oracle)
            << ",\"nonfinite_values\":" << json_number(r.nonfinite_values);
  if (r.host_estimate_bytes)
    std::cout << ",\"host_estimate_bytes\":" << json_number(r.host_estimate_bytes)
              << ",\"host_peak_bytes\":" << json_number(r.host_peak_bytes);
  for (const auto& [name, value] : r.counters) std::cout << "," << json_string(name) << ":" << json_number(value);
  std::cout << ",\"note\":" << (r.note.empty() ? "null" : json_string(r.note)) << "}\n";
}

std::string cell(std::optional<double> value, const char* format) {
  if (!value) return "-";
  char text[48];
  std::snprintf(text, sizeof text, format, *value);
  return text;
}

void print_table_header(bool backward) {
  std::printf("%-17s %-4s %-5s %10s %9s %10s %8s %10s %10s", "stage", "tier", "dtype", "fwd ms", "TFLOP/s", "extra mem",
              "speedup", "err prev", "err fp64");
  if (backward) std::printf(" %10s %9s %10s %10s", "bwd ms", "TFLOP/s", "bwd extra", "bwd err");
  std::printf("\n");
}

void print_table_row(const Row& r, bool backward) {
  std::printf("%-17s %-4s %-5s %10s %9s %10s %8s %10s %10s", r.stage.c_str(), r.tier.c_str(), r.dtype.c_str(),
              cell(r.time_ms, "%.3f").c_str(), cell(r.tflops, "%.3f").c_str(),
              r.extra_bytes ? format_bytes(*r.extra_bytes).c_str() : "-", cell(r.speedup_prev, "%.2fx").c_str(),
              cell(r.rel_err_prev, "%.2e").c_str(), cell(r.rel_err_oracle, "%.2e").c_str());
  if (backward)
    std::printf(" %10s %9s %10s %10s", cell(r.bwd_ms, "%.3f").c_str(), cell(r.bwd_tflops, "%.3f").c_str(),
                r.bwd_extra_bytes ? format_bytes(*r.bwd_extra_bytes).c_str() : "-",
                cell(r.bwd_rel_err_prev, "%.2e").c_str());
  if (!r.note.empty()) std::printf("  (%s)", r.note.c_str());
  std::printf("\n");
  for (const auto& [name, value] : r.counters) {
    // A backward counter equal to the forward's (a block count both passes use, say) is not repeated.
    const std::string_view prefix = "backward_";
    if (name.starts_with(prefix)) {
      const auto forward = r.counters.find(name.substr(prefix.size()));
      if (forward != r.counters.end() && forward->second == value) continue;
    }
    std::printf("    %s = %.6g\n", name.c_str(), value);
  }
}

// The backward's errors: with the oracle, oracle::worst_gradient_error, the error of each gradient against the
// size of the terms it sums (meaningful when large logits make the exact dQ and dK cancel to near zero);
// without it (a problem too large for the oracle), the worst relative Frobenius error of dQ, dK, dV.
double worst_relative(const StageRun& run, const StageRun& reference) {
  return std::max({compare(run.dq.span(), reference.dq.span()).rel_frobenius,
                   compare(run.dk.span(), reference.dk.span()).rel_frobenius,
                   compare(run.dv.span(), reference.dv.span()).rel_frobenius});
}

// Runs one stage; fills its row, comparing with the previous stage's outputs (when given) and the oracle.
Row run_row(const Stage& stage, Tier tier, const ProblemData& data, const RunSettings& settings, const StageRun* previous,
            const std::optional<oracle::Result>& exact, StageRun* keep) {
  Row row;
  row.stage = stage.name;
  row.tier = tier_name(tier);
  row.dtype = dtype_name(tier == Tier::cpu ? DType::f32 : data.dtype);
  row.problem = data.problem.describe();
  RunSettings own = settings;
  if (settings.backward && !stage.find(tier)->caps.has_backward) {  // e.g. a decode kernel: forward only
    own.backward = false;
    const std::string& why = stage.find(tier)->no_backward_note;
    row.note = why.empty() ? "no backward pass" : why;
  }
  StageRun run = run_stage(stage, tier, data, own);
  row.time_ms = run.forward_ms;
  row.tflops = data.problem.forward_flops() / (run.forward_ms * 1e-3) / 1e12;
  row.extra_bytes = static_cast<double>(run.forward_extra_bytes);
  row.counters = run.counters;
  if (previous != nullptr) {
    row.speedup_prev = previous->forward_ms / run.forward_ms;
    row.rel_err_prev = compare(run.o.span(), previous->o.span()).rel_frobenius;
  }
  if (exact) row.rel_err_oracle = compare(run.o.span(), std::span<const double>(exact->o)).rel_frobenius;
  if (own.backward) {
    row.bwd_ms = run.backward_ms;
    row.bwd_tflops = data.problem.backward_flops() / (run.backward_ms * 1e-3) / 1e12;
    row.bwd_extra_bytes = static_cast<double>(run.backward_extra_bytes);
    if (previous != nullptr && previous->dq.size() > 0)
      row.bwd_rel_err_prev = exact ? oracle::worst_gradient_error(run, *previous, *exact) : worst_relative(run, *previous);
    if (exact) row.bwd_rel_err_oracle = oracle::worst_gradient_error(run, *exact);
  }
  row.nonfinite_values = static_cast<double>(run.nonfinite_values());
  if (*row.nonfinite_values > 0)
    add_note(row, std::to_string(static_cast<long long>(*row.nonfinite_values)) + " output values are NaN or infinite");
  if (keep != nullptr) *keep = std::move(run);
  return row;
}

void print_machine(Tier tier) {
  if (tier == Tier::cpu) {
    std::printf("# CPU: %d OpenMP threads\n", omp_get_max_threads());
    return;
  }
#ifdef ATTN_HAVE_CUDA
  std::printf("# GPU: %s\n", cuda::device_description().c_str());
#endif
}

bool gpu_present() {
#ifdef ATTN_HAVE_CUDA
  return cuda::device_available();
#else
  return false;
#endif
}

int command_list() {
  std::printf("%-3s %-17s %-7s %-45s %s\n", "#", "stage", "tiers", "paper", "adds");
  int rung = 1;
  for (const Stage& stage : ladder()) {
    std::string tiers;
    for (const TierEntry& entry : stage.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(tier_name(entry.tier));
    std::printf("%-3d %-17s %-7s %-45s %s\n", rung++, stage.name.c_str(), tiers.c_str(), stage.paper.c_str(),
                stage.adds.c_str());
  }
  for (const Stage& stage : ladder())
    for (const TierEntry& entry : stage.tiers)
      if (!entry.target.empty()) std::printf("# %s/%s built for: %s\n", stage.name.c_str(), tier_name(entry.tier), entry.target.c_str());
  std::printf("# GPU tier %s\n", gpu_present() ? "built, device present" :
#ifdef ATTN_HAVE_CUDA
                                                "built, no device on this machine"
#else
                                                "not built (no CUDA toolkit at configure time)"
#endif
  );
  return 0;
}

// Bytes the process has had resident at most so far (Linux reports ru_maxrss in KB).
double peak_resident_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return 1024.0 * static_cast<double>(usage.ru_maxrss);
}

// Reads the run/ladder settings shared by both commands: --backward, --repeats (1 to 10^6), the progress switch.
RunSettings read_settings(Flags& flags) {
  RunSettings settings;
  settings.backward = flags.flag("--backward");
  settings.repeats = static_cast<int>(flags.integer("--repeats", 3, 1, 1000000));
  return settings;
}

// Progress lines go to stderr for work longer than a few seconds; --json silences them unless --progress.
std::unique_ptr<progress::Reporter> progress_reporter(bool json, bool asked) {
  return !json || asked ? std::make_unique<progress::Reporter>() : nullptr;
}

#ifdef ATTN_STAGE_sparse
// sparse attends to fewer pairs than the dense stages before it, so its row is checked in its own terms (and
// the row's note says so): "err fp64" against the fp64 oracle under the same mask (sparse::ReferenceMask, from
// the mask rules alone), "err prev" against dense flash_v2 with sparse run again in its degenerate setting
// (mode 0, nothing dropped, the same blocks), where it must equal dense attention within rounding, and the
// speedup against dense flash_v2 (what the sparsity buys).
bool is_sparse(const Stage& stage) { return stage.name == "sparse"; }

// The dense stage sparse is measured against: flash_v2, when this build has it.
const Stage* dense_reference(Tier tier) {
  for (const Stage& stage : ladder())
    if (stage.name == "flash_v2" && stage.find(tier) != nullptr) return &stage;
  return nullptr;
}

oracle::Result sparse_oracle(const ProblemData& data, const StageOptions& options, bool backward) {
  const sparse::ReferenceMask mask(data.problem, data.q.data(), data.q_strides(), data.k.data(), data.kv_strides(),
                                   sparse::read_settings(options));
  return oracle::attention(data, backward,
                           [&mask](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) { return mask(b, h, i, j); });
}

// The sparse row's error columns and speedup against flash_v2's run on the same data (see above).
void sparse_against_dense(Row& row, const Stage& stage, Tier tier, const ProblemData& data, const RunSettings& settings,
                          const StageRun& flash_v2, double sparse_forward_ms) {
  RunSettings degenerate = settings;
  degenerate.repeats = 1;
  degenerate.warmup = 0;
  degenerate.options = StageOptions{};
  for (const char* name : {"block_rows", "block_cols"})
    if (settings.options.values.count(name)) degenerate.options.values[name] = settings.options.values.at(name);
  degenerate.options.values["mode"] = 0;
  const StageRun dense = run_stage(stage, tier, data, degenerate);
  row.speedup_prev = flash_v2.forward_ms / sparse_forward_ms;
  // TFLOP/s of the pairs attended (the dense count times the visible fraction), not of the dense problem.
  if (const auto fraction = row.counters.find("visible_fraction"); fraction != row.counters.end()) {
    if (row.tflops) *row.tflops *= fraction->second;
    if (row.bwd_tflops) *row.bwd_tflops *= fraction->second;
  }
  row.rel_err_prev = compare(dense.o.span(), flash_v2.o.span()).rel_frobenius;
  if (settings.backward && flash_v2.dq.size() > 0) row.bwd_rel_err_prev = worst_relative(dense, flash_v2);
  add_note(row, "err fp64: against the oracle under the same mask; err prev: sparse with nothing dropped against "
                "flash_v2; speedup: against dense flash_v2; TFLOP/s: of the pairs attended");
}
#endif

int command_run(Flags& flags) {
  if (flags.help()) {
    std::printf(kRunUsage, kProblemFlags);
    return 0;
  }
  const std::string name = flags.value("--stage").value_or("");
  if (name.empty()) throw UsageError("--stage: required (see `attn list`)");
  const Stage& stage = find_stage(name);
  const Tier tier = parse_tier(flags.value("--tier").value_or("cpu"));
  AttentionProblem defaults;
  defaults.batch = 1;
  defaults.q_heads = 2;
  defaults.seq_q = defaults.seq_k = 256;
  defaults.head_dim = 64;
  const TierEntry* entry = stage.find(tier);
  if (entry != nullptr && entry->caps.max_seq_q > 0) defaults.seq_q = entry->caps.max_seq_q;  // a decode stage
  const AttentionProblem problem = read_problem(flags, defaults);
  const DType dtype = parse_dtype(flags.value("--dtype").value_or(tier == Tier::cpu ? "f32" : "bf16"));
  const Layout layout = parse_layout(flags.value("--layout").value_or("bhnd"));
  const auto seed = static_cast<std::uint64_t>(flags.integer("--seed", 1, 0, std::numeric_limits<std::int64_t>::max()));
  const float q_std = static_cast<float>(flags.positive_float("--q-std", 1.0));
  RunSettings settings = read_settings(flags);
  settings.options = read_options(flags);
  const bool json = flags.flag("--json");
  const bool show_progress = flags.flag("--progress");
  flags.reject_unknown();

  // Everything the stage asked for can refuse is checked before any input is made, in its own name.
  check_can_run(stage, tier, problem, dtype, settings.backward, settings.options);
  entry = stage.find(tier);
  const auto reporter = progress_reporter(json, show_progress);

  // The host memory of the whole run: inputs, the stage's outputs and scratch, then (when they fit too) the
  // fp64 oracle and the previous stage's run, whose outputs stay alive for the error column.
  const double available = 0.9 * static_cast<double>(available_bytes(Tier::cpu));
  const double inputs = static_cast<double>(problem_data_bytes(problem));
  const double own = static_cast<double>(run_host_bytes(*entry, problem, dtype, settings.backward, settings.options));
  double planned = inputs + own;
  if (planned > available)
    throw ProblemTooLarge(stage.name + "/" + tier_name(tier) + ": " + problem.describe() + " needs " +
                          format_bytes(planned) + " of host memory (inputs " + format_bytes(inputs) +
                          ", the stage's outputs and scratch " + format_bytes(own) + "); " + format_bytes(available / 0.9) +
                          " available");
  std::vector<std::string> notes;
  const bool want_oracle = oracle::affordable(problem);
  const double oracle_bytes = static_cast<double>(oracle::result_bytes(problem, settings.backward));
  const bool run_oracle = want_oracle && planned + oracle_bytes <= available;
  if (run_oracle) planned += oracle_bytes;
  if (want_oracle && !run_oracle) notes.push_back("fp64 comparison not made: the oracle's " + format_bytes(oracle_bytes) + " do not fit");
  // The previous stage (same tier) on the same inputs, for the error column: only when it can run this problem.
  const Stage* previous = previous_stage(stage.name, tier);
#ifdef ATTN_STAGE_sparse
  if (is_sparse(stage)) previous = dense_reference(tier);  // the dense stage it is measured against
#endif
  std::string previous_refusal;
  if (previous != nullptr) {
    try {
      check_can_run(*previous, tier, problem, dtype, settings.backward);
      // It runs first: its outputs stay for the comparison, its scratch is freed before this stage allocates.
      const TierEntry& previous_entry = *previous->find(tier);
      const double previous_run_bytes = static_cast<double>(run_host_bytes(previous_entry, problem, dtype, settings.backward));
      const double previous_scratch = tier == Tier::cpu && previous_entry.extra_bytes
                                          ? static_cast<double>(previous_entry.extra_bytes(problem, DType::f32, settings.backward))
                                          : 0.0;
      const double kept = previous_run_bytes - previous_scratch;
      const double more = kept + std::max(0.0, previous_scratch - own);
      if (planned + more > available)
        throw ProblemTooLarge("its run (" + format_bytes(previous_run_bytes) + ") does not fit next to this one's");
      planned += more;
    } catch (const std::exception& e) {
      previous_refusal = e.what();
    }
  }

  const ProblemData data = make_problem_data(problem, dtype, layout, seed, q_std);
  std::optional<oracle::Result> exact;
  if (run_oracle) {
#ifdef ATTN_STAGE_sparse
    if (is_sparse(stage))
      exact = sparse_oracle(data, settings.options, settings.backward);
    else
#endif
      exact = oracle::attention(data, settings.backward);
  }
  StageRun previous_run;
  bool have_previous = false;
  if (previous != nullptr && previous_refusal.empty()) {
    try {
      // Timed as this stage is (its warm-up runs, then the median of as many timed runs): the speedup column
      // divides its forward time by this stage's. (A single cold run counted the first launch's one-time costs:
      // sparse's speedup at 90% dropped, N = 32768, read 81x instead of 43x.)
      RunSettings timed_alike = settings;
      timed_alike.options = StageOptions{};
      previous_run = run_stage(*previous, tier, data, timed_alike);
      have_previous = true;
    } catch (const std::exception& e) {  // it refused after all (e.g. less memory free now): no comparison
      previous_refusal = e.what();
    }
  }
  if (previous != nullptr && !have_previous)
    notes.push_back("comparison with " + previous->name + " not made: " + previous_refusal);
  Row row;
#ifdef ATTN_STAGE_sparse
  if (is_sparse(stage)) {
    row = run_row(stage, tier, data, settings, nullptr, exact, nullptr);
    if (have_previous) sparse_against_dense(row, stage, tier, data, settings, previous_run, *row.time_ms);
  } else
#endif
    row = run_row(stage, tier, data, settings, have_previous ? &previous_run : nullptr, exact, nullptr);
  for (const std::string& note : notes) add_note(row, note);
  row.host_estimate_bytes = planned;
  row.host_peak_bytes = peak_resident_bytes();
  if (row.nonfinite_values && *row.nonfinite_values > 0)
    std::fprintf(stderr, "attn: warning: %s/%s: %.0f output values are NaN or infinite (non-finite inputs, or logits or "
                 "outputs beyond fp32's range, propagate as in PyTorch)\n", stage.name.c_str(), tier_name(tier),
                 *row.nonfinite_values);
  if (json) {
    print_json(row);
  } else {
    print_machine(tier);
    std::printf("# %s, %s layout%s\n", problem.describe().c_str(), layout_name(layout),
                previous ? (", errors against " + previous->name + (have_previous ? "" : " (not made)")).c_str() : "");
    std::printf("# host memory: %s planned, %s peak resident\n", format_bytes(planned).c_str(),
                format_bytes(*row.host_peak_bytes).c_str());
    print_table_header(settings.backward);
    print_table_row(row, settings.backward);
  }
  return 0;
}

int command_ladder(Flags& flags) {
  if (flags.help()) {
    std::printf(kLadderUsage, kProblemFlags);
    return 0;
  }
  const std::string tier_text = flags.value("--tier").value_or("all");
  std::vector<Tier> tiers;
  if (tier_text == "all") {
    tiers.push_back(Tier::cpu);
    if (gpu_present()) tiers.push_back(Tier::gpu);
  } else {
    tiers.push_back(parse_tier(tier_text));
  }
  if (std::find(tiers.begin(), tiers.end(), Tier::gpu) != tiers.end() && !gpu_present())
#ifdef ATTN_HAVE_CUDA
    throw UsageError("tier: gpu needs a CUDA device: no CUDA device on this machine");
#else
    throw UsageError("tier: gpu needs a CUDA device: no CUDA device in this build (the CUDA toolkit was not found at "
                     "configure time, so the GPU tier was not built)");
#endif
  // The default problems: big enough to fill each machine, small enough that naive still fits.
  AttentionProblem cpu_problem;
  cpu_problem.batch = 1;
  cpu_problem.q_heads = cpu_problem.kv_heads = 8;
  cpu_problem.seq_q = cpu_problem.seq_k = 2048;
  cpu_problem.head_dim = 64;
  AttentionProblem gpu_problem;
  gpu_problem.batch = 4;
  gpu_problem.q_heads = gpu_problem.kv_heads = 16;
  gpu_problem.seq_q = gpu_problem.seq_k = 4096;
  gpu_problem.head_dim = 128;
  const bool custom = std::any_of(flags.args.begin(), flags.args.end(), [](const std::string& a) {
    return a == "--batch" || a == "--heads" || a == "--kv-heads" || a == "--seq" || a == "--seq-q" || a == "--seq-k" ||
           a == "--head-dim" || a == "--causal" || a == "--scale";
  });
  std::optional<AttentionProblem> chosen;
  if (custom) chosen = read_problem(flags, cpu_problem);
  const std::optional<std::string> dtype_text = flags.value("--dtype");
  const DType gpu_dtype = parse_dtype(dtype_text.value_or("bf16"));
  if (dtype_text && gpu_dtype != DType::f32 && tiers == std::vector<Tier>{Tier::cpu})
    throw UsageError("--dtype: " + *dtype_text + " applies to the GPU tier; the CPU tier's ladder runs in f32 "
                     "(`attn run --tier cpu --dtype " + *dtype_text + "` rounds one stage's inputs to it)");
  const RunSettings settings = read_settings(flags);
  const bool json = flags.flag("--json");
  const bool show_progress = flags.flag("--progress");
  flags.reject_unknown();
  const auto reporter = progress_reporter(json, show_progress);

  for (Tier tier : tiers) {
    const AttentionProblem problem = chosen ? *chosen : (tier == Tier::cpu ? cpu_problem : gpu_problem);
    const DType dtype = tier == Tier::cpu ? DType::f32 : gpu_dtype;
    const ProblemData data = make_problem_data(problem, dtype);
    std::optional<oracle::Result> exact;
    if (oracle::affordable(problem)) exact = oracle::attention(data, settings.backward);
    if (!json) {
      print_machine(tier);
      std::printf("# %s tier ladder: %s, %s, %d timed runs (median)\n", tier_name(tier), problem.describe().c_str(),
                  dtype_name(dtype), settings.repeats);
      print_table_header(settings.backward);
    }
    StageRun previous;
    bool have_previous = false;
    const Stage* previous_stage_run = nullptr;
    for (const Stage& stage : ladder()) {
      const TierEntry* entry = stage.find(tier);
      if (entry == nullptr) continue;
      Row row;
      StageRun run;
      RunSettings stage_settings = settings;
      stage_settings.options.values = entry->ladder_options;  // block sizes pinned so that Tc >= 4 (printed as Tc)
      try {
        if (entry->caps.max_seq_q > 0 && problem.seq_q > entry->caps.max_seq_q) {
          // A decode stage (one query token per sequence): same batch, heads and context, seq_q = 1, compared
          // with the previous stage run on that decode problem.
          AttentionProblem decode = problem;
          decode.seq_q = entry->caps.max_seq_q;
          decode.batch = std::max<std::int64_t>(problem.batch, 16);
          const ProblemData decode_data = make_problem_data(decode, dtype);
          std::optional<StageRun> reference;
          if (previous_stage_run != nullptr) {
            RunSettings once;
            reference = run_stage(*previous_stage_run, tier, decode_data, once);
          }
          std::optional<oracle::Result> decode_exact;
          if (oracle::affordable(decode)) decode_exact = oracle::attention(decode_data, false);
          RunSettings forward_only = stage_settings;
          forward_only.backward = false;
          row = run_row(stage, tier, decode_data, forward_only, reference ? &*reference : nullptr, decode_exact, nullptr);
          // The row times the decode alone (the stage's decode_ms); block management and the cache write are the
          // rest of the pass, reported apart as setup_ms.
          if (const auto decode_ms = row.counters.find("decode_ms"); decode_ms != row.counters.end() && row.time_ms) {
            row.counters["setup_ms"] = *row.time_ms - decode_ms->second;
            row.time_ms = decode_ms->second;
            row.tflops = decode.forward_flops() / (decode_ms->second * 1e-3) / 1e12;
            if (reference) row.speedup_prev = reference->forward_ms / decode_ms->second;
          }
          row.note = "decode problem: " + decode.describe() + (reference ? ", errors against " + previous_stage_run->name : "");
        }
#ifdef ATTN_STAGE_sparse
        else if (is_sparse(stage)) {
          // Its own oracle (the same mask) and flash_v2 run again here, timed as the ladder times every row.
          std::optional<oracle::Result> masked;
          if (oracle::affordable(problem)) masked = sparse_oracle(data, stage_settings.options, settings.backward);
          // The GPU tier's backward takes its forward's plan (each timed run is a forward, then its backward, on
          // this thread), as a training step would, instead of planning again; the CPU tier has no such option.
          if (tier == Tier::gpu && settings.backward) stage_settings.options.values["keep_plan"] = 1;
          row = run_row(stage, tier, data, stage_settings, nullptr, masked, nullptr);
          if (const Stage* flash_v2 = dense_reference(tier)) {
            RunSettings dense = settings;
            dense.options.values = flash_v2->find(tier)->ladder_options;
            const StageRun flash_v2_run = run_stage(*flash_v2, tier, data, dense);
            sparse_against_dense(row, stage, tier, data, stage_settings, flash_v2_run, *row.time_ms);
          }
          std::string sparsity;
          for (const auto& [name, value] : stage_settings.options.values) sparsity += " " + name + "=" + std::to_string(value);
          add_note(row, "ladder sparsity:" + sparsity);
        }
#endif
        else {
          row = run_row(stage, tier, data, stage_settings, have_previous ? &previous : nullptr, exact, &run);
          previous = std::move(run);
          have_previous = true;
          previous_stage_run = &stage;
        }
      } catch (const std::exception& e) {  // too large, or a head dim this stage does not support: say so, go on
        row.stage = stage.name;
        row.tier = tier_name(tier);
        row.dtype = dtype_name(dtype);
        row.problem = problem.describe();
        row.note = std::string("skipped: ") + e.what();
      }
      if (json)
        print_json(row);
      else
        print_table_row(row, settings.backward);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  Flags flags(std::vector<std::string>(args.begin() + 1, args.end()));
  try {
    if (command == "list" && flags.help()) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (command == "list") {
      flags.reject_unknown();
      return command_list();
    }
    if (command == "run") return command_run(flags);
    if (command == "ladder") return command_ladder(flags);
#ifdef ATTN_STAGE_flash_v3
    if (command == "fp8-error") return tools::fp8_error_study(flags.args);
#endif
#ifdef ATTN_STAGE_paged
    if (command == "paged-sim") return paged::sim_command(flags.args);
#endif
    throw UsageError("unknown command '" + command + "' (list, run, ladder" FP8_ERROR_NAME PAGED_SIM_NAME ")");
  } catch (const ProblemTooLarge& e) {
    std::fprintf(stderr, "attn: problem too large: %s\n", e.what());
    return 2;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "attn: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {  // the up-front checks should have refused first: a bug to report
    std::fprintf(stderr, "attn: error: out of memory: an allocation failed that the memory checks did not foresee\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attn: error: %s\n", e.what());
    return 1;
  }
}
