// flash_v3 (FlashAttention-3's producer/consumer pipeline), CPU tier: checked against flash_v2's CPU tier and the
// fp64 oracle on the awkward shapes and on problems of several Q tiles and K/V blocks, with P~ rounded to bf16
// (the default, as the GPU's bf16 path) and in fp32; the ring depth and the number of CTAs change the schedule
// but not the result; the trace=1 timeline is a legal schedule; extra memory; the option rules.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <map>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "flash_v3/flash_v3.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::testing;

namespace {

// round_p = 0: fp32 throughout, as flash_v2; observed errors against the oracle 1e-7 to 9e-7 (2e-6 with logits
// near 1e3). 1e-5 still catches any indexing, masking or rescaling mistake (those give errors near 1).
constexpr double kFp32Tolerance = 1e-5;
// Against flash_v2 both sides carry fp32 rounding, summed in a different order (K/V blocks in reverse, exp2 with
// the scale folded into Q instead of exp): twice the oracle tolerance.
constexpr double kFp32VsPrevious = 2 * kFp32Tolerance;
// round_p = 1 (the default): P~ is rounded to bf16 before P V, a relative error of at most 2^-9 per element. The
// errors of O = P~ V / l are of random sign, so its relative Frobenius error is about 2^-9 / sqrt(3) ~ 1.1e-3
// (observed 1.0e-3 to 1.4e-3; 1e-4 with logits near 1e3, where few keys dominate); 2 * 2^-9 = 3.9e-3 leaves room
// and still fails on any real mistake. l_i sums the unrounded P~, so the LSE keeps the fp32 tolerance.
constexpr double kRoundedPTolerance = 2.0 / 512.0;

const Stage& this_stage() { return find_stage("flash_v3"); }

StageOptions options_of(std::initializer_list<std::pair<const char*, std::int64_t>> values) {
  StageOptions options;
  for (const auto& [name, value] : values) options.values[name] = value;
  return options;
}

// Problems of several 128-row Q tiles and 128-key K/V blocks (the awkward shapes are mostly one tile).
std::vector<Shape> multi_tile_shapes() {
  return {
      {"N = 300, not a multiple of 128, causal", problem_of(1, 2, 2, 300, 300, 64, true)},
      {"Nq < Nk, causal", problem_of(1, 2, 2, 200, 457, 128, true)},
      {"Nq > Nk, causal: two Q tiles with no visible K/V block", problem_of(1, 2, 2, 457, 200, 64, true)},
      {"GQA 8:1", problem_of(1, 16, 2, 260, 260, 64, true)},
      {"MQA 4:1", problem_of(2, 4, 1, 190, 333, 64, false)},
      {"head dim 256", problem_of(1, 1, 1, 200, 300, 256, false)},
      {"head dim 128, causal", problem_of(2, 2, 2, 257, 257, 128, true)},
  };
}

void check_against_oracle(const StageRun& run, const ProblemData& data, double o_tolerance) {
  const Errors e = compare_with_oracle(run, oracle::attention(data, false));
  CHECK(e.o.bad_values == 0);
  CHECK(e.lse.bad_values == 0);
  CHECK(e.o.rel_frobenius < o_tolerance);
  CHECK(e.lse.rel_frobenius < kFp32Tolerance);
}

void check_against_previous(const StageRun& run, const StageRun& previous, double o_tolerance) {
  const Errors e = compare_runs(run, previous);
  CHECK(e.o.bad_values == 0);
  CHECK(e.lse.bad_values == 0);
  CHECK(e.o.rel_frobenius < o_tolerance);
  CHECK(e.lse.rel_frobenius < kFp32VsPrevious);
}

// Runs flash_v3 and flash_v2 on every shape in both layouts and checks both against the oracle.
void check_shapes(const std::vector<Shape>& shapes, const StageOptions& options, double o_tolerance, std::uint64_t seed) {
  const Stage* previous = previous_stage("flash_v3", Tier::cpu);
  REQUIRE(previous != nullptr);
  RunSettings settings;
  settings.options = options;
  for (const Shape& shape : shapes)
    for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
      INFO(label(shape) << " layout " << layout_name(layout) << ", previous stage " << previous->name);
      const ProblemData data = make_problem_data(shape.problem, DType::f32, layout, ++seed);
      const StageRun run = run_stage(this_stage(), Tier::cpu, data, settings);
      check_against_oracle(run, data, o_tolerance);
      check_against_previous(run, run_stage(*previous, Tier::cpu, data, RunSettings{}), o_tolerance + kFp32VsPrevious);
    }
}

