// `attn paged-sim`: a small, deterministic serving simulation. One synthetic request trace (seeded log-normal
// prompt and output lengths) is replayed through contiguous per-request reservation, as pre-vLLM systems
// did (Orca's three variants: reserve the maximum length, the next power of two, or the exact final length),
// and through the paged BlockManager; each reports where its KV memory went, step by step.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "common/memory.hpp"
#include "common/numeric.hpp"
#include "common/progress.hpp"
#include "paged/paged.hpp"

namespace attn::paged {
namespace {

struct SimConfig {
  std::int64_t requests = 1000;
  std::uint64_t seed = 1;
  std::int64_t block_size = 16;
  std::int64_t pool_tokens = 16384;
  std::int64_t max_len = 2048;
  double prompt_median = 128;
  double output_median = 256;
  double sigma = 1.0;
  bool json = false;
  bool progress = false;
};

struct Request {
  std::int64_t prompt = 0;
  std::int64_t output = 0;
  std::int64_t final_length() const { return prompt + output; }
};

/// Lengths are median * exp(sigma * z), z standard normal (attn::fill_normal: the same on every machine),
/// rounded, the prompt clamped to [1, max_len / 2] and the output to [1, max_len - prompt].
std::vector<Request> make_trace(const SimConfig& c) {
  HostBuffer<float> z(static_cast<std::size_t>(2 * c.requests));
  fill_normal(z.span(), c.seed);
  std::vector<Request> trace;
  for (std::int64_t i = 0; i < c.requests; ++i) {
    auto draw = [&](double median, float normal, std::int64_t limit) {
      const double length = std::round(median * std::exp(c.sigma * static_cast<double>(normal)));
      return static_cast<std::int64_t>(std::clamp(length, 1.0, static_cast<double>(limit)));
    };
    Request r;
    r.prompt = draw(c.prompt_median, z[2 * i], c.max_len / 2);
    r.output = draw(c.output_median, z[2 * i + 1], c.max_len - r.prompt);
    trace.push_back(r);
  }
  return trace;
}

/// Where the pool's slots are at one step, in tokens: holding a token's K/V; reserved for tokens the request
/// will still generate; over-reserved beyond the request's final length (internal fragmentation; for paged,
/// the unfilled tail of each last block); free but in holes too small for the waiting request (external
/// fragmentation); free and usable.
struct Occupancy {
  double tokens = 0, reserved = 0, internal = 0, external = 0, free = 0;
  double running = 0;
};

struct PolicyResult {
  std::string name;
  Occupancy mean;              ///< averaged over the steps where requests were waiting (memory-bound steps)
  std::int64_t max_running = 0;
  std::int64_t steps = 0;      ///< decode steps until the whole trace is served
  std::int64_t preemptions = 0;
};

class Averager {
 public:
  void add(const Occupancy& o) {
    sum_.tokens += o.tokens, sum_.reserved += o.reserved, sum_.internal += o.internal, sum_.external += o.external;
    sum_.free += o.free, sum_.running += o.running;
    ++count_;
  }
  Occupancy mean() const {
    const double n = count_ > 0 ? static_cast<double>(count_) : 1.0;
    return {sum_.tokens / n, sum_.reserved / n, sum_.internal / n, sum_.external / n, sum_.free / n, sum_.running / n};
  }

