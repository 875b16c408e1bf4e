// flash_v3, CPU tier: FlashAttention-3's warp-specialized forward pass written with threads, for reading and
// stepping in a debugger. A "CTA" is a producer thread (FA3 Alg. 1 lines 2-8) that fills rings of K and V stage
// buffers and two consumer threads (FA3 Alg. 2) that each own half of a Q tile, take turns on the "tensor cores"
// (the pingpong token) and overlap the next S = Q K^T with this block's softmax. Names follow the GPU tier.
//
// Options: "block_rows" / "block_cols" (Br / Bc, default 128 / 128; Br >= 2: one row per consumer at least;
// Bc >= 1), "stages" (depth of the K and V rings, >= 2; default 2), "round_p" = 1 (default: P~ rounded to bf16
// before P V, as the GPU tier's bf16 path) or 0 (fp32 P~), "ctas" (CTAs run side by side, each a producer and two
// consumers; >= 1, default 1), "trace" = 1 (print the schedule to stderr, one line per step: only with ctas = 1
// and for problems of at most kMaxTraceSteps K/V steps).
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <numbers>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/cpu_tiles.hpp"
#include "common/flash_cpu.hpp"
#include "common/memory.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "flash_v3/flash_v3.hpp"

namespace attn::flash_v3 {
namespace {

using tiles::kNegInf;
using tiles::MatrixView;
using tiles::Update;
using flash_cpu::Head;
using flash_cpu::head_pointers;

// The GPU tier's tile: a CTA takes Br = 128 query rows (64 per consumer warpgroup) and streams Bc = 128 keys
// per K/V block through a ring of 2 stages.
constexpr std::int64_t kDefaultBr = 128;
constexpr std::int64_t kDefaultBc = 128;
constexpr std::int64_t kDefaultStages = 2;
constexpr int kConsumers = 2;
// trace = 1 prints about 8 lines per consumer per K/V step: at most this many steps keeps it readable.
constexpr std::int64_t kMaxTraceSteps = 32;

struct Settings {
  std::int64_t Br = 0;
  std::int64_t Bc = 0;
  std::int64_t stages = 0;
  std::int64_t ctas = 0;
  bool round_p = true;
  bool trace = false;
};

std::int64_t blocks_of(std::int64_t n, std::int64_t block) { return (n + block - 1) / block; }

std::int64_t at_least_option(const StageOptions& options, const char* name, std::int64_t fallback, std::int64_t least,
                             const char* why) {
  const std::int64_t value = options.get(name, fallback);
  if (value < least)
    throw std::invalid_argument(std::string(name) + ": must be >= " + std::to_string(least) + " (" + why + "), got " +
                                std::to_string(value));
  return value;
}

bool switch_option(const StageOptions& options, const char* name, bool fallback, const char* meaning) {
  const std::int64_t value = options.get(name, fallback ? 1 : 0);
  if (value != 0 && value != 1)
    throw std::invalid_argument(std::string(name) + ": must be 0 or 1 (" + meaning + "), got " + std::to_string(value));
  return value == 1;
}

// ---- the work: Q tiles and the K/V blocks each one visits ------------------------------------------------------

// One CTA's work item: Q tile i of (batch b, query head h) and the K/V blocks it visits.
struct QueryTile {
  std::int64_t b = 0, h = 0, i = 0;
  std::int64_t row0 = 0, rows = 0;
  std::int64_t Tc = 0;  // K/V blocks that hold a key some row of the tile sees; visited j = Tc - 1 down to 0
};

std::int64_t tile_count(const AttentionProblem& p, const Settings& s) { return p.batch * p.q_heads * blocks_of(p.seq_q, s.Br); }

QueryTile query_tile(const AttentionProblem& p, const Settings& s, std::int64_t index) {
  const std::int64_t Tr = blocks_of(p.seq_q, s.Br);
  QueryTile tile;
  tile.b = index / (p.q_heads * Tr);
  tile.h = index / Tr % p.q_heads;
  tile.i = index % Tr;
  tile.row0 = tile.i * s.Br;
  tile.rows = std::min(s.Br, p.seq_q - tile.row0);
  // Causal: the tile's last row sees the most keys; blocks past them are never loaded (FA2's block skipping).
  // Tc = 0 when no row of the tile sees a key (causal with Nq > Nk).
  tile.Tc = blocks_of(p.visible_keys(tile.row0 + tile.rows - 1), s.Bc);
  return tile;
}

// K/V block j, visited at `step` (0 = first). Reverse order: the blocks that need the causal mask (and the
// partial block at the end of the sequence) come first, so the masked steps are peeled off the front of the loop.
struct KeyBlock {
  std::int64_t j = 0, key0 = 0, keys = 0;
};

KeyBlock key_block(const AttentionProblem& p, const Settings& s, const QueryTile& tile, std::int64_t step) {
  KeyBlock block;
  block.j = tile.Tc - 1 - step;
  block.key0 = block.j * s.Bc;
  block.keys = std::min(s.Bc, p.seq_k - block.key0);
  return block;
}

// The rows of the Q tile a consumer owns: consumer 0 the first half (rows 0-63 of a full GPU tile), consumer 1
// the second. A short last tile can leave consumer 1 with none; it still takes part in every barrier and turn.
struct ConsumerRows {
  std::int64_t offset = 0;  // first row within the tile
  std::int64_t row0 = 0;    // first row within the sequence
  std::int64_t count = 0;
  std::int64_t columns = 0;  // count rounded up to the SIMD width: the columns of this consumer's S tile
};

std::int64_t half_of(std::int64_t Br) { return (Br + 1) / 2; }

ConsumerRows rows_of(const QueryTile& tile, const Settings& s, int consumer) {
  ConsumerRows rows;
  rows.offset = std::min(consumer * half_of(s.Br), tile.rows);
  rows.row0 = tile.row0 + rows.offset;
  rows.count = std::min(half_of(s.Br), tile.rows - rows.offset);
  rows.columns = tiles::round_up_to_lanes(rows.count);
  return rows;
}

// Block sizes never exceed the sequence (as in flash_v2): a 128-row tile on a 37-row problem is one 37-row tile.
Settings read_settings(const AttentionProblem& p, const StageOptions& options) {
  Settings s;
  s.Br = std::min(at_least_option(options, "block_rows", kDefaultBr, 2, "one row per consumer at least"), p.seq_q);
  s.Bc = std::min(at_least_option(options, "block_cols", kDefaultBc, 1, "a block has at least one key"), p.seq_k);
  s.stages = at_least_option(options, "stages", kDefaultStages, 2, "the producer fills one stage while the consumers read another");
  s.ctas = std::min(at_least_option(options, "ctas", 1, 1, "producer and consumer threads per CTA"), tile_count(p, s));
  s.round_p = switch_option(options, "round_p", true, "1 = P~ rounded to bf16 before P V, as on the GPU; 0 = fp32 P~");
  s.trace = switch_option(options, "trace", false, "1 = print the pipeline's schedule to stderr");
  if (s.trace) {
    if (options.get("ctas", 1) != 1) throw std::invalid_argument("trace: needs ctas = 1 (one CTA, one timeline)");
    std::int64_t steps = 0;
    for (std::int64_t index = 0; index < tile_count(p, s); ++index) steps += query_tile(p, s, index).Tc;
    if (steps > kMaxTraceSteps)
      throw std::invalid_argument("trace: only for tiny problems, at most " + std::to_string(kMaxTraceSteps) +
                                  " K/V steps over all Q tiles; this one has " + std::to_string(steps) +
                                  " (use fewer heads or rows, or larger block_rows / block_cols)");
  }
  return s;
}

// ---- synchronisation: stage barriers, the rings, the pingpong token ---------------------------------------------

// Thrown inside a role when another role failed, so that the role unwinds and every thread can be joined.
struct PipelineCancelled {};

// An mbarrier: a phase completes when `arrivals` arrivals have come; a waiter blocks until a given number of
// phases have completed. The GPU waits on the parity of the phase; counting phases reads more easily. The atomics
// are sequentially consistent, so what a role wrote before arriving is visible to the role whose wait returns.
class StageBarrier {
 public:
  explicit StageBarrier(int arrivals) : arrivals_(arrivals), pending_(arrivals) {}