// A plain find rather than a Catch matcher: the string matchers differ between Catch2 2.13 and 3.x.
void check_mentions(const std::string& message, const std::string& part) {
  INFO("message: " << message);
  CHECK(message.find(part) != std::string::npos);
}

// What the process writes to stderr (file descriptor 2) while it lives: the trace=1 timeline.
class StderrCapture {
 public:
  StderrCapture() : file_(std::tmpfile()), saved_(dup(2)) {
    REQUIRE(file_ != nullptr);
    std::fflush(stderr);
    dup2(fileno(file_), 2);
  }
  ~StderrCapture() { restore(); }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  std::string text() {
    restore();
    std::string text;
    std::rewind(file_);
    for (int c = std::fgetc(file_); c != EOF; c = std::fgetc(file_)) text += static_cast<char>(c);
    return text;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    dup2(saved_, 2);
    close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_;
};

std::string traced_run(const AttentionProblem& p, StageOptions options) {
  options.values["trace"] = 1;
  RunSettings settings;
  settings.warmup = 0;  // one pass, one timeline
  settings.options = options;
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 3);
  StderrCapture capture;
  const StageRun run = run_stage(this_stage(), Tier::cpu, data, settings);
  const std::string text = capture.text();
  check_against_oracle(run, data, kRoundedPTolerance);
  return text;
}

// One line of the timeline: "consumer0 gemm0   S_next = Q K[1]^T (stage 1)   Alg. 2 line 8".
struct Event {
  std::string role, step, line;
  char ring = 0;  // 'K' or 'V' when the line names a stage buffer
  long block = -1, stage = -1;
};

std::vector<Event> parse_trace(const std::string& text) {
  static const std::regex buffer(R"(([KV])\[(\d+)\].*stage (\d+))");
  std::vector<Event> events;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    Event e;
    e.line = line;
    std::istringstream words(line);
    words >> e.role >> e.step;
    std::smatch match;
    if (std::regex_search(line, match, buffer)) {
      e.ring = match[1].str()[0];
      e.block = std::stol(match[2]);
      e.stage = std::stol(match[3]);
    }
    events.push_back(e);
  }
  return events;
}

// The rules of the pipeline, checked on its timeline: a stage is read (gemm) only after the producer filled it
// with that block and before its next fill, and refilled only after both consumers released it; the consumers
// hold the pingpong token in turns, consumer 0 first, and issue S = Q K^T only while holding it; each consumer
// reads K and V in Algorithm 2's order. Returns the number of fills.
int check_schedule(const std::vector<Event>& events, const AttentionProblem& p, std::int64_t Br, std::int64_t Bc) {
  struct StageState {
    long block = -1;
    bool used[2] = {false, false}, released[2] = {false, false};
  };
  std::map<std::pair<char, long>, StageState> stages;
  std::string holder;
  int next_taker = 0, fills = 0;
  std::vector<std::string> reads[2];  // each consumer's gemm lines, "K3" / "V3", in order
  for (const Event& e : events) {
    INFO("line: " << e.line);
    if (e.step == "take") {
      CHECK(e.role == "consumer" + std::to_string(next_taker));
      CHECK(holder.empty());
      holder = e.role;
      next_taker = 1 - next_taker;
    } else if (e.step == "pass") {
      CHECK(holder == e.role);
      holder.clear();
    }
    if (e.ring == 0) continue;
    StageState& stage = stages[{e.ring, e.stage}];
    if (e.role == "producer") {
      CHECK(e.step == "fill");
      const bool free = stage.block < 0 || (stage.released[0] && stage.released[1]);
      CHECK(free);
      stage = StageState{};
      stage.block = e.block;
      ++fills;
      continue;
    }
    const int c = e.role == "consumer0" ? 0 : 1;
    CHECK(stage.block == e.block);
    CHECK_FALSE(stage.released[c]);
    if (e.step == "gemm0" || e.step == "gemm1") {
      if (e.step == "gemm0") CHECK(holder == e.role);
      stage.used[c] = true;
      reads[c].push_back(std::string(1, e.ring) + std::to_string(e.block));
    } else {
      CHECK(e.step == "release");
      CHECK(stage.used[c]);
      stage.released[c] = true;
    }
  }
  for (const auto& [key, stage] : stages) {
    INFO("ring " << key.first << " stage " << key.second);
    CHECK(stage.released[0]);
    CHECK(stage.released[1]);
  }
  // Algorithm 2's order for one Q tile: K_last; then K_j and V_{j+1} for j descending; then V_0.
  std::vector<std::string> expected;
  const std::int64_t Tr = (p.seq_q + Br - 1) / Br;
  for (std::int64_t bh = 0; bh < p.batch * p.q_heads; ++bh)
    for (std::int64_t i = 0; i < Tr; ++i) {
      const std::int64_t last_row = std::min(p.seq_q, (i + 1) * Br) - 1;
      const long Tc = static_cast<long>((p.visible_keys(last_row) + Bc - 1) / Bc);
      for (long j = Tc - 1; j >= 0; --j) {
        expected.push_back("K" + std::to_string(j));
        if (j < Tc - 1) expected.push_back("V" + std::to_string(j + 1));
      }
      if (Tc > 0) expected.push_back("V0");
    }
  CHECK(reads[0] == expected);
  CHECK(reads[1] == expected);
  return fills;
}

}  // namespace

