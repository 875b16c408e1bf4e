// paged, CPU tier: the paged KV cache (pools, reshape-and-cache, block copies) and decode attention through
// block tables, v1 and v2, in fp32 with OpenMP over work items and xsimd in the row loops. Step through
// attend_partition to watch one partition's online softmax walk the block table.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/simd.hpp"
#include "common/timer.hpp"
#include "common/validate.hpp"
#include "paged/paged.hpp"

namespace attn::paged {
namespace {

const float kNegInf = -std::numeric_limits<float>::infinity();

[[noreturn]] void reject(const std::string& argument, const std::string& rule) {
  throw std::invalid_argument(argument + ": " + rule);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

void validate_geometry(const CacheGeometry& g) {
  if (g.num_blocks < 1) reject("num_blocks", std::to_string(g.num_blocks) + " must be >= 1");
  if (g.block_size < 1) reject("block_size", std::to_string(g.block_size) + " must be >= 1");
  if (g.kv_heads < 1) reject("kv_heads", std::to_string(g.kv_heads) + " must be >= 1");
  if (g.head_dim < 1) reject("head_dim", std::to_string(g.head_dim) + " must be >= 1");
}

}  // namespace

// ---- the cache --------------------------------------------------------------------------------------------

HostKVCache::HostKVCache(const CacheGeometry& geometry, std::int64_t layers) : geometry_(geometry), layers_(layers) {
  validate_geometry(geometry);
  if (layers < 1) reject("layers", std::to_string(layers) + " must be >= 1");
  k_ = HostBuffer<float>(static_cast<std::size_t>(layers * geometry.pool_elements()));
  v_ = HostBuffer<float>(static_cast<std::size_t>(layers * geometry.pool_elements()));
}

float DecodeBatch::softmax_scale() const {
  return scale > 0.0 ? static_cast<float>(scale) : 1.0f / std::sqrt(static_cast<float>(cache.head_dim));
}

std::int64_t DecodeBatch::max_context() const {
  std::int64_t longest = 0;
  for (std::int32_t length : context_lens) longest = std::max<std::int64_t>(longest, length);
  return longest;
}

double DecodeBatch::kv_bytes(DType dtype) const {
  double tokens = 0;
  for (std::int32_t length : context_lens) tokens += length;
  return 2.0 * tokens * static_cast<double>(cache.kv_heads * cache.head_dim * dtype_size(dtype));
}

DecodeBatch make_decode_batch(const BlockManager& manager, const std::vector<SequenceId>& sequences,
                              const CacheGeometry& cache, std::int64_t q_heads, double scale) {
  if (cache.block_size != manager.block_size() || cache.num_blocks != manager.num_blocks())
    reject("cache", "geometry does not match the block manager's pool");
  DecodeBatch batch;
  batch.cache = cache;
  batch.q_heads = q_heads;
  batch.scale = scale;
  for (SequenceId id : sequences) {
    batch.context_lens.push_back(static_cast<std::int32_t>(manager.length(id)));
    batch.max_blocks_per_sequence =
        std::max<std::int64_t>(batch.max_blocks_per_sequence, static_cast<std::int64_t>(manager.block_table(id).size()));
  }
  batch.block_tables.assign(sequences.size() * batch.max_blocks_per_sequence, -1);  // -1: unused entry
  for (std::size_t b = 0; b < sequences.size(); ++b) {
    const std::vector<BlockId>& table = manager.block_table(sequences[b]);
    std::copy(table.begin(), table.end(), batch.block_tables.begin() + b * batch.max_blocks_per_sequence);
  }
  return batch;
}

void validate_decode_batch(const DecodeBatch& batch, const std::string& who) {
  validate_geometry(batch.cache);
  if (batch.q_heads < 1 || batch.q_heads % batch.cache.kv_heads != 0)
    reject("q_heads", std::to_string(batch.q_heads) + " must be a positive multiple of kv_heads (" +
                          std::to_string(batch.cache.kv_heads) + ") for " + who);
  if (!std::isfinite(batch.scale) || batch.scale < 0.0) reject("scale", "must be finite and > 0 (0 selects 1/sqrt(head_dim))");
  if (batch.sequences() < 1) reject("context_lens", "the batch has no sequence");
  if (batch.max_blocks_per_sequence < 1) reject("max_blocks_per_sequence", "must be >= 1");
  if (static_cast<std::int64_t>(batch.block_tables.size()) != batch.sequences() * batch.max_blocks_per_sequence)
    reject("block_tables", "has " + std::to_string(batch.block_tables.size()) + " entries, expected sequences * " +
                               "max_blocks_per_sequence = " + std::to_string(batch.sequences() * batch.max_blocks_per_sequence));
  const std::int64_t capacity = batch.max_blocks_per_sequence * batch.cache.block_size;
  for (std::int64_t b = 0; b < batch.sequences(); ++b) {
    const std::int64_t length = batch.context_lens[b];
    if (length < 0 || length > capacity)
      reject("context_lens[" + std::to_string(b) + "]", std::to_string(length) + " is outside [0, " +
                                                            std::to_string(capacity) + "] (max_blocks_per_sequence * block_size)");
    for (std::int64_t i = 0; i < ceil_div(length, batch.cache.block_size); ++i) {
      const std::int64_t block = batch.block_tables[b * batch.max_blocks_per_sequence + i];
      if (block < 0 || block >= batch.cache.num_blocks)
        reject("block_tables[" + std::to_string(b) + "][" + std::to_string(i) + "]",
               std::to_string(block) + " is outside the pool [0, " + std::to_string(batch.cache.num_blocks) + ")");
    }
  }
}

void validate_slot_mapping(const CacheGeometry& cache, std::span<const std::int64_t> slot_mapping, std::int64_t tokens) {
  validate_geometry(cache);
  if (static_cast<std::int64_t>(slot_mapping.size()) != tokens)
    reject("slot_mapping", "has " + std::to_string(slot_mapping.size()) + " entries for " + std::to_string(tokens) + " tokens");
  for (std::size_t t = 0; t < slot_mapping.size(); ++t)
    if (slot_mapping[t] < -1 || slot_mapping[t] >= cache.slots())
      reject("slot_mapping[" + std::to_string(t) + "]", std::to_string(slot_mapping[t]) + " is outside [-1, " +
                                                             std::to_string(cache.slots()) + ") (-1 skips a padding token)");
}

void write_to_cache_cpu(const CacheGeometry& cache, const NewTokens& tokens, std::span<const std::int64_t> slot_mapping,
                        float* k_cache, float* v_cache) {
  validate_slot_mapping(cache, slot_mapping, tokens.count);
  const auto* k = static_cast<const float*>(tokens.k);
  const auto* v = static_cast<const float*>(tokens.v);
  const std::int64_t D = cache.head_dim;
#pragma omp parallel for schedule(static)
  for (std::int64_t t = 0; t < tokens.count; ++t) {
    const std::int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    const std::int64_t block = slot / cache.block_size, offset = slot % cache.block_size;
    for (std::int64_t h = 0; h < cache.kv_heads; ++h) {
      const std::int64_t source = t * tokens.token_stride + h * tokens.head_stride;
      std::copy(k + source, k + source + D, k_cache + cache.row(block, h, offset));
      std::copy(v + source, v + source + D, v_cache + cache.row(block, h, offset));
    }
  }
}

void copy_blocks_cpu(const CacheGeometry& cache, std::span<const BlockCopy> copies, float* k_cache, float* v_cache) {
  const std::int64_t block_elements = cache.kv_heads * cache.block_size * cache.head_dim;
  for (const BlockCopy& c : copies) {
    if (c.source < 0 || c.source >= cache.num_blocks || c.destination < 0 || c.destination >= cache.num_blocks)
      reject("copies", "block " + std::to_string(c.source) + " -> " + std::to_string(c.destination) +
                           " is outside the pool [0, " + std::to_string(cache.num_blocks) + ")");
    for (float* pool : {k_cache, v_cache})
      std::copy(pool + c.source * block_elements, pool + (c.source + 1) * block_elements, pool + c.destination * block_elements);
  }
}

int choose_variant(const DecodeBatch& batch, std::int64_t parallel_units) {
  // Measured on the H100 (README.md): v1 wins whenever the (sequence, KV head) work items fill the machine
  // twice over, and also with fewer items up to 2k-token contexts (a v1 block keeps 8 chunks in flight and
  // pays no reduction); v2 wins from 8k tokens when the items are few. vLLM's rule is similar (v1 for
  // contexts up to 8192 with enough sequences x heads).
  const std::int64_t work_items = batch.sequences() * batch.cache.kv_heads;
  return work_items < 2 * parallel_units && batch.max_context() > 4096 ? 2 : 1;
}

// ---- decode -----------------------------------------------------------------------------------------------
namespace {

/// Running softmax state of one query head over the keys seen so far: m (largest logit), l (sum of
/// exp(logit - m)) and acc (sum of exp(logit - m) * v, not yet divided by l) -- FlashAttention's m_i, l_i, O_i.
struct SoftmaxState {
  float m = kNegInf;
  float l = 0.0f;
  std::vector<float> acc;
};

/// One partition: keys [begin, end) of sequence b, for the group of query heads that read KV head kv_head.
/// The block table turns each logical block i into the physical block whose rows are read: this lookup is
/// the whole difference from contiguous attention. Per cache block, the online softmax update (FA2 Alg. 1
/// lines 8-10): logits, new max, rescale by exp(m_old - m_new), accumulate p V.
void attend_partition(const DecodeBatch& batch, const DecodeTensors& t, std::int64_t b, std::int64_t kv_head,
                      std::int64_t begin, std::int64_t end, std::vector<SoftmaxState>& heads, std::vector<float>& logits) {
  // LAB BEGIN paged-decode: one partition's online softmax through the block table
  const CacheGeometry& g = batch.cache;
  const std::int64_t D = g.head_dim, G = batch.group_size();
  const float scale = batch.softmax_scale();
  const auto* q = static_cast<const float*>(t.q);
  const auto* k_cache = static_cast<const float*>(t.k_cache);
  const auto* v_cache = static_cast<const float*>(t.v_cache);
  const std::int32_t* table = batch.block_tables.data() + b * batch.max_blocks_per_sequence;

  for (SoftmaxState& s : heads) {
    s.m = kNegInf;
    s.l = 0.0f;
    s.acc.assign(static_cast<std::size_t>(D), 0.0f);
  }
  for (std::int64_t logical = begin / g.block_size; logical * g.block_size < end; ++logical) {
    const std::int64_t physical = table[logical];
    const std::int64_t first = std::max(begin, logical * g.block_size) - logical * g.block_size;  // offsets in block
    const std::int64_t last = std::min(end, (logical + 1) * g.block_size) - logical * g.block_size;
    const float* k_block = k_cache + g.row(physical, kv_head, 0);
    const float* v_block = v_cache + g.row(physical, kv_head, 0);
    for (std::int64_t j = 0; j < G; ++j) {
      const std::int64_t h = kv_head * G + j;
      const float* q_row = q + b * t.q_strides.batch + h * t.q_strides.head;
      SoftmaxState& s = heads[j];
      for (std::int64_t i = first; i < last; ++i) logits[i] = scale * simd::dot(q_row, k_block + i * D, D);
      const float m_new = std::max(s.m, simd::max(logits.data() + first, last - first));
      const float rescale = std::exp(s.m - m_new);  // exp(-inf) = 0 on the first block
      s.l *= rescale;
      simd::scale(rescale, s.acc.data(), D);
      for (std::int64_t i = first; i < last; ++i) {
        const float p = std::exp(logits[i] - m_new);
        s.l += p;
        simd::axpy(p, v_block + i * D, s.acc.data(), D);
      }
      s.m = m_new;
    }
  }
  // LAB END paged-decode
}

/// O = acc / l and LSE = m + log l; a sequence with no keys gives O = 0 and LSE = -inf.
void finish_row(const SoftmaxState& s, std::int64_t D, float* o, float* lse) {
  const float inverse = s.l > 0.0f ? 1.0f / s.l : 0.0f;
  for (std::int64_t d = 0; d < D; ++d) o[d] = s.acc[d] * inverse;
  *lse = s.l > 0.0f ? s.m + std::log(s.l) : kNegInf;
}

/// v1: one work item per (sequence, KV head) runs the whole context as a single partition.
void decode_v1(const DecodeBatch& batch, const DecodeTensors& t) {
  // LAB BEGIN paged-decode: decode v1: one partition per (sequence, KV head)
  const std::int64_t B = batch.sequences(), Hkv = batch.cache.kv_heads, G = batch.group_size(), D = batch.cache.head_dim;
  auto* o = static_cast<float*>(t.o);
#pragma omp parallel
  {
    std::vector<SoftmaxState> heads(static_cast<std::size_t>(G));
    std::vector<float> logits(static_cast<std::size_t>(batch.cache.block_size));
#pragma omp for collapse(2) schedule(dynamic)
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t kv_head = 0; kv_head < Hkv; ++kv_head) {
        attend_partition(batch, t, b, kv_head, 0, batch.context_lens[b], heads, logits);
        for (std::int64_t j = 0; j < G; ++j) {
          const std::int64_t h = kv_head * G + j;
          finish_row(heads[j], D, o + b * t.q_strides.batch + h * t.q_strides.head, t.lse + b * batch.q_heads + h);
        }
      }
    }
  }
  // LAB END paged-decode
}

/// v2 (flash-decoding): every (sequence, KV head, partition) is a work item writing a partial O_p normalised
/// by its own l_p, and its LSE_p; then per (sequence, query head) the partials combine as
///   LSE = log sum_p exp(LSE_p),   O = sum_p exp(LSE_p - LSE) O_p.
void decode_v2(const DecodeBatch& batch, const DecodeTensors& t, std::int64_t partition_tokens) {
  // LAB BEGIN paged-decode: decode v2: partitions in parallel, then their merge
  const std::int64_t B = batch.sequences(), Hkv = batch.cache.kv_heads, G = batch.group_size(), D = batch.cache.head_dim;
  const std::int64_t Hq = batch.q_heads;
  const std::int64_t P = std::max<std::int64_t>(1, ceil_div(batch.max_context(), partition_tokens));
  HostBuffer<float> partial_o(static_cast<std::size_t>(B * Hq * P * D));
  HostBuffer<float> partial_lse(static_cast<std::size_t>(B * Hq * P));
  auto partial_index = [&](std::int64_t b, std::int64_t h, std::int64_t p) { return (b * Hq + h) * P + p; };

#pragma omp parallel
  {
    std::vector<SoftmaxState> heads(static_cast<std::size_t>(G));
    std::vector<float> logits(static_cast<std::size_t>(batch.cache.block_size));
#pragma omp for collapse(3) schedule(dynamic)
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t kv_head = 0; kv_head < Hkv; ++kv_head) {
        for (std::int64_t p = 0; p < P; ++p) {
          const std::int64_t begin = p * partition_tokens;
          const std::int64_t end = std::min<std::int64_t>(begin + partition_tokens, batch.context_lens[b]);
          if (begin >= end && p > 0) continue;  // past this sequence's context: the reduction skips it
          attend_partition(batch, t, b, kv_head, begin, std::max(begin, end), heads, logits);
          for (std::int64_t j = 0; j < G; ++j) {
            const std::int64_t index = partial_index(b, kv_head * G + j, p);
            finish_row(heads[j], D, partial_o.data() + index * D, partial_lse.data() + index);
          }
        }
      }
    }
  }

  // The reduction: combine the partitions of each (sequence, query head) by their log-sum-exp.
  auto* o = static_cast<float*>(t.o);
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t partitions = std::max<std::int64_t>(1, ceil_div(batch.context_lens[b], partition_tokens));
      float max_lse = kNegInf;
      for (std::int64_t p = 0; p < partitions; ++p) max_lse = std::max(max_lse, partial_lse[partial_index(b, h, p)]);
      float* o_row = o + b * t.q_strides.batch + h * t.q_strides.head;
      float* lse = t.lse + b * Hq + h;
      std::fill(o_row, o_row + D, 0.0f);
      if (max_lse == kNegInf) {  // empty context
        *lse = kNegInf;
        continue;
      }
      float sum = 0.0f;
      for (std::int64_t p = 0; p < partitions; ++p) sum += std::exp(partial_lse[partial_index(b, h, p)] - max_lse);
      const float total_lse = max_lse + std::log(sum);
      for (std::int64_t p = 0; p < partitions; ++p) {
        const std::int64_t index = partial_index(b, h, p);
        simd::axpy(std::exp(partial_lse[index] - total_lse), partial_o.data() + index * D, o_row, D);
      }
      *lse = total_lse;
    }
  }
  // LAB END paged-decode
}

}  // namespace

