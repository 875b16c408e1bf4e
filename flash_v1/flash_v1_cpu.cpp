// flash_v1, CPU tier: FlashAttention's Algorithm 1 (forward, with Algorithm 2's causal mask) and Algorithm 4
// (backward), line for line (restated in docs/papers/flash_v1.md). "HBM" is main memory (the tensors and the l, m arrays);
// "on-chip memory" is a set of tile buffers of at most M bytes, which the core's L2 cache holds.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "common/cpu_tiles.hpp"
#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/simd.hpp"
#include "common/validate.hpp"
#include "flash_v1/flash_v1.hpp"

namespace attn::flash_v1 {
namespace {

using tiles::kNegInf;
using tiles::MatrixView;
using tiles::Update;

// The default M: the core's private L2 cache, the CPU's nearest analogue of a GPU's shared memory per SM
// (sysconf, else /sys, else 256 KiB).
std::int64_t default_sram_bytes() {
  long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (bytes <= 0) {
    if (std::FILE* file = std::fopen("/sys/devices/system/cpu/cpu0/cache/index2/size", "r")) {
      long kib = 0;
      if (std::fscanf(file, "%ldK", &kib) == 1) bytes = kib * 1024;
      std::fclose(file);
    }
  }
  return bytes > 0 ? bytes : 256 * 1024;
}

struct Settings {
  std::int64_t Br = 0, Bc = 0;
  bool count_io = false;
};

std::int64_t positive_option(const StageOptions& options, const char* name) {
  const std::int64_t value = options.values.at(name);
  if (value < 1) throw std::invalid_argument(std::string(name) + ": must be >= 1, got " + std::to_string(value));
  return value;
}

// FA1 Alg. 1 line 1, with the options' overrides and their rules.
Settings read_settings(const AttentionProblem& p, const StageOptions& options) {
  const std::int64_t D = p.head_dim;
  const bool sram_given = options.values.count("sram_bytes") != 0;
  const std::int64_t M = sram_given ? positive_option(options, "sram_bytes") : default_sram_bytes();
  // M must hold at least one row of each of the four blocks (Q_i, K_j, V_j, O_i): 4 d floats.
  const std::int64_t one_row = 4 * D * static_cast<std::int64_t>(sizeof(float));
  if (M < one_row)
    throw std::invalid_argument("sram_bytes: " + std::to_string(M) + " bytes cannot hold one row of each of Q_i, K_j, V_j and O_i at head_dim " +
                                std::to_string(D) + " (needs at least " + std::to_string(one_row) + ")");
  const BlockSizes paper = block_sizes(M, D);
  Settings s;
  s.Br = options.values.count("block_rows") ? positive_option(options, "block_rows") : paper.Br;
  s.Bc = options.values.count("block_cols") ? positive_option(options, "block_cols") : paper.Bc;
  // Blocks chosen by hand must fit an M that was given too: Q_i, O_i (Br x d) and K_j, V_j (Bc x d).
  // In double: block_rows = 2^63 - 1 must be refused, not wrap to a negative need.
  const double needed = 2.0 * (static_cast<double>(s.Br) + static_cast<double>(s.Bc)) * static_cast<double>(D) * sizeof(float);
  if (sram_given && (options.values.count("block_rows") || options.values.count("block_cols")) && needed > static_cast<double>(M))
  {
    char bytes[32];
    std::snprintf(bytes, sizeof bytes, "%.0f", needed);
    throw std::invalid_argument("block_rows/block_cols: blocks of " + std::to_string(s.Br) + " and " + std::to_string(s.Bc) +
                                " rows need " + bytes + " bytes of on-chip memory, more than sram_bytes = " +
                                std::to_string(M));
  }
  s.Br = std::min(s.Br, p.seq_q);  // a block larger than the sequence is the whole sequence
  s.Bc = std::min(s.Bc, p.seq_k);
  s.count_io = options.get("count_io", 0) != 0;
  return s;
}

std::int64_t blocks_of(std::int64_t n, std::int64_t block) { return (n + block - 1) / block; }

// Bytes moved between "HBM" and the tiles, counted only with count_io (one branch per block when off).
struct IoCounter {
  bool enabled;
  double bytes = 0;
  void add(std::int64_t floats) {
    if (enabled) bytes += static_cast<double>(floats) * sizeof(float);
  }
};

// Copies `rows` rows of D floats between an HBM tensor (row stride `stride`) and a dense tile.
void load_rows(const float* hbm, std::int64_t stride, std::int64_t rows, std::int64_t D, float* tile, IoCounter& io) {
  tiles::copy_rows(hbm, rows, D, stride, tile, D);
  io.add(rows * D);
}
void store_rows(const float* tile, std::int64_t rows, std::int64_t D, float* hbm, std::int64_t stride, IoCounter& io) {
  tiles::copy_rows(tile, rows, D, D, hbm, stride);
  io.add(rows * D);
}

// The number of keys of block [key0, key0 + keys) that query row `row` sees (Algorithm 2's MASK).
std::int64_t visible_in_block(const AttentionProblem& p, std::int64_t row, std::int64_t key0, std::int64_t keys) {
  return p.causal ? std::clamp<std::int64_t>(p.visible_keys(row) - key0, 0, keys) : keys;
}

// The on-chip memory of the forward: K_j (transposed, for S = Q_i K_j^T), V_j, and the Q_i, O_i, l_i, m_i
// loaded in each inner step, plus the Br x Bc scores.
struct ForwardTiles {
  ForwardTiles(std::int64_t Br, std::int64_t Bc, std::int64_t D)
      : Kt(D * Bc), V(Bc * D), Q(Br * D), O(Br * D), PV(Br * D), S(Br * Bc), l(Br), m(Br), old_coef(Br), new_coef(Br) {}
  HostBuffer<float> Kt, V, Q, O, PV, S, l, m;
  HostBuffer<float> old_coef, new_coef;  // line 12's per-row factors
};

// The on-chip memory of the backward (Algorithm 4): K_j, V_j and their transposes, dK~_j, dV~_j, the Q-side
// blocks of line 10, and the Br x Bc tiles P_ij and dS_ij.
struct BackwardTiles {
  BackwardTiles(std::int64_t Br, std::int64_t Bc, std::int64_t D)
      : K(Bc * D), V(Bc * D), Kt(D * Bc), Vt(D * Bc), dK(Bc * D), dV(Bc * D), Q(Br * D), O(Br * D), dO(Br * D),
        dQ(Br * D), L(Br), P(Br * Bc), dS(Br * Bc) {}
  HostBuffer<float> K, V, Kt, Vt, dK, dV, Q, O, dO, dQ, L, P, dS;
};

}  // namespace

BlockSizes block_sizes(std::int64_t sram_bytes, std::int64_t head_dim) {
  // M counts floats here: the four blocks Q_i, K_j, V_j, O_i of about M / 4 floats each.
  const std::int64_t M = sram_bytes / static_cast<std::int64_t>(sizeof(float));
  BlockSizes sizes;
  sizes.Bc = std::max<std::int64_t>((M + 4 * head_dim - 1) / (4 * head_dim), 1);
  sizes.Br = std::min(sizes.Bc, head_dim);
  return sizes;
}

TierCaps cpu_caps() { return TierCaps{{DType::f32}, 256, {}, true, 0}; }

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "flash_v1/cpu", false);
  const Settings s = read_settings(p, options);  // line 1: Br, Bc
  const std::int64_t D = p.head_dim, Br = s.Br, Bc = s.Bc;
  // LAB BEGIN flash-v1: FA1 Alg. 1 lines 2-16: K/V blocks outside, Q blocks inside, O, l, m in HBM
  const std::int64_t Tr = blocks_of(p.seq_q, Br), Tc = blocks_of(p.seq_k, Bc);  // lines 3-4
  progress::expect(static_cast<double>(p.batch * p.q_heads * Tc));
  const std::int64_t q_seq = t.q_strides.seq, kv_seq = t.kv_strides.seq;
  // l and m live in HBM next to O (line 2): that is this stage's O(N) extra memory.
  HostBuffer<float> l_hbm(p.batch * p.q_heads * p.seq_q), m_hbm(p.batch * p.q_heads * p.seq_q);
  double io_bytes = 0;

  // FlashAttention-1 runs one thread block per (batch, head); here one OpenMP iteration per (batch, head).