TEST_CASE("flash_v3/cpu matches flash_v2 and the fp64 oracle on awkward shapes, P~ rounded to bf16", "[flash_v3][cpu]") {
  check_shapes(awkward_shapes(), StageOptions{}, kRoundedPTolerance, 1000);
}

TEST_CASE("flash_v3/cpu with round_p = 0 matches flash_v2 to fp32 rounding", "[flash_v3][cpu]") {
  check_shapes(awkward_shapes(), options_of({{"round_p", 0}}), kFp32Tolerance, 1100);
  check_shapes(multi_tile_shapes(), options_of({{"round_p", 0}}), kFp32Tolerance, 1200);
}

TEST_CASE("flash_v3/cpu on several Q tiles and K/V blocks: N % 128 != 0, Nq != Nk, GQA, MQA, D up to 256",
          "[flash_v3][cpu]") {
  check_shapes(multi_tile_shapes(), StageOptions{}, kRoundedPTolerance, 1300);
}

// The shapes of the three cases above against the oracle alone: the course lab's grade, which must not depend
// on another stage (a blank flash_v2 cannot fail it).
TEST_CASE("flash_v3/cpu matches the fp64 oracle on awkward shapes and several tiles, round_p 1 and 0 (oracle only)",
          "[flash_v3][cpu][lab]") {
  std::uint64_t seed = 1400;
  for (int round_p : {1, 0}) {
    RunSettings settings;
    settings.options = options_of({{"round_p", round_p}});
    for (const std::vector<Shape>& shapes : {awkward_shapes(), multi_tile_shapes()})
      for (const Shape& shape : shapes)
        for (Layout layout : {Layout::bhnd, Layout::bnhd}) {
          INFO(label(shape) << " layout " << layout_name(layout) << " round_p " << round_p);
          const ProblemData data = make_problem_data(shape.problem, DType::f32, layout, ++seed);
          check_against_oracle(run_stage(this_stage(), Tier::cpu, data, settings), data,
                               round_p == 1 ? kRoundedPTolerance : kFp32Tolerance);
        }
  }
}

