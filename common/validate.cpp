#include "common/validate.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <utility>

namespace attn {
namespace {

[[noreturn]] void reject(const std::string& argument, const std::string& rule) {
  throw std::invalid_argument(argument + ": " + rule);
}

void require_positive(std::int64_t value, const char* name) {
  if (value < 1) reject(name, std::to_string(value) + " must be >= 1");
}

std::string dtype_list(const std::vector<DType>& dtypes) {
  std::string text;
  for (DType d : dtypes) text += (text.empty() ? "" : ", ") + std::string(dtype_name(d));
  return text;
}

void check_pointer(const void* pointer, const char* name, std::size_t alignment) {
  if (pointer == nullptr) reject(name, "null pointer");
  if (reinterpret_cast<std::uintptr_t>(pointer) % alignment != 0)
    reject(name, "pointer is not aligned to " + std::to_string(alignment) + " bytes");
}

// The three (stride, extent) pairs of a [B, H, N, D] tensor must nest without overlap: sorted by stride,
// each stride is at least the span of everything below it. Row elements (D) are contiguous.
void check_strides(const Strides& s, std::int64_t batch, std::int64_t heads, std::int64_t seq, std::int64_t dim,
                   const char* name) {
  const std::string what = std::string(name) + "_strides";
  if (s.batch < 1 || s.head < 1 || s.seq < 1) reject(what, "strides must be >= 1 (got " + std::to_string(s.batch) + ", " +
                                                        std::to_string(s.head) + ", " + std::to_string(s.seq) + ")");
  std::array<std::pair<std::int64_t, std::int64_t>, 3> dims{{{s.batch, batch}, {s.head, heads}, {s.seq, seq}}};
  std::sort(dims.begin(), dims.end());
  std::int64_t span = dim;  // elements covered by one row
  for (auto [stride, extent] : dims) {
    if (extent == 1) continue;  // a dimension of extent 1 never steps
    if (stride < span)
      reject(what, "stride " + std::to_string(stride) + " makes rows overlap (needs >= " + std::to_string(span) + ")");
    span = stride * extent;
  }
}

// Kernels that copy rows in 16-byte chunks need every row to start on such a boundary.
void check_stride_multiple(const Strides& s, std::int64_t batch, std::int64_t heads, std::int64_t seq,
                           std::int64_t multiple, const char* name, const std::string& who) {
  auto off = [&](std::int64_t stride, std::int64_t extent) { return extent > 1 && stride % multiple != 0; };
  if (multiple > 1 && (off(s.batch, batch) || off(s.head, heads) || off(s.seq, seq)))
    reject(std::string(name) + "_strides", "every stride must be a multiple of " + std::to_string(multiple) +
                                               " elements for " + who + ", which copies rows in 16-byte chunks (got batch " +
                                               std::to_string(s.batch) + ", head " + std::to_string(s.head) + ", seq " +
                                               std::to_string(s.seq) + ")");
}

// A product of sizes, saturating at kMaxElements + 1 instead of wrapping.
std::int64_t saturating_product(std::initializer_list<std::int64_t> factors) {
  std::int64_t product = 1;
  for (std::int64_t f : factors) {
    if (product > kMaxElements / f) return kMaxElements + 1;
    product *= f;
  }
  return product;
}

// Every element count (and the B x Hq x Nq x Nk scores) must stay below kMaxElements, so that byte counts and
// offsets computed in 64 bits never wrap. Names the largest factor: the argument a user would shrink.
void check_size_product(const std::string& what, std::initializer_list<std::pair<const char*, std::int64_t>> factors) {
  std::int64_t product = 1;
  std::string formula, values;
  std::pair<const char*, std::int64_t> largest{"", 0};
  for (auto [name, value] : factors) {
    product = saturating_product({product, value});
    formula += (formula.empty() ? "" : " x ") + std::string(name);
    values += (values.empty() ? "" : " x ") + std::to_string(value);
    if (value > largest.second) largest = {name, value};
  }
  if (product > kMaxElements)
    reject(largest.first, std::to_string(largest.second) + " is too large: " + what + " = " + formula + " = " + values +
                              " exceeds 2^58 elements (64-bit byte counts would overflow)");
}

}  // namespace

void validate_problem(const AttentionProblem& p) {
  require_positive(p.batch, "batch");
  require_positive(p.q_heads, "q_heads");
  require_positive(p.kv_heads, "kv_heads");
  require_positive(p.seq_q, "seq_q");
  require_positive(p.seq_k, "seq_k");
  require_positive(p.head_dim, "head_dim");
  if (p.q_heads % p.kv_heads != 0)
    reject("q_heads", std::to_string(p.q_heads) + " must be a multiple of kv_heads (" + std::to_string(p.kv_heads) + ")");
  if (!std::isfinite(p.scale) || p.scale < 0.0)
    reject("scale", "must be finite and > 0 (0 selects 1/sqrt(head_dim))");
  if (p.scale > std::numeric_limits<float>::max()) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", p.scale);
    reject("scale", std::string(text) + " overflows fp32 (the stages compute in fp32; at most 3.4e38)");
  }
  check_size_product("Q's elements", {{"batch", p.batch}, {"q_heads", p.q_heads}, {"seq_q", p.seq_q}, {"head_dim", p.head_dim}});
  check_size_product("K's elements", {{"batch", p.batch}, {"kv_heads", p.kv_heads}, {"seq_k", p.seq_k}, {"head_dim", p.head_dim}});
  check_size_product("the scores", {{"batch", p.batch}, {"q_heads", p.q_heads}, {"seq_q", p.seq_q}, {"seq_k", p.seq_k}});
}