#pragma omp parallel reduction(+ : io_bytes)
  {
    ForwardTiles tile(Br, Bc, D);
    IoCounter io{s.count_io};
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t h = 0; h < p.q_heads; ++h) {
        const std::int64_t bh = b * p.q_heads + h, kv_head = p.kv_head_of(h);
        const float* q = row_pointer(static_cast<const float*>(t.q), t.q_strides, b, h, 0);
        const float* k = row_pointer(static_cast<const float*>(t.k), t.kv_strides, b, kv_head, 0);
        const float* v = row_pointer(static_cast<const float*>(t.v), t.kv_strides, b, kv_head, 0);
        float* o = row_pointer(static_cast<float*>(t.o), t.q_strides, b, h, 0);
        float* l = l_hbm.data() + bh * p.seq_q;
        float* m = m_hbm.data() + bh * p.seq_q;
        // Line 2: O = 0, l = 0, m = -inf in HBM.
        for (std::int64_t i = 0; i < p.seq_q; ++i) std::fill_n(o + i * q_seq, D, 0.0f);
        std::fill_n(l, p.seq_q, 0.0f);
        std::fill_n(m, p.seq_q, kNegInf);
        io.add(p.seq_q * (D + 2));

        for (std::int64_t j = 0; j < Tc; ++j) {  // line 5: the OUTER loop runs over K/V blocks
          progress::advance();
          const std::int64_t key0 = j * Bc, keys = std::min(Bc, p.seq_k - key0);
          // Line 6: load K_j, V_j on chip (K_j transposed and scaled by tau for line 9's product).
          tiles::pack_transposed(k + key0 * kv_seq, keys, D, kv_seq, p.softmax_scale(), tile.Kt.data(), Bc, Bc);
          io.add(keys * D);
          load_rows(v + key0 * kv_seq, kv_seq, keys, D, tile.V.data(), io);

          for (std::int64_t i = 0; i < Tr; ++i) {  // line 7: the INNER loop runs over Q blocks
            const std::int64_t row0 = i * Br, rows = std::min(Br, p.seq_q - row0);
            // Algorithm 2's mask makes a block that lies wholly above the diagonal a no-op (m~ = -inf leaves
            // O_i, l_i, m_i unchanged): skip it, as FlashAttention's implementation does.
            if (visible_in_block(p, row0 + rows - 1, key0, keys) == 0) continue;
            // Line 8: load Q_i, O_i, l_i, m_i from HBM.
            load_rows(q + row0 * q_seq, q_seq, rows, D, tile.Q.data(), io);
            load_rows(o + row0 * q_seq, q_seq, rows, D, tile.O.data(), io);
            std::copy_n(l + row0, rows, tile.l.data());
            std::copy_n(m + row0, rows, tile.m.data());
            io.add(2 * rows);
            // Line 9: S_ij = tau Q_i K_j^T (rows x keys).
            tiles::matmul(Update::overwrite, rows, keys, D, MatrixView{tile.Q.data(), D, 1}, tile.Kt.data(), Bc, tile.S.data(), Bc);
            for (std::int64_t r = 0; r < rows; ++r) {
              float* S = tile.S.data() + r * Bc;
              // Algorithm 2: S_ij = MASK(S_ij), keys past the row's last visible key get -inf.
              const std::int64_t visible = visible_in_block(p, row0 + r, key0, keys);
              std::fill(S + visible, S + keys, kNegInf);
              // Line 10: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij), l~_ij = rowsum(P~_ij).
              const float m_tilde = simd::max(S, keys);
              float l_tilde = 0.0f;
              if (m_tilde == kNegInf)
                std::fill_n(S, keys, 0.0f);  // this row sees no key of the block: P~ = 0
              else
                l_tilde = simd::exp_shifted_sum(S, m_tilde, keys);
              // Line 11: m_new = max(m_i, m~_ij), l_new = exp(m_i - m_new) l_i + exp(m~_ij - m_new) l~_ij.
              const float m_new = std::max(tile.m[r], m_tilde);
              const float old_weight = m_new == kNegInf ? 0.0f : std::exp(tile.m[r] - m_new);
              const float new_weight = m_new == kNegInf ? 0.0f : std::exp(m_tilde - m_new);
              const float l_new = old_weight * tile.l[r] + new_weight * l_tilde;
              // Line 12's two factors: O_i = old_coef O_i + new_coef P~_ij V_j.
              const float inverse = l_new > 0.0f ? 1.0f / l_new : 0.0f;  // l_new = 0: the row has seen no key yet
              tile.old_coef[r] = inverse * tile.l[r] * old_weight;
              tile.new_coef[r] = inverse * new_weight;
              tile.l[r] = l_new;
              tile.m[r] = m_new;
            }
            // Line 12: O_i = diag(l_new)^-1 (diag(l_i) exp(m_i - m_new) O_i + exp(m~_ij - m_new) P~_ij V_j).
            tiles::matmul(Update::overwrite, rows, D, keys, MatrixView{tile.S.data(), Bc, 1}, tile.V.data(), D, tile.PV.data(), D);
            for (std::int64_t r = 0; r < rows; ++r) {
              simd::scale(tile.old_coef[r], tile.O.data() + r * D, D);
              simd::axpy(tile.new_coef[r], tile.PV.data() + r * D, tile.O.data() + r * D, D);
            }
            store_rows(tile.O.data(), rows, D, o + row0 * q_seq, q_seq, io);
            // Line 13: write l_i = l_new, m_i = m_new to HBM.
            std::copy_n(tile.l.data(), rows, l + row0);
            std::copy_n(tile.m.data(), rows, m + row0);
            io.add(2 * rows);
          }
        }
        // The harness keeps L = m + log(l) for the backward (FlashAttention-2's convention): one more pass.
        for (std::int64_t i = 0; i < p.seq_q; ++i) t.lse[bh * p.seq_q + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kNegInf;
        io.add(3 * p.seq_q);
      }
    io_bytes += io.bytes;
  }
  if (s.count_io) options.counters["hbm_bytes"] = io_bytes;
  // LAB END flash-v1
}