TEST_CASE("flash_v3/cpu: causal rows with no visible key give zero output and -inf LSE", "[flash_v3][cpu]") {
  // Nq = 457 > Nk = 200: rows 0-256 see no key, so the first two 128-row Q tiles visit no K/V block at all and
  // the third has a consumer whose first row sees none. block_rows = 6 also leaves tiles with rows only for some.
  const AttentionProblem p = problem_of(1, 2, 2, 457, 200, 32, true);
  for (std::int64_t Br : {128, 6}) {
    INFO("block_rows " << Br);
    const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 17);
    RunSettings settings;
    settings.options = options_of({{"block_rows", Br}});
    const StageRun run = run_stage(this_stage(), Tier::cpu, data, settings);
    std::int64_t empty_rows = 0;
    for (std::int64_t h = 0; h < p.q_heads; ++h)
      for (std::int64_t i = 0; i < p.seq_q; ++i) {
        if (p.visible_keys(i) > 0) continue;
        ++empty_rows;
        CHECK(run.lse[h * p.seq_q + i] == -std::numeric_limits<float>::infinity());
        for (std::int64_t d = 0; d < p.head_dim; ++d) CHECK(run.o[(h * p.seq_q + i) * p.head_dim + d] == 0.0f);
      }
    CHECK(empty_rows == 2 * 257);
    check_against_oracle(run, data, kRoundedPTolerance);
  }
}

TEST_CASE("flash_v3/cpu: logits near 1e3 do not overflow", "[flash_v3][cpu]") {
  const AttentionProblem p = problem_of(1, 2, 2, 300, 300, 64, true);
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bhnd, 11, 40.0f);  // logits up to ~1e3
  for (std::int64_t round_p : {1, 0}) {
    INFO("round_p " << round_p);
    RunSettings settings;
    settings.options = options_of({{"round_p", round_p}, {"block_cols", 32}});  // the running max moves often
    check_against_oracle(run_stage(this_stage(), Tier::cpu, data, settings), data,
                         round_p ? kRoundedPTolerance : kFp32Tolerance);
  }
}

TEST_CASE("flash_v3/cpu gives the oracle's answer for any block sizes, including one key per block",
          "[flash_v3][cpu][blocks]") {
  const std::pair<std::int64_t, std::int64_t> sizes[] = {{2, 1}, {2, 16}, {7, 5}, {16, 64}, {64, 13}, {1000, 1000}};
  std::uint64_t seed = 1400;
  for (const Shape& shape : awkward_shapes()) {
    if (shape.problem.seq_q * shape.problem.seq_k > 10000) continue;  // keeps Br = 2, Bc = 1 fast under ASan
    for (auto [Br, Bc] : sizes) {
      INFO(label(shape) << " Br " << Br << " Bc " << Bc);
      const ProblemData data = make_problem_data(shape.problem, DType::f32, Layout::bhnd, ++seed);
      RunSettings settings;
      settings.options = options_of({{"block_rows", Br}, {"block_cols", Bc}});
      check_against_oracle(run_stage(this_stage(), Tier::cpu, data, settings), data, kRoundedPTolerance);
    }
  }
}

TEST_CASE("flash_v3/cpu: the ring depth and the number of CTAs change the schedule, not one bit of the result",
          "[flash_v3][cpu][schedule]") {
  // Each Q tile's arithmetic is the same whatever the schedule: only the order of the threads' steps changes.
  const AttentionProblem p = problem_of(2, 4, 2, 300, 270, 64, true);
  const ProblemData data = make_problem_data(p, DType::f32, Layout::bnhd, 21);
  const StageRun reference = run_stage(this_stage(), Tier::cpu, data, RunSettings{});
  for (auto [stages, ctas] : {std::pair<std::int64_t, std::int64_t>{3, 1}, {4, 1}, {2, 2}, {3, 5}, {2, 1000}}) {
    INFO("stages " << stages << " ctas " << ctas);
    RunSettings settings;
    settings.options = options_of({{"stages", stages}, {"ctas", ctas}});
    const StageRun run = run_stage(this_stage(), Tier::cpu, data, settings);
    const Errors e = compare_runs(run, reference);
    CHECK(e.o.max_abs == 0.0);
    CHECK(e.lse.max_abs == 0.0);
    CHECK(e.o.bad_values == 0);
  }
}

TEST_CASE("flash_v3/cpu extra memory is the CTA's tiles and rings, the same for any N, as describe() says",
          "[flash_v3][cpu][memory]") {
  auto extra = [](std::int64_t n) {
    const AttentionProblem p = problem_of(1, 2, 2, n, n, 32, false);
    const StageRun run = run_stage(this_stage(), Tier::cpu, make_problem_data(p), RunSettings{});
    const std::size_t estimate = this_stage().find(Tier::cpu)->extra_bytes(p, DType::f32, false);
    CHECK(run.forward_extra_bytes == estimate);
    return run.forward_extra_bytes;
  };
  CHECK(extra(256) == extra(1024));
}