void decode_cpu(const DecodeBatch& batch, const DecodeTensors& t, const DecodeOptions& options) {
  validate_decode_batch(batch, "paged/cpu");
  if (t.dtype != DType::f32) reject("dtype", std::string(dtype_name(t.dtype)) + " is not supported by paged/cpu (f32 only)");
  if (t.q == nullptr || t.k_cache == nullptr || t.v_cache == nullptr || t.o == nullptr || t.lse == nullptr)
    reject("tensors", "q, k_cache, v_cache, o and lse must all be set");
  if (options.partition_tokens < 1) reject("partition", std::to_string(options.partition_tokens) + " must be >= 1");
  const int variant = options.variant == 0 ? choose_variant(batch, omp_get_max_threads()) : options.variant;
  if (variant == 1)
    decode_v1(batch, t);
  else if (variant == 2)
    decode_v2(batch, t, options.partition_tokens);
  else
    reject("variant", std::to_string(options.variant) + " must be 0 (choose), 1 or 2");
}

// ---- the registry entry -----------------------------------------------------------------------------------

void validate_paging(const AttentionProblem& p, std::int64_t block_size) {
  const std::int64_t int32_max = std::numeric_limits<std::int32_t>::max();
  if (p.seq_k > int32_max)
    reject("seq_k", std::to_string(p.seq_k) + " exceeds 2^31 - 1: paged keeps context lengths in 32 bits");
  const std::int64_t blocks = p.batch * ceil_div(p.seq_k, block_size);
  if (blocks > int32_max)
    reject("seq_k", "batch x ceil(seq_k / block_size) = " + std::to_string(p.batch) + " x ceil(" + std::to_string(p.seq_k) +
                        " / " + std::to_string(block_size) + ") = " + std::to_string(blocks) +
                        " cache blocks exceeds 2^31 - 1 (block ids are 32-bit): use a larger block_size");
}