  // Blocks until `phases` phases have completed (wait(0) returns at once: a fresh buffer is empty).
  void wait(std::int64_t phases) {
    for (;;) {
      const std::int64_t completed = completed_.load();
      if (cancelled_.load()) throw PipelineCancelled{};
      if (completed >= phases) return;
      completed_.wait(completed);
    }
  }

  // The last arrival of a phase re-arms the barrier and wakes the waiters. No arrival of the next phase can come
  // before: in this pipeline it always waits (through another barrier) for the phase to complete first.
  void arrive() {
    if (pending_.fetch_sub(1) == 1) {
      pending_.store(arrivals_);
      completed_.fetch_add(1);
      completed_.notify_all();
    }
  }

  void cancel() {
    cancelled_.store(true);
    completed_.fetch_add(1);  // a changed value wakes every waiter, which then sees cancelled_
    completed_.notify_all();
  }

 private:
  const int arrivals_;
  std::atomic<int> pending_;
  std::atomic<std::int64_t> completed_{0};
  std::atomic<bool> cancelled_{false};
};

// A ring of `stages` buffers of Bc x D floats (shared memory on the GPU), each with a full barrier (the producer's
// load has landed: 1 arrival) and an empty barrier (both consumers are done with it: 2 arrivals).
struct Ring {
  Ring(std::int64_t stages, std::int64_t stage_floats) : buffers(stages * stage_floats), stage_floats(stage_floats) {
    for (std::int64_t s = 0; s < stages; ++s) {
      full.emplace_back(1);
      empty.emplace_back(kConsumers);
    }
  }
  float* stage(std::int64_t s) { return buffers.data() + s * stage_floats; }