 private:
  Occupancy sum_;
  std::int64_t count_ = 0;
};

enum class Reservation { maximum, power_of_two, exact };

std::int64_t reservation_for(const Request& r, Reservation policy, std::int64_t max_len) {
  switch (policy) {
    case Reservation::maximum: return max_len;
    case Reservation::power_of_two: {
      std::int64_t size = 1;
      while (size < r.final_length()) size *= 2;
      return std::min(size, max_len);
    }
    case Reservation::exact: return r.final_length();
  }
  return max_len;
}

/// First-fit allocator of contiguous token ranges: the memory model of a system that gives every request one
/// contiguous KV region for its whole life.
class ContiguousPool {
 public:
  explicit ContiguousPool(std::int64_t size) { holes_[0] = size; }
  std::optional<std::int64_t> allocate(std::int64_t size) {
    for (auto it = holes_.begin(); it != holes_.end(); ++it) {
      if (it->second < size) continue;
      const std::int64_t start = it->first, length = it->second;
      holes_.erase(it);
      if (length > size) holes_[start + size] = length - size;
      return start;
    }
    return std::nullopt;
  }
  void release(std::int64_t start, std::int64_t size) {
    auto [it, inserted] = holes_.emplace(start, size);
    auto next = std::next(it);
    if (next != holes_.end() && it->first + it->second == next->first) {  // merge with the hole after
      it->second += next->second;
      holes_.erase(next);
    }
    if (it != holes_.begin()) {  // and with the hole before
      auto previous = std::prev(it);
      if (previous->first + previous->second == it->first) {
        previous->second += it->second;
        holes_.erase(it);
      }
    }
  }
  /// Free tokens in holes smaller than `needed` (unusable by a request that needs that much).
  std::int64_t stranded(std::int64_t needed) const {
    std::int64_t total = 0;
    for (const auto& hole : holes_)
      if (hole.second < needed) total += hole.second;
    return total;
  }