PagedProblem::PagedProblem(const AttentionProblem& p, std::int64_t block_size, std::uint64_t seed)
    : geometry{(validate_paging(p, block_size), p.batch * ceil_div(p.seq_k, block_size)), block_size, p.kv_heads, p.head_dim},
      manager(geometry.num_blocks, block_size, seed) {
  for (std::int64_t b = 0; b < p.batch; ++b) {
    sequences.push_back(manager.add_sequence());
    slots.push_back(manager.append(sequences.back(), p.seq_k).slots);
  }
  batch = make_decode_batch(manager, sequences, geometry, p.q_heads, p.scale);
}

NewTokens PagedProblem::tokens_of(const AttentionTensors& t, std::int64_t b, std::size_t element_size) const {
  const auto* k = static_cast<const char*>(t.k) + b * t.kv_strides.batch * element_size;
  const auto* v = static_cast<const char*>(t.v) + b * t.kv_strides.batch * element_size;
  return NewTokens{batch.context_lens[b], k, v, t.kv_strides.seq, t.kv_strides.head};
}

std::int64_t block_size_option(const StageOptions& options) {
  const std::int64_t block_size = options.get("block_size", 16);
  if (block_size < 1 || block_size > kMaxBlockSize)
    reject("block_size", std::to_string(block_size) + " must be in [1, 2^20] (tokens per cache block)");
  return block_size;
}