  HostBuffer<float> buffers;
  std::int64_t stage_floats;
  std::deque<StageBarrier> full, empty;  // a deque: barriers hold atomics and cannot move
};

// Where a role is in a ring (CUTLASS's PipelineState): the stage its next load or read uses, and how many times
// it has gone round the ring before (the phase to wait for).
struct RingPosition {
  std::int64_t stage = 0;
  std::int64_t phase = 0;
  void advance(std::int64_t stages) {
    if (++stage == stages) {
      stage = 0;
      ++phase;
    }
  }
};

// Pingpong scheduling (FA3 Sec. 3.1): the consumers take turns issuing GEMMs, so that one's GEMMs run while the
// other does its softmax. The GPU uses two named barriers (bar.sync on its own id, bar.arrive on the other's, and
// consumer 1 pre-arrives so consumer 0 goes first); here one atomic says whose turn it is.
class PingpongToken {
 public:
  void take(int consumer) {
    for (;;) {
      const int holder = holder_.load();
      if (holder == kCancelled) throw PipelineCancelled{};
      if (holder == consumer) return;
      holder_.wait(holder);
    }
  }
  void pass(int consumer) {
    int expected = consumer;  // a compare-exchange, so that a pass never overwrites a cancellation
    holder_.compare_exchange_strong(expected, 1 - consumer);
    holder_.notify_all();
  }
  void cancel() {
    holder_.store(kCancelled);
    holder_.notify_all();
  }

 private:
  static constexpr int kCancelled = -1;
  std::atomic<int> holder_{0};  // consumer 0 goes first
};

// The schedule of trace = 1: one line per step, printed under a lock in the order the steps happen. A producer
// prints a fill before it arrives on the full barrier and a consumer a release before it arrives on the empty
// one, so the printed order respects every barrier.
class Trace {
 public:
  explicit Trace(bool on) : on_(on) {}

  [[gnu::format(printf, 5, 6)]] void step(const char* role, const char* what, const char* alg_line, const char* format, ...) {
    if (!on_) return;
    char text[160];
    va_list args;
    va_start(args, format);
    std::vsnprintf(text, sizeof text, format, args);
    va_end(args);
    const std::lock_guard<std::mutex> lock(mutex_);
    std::fprintf(stderr, "%-9s %-7s %-38s %s\n", role, what, text, alg_line);
  }

 private:
  bool on_;
  std::mutex mutex_;
};

// ---- one consumer's tiles and the math of Algorithm 2 ------------------------------------------------------------

// One consumer's on-chip state for its rows of the Q tile (the warpgroup's registers on the GPU). S and P~ are
// stored key-major (row = key, column = query; see common/cpu_tiles.hpp) so that m_i and l_i are updated with
// vertical SIMD operations.
struct ConsumerTiles {
  ConsumerTiles(std::int64_t rows, std::int64_t Bc, std::int64_t D)
      : ld(tiles::round_up_to_lanes(rows)), Qt(D * ld), S_a(Bc * ld), S_b(Bc * ld), O(rows * D), m_i(ld), l_i(ld),
        m_new(ld), shift(ld), alpha(ld), P_cur(S_a.data()), S_next(S_b.data()) {}
  ConsumerTiles(const ConsumerTiles&) = delete;
  ConsumerTiles& operator=(const ConsumerTiles&) = delete;