void backward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "flash_v1/cpu", true);
  const Settings s = read_settings(p, options);  // line 2: Br, Bc
  const std::int64_t D = p.head_dim, Br = s.Br, Bc = s.Bc, group = p.group_size();
  // LAB BEGIN flash-v1: FA1 Alg. 4 lines 5-24: K/V blocks outside, Q blocks inside, dQ in HBM
  const std::int64_t Tr = blocks_of(p.seq_q, Br), Tc = blocks_of(p.seq_k, Bc);  // lines 3-4
  progress::expect(static_cast<double>(p.batch * p.kv_heads * Tc));
  const std::int64_t q_seq = t.q_strides.seq, kv_seq = t.kv_strides.seq;
  const float tau = p.softmax_scale();
  double io_bytes = 0;

  // One OpenMP iteration per (batch, KV head): with GQA the group's query heads all add into the same dK_j,
  // dV_j, and each head's dQ is touched by this iteration only.
#pragma omp parallel reduction(+ : io_bytes)
  {
    BackwardTiles tile(Br, Bc, D);
    IoCounter io{s.count_io};
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
        const float* k = row_pointer(static_cast<const float*>(t.k), t.kv_strides, b, kv_head, 0);
        const float* v = row_pointer(static_cast<const float*>(t.v), t.kv_strides, b, kv_head, 0);
        float* dk = row_pointer(static_cast<float*>(t.dk), t.kv_strides, b, kv_head, 0);
        float* dv = row_pointer(static_cast<float*>(t.dv), t.kv_strides, b, kv_head, 0);
        // Line 5: dQ = 0 in HBM (dK and dV are written whole at line 24).
        for (std::int64_t g = 0; g < group; ++g)
          for (std::int64_t i = 0; i < p.seq_q; ++i)
            std::fill_n(row_pointer(static_cast<float*>(t.dq), t.q_strides, b, kv_head * group + g, i), D, 0.0f);
        io.add(group * p.seq_q * D);

        for (std::int64_t j = 0; j < Tc; ++j) {  // line 6: the outer loop over K/V blocks
          progress::advance();
          const std::int64_t key0 = j * Bc, keys = std::min(Bc, p.seq_k - key0);
          // Line 7: load K_j, V_j (plus their transposes, for S_ij and dP_ij); line 8: dK~_j = dV~_j = 0.
          load_rows(k + key0 * kv_seq, kv_seq, keys, D, tile.K.data(), io);
          load_rows(v + key0 * kv_seq, kv_seq, keys, D, tile.V.data(), io);
          tiles::pack_transposed(tile.K.data(), keys, D, D, tau, tile.Kt.data(), Bc, Bc);
          tiles::pack_transposed(tile.V.data(), keys, D, D, 1.0f, tile.Vt.data(), Bc, Bc);
          std::fill_n(tile.dK.data(), keys * D, 0.0f);
          std::fill_n(tile.dV.data(), keys * D, 0.0f);

          for (std::int64_t g = 0; g < group; ++g) {
            const std::int64_t h = kv_head * group + g, bh = b * p.q_heads + h;
            const float* q = row_pointer(static_cast<const float*>(t.q), t.q_strides, b, h, 0);
            const float* o = row_pointer(static_cast<const float*>(t.o), t.q_strides, b, h, 0);
            const float* d_o = row_pointer(static_cast<const float*>(t.d_o), t.q_strides, b, h, 0);
            float* dq = row_pointer(static_cast<float*>(t.dq), t.q_strides, b, h, 0);
            const float* lse = t.lse + bh * p.seq_q;
            for (std::int64_t i = 0; i < Tr; ++i) {  // line 9: the inner loop over Q blocks
              const std::int64_t row0 = i * Br, rows = std::min(Br, p.seq_q - row0);
              if (visible_in_block(p, row0 + rows - 1, key0, keys) == 0) continue;  // wholly masked: P_ij = 0
              // Line 10: load Q_i, O_i, dO_i, dQ_i, l_i, m_i. The harness keeps only L = m + log(l), and
              // diag(l_i)^-1 exp(S - m_i) = exp(S - L_i), so L_i stands for the pair.
              load_rows(q + row0 * q_seq, q_seq, rows, D, tile.Q.data(), io);
              load_rows(o + row0 * q_seq, q_seq, rows, D, tile.O.data(), io);
              load_rows(d_o + row0 * q_seq, q_seq, rows, D, tile.dO.data(), io);
              load_rows(dq + row0 * q_seq, q_seq, rows, D, tile.dQ.data(), io);
              std::copy_n(lse + row0, rows, tile.L.data());
              io.add(rows);
              // Line 11: S_ij = tau Q_i K_j^T.
              tiles::matmul(Update::overwrite, rows, keys, D, MatrixView{tile.Q.data(), D, 1}, tile.Kt.data(), Bc, tile.P.data(), Bc);
              // Lines 12-13: P_ij = diag(l_i)^-1 exp(MASK(S_ij) - m_i) = exp(S_ij - L_i), 0 where masked.
              for (std::int64_t r = 0; r < rows; ++r) {
                float* P = tile.P.data() + r * Bc;
                const std::int64_t visible = visible_in_block(p, row0 + r, key0, keys);
                tiles::exp_shifted(P, tile.L[r], visible);
                std::fill(P + visible, P + keys, 0.0f);
              }
              // (Lines 14-15, dropout, are not part of this project.)
              // Line 16: dV~_j += P_ij^T dO_i.
              tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.P.data(), Bc), tile.dO.data(), D, tile.dV.data(), D);
              // Line 17: dP_ij = dO_i V_j^T.
              tiles::matmul(Update::overwrite, rows, keys, D, MatrixView{tile.dO.data(), D, 1}, tile.Vt.data(), Bc, tile.dS.data(), Bc);
              for (std::int64_t r = 0; r < rows; ++r) {
                // Line 19: D_i = rowsum(dO_i * O_i), recomputed in every inner step (FlashAttention-2 hoists it).
                const float D_i = simd::dot(tile.dO.data() + r * D, tile.O.data() + r * D, D);
                // Line 20: dS_ij = P_ij * (dP_ij - D_i), here times tau, which lines 21 and 22 both apply.
                tiles::softmax_gradient_row(tile.P.data() + r * Bc, tile.dS.data() + r * Bc, D_i, tau, keys);
              }
              // Line 21: dQ_i += tau dS_ij K_j, written back to HBM.
              tiles::matmul(Update::accumulate, rows, D, keys, MatrixView{tile.dS.data(), Bc, 1}, tile.K.data(), D, tile.dQ.data(), D);
              store_rows(tile.dQ.data(), rows, D, dq + row0 * q_seq, q_seq, io);
              // Line 22: dK~_j += tau dS_ij^T Q_i.
              tiles::matmul(Update::accumulate, keys, D, rows, tiles::transposed(tile.dS.data(), Bc), tile.Q.data(), D, tile.dK.data(), D);
            }
          }
          // Line 24: write dK_j = dK~_j, dV_j = dV~_j to HBM.
          store_rows(tile.dK.data(), keys, D, dk + key0 * kv_seq, kv_seq, io);
          store_rows(tile.dV.data(), keys, D, dv + key0 * kv_seq, kv_seq, io);
        }
      }
    io_bytes += io.bytes;
  }
  if (s.count_io) options.counters["hbm_bytes"] = io_bytes;
  // LAB END flash-v1
}

Stage describe() {
  Stage stage;
  stage.name = "flash_v1";
  stage.paper = "FlashAttention (Dao et al. 2022)";
  stage.adds = "tiling for on-chip memory: K/V blocks outer, Q blocks inner, O/l/m updated in HBM";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = [](const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
    forward_cpu(p, t, options);
    options.counters["Tc"] = static_cast<double>(blocks_of(p.seq_k, read_settings(p, options).Bc));
  };
  cpu.backward = backward_cpu;
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool) {
    return static_cast<std::size_t>(2 * p.batch * p.q_heads * p.seq_q) * sizeof(float);
  };
  cpu.option_names = {"sram_bytes", "block_rows", "block_cols", "count_io"};
  // M from the L2 cache differs between machines (2 MiB of L2 gives Bc = 2048: one K/V block at the ladder's
  // N = 2048, no online rescaling at all). The ladder pins what M = 512 KiB gives at d = 64: Tc = 4.
  cpu.ladder_options = {{"block_rows", 64}, {"block_cols", 512}};
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::flash_v1