DecodeOptions decode_options(const StageOptions& options) {
  // Ranges checked before the narrowing cast (variant = 2^63 - 1 used to be reported as -1).
  const std::int64_t variant = options.get("variant", 0), partition = options.get("partition", 1024);
  if (variant < 0 || variant > 2) reject("variant", std::to_string(variant) + " must be 0 (choose), 1 or 2");
  if (partition < 1 || partition > std::numeric_limits<std::int32_t>::max())
    reject("partition", std::to_string(partition) + " must be in [1, 2^31 - 1] (tokens per v2 partition)");
  return DecodeOptions{static_cast<int>(variant), partition, options.get("tensor_cores", 1) != 0};
}

std::size_t registry_extra_bytes(const AttentionProblem& p, DType dtype, const StageOptions& options) {
  // The K and V pools at the run's block size, v2's partials at its partition size (counted whether or not v2
  // is chosen), and the block manager's tables. In double: a block size of 2^20 on a long context must give a
  // figure to refuse, not a wrapped count.
  const std::int64_t block_size = block_size_option(options);
  validate_paging(p, block_size);
  const std::int64_t partition = std::max<std::int64_t>(1, options.get("partition", 1024));
  const double blocks = static_cast<double>(p.batch) * std::ceil(static_cast<double>(p.seq_k) / static_cast<double>(block_size));
  const double pool = 2.0 * blocks * static_cast<double>(block_size) * static_cast<double>(p.kv_heads * p.head_dim) *
                      static_cast<double>(dtype_size(dtype));
  const double partials = 4.0 * static_cast<double>(p.batch * p.q_heads) *
                          std::ceil(static_cast<double>(p.seq_k) / static_cast<double>(partition)) * static_cast<double>(p.head_dim + 1);
  const double tables = 16.0 * blocks + 8.0 * static_cast<double>(p.batch) * static_cast<double>(p.seq_k);  // block manager, slots
  const double total = pool + partials + tables;
  return total >= 1.8e19 ? std::numeric_limits<std::size_t>::max() : static_cast<std::size_t>(total);
}