 private:
  std::map<std::int64_t, std::int64_t> holes_;  // start -> length
};

PolicyResult simulate_contiguous(const SimConfig& c, const std::vector<Request>& trace, Reservation policy,
                                 const std::string& name) {
  struct Running {
    Request request;
    std::int64_t start, reserved, length;
  };
  ContiguousPool pool(c.pool_tokens);
  progress::begin("paged-sim: " + name);
  progress::expect(static_cast<double>(trace.size()));
  std::deque<std::size_t> waiting;
  for (std::size_t i = 0; i < trace.size(); ++i) waiting.push_back(i);
  std::vector<Running> running;
  Averager averager;
  PolicyResult result{name, {}, 0, 0, 0};
  while (!waiting.empty() || !running.empty()) {
    // Admit in arrival order while the head request's reservation finds a hole; its prompt is prefilled now.
    while (!waiting.empty()) {
      const Request& r = trace[waiting.front()];
      const std::int64_t size = reservation_for(r, policy, c.max_len);
      if (size > c.pool_tokens) throw std::invalid_argument("--pool-tokens: smaller than one request's reservation");
      const auto start = pool.allocate(size);
      if (!start) break;
      running.push_back({r, *start, size, r.prompt});
      waiting.pop_front();
    }
    if (!waiting.empty()) {
      Occupancy o;
      for (const Running& run : running) {
        o.tokens += run.length;
        o.reserved += run.request.final_length() - run.length;
        o.internal += run.reserved - run.request.final_length();
      }
      o.external = pool.stranded(reservation_for(trace[waiting.front()], policy, c.max_len));
      o.free = c.pool_tokens - o.tokens - o.reserved - o.internal - o.external;
      o.running = static_cast<double>(running.size());
      averager.add(o);
    }
    result.max_running = std::max<std::int64_t>(result.max_running, static_cast<std::int64_t>(running.size()));
    // One decode step: every running request generates a token; finished ones give their region back.
    for (Running& run : running) ++run.length;
    for (std::size_t i = running.size(); i-- > 0;) {
      if (running[i].length < running[i].request.final_length()) continue;
      pool.release(running[i].start, running[i].reserved);
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
      progress::advance();
    }
    ++result.steps;
  }
  result.mean = averager.mean();
  return result;
}

PolicyResult simulate_paged(const SimConfig& c, const std::vector<Request>& trace) {
  struct Running {
    std::size_t request;
    SequenceId sequence;
  };
  BlockManager manager(c.pool_tokens / c.block_size, c.block_size);
  progress::begin("paged-sim: paged (vLLM)");
  progress::expect(static_cast<double>(trace.size()));
  const std::int64_t watermark = std::max<std::int64_t>(1, manager.num_blocks() / 100);
  std::deque<std::size_t> waiting;
  for (std::size_t i = 0; i < trace.size(); ++i) waiting.push_back(i);
  std::vector<std::int64_t> generated(trace.size(), 0);  // output tokens produced so far (kept across preemption)
  std::vector<SequenceId> sequence_of(trace.size(), -1);  // a preempted request keeps its emptied sequence
  std::vector<Running> running;
  Averager averager;
  PolicyResult result{"paged (vLLM)", {}, 0, 0, 0};
  while (!waiting.empty() || !running.empty()) {
    // Admit while the prompt (plus what was generated before a preemption, recomputed) fits in free blocks,
    // keeping vLLM's watermark of 1% of the pool free for the running requests' next tokens.
    while (!waiting.empty()) {
      const std::size_t i = waiting.front();
      if (sequence_of[i] < 0) sequence_of[i] = manager.add_sequence();
      const SequenceId id = sequence_of[i];
      const std::int64_t to_prefill = trace[i].prompt + generated[i];
      if (manager.blocks_needed(id, to_prefill) + watermark > manager.free_block_count()) {
        if (running.empty()) throw std::invalid_argument("--pool-tokens: too small for a single request");
        break;
      }
      manager.append(id, to_prefill);
      running.push_back({i, id});
      waiting.pop_front();
    }
    if (!waiting.empty()) {
      Occupancy o;
      for (const Running& run : running) {
        const std::int64_t length = manager.length(run.sequence);
        o.tokens += static_cast<double>(length);
        o.internal += static_cast<double>(manager.block_table(run.sequence).size()) * c.block_size - length;
      }
      o.free = static_cast<double>(manager.free_block_count() * c.block_size);
      o.running = static_cast<double>(running.size());
      averager.add(o);
    }
    result.max_running = std::max<std::int64_t>(result.max_running, static_cast<std::int64_t>(running.size()));
    // One decode step. A request that needs a new block when none is free preempts the most recently admitted
    // request (vLLM's policy; it may be itself), whose blocks are freed and whose tokens will be recomputed.
    for (std::size_t r = 0; r < running.size(); ++r) {
      while (!manager.can_append(running[r].sequence, 1)) {
        const Running victim = running.back();
        const Preempted preempted = manager.preempt(victim.sequence);  // its blocks return to the free list
        if (preempted.tokens_to_recompute != trace[victim.request].prompt + generated[victim.request])
          throw std::logic_error("paged-sim: preempted sequence has an unexpected length");
        waiting.push_front(victim.request);
        running.pop_back();
        ++result.preemptions;
        if (running.size() <= r) break;  // the victim was this request itself
      }
      if (r >= running.size()) break;
      manager.append(running[r].sequence, 1);
      ++generated[running[r].request];
    }
    for (std::size_t r = running.size(); r-- > 0;) {
      if (generated[running[r].request] < trace[running[r].request].output) continue;
      manager.free(running[r].sequence);
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(r));
      progress::advance();
    }
    ++result.steps;
  }
  result.mean = averager.mean();
  return result;
}

struct BadFlag : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A number in [minimum, maximum]; checked before any cast, so that 1e19 cannot become a negative count.
double parse_number(const std::string& flag, const std::string& text, double minimum, double maximum) {
  std::size_t end = 0;
  double value = 0;
  try {
    value = std::stod(text, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  if (end == 0 || end != text.size() || !std::isfinite(value)) throw BadFlag(flag + ": '" + text + "' is not a number");
  if (value < minimum || value > maximum) {
    char range[96];
    std::snprintf(range, sizeof range, " is outside [%.15g, %.15g]", minimum, maximum);
    throw BadFlag(flag + ": " + text + range);
  }
  return value;
}

std::int64_t parse_integer(const std::string& flag, const std::string& text, std::int64_t minimum, std::int64_t maximum) {
  const double value = parse_number(flag, text, static_cast<double>(minimum), static_cast<double>(maximum));
  if (value != std::floor(value)) throw BadFlag(flag + ": '" + text + "' is not an integer");
  return static_cast<std::int64_t>(value);
}

const char* kSimUsage =
    "usage: attn paged-sim [--requests N] [--seed S] [--block-size B] [--pool-tokens T] [--max-len L]\n"
    "                      [--prompt-median X] [--output-median X] [--sigma X] [--json] [--progress]\n"
    "  --requests N       requests in the trace, 1 to 1e8 (default 1000)\n"
    "  --seed S           seed of the trace (default 1)\n"
    "  --block-size B     tokens per KV block, 1 to 2^20 (default 16)\n"
    "  --pool-tokens T    KV pool size in tokens (default 16384); T / B blocks, fewer than 2^31\n"
    "  --max-len L        longest request, prompt + output (default 2048)\n"
    "  --prompt-median X, --output-median X, --sigma X   the log-normal lengths (defaults 128, 256, 1)\n"
    "  --json             one JSON object per policy instead of the table\n"
    "  --progress         progress lines on stderr even with --json\n";

// Host bytes the simulation holds at most: the block manager's reference counts and free list (8 bytes per
// block), the trace and the per-request bookkeeping (about 64 bytes per request), and the running requests'
// block tables (at most one 4-byte entry per block).
double sim_bytes(const SimConfig& c) {
  const double blocks = static_cast<double>(c.pool_tokens / c.block_size);
  return 12.0 * blocks + 64.0 * static_cast<double>(c.requests);
}

SimConfig parse_config(const std::vector<std::string>& args) {
  SimConfig c;
  std::vector<std::string> seen;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (std::find(seen.begin(), seen.end(), flag) != seen.end()) throw BadFlag(flag + ": given twice (once at most)");
    seen.push_back(flag);
    if (flag == "--json") {
      c.json = true;
      continue;
    }
    if (flag == "--progress") {
      c.progress = true;
      continue;
    }
    const bool known = flag == "--requests" || flag == "--seed" || flag == "--block-size" || flag == "--pool-tokens" ||
                       flag == "--max-len" || flag == "--prompt-median" || flag == "--output-median" || flag == "--sigma";
    if (!known) throw BadFlag(flag + ": unknown flag (see attn paged-sim --help)");
    if (i + 1 >= args.size()) throw BadFlag(flag + ": needs a value");
    const std::string& text = args[++i];
    const std::int64_t int64_max = std::numeric_limits<std::int64_t>::max() / 2;
    if (flag == "--requests") c.requests = parse_integer(flag, text, 1, 100000000);
    else if (flag == "--seed") c.seed = static_cast<std::uint64_t>(parse_integer(flag, text, 0, std::int64_t{1} << 53));
    else if (flag == "--block-size") c.block_size = parse_integer(flag, text, 1, std::int64_t{1} << 20);
    else if (flag == "--pool-tokens") c.pool_tokens = parse_integer(flag, text, 1, int64_max);
    else if (flag == "--max-len") c.max_len = parse_integer(flag, text, 2, std::numeric_limits<std::int32_t>::max());
    else if (flag == "--prompt-median") c.prompt_median = parse_number(flag, text, 1, 1e9);
    else if (flag == "--output-median") c.output_median = parse_number(flag, text, 1, 1e9);
    else c.sigma = parse_number(flag, text, 0, 10);
  }
  if (c.pool_tokens < c.max_len) throw BadFlag("--pool-tokens: " + std::to_string(c.pool_tokens) + " must be >= --max-len (" + std::to_string(c.max_len) + ")");
  if (c.pool_tokens / c.block_size < 1) throw BadFlag("--block-size: larger than the pool");
  if (c.pool_tokens / c.block_size > std::numeric_limits<std::int32_t>::max())
    throw BadFlag("--pool-tokens: " + std::to_string(c.pool_tokens) + " tokens in blocks of " + std::to_string(c.block_size) +
                  " are " + std::to_string(c.pool_tokens / c.block_size) + " blocks, more than 2^31 - 1 (block ids are 32-bit): "
                  "use a larger --block-size");
  const double needed = sim_bytes(c), available = 0.9 * static_cast<double>(available_bytes(Tier::cpu));
  if (needed > available)
    throw BadFlag("--pool-tokens: " + std::to_string(c.pool_tokens) + " tokens in blocks of " + std::to_string(c.block_size) +
                  " need " + format_bytes(needed) + " for the block manager and the trace; " +
                  format_bytes(available / 0.9) + " available");
  return c;
}

void print_json(const SimConfig& c, const std::vector<PolicyResult>& results) {
  const double pool = static_cast<double>(c.pool_tokens);
  for (const PolicyResult& r : results) {
    const Occupancy& m = r.mean;
    const double taken = m.tokens + m.reserved + m.internal + m.external;
    std::printf("{\"policy\":\"%s\",\"requests\":%lld,\"pool_tokens\":%lld,\"block_size\":%lld,\"tokens\":%.6g,"
                "\"reserved\":%.6g,\"internal\":%.6g,\"external\":%.6g,\"free\":%.6g,\"token_share\":%.6g,"
                "\"running_mean\":%.6g,\"max_running\":%lld,\"steps\":%lld,\"preemptions\":%lld}\n",
                r.name.c_str(), static_cast<long long>(c.requests), static_cast<long long>(c.pool_tokens),
                static_cast<long long>(c.block_size), m.tokens / pool, m.reserved / pool, m.internal / pool,
                m.external / pool, m.free / pool, taken > 0 ? m.tokens / taken : 0.0, m.running,
                static_cast<long long>(r.max_running), static_cast<long long>(r.steps),
                static_cast<long long>(r.preemptions));
  }
}

void print_results(const SimConfig& c, const std::vector<PolicyResult>& results) {
  std::printf("paged-sim: %lld requests, seed %llu; prompt ~ %g * exp(%g z), output ~ %g * exp(%g z), z ~ N(0, 1),\n"
              "  clamped so that prompt <= %lld and prompt + output <= %lld; KV pool of %lld tokens, block size %lld.\n"
              "  Shares of the pool, averaged over the steps where requests were waiting for memory:\n\n",
              static_cast<long long>(c.requests), static_cast<unsigned long long>(c.seed), c.prompt_median, c.sigma,
              c.output_median, c.sigma, static_cast<long long>(c.max_len / 2), static_cast<long long>(c.max_len),
              static_cast<long long>(c.pool_tokens), static_cast<long long>(c.block_size));
  std::printf("%-22s %7s %9s %9s %9s %6s %12s %14s %7s %8s\n", "policy", "tokens", "reserved", "internal", "external",
              "free", "token share", "running mean", "max", "steps");
  std::printf("%-22s %7s %9s %9s %9s %6s %12s %14s %7s %8s\n", "", "", "(future)", "frag.", "frag.", "",
              "of non-free", "", "", "");
  for (const PolicyResult& r : results) {
    const double pool = static_cast<double>(c.pool_tokens);
    const Occupancy& m = r.mean;
    const double taken = m.tokens + m.reserved + m.internal + m.external;
    std::printf("%-22s %6.1f%% %8.1f%% %8.1f%% %8.1f%% %5.1f%% %11.1f%% %14.1f %7lld %8lld", r.name.c_str(),
                100 * m.tokens / pool, 100 * m.reserved / pool, 100 * m.internal / pool, 100 * m.external / pool,
                100 * m.free / pool, taken > 0 ? 100 * m.tokens / taken : 0.0, m.running,
                static_cast<long long>(r.max_running), static_cast<long long>(r.steps));
    if (r.preemptions > 0) std::printf("  (%lld preemptions)", static_cast<long long>(r.preemptions));
    std::printf("\n");
  }
}

}  // namespace

int sim_command(const std::vector<std::string>& args) {
  if (std::find(args.begin(), args.end(), "--help") != args.end()) {
    std::cout << kSimUsage;
    return 0;
  }
  SimConfig config;
  try {
    config = parse_config(args);
  } catch (const BadFlag& e) {
    std::cerr << "attn paged-sim: " << e.what() << "\n";
    return 2;
  }
  std::unique_ptr<progress::Reporter> reporter;
  if (!config.json || config.progress) reporter = std::make_unique<progress::Reporter>();
  const std::vector<Request> trace = make_trace(config);
  std::vector<PolicyResult> results;
  try {
    results.push_back(simulate_contiguous(config, trace, Reservation::maximum, "contiguous, max length"));
    results.push_back(simulate_contiguous(config, trace, Reservation::power_of_two, "contiguous, power of 2"));
    results.push_back(simulate_contiguous(config, trace, Reservation::exact, "contiguous, exact"));
    results.push_back(simulate_paged(config, trace));
  } catch (const std::invalid_argument& e) {  // a pool too small for the trace
    std::cerr << "attn paged-sim: " << e.what() << "\n";
    return 2;
  }
  progress::begin("");
  reporter.reset();
  if (config.json)
    print_json(config, results);
  else
    print_results(config, results);
  return 0;
}

}  // namespace attn::paged