  std::int64_t ld;              // row stride of Q_i^T, S and P~: rows rounded up to the SIMD width
  HostBuffer<float> Qt;         // D x ld: scale log2(e) Q_i^T, this consumer's rows
  HostBuffer<float> S_a, S_b;   // Bc x ld each: S_cur / P~_cur and S_next / P~_next, swapped at Alg. 2 line 16
  HostBuffer<float> O;          // rows x D: the unnormalised O_i
  HostBuffer<float> m_i, l_i;   // the running max (base-2 units) and sum, one per query
  HostBuffer<float> m_new, shift, alpha;
  float* P_cur;
  float* S_next;
};

// Floats one CTA allocates: Q_i, the K and V rings, each consumer's tiles. Independent of N.
std::int64_t cta_floats(const Settings& s, std::int64_t D) {
  const std::int64_t half = half_of(s.Br), ld = tiles::round_up_to_lanes(half);
  const std::int64_t consumer = D * ld + 2 * s.Bc * ld + half * D + 5 * ld;
  return s.Br * D + 2 * s.stages * s.Bc * D + kConsumers * consumer;
}

// P~ rounded to the nearest bf16, ties to even (float_to_bf16_bits of common/numeric.hpp without its NaN case:
// P~ is finite and >= 0), as the GPU converts it to the A operand of the bf16 P V wgmma. The loop vectorises.
void round_to_bf16(float* P, std::int64_t keys, std::int64_t columns, std::int64_t ld) {
  for (std::int64_t k = 0; k < keys; ++k)
    for (std::int64_t q = 0; q < columns; ++q) {
      const std::uint32_t bits = std::bit_cast<std::uint32_t>(P[k * ld + q]);
      P[k * ld + q] = std::bit_cast<float>((bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u);
    }
}

// FA3 Alg. 2 line 2, after the wait: this consumer's rows of Q_i, with scale log2(e) folded in (every exp below is
// an exp2, as on the GPU); O_i = 0, m_i = -inf, l_i = 0 (Alg. 1 line 10; line 5 of Alg. 2 then sets m_i and l_i).
void start_rows(const AttentionProblem& p, ConsumerTiles& c, const float* Q_tile, const ConsumerRows& rows) {
  const std::int64_t D = p.head_dim;
  const float scale_log2 = p.softmax_scale() * std::numbers::log2e_v<float>;
  tiles::pack_transposed(Q_tile + rows.offset * D, rows.count, D, D, scale_log2, c.Qt.data(), rows.columns, c.ld);
  std::fill_n(c.O.data(), rows.count * D, 0.0f);
  std::fill(c.m_i.begin(), c.m_i.end(), kNegInf);
  std::fill(c.l_i.begin(), c.l_i.end(), 0.0f);
}

// FA3 Alg. 2 lines 3 and 8: S = Q_i K_j^T for this consumer's rows, key-major: S^T = K_j (scale log2(e) Q_i^T).
void gemm_s(const AttentionProblem& p, const ConsumerTiles& c, const ConsumerRows& rows, const float* K_stage,
            const KeyBlock& block, float* S) {
  tiles::matmul(Update::overwrite, block.keys, rows.columns, p.head_dim, MatrixView{K_stage, p.head_dim, 1}, c.Qt.data(),
                c.ld, S, c.ld);
}

// FA3 Alg. 2 lines 10 and 19: O_i += P~ V_j (P~ read transposed out of its key-major tile).
void gemm_pv(const AttentionProblem& p, ConsumerTiles& c, const ConsumerRows& rows, const float* P, const float* V_stage,
             const KeyBlock& block) {
  tiles::matmul(Update::accumulate, rows.count, p.head_dim, block.keys, tiles::transposed(P, c.ld), V_stage, p.head_dim,
                c.O.data(), p.head_dim);
}

// Whether block j crosses the causal diagonal for some row of this consumer (its first row sees the fewest keys).
bool needs_mask(const AttentionProblem& p, const ConsumerRows& rows, const KeyBlock& block) {
  return p.causal && rows.count > 0 && block.key0 + block.keys > p.visible_keys(rows.row0);
}

// Query row r sees keys below visible_keys(row0 + r); the rest of the block becomes -inf.
void apply_causal_mask(const AttentionProblem& p, const ConsumerTiles& c, const ConsumerRows& rows, const KeyBlock& block,
                       float* S) {
  for (std::int64_t r = 0; r < rows.count; ++r) {
    const std::int64_t first_hidden = std::max<std::int64_t>(p.visible_keys(rows.row0 + r) - block.key0, 0);
    for (std::int64_t k = first_hidden; k < block.keys; ++k) S[k * c.ld + r] = kNegInf;
  }
}

// FA3 Alg. 2 line 12 (line 5 for the first block, where m_i = -inf and l_i = 0): m_new = max(m_i, rowmax(S)),
// P~ = exp(S - m_new), l_i = exp(m_i - m_new) l_i + rowsum(P~). alpha = exp(m_i - m_new) waits for line 14.
// l_i sums P~ in fp32 before P~ is rounded to bf16, as the GPU does.
void online_softmax(const AttentionProblem& p, ConsumerTiles& c, const ConsumerRows& rows, const KeyBlock& block, float* S,
                    bool round_p) {
  if (needs_mask(p, rows, block)) apply_causal_mask(p, c, rows, block, S);
  std::copy_n(c.m_i.data(), rows.columns, c.m_new.data());
  tiles::max_over_keys(S, block.keys, rows.columns, c.ld, c.m_new.data());
  for (std::int64_t r = 0; r < rows.columns; ++r) {
    // A row that has seen only masked keys keeps m = -inf; shifting by 0 then gives exp2(-inf) = 0, not NaN.
    c.shift[r] = c.m_new[r] == kNegInf ? 0.0f : c.m_new[r];
    c.alpha[r] = std::exp2(c.m_i[r] - c.shift[r]);
    c.l_i[r] *= c.alpha[r];
  }
  tiles::exp_over_keys</*Base2=*/true>(S, block.keys, rows.columns, c.ld, c.shift.data(), c.l_i.data());
  if (round_p) round_to_bf16(S, block.keys, rows.columns, c.ld);
}

// FA3 Alg. 2 lines 21-22: O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i) (m_i is in base-2 units: times ln 2).
// A row that saw no key has l_i = 0: O = 0, L = -inf.
void finish_rows(const AttentionProblem& p, const AttentionTensors& t, const ConsumerTiles& c, const ConsumerRows& rows,
                 const Head& head) {
  const std::int64_t D = p.head_dim;
  for (std::int64_t r = 0; r < rows.count; ++r) {
    float* out = head.o + (rows.row0 + r) * t.q_strides.seq;
    const float l = c.l_i[r];
    const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
    for (std::int64_t d = 0; d < D; ++d) out[d] = inverse * c.O[r * D + d];
    head.lse[rows.row0 + r] = l > 0.0f ? c.m_i[r] * std::numbers::ln2_v<float> + std::log(l) : kNegInf;
  }
}

// ---- one CTA: its shared buffers, barriers and token, and its three roles ----------------------------------------

struct Cta {
  Cta(const Settings& s, std::int64_t D)
      : Q(s.Br * D), K(s.stages, s.Bc * D), V(s.stages, s.Bc * D),
        consumer{ConsumerTiles(half_of(s.Br), s.Bc, D), ConsumerTiles(half_of(s.Br), s.Bc, D)} {}

  void cancel() {
    for (Ring* ring : {&K, &V})
      for (auto* barriers : {&ring->full, &ring->empty})
        for (StageBarrier& barrier : *barriers) barrier.cancel();
    Q_full.cancel();
    Q_empty.cancel();
    token.cancel();
  }

  HostBuffer<float> Q;  // Br x D: Q_i
  StageBarrier Q_full{1}, Q_empty{kConsumers};
  Ring K, V;
  PingpongToken token;
  ConsumerTiles consumer[kConsumers];
};

// What every role of every CTA reads: the kernel launch's parameters on the GPU.
struct Launch {
  const AttentionProblem& p;
  const AttentionTensors& t;
  const Settings& s;
  Trace& trace;
};

const char* const kRoleName[kConsumers] = {"consumer0", "consumer1"};

// FA3 Alg. 1 lines 6-7: wait until the stage is free, copy K_j or V_j into it (the TMA load), signal it is full.
void fill_stage(const Launch& launch, Ring& ring, RingPosition& position, const char* name, const float* rows,
                const KeyBlock& block) {
  const std::int64_t kv_seq = launch.t.kv_strides.seq;
  ring.empty[position.stage].wait(position.phase);  // both consumers are done with what it held
  tiles::copy_rows(rows + block.key0 * kv_seq, block.keys, launch.p.head_dim, kv_seq, ring.stage(position.stage),
                   launch.p.head_dim);
  launch.trace.step("producer", "fill", "Alg. 1 lines 6-7", "%s[%lld] -> stage %lld", name,
                    static_cast<long long>(block.j), static_cast<long long>(position.stage));
  ring.full[position.stage].arrive();
  position.advance(launch.s.stages);
}

// The producer (FA3 Alg. 1 lines 2-8): for each of this CTA's Q tiles, Q_i first (line 4), then K and V in the
// order the consumers read them (line 5's loop): K one block ahead of V (K_last; then K_j and V_{j+1}, j
// descending; then V_0), as FA3's code does, where the paper's line 7 loads K_j and V_j together.
void producer(const Launch& launch, Cta& cta, std::int64_t first_tile) {
  // LAB BEGIN flash-v3-cpu: the producer, FA3 Alg. 1 lines 2-8: Q_i, then the K and V rings
  const AttentionProblem& p = launch.p;
  const std::int64_t D = p.head_dim, q_seq = launch.t.q_strides.seq;
  RingPosition k_position, v_position;
  std::int64_t tiles_done = 0;
  for (std::int64_t index = first_tile; index < tile_count(p, launch.s); index += launch.s.ctas, ++tiles_done) {
    const QueryTile tile = query_tile(p, launch.s, index);
    const Head head = head_pointers(p, launch.t, tile.b, tile.h);
    cta.Q_empty.wait(tiles_done);  // both consumers have released the previous tile's Q
    tiles::copy_rows(head.q + tile.row0 * q_seq, tile.rows, D, q_seq, cta.Q.data(), D);
    launch.trace.step("producer", "load", "Alg. 1 line 4", "Q[%lld] rows %lld-%lld (b %lld, h %lld)",
                      static_cast<long long>(tile.i), static_cast<long long>(tile.row0),
                      static_cast<long long>(tile.row0 + tile.rows - 1), static_cast<long long>(tile.b),
                      static_cast<long long>(tile.h));
    cta.Q_full.arrive();
    for (std::int64_t step = 0; step <= tile.Tc; ++step) {
      if (step < tile.Tc) fill_stage(launch, cta.K, k_position, "K", head.k, key_block(p, launch.s, tile, step));
      if (step > 0) fill_stage(launch, cta.V, v_position, "V", head.v, key_block(p, launch.s, tile, step - 1));
    }
  }
  // LAB END flash-v3-cpu
}

// A consumer's reads of a ring: wait until the stage is full; release it (arrive on its empty barrier).
const float* wait_full(Ring& ring, const RingPosition& position) {
  ring.full[position.stage].wait(position.phase + 1);
  return ring.stage(position.stage);
}

void release(const Launch& launch, Ring& ring, RingPosition& position, int me, const char* name, const KeyBlock& block,
             const char* alg_line) {
  launch.trace.step(kRoleName[me], "release", alg_line, "%s[%lld] (stage %lld)", name, static_cast<long long>(block.j),
                    static_cast<long long>(position.stage));
  ring.empty[position.stage].arrive();
  position.advance(launch.s.stages);
}

// The pingpong token around a consumer's GEMMs, with their trace lines.
void take_turn(const Launch& launch, Cta& cta, int me) {
  cta.token.take(me);
  launch.trace.step(kRoleName[me], "take", "pingpong (Sec. 3.1)", "token");
}

void pass_turn(const Launch& launch, Cta& cta, int me) {
  launch.trace.step(kRoleName[me], "pass", "pingpong (Sec. 3.1)", "token -> %s", kRoleName[1 - me]);
  cta.token.pass(me);
}

// FA3 Alg. 2 lines 3-20 for one Q tile of Tc >= 1 K/V blocks (intra-warpgroup overlap): the GEMMs of step j,
// S_next = Q_i K_j^T and O_i += P~_cur V_{j+1}, are issued together under the pingpong token; the softmax of
// S_next runs after the token has passed, while the other consumer multiplies.
void attend_tile(const Launch& launch, Cta& cta, int me, const QueryTile& tile, const ConsumerRows& rows,
                 RingPosition& k_position, RingPosition& v_position) {
  // LAB BEGIN flash-v3-cpu: a consumer, FA3 Alg. 2 lines 3-20, with the pingpong token
  const AttentionProblem& p = launch.p;
  const Settings& s = launch.s;
  Trace& trace = launch.trace;
  const char* role = kRoleName[me];
  ConsumerTiles& c = cta.consumer[me];
  // Prologue, lines 3-5: the first block's S alone, and its softmax.
  KeyBlock block = key_block(p, s, tile, 0);
  const float* K_stage = wait_full(cta.K, k_position);
  take_turn(launch, cta, me);
  gemm_s(p, c, rows, K_stage, block, c.P_cur);  // line 3: S_cur = Q_i K_j^T, commit and wait
  trace.step(role, "gemm0", "Alg. 2 line 3", "S_cur = Q K[%lld]^T (stage %lld)", static_cast<long long>(block.j),
             static_cast<long long>(k_position.stage));
  pass_turn(launch, cta, me);
  release(launch, cta.K, k_position, me, "K", block, "Alg. 2 line 4");
  online_softmax(p, c, rows, block, c.P_cur, s.round_p);  // line 5
  std::copy_n(c.m_new.data(), rows.columns, c.m_i.data());
  trace.step(role, "softmax", "Alg. 2 line 5", "S_cur -> P~_cur, m_i, l_i%s", needs_mask(p, rows, block) ? " (masked)" : "");

  for (std::int64_t step = 1; step < tile.Tc; ++step) {  // line 6
    const KeyBlock previous = block;                     // the block of P~_cur: j + 1
    block = key_block(p, s, tile, step);
    K_stage = wait_full(cta.K, k_position);  // line 7
    take_turn(launch, cta, me);
    gemm_s(p, c, rows, K_stage, block, c.S_next);  // line 8: S_next = Q_i K_j^T, commit, do not wait
    trace.step(role, "gemm0", "Alg. 2 line 8", "S_next = Q K[%lld]^T (stage %lld)", static_cast<long long>(block.j),
               static_cast<long long>(k_position.stage));
    const float* V_stage = wait_full(cta.V, v_position);  // line 9
    gemm_pv(p, c, rows, c.P_cur, V_stage, previous);      // line 10: O_i += P~_cur V_{j+1}, commit, do not wait
    trace.step(role, "gemm1", "Alg. 2 line 10", "O += P~_cur V[%lld] (stage %lld)", static_cast<long long>(previous.j),
               static_cast<long long>(v_position.stage));
    pass_turn(launch, cta, me);
    // Line 11: S_next is done (the CPU's GEMMs are synchronous). FA3's code releases K_j now rather than at
    // line 15, so that the producer can refill the stage while this softmax runs.
    release(launch, cta.K, k_position, me, "K", block, "Alg. 2 lines 11, 15");
    online_softmax(p, c, rows, block, c.S_next, s.round_p);  // line 12
    trace.step(role, "softmax", "Alg. 2 line 12", "S_next -> P~_next, m_new, l_i%s",
               needs_mask(p, rows, block) ? " (masked)" : "");
    // Line 13: P~_cur V_{j+1} is done. Line 14: O_i = diag(exp(m_i - m_new)) O_i.
    tiles::scale_rows(c.O.data(), rows.count, p.head_dim, p.head_dim, c.alpha.data());
    trace.step(role, "rescale", "Alg. 2 line 14", "O *= exp(m_i - m_new)");
    release(launch, cta.V, v_position, me, "V", previous, "Alg. 2 line 15");
    std::copy_n(c.m_new.data(), rows.columns, c.m_i.data());  // line 16: m_i = m_new, P~_cur = P~_next
    std::swap(c.P_cur, c.S_next);
  }
  // The tile's last S GEMM has run: Q_i can be replaced (FA3's code signals "query empty" here).
  trace.step(role, "release", "after Alg. 2 line 17", "Q[%lld]", static_cast<long long>(tile.i));
  cta.Q_empty.arrive();
  // Epilogue, lines 18-20: the last P~ V, outside the pingpong turns (as in FA3's code).
  const float* V_stage = wait_full(cta.V, v_position);  // line 18
  gemm_pv(p, c, rows, c.P_cur, V_stage, block);         // line 19
  trace.step(role, "gemm1", "Alg. 2 line 19", "O += P~_cur V[%lld] (stage %lld)", static_cast<long long>(block.j),
             static_cast<long long>(v_position.stage));
  release(launch, cta.V, v_position, me, "V", block, "Alg. 2 line 20");
  // LAB END flash-v3-cpu
}

// A consumer: for each of this CTA's Q tiles, its half of the rows through FA3 Alg. 2.
void consumer(const Launch& launch, Cta& cta, int me, std::int64_t first_tile) {
  const AttentionProblem& p = launch.p;
  const Settings& s = launch.s;
  ConsumerTiles& c = cta.consumer[me];
  RingPosition k_position, v_position;
  std::int64_t tiles_done = 0;
  for (std::int64_t index = first_tile; index < tile_count(p, s); index += s.ctas, ++tiles_done) {
    const QueryTile tile = query_tile(p, s, index);
    const ConsumerRows rows = rows_of(tile, s, me);
    cta.Q_full.wait(tiles_done + 1);  // Alg. 2 line 2: wait Q_i
    start_rows(p, c, cta.Q.data(), rows);
    if (tile.Tc > 0) {
      attend_tile(launch, cta, me, tile, rows, k_position, v_position);
    } else {  // no row of this tile sees a key (causal, Nq > Nk): nothing was loaded but Q_i
      launch.trace.step(kRoleName[me], "release", "", "Q[%lld] (no visible K/V block)", static_cast<long long>(tile.i));
      cta.Q_empty.arrive();
    }
    finish_rows(p, launch.t, c, rows, head_pointers(p, launch.t, tile.b, tile.h));  // Alg. 2 lines 21-22
    if (rows.count > 0)
      launch.trace.step(kRoleName[me], "write", "Alg. 2 lines 21-22", "O, LSE rows %lld-%lld",
                        static_cast<long long>(rows.row0), static_cast<long long>(rows.row0 + rows.count - 1));
  }
}

// Runs s.ctas CTAs side by side; CTA c takes Q tiles c, c + ctas, ... (a static persistent tile scheduler).
// Every buffer is allocated before any thread starts, so the roles never allocate. If a role throws, every
// CTA is cancelled (each wait then throws PipelineCancelled), the threads are joined and the error rethrown.
void run_ctas(const Launch& launch) {
  std::deque<Cta> ctas;
  for (std::int64_t c = 0; c < launch.s.ctas; ++c) ctas.emplace_back(launch.s, launch.p.head_dim);
  std::mutex failure_lock;
  std::exception_ptr failure;
  auto guarded = [&](auto&& role) {
    try {
      role();
    } catch (const PipelineCancelled&) {
    } catch (...) {
      {
        const std::lock_guard<std::mutex> lock(failure_lock);
        if (!failure) failure = std::current_exception();
      }
      for (Cta& cta : ctas) cta.cancel();
    }
  };
  {
    std::vector<std::jthread> threads;
    threads.reserve(ctas.size() * (1 + kConsumers));
    try {
      for (std::int64_t c = 0; c < launch.s.ctas; ++c) {
        Cta& cta = ctas[c];
        threads.emplace_back([&, c] { guarded([&] { producer(launch, cta, c); }); });
        for (int me = 0; me < kConsumers; ++me)
          threads.emplace_back([&, c, me] { guarded([&] { consumer(launch, cta, me, c); }); });
      }
    } catch (...) {  // a thread could not be started: stop those that were, join them (below), rethrow
      for (Cta& cta : ctas) cta.cancel();
      throw;
    }
  }  // every thread joined here
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

TierCaps cpu_caps() {
  TierCaps caps;
  caps.dtypes = {DType::f32};
  caps.max_head_dim = 256;  // any head dim from 1 to 256 (the GPU tier's largest)
  caps.has_backward = false;
  return caps;
}

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "flash_v3/cpu", false);
  const Settings s = read_settings(p, options);
  Trace trace(s.trace);
  if (s.trace)
    std::fprintf(stderr, "# flash_v3/cpu schedule: %s, Br = %lld, Bc = %lld, %lld stages\n", p.describe().c_str(),
                 static_cast<long long>(s.Br), static_cast<long long>(s.Bc), static_cast<long long>(s.stages));
  run_ctas(Launch{p, t, s, trace});
}

Stage describe() {
  Stage stage;
  stage.name = "flash_v3";
  stage.paper = "FlashAttention-3 (Shah et al. 2024)";
  stage.adds = "Hopper: TMA producer, wgmma consumers, pingpong, GEMM-softmax overlap (forward only)";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_cpu(p, t, options);
    options.counters["Tc"] = static_cast<double>(blocks_of(p.seq_k, read_settings(p, options).Bc));
  };
  // One CTA's Q tile, K and V rings and consumer tiles, whatever N (exact for the default options; the harness
  // uses the estimate only to refuse problems that cannot fit).
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool) {
    const Settings s = read_settings(p, StageOptions{});
    return static_cast<std::size_t>(s.ctas * cta_floats(s, p.head_dim)) * sizeof(float);
  };
  cpu.option_names = {"trace", "block_rows", "block_cols", "stages", "round_p", "ctas"};
  cpu.no_backward_note = "backward not implemented yet";
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::flash_v3