TierCaps cpu_caps() {
  TierCaps caps{{DType::f32}, 256, {}, false, 0};
  caps.max_seq_q = 1;
  return caps;
}

namespace {

void forward_cpu(const AttentionProblem& p, const AttentionTensors& t, StageOptions& options) {
  validate_call(p, t, cpu_caps(), "paged/cpu", false);
  PagedProblem paged(p, block_size_option(options), static_cast<std::uint64_t>(options.get("shuffle_seed", 1)));
  HostKVCache cache(paged.geometry);
  for (std::int64_t b = 0; b < p.batch; ++b)
    write_to_cache_cpu(paged.geometry, paged.tokens_of(t, b, sizeof(float)), paged.slots[b], cache.k(), cache.v());
  // Causal masking changes nothing here: the one query row sees all seq_k keys (bottom-right alignment).
  const DecodeTensors tensors{DType::f32, t.q_strides, t.q, cache.k(), cache.v(), t.o, t.lse};
  CpuTimer timer;
  timer.start();
  decode_cpu(paged.batch, tensors, decode_options(options));
  const double ms = timer.stop_ms();
  options.counters["decode_ms"] = ms;
  options.counters["kv_GBps"] = paged.batch.kv_bytes(DType::f32) / (ms * 1e-3) / 1e9;
  options.counters["Tc"] = static_cast<double>(ceil_div(p.seq_k, paged.geometry.block_size));  // cache blocks per sequence
}

}  // namespace

Stage describe() {
  Stage stage;
  stage.name = "paged";
  stage.paper = "PagedAttention (Kwon et al. 2023)";
  stage.adds = "decode through block tables over a paged KV cache; v2 splits the context (flash-decoding)";
  TierEntry cpu;
  cpu.tier = Tier::cpu;
  cpu.caps = cpu_caps();
  cpu.forward = forward_cpu;
  cpu.extra_bytes = [](const AttentionProblem& p, DType, bool, const StageOptions& options) {
    return registry_extra_bytes(p, DType::f32, options);
  };
  cpu.option_names = {"block_size", "shuffle_seed", "variant", "partition"};
  stage.tiers.push_back(cpu);
#ifdef ATTN_HAVE_CUDA
  stage.tiers.push_back(gpu_tier());
#endif
  return stage;
}

}  // namespace attn::paged