void validate_problem_for(const AttentionProblem& p, DType dtype, const TierCaps& caps, const std::string& who) {
  validate_problem(p);
  if (std::find(caps.dtypes.begin(), caps.dtypes.end(), dtype) == caps.dtypes.end())
    reject("dtype", std::string(dtype_name(dtype)) + " is not supported by " + who + " (supported: " +
                        dtype_list(caps.dtypes) + ")");
  if (p.head_dim > caps.max_head_dim)
    reject("head_dim", std::to_string(p.head_dim) + " exceeds the limit " + std::to_string(caps.max_head_dim) + " of " + who);
  if (!caps.head_dims.empty() &&
      std::find(caps.head_dims.begin(), caps.head_dims.end(), static_cast<int>(p.head_dim)) == caps.head_dims.end()) {
    std::string list;
    for (int d : caps.head_dims) list += (list.empty() ? "" : ", ") + std::to_string(d);
    reject("head_dim", std::to_string(p.head_dim) + " is not supported by " + who + " (supported: " + list + ")");
  }
  if (caps.max_seq > 0 && std::max(p.seq_q, p.seq_k) > caps.max_seq)
    reject(p.seq_q > caps.max_seq ? "seq_q" : "seq_k", std::to_string(std::max(p.seq_q, p.seq_k)) +
                                                           " exceeds the limit " + std::to_string(caps.max_seq) + " of " + who);
  if (caps.max_seq_q > 0 && p.seq_q > caps.max_seq_q)
    reject("seq_q", std::to_string(p.seq_q) + " exceeds the limit " + std::to_string(caps.max_seq_q) + " of " + who +
                        " (a decode kernel: one query token per sequence)");
}

void validate_call(const AttentionProblem& p, const AttentionTensors& t, const TierCaps& caps, const std::string& who,
                   bool backward) {
  validate_problem_for(p, t.dtype, caps, who);
  if (backward && !caps.has_backward) reject("backward", who + " has no backward pass");
  const std::size_t alignment = caps.pointer_alignment ? caps.pointer_alignment : dtype_size(t.dtype);
  check_strides(t.q_strides, p.batch, p.q_heads, p.seq_q, p.head_dim, "q");
  check_strides(t.kv_strides, p.batch, p.kv_heads, p.seq_k, p.head_dim, "kv");
  check_stride_multiple(t.q_strides, p.batch, p.q_heads, p.seq_q, caps.stride_multiple, "q", who);
  check_stride_multiple(t.kv_strides, p.batch, p.kv_heads, p.seq_k, caps.stride_multiple, "kv", who);
  check_pointer(t.q, "q", alignment);
  check_pointer(t.k, "k", alignment);
  check_pointer(t.v, "v", alignment);
  check_pointer(t.o, "o", alignment);
  check_pointer(t.lse, "lse", alignof(float));
  if (backward) {
    check_pointer(t.d_o, "d_o", alignment);
    check_pointer(t.dq, "dq", alignment);
    check_pointer(t.dk, "dk", alignment);
    check_pointer(t.dv, "dv", alignment);
  }
}

}  // namespace attn