TEST_CASE("flash_v3/cpu trace=1 prints a legal schedule: fills before reads, releases before refills, turns",
          "[flash_v3][cpu][trace]") {
  SECTION("two Q tiles, causal, Nq < Nk, two stages") {
    const AttentionProblem p = problem_of(1, 1, 1, 16, 24, 16, true);
    const std::string text = traced_run(p, options_of({{"block_rows", 8}, {"block_cols", 8}}));
    INFO(text);
    CHECK(text.rfind("# flash_v3/cpu schedule", 0) == 0);
    const std::vector<Event> events = parse_trace(text);
    // Tile 0 (rows 0-7) sees keys 0-15: blocks 1, 0; tile 1 (rows 8-15) sees keys 0-23: blocks 2, 1, 0.
    CHECK(check_schedule(events, p, 8, 8) == 2 * (2 + 3));
    int writes = 0;
    for (const Event& e : events) writes += e.step == "write";
    CHECK(writes == 4);  // two tiles, two consumers each
  }
  SECTION("three stages, two heads, a Q tile with no visible block, a consumer with no rows") {
    const AttentionProblem p = problem_of(1, 2, 1, 20, 9, 16, true);
    const std::string text = traced_run(p, options_of({{"block_rows", 8}, {"block_cols", 4}, {"stages", 3}}));
    INFO(text);
    // Rows 0-10 see no key: tile 0 (rows 0-7) loads no K/V block, tile 1 two, tile 2 three; tile 2 has 4 rows,
    // all consumer 0's (consumer 1 still takes its turns and releases every stage).
    CHECK(check_schedule(parse_trace(text), p, 8, 4) == 2 * 2 * (0 + 2 + 3));
    CHECK(text.find("no visible K/V block") != std::string::npos);
  }
  SECTION("trace = 0 prints nothing") {
    const AttentionProblem p = problem_of(1, 1, 1, 16, 24, 16, true);
    const ProblemData data = make_problem_data(p);
    StderrCapture capture;
    run_stage(this_stage(), Tier::cpu, data, RunSettings{});
    CHECK(capture.text().empty());
  }
}

TEST_CASE("flash_v3/cpu rejects bad options, naming the option", "[flash_v3][cpu][validation]") {
  const ProblemData data = make_problem_data(problem_of(1, 1, 1, 40, 40, 64, false));
  auto message_of = [&](StageOptions options, const AttentionProblem* problem = nullptr) {
    RunSettings settings;
    settings.options = std::move(options);
    const ProblemData other = problem ? make_problem_data(*problem) : ProblemData{};
    return invalid_argument_message([&] { run_stage(this_stage(), Tier::cpu, problem ? other : data, settings); });
  };
  check_mentions(message_of(options_of({{"block_rows", 1}})), "block_rows: must be >= 2");
  check_mentions(message_of(options_of({{"block_cols", 0}})), "block_cols: must be >= 1");
  check_mentions(message_of(options_of({{"stages", 1}})), "stages: must be >= 2");
  check_mentions(message_of(options_of({{"ctas", 0}})), "ctas: must be >= 1");
  check_mentions(message_of(options_of({{"round_p", 2}})), "round_p: must be 0 or 1");
  check_mentions(message_of(options_of({{"trace", -1}})), "trace: must be 0 or 1");
  check_mentions(message_of(options_of({{"trace", 1}, {"ctas", 2}})), "trace: needs ctas = 1");
  const AttentionProblem large = problem_of(1, 8, 8, 2048, 2048, 64, false);
  check_mentions(message_of(options_of({{"trace", 1}}), &large), "trace: only for tiny problems");
  // The tier has no backward pass and takes fp32 only.
  CHECK_FALSE(this_stage().find(Tier::cpu)->caps.has_backward);
  check_mentions(invalid_argument_message([&] {
                   StageOptions options;
                   AttentionProblem p = problem_of(1, 1, 1, 4, 4, 300, false);
                   flash_v3::forward_cpu(p, fake_tensors(p, DType::f32), options);
                 }),
                 "head_dim");
}
