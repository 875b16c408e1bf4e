// The kernel arguments every tensor-core attention kernel shares (flash_v1, flash_v2): the tensors' device
// pointers and strides, the sizes, the softmax scale (also in log2 units for exp2), and the causal mask. A stage's
// own Params struct derives from it and adds its scratch buffers.
#pragma once

#include "common/problem.hpp"

namespace attn::cuda {

constexpr float kLog2e = 1.4426950408889634f;

struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;    // the forward's O, read by the backward
  const void* d_o = nullptr;
  void* o_out = nullptr;      // the forward writes O here (same tensor as o)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* lse = nullptr;       // [batch, q_heads, seq_q], natural log
  long long q_batch = 0, q_head = 0, q_seq = 0;
  long long kv_batch = 0, kv_head = 0, kv_seq = 0;
  int q_heads = 1, group_size = 1, seq_q = 1, seq_k = 1;
  float scale = 1.0f;       // softmax scale
  float scale_log2 = 1.0f;  // scale * log2(e): exp(scale * s) = exp2(scale_log2 * s)
  bool causal = false;
};

/// The shared arguments of one call (validated before: sizes fit in int).
inline AttentionParams make_attention_params(const AttentionProblem& p, const AttentionTensors& t) {
  AttentionParams params;
  params.q = t.q;
  params.k = t.k;
  params.v = t.v;
  params.o = t.o;
  params.o_out = t.o;
  params.d_o = t.d_o;
  params.dq = t.dq;
  params.dk = t.dk;
  params.dv = t.dv;
  params.lse = t.lse;
  params.q_batch = t.q_strides.batch;
  params.q_head = t.q_strides.head;
  params.q_seq = t.q_strides.seq;
  params.kv_batch = t.kv_strides.batch;
  params.kv_head = t.kv_strides.head;
  params.kv_seq = t.kv_strides.seq;
  params.q_heads = static_cast<int>(p.q_heads);
  params.group_size = static_cast<int>(p.group_size());
  params.seq_q = static_cast<int>(p.seq_q);
  params.seq_k = static_cast<int>(p.seq_k);
  params.scale = p.softmax_scale();
  params.scale_log2 = params.scale * kLog2e;
  params.causal = p.causal;
  return params;
}

// Causal masking is aligned bottom-right: query i sees key j iff j <= i + (seq_k - seq_q); indices past the
// sequence ends are masked too.
__device__ __forceinline__ bool masked(const AttentionParams& p, int query, int key) {
  return key >= p.seq_k || query >= p.seq_q || (p.causal && key > query + (p.seq_k - p.seq_q));
}

}  // namespace attn::cuda
