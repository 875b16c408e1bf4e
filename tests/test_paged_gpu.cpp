// paged, GPU tier: decode v1 and v2 against the CPU tier (the same rounded inputs) and the fp64 oracle, in
// bf16 and f16, for several block sizes, head dims, GQA, variable context lengths and forked prefixes; the
// reshape-and-cache kernel against the CPU one; and the GPU-specific input rules.
#include <cmath>

#include "common/cuda_utils.hpp"
#include "paged/paged.hpp"
#include "test_support.hpp"

using namespace attn;
using namespace attn::paged;
using namespace attn::testing;

namespace {

// The GPU rounds O to bf16 (relative step 2^-8, so about 2e-3 rms per element) or f16 (2^-11); the inputs
// are the same rounded values on both tiers and both accumulate in fp32, so the rest is summation order and
// exp2f. LSE stays fp32. A wrong block, offset or head gives errors near 1.
double output_tolerance(DType dtype) { return dtype == DType::bf16 ? 8e-3 : 1e-3; }
constexpr double kLseTolerance = 1e-5;

}  // namespace

TEST_CASE("paged/gpu decode v1 and v2 match the CPU tier and the oracle (registry path, bf16 and f16)",
          "[paged][gpu][decode]") {
  const Stage stage = paged::describe();
  auto make = [](std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t nk, std::int64_t d) {
    AttentionProblem p;
    p.batch = b, p.q_heads = hq, p.kv_heads = hkv, p.seq_q = 1, p.seq_k = nk, p.head_dim = d;
    return p;
  };
  const std::vector<Shape> shapes = {
      {"one key", make(1, 1, 1, 1, 64)},
      {"odd context, MHA", make(2, 2, 2, 77, 64)},
      {"GQA 4:1, D=128, long", make(2, 8, 2, 3001, 128)},
      {"GQA 8:1 (8 heads a block)", make(1, 8, 1, 700, 128)},
      {"GQA 6:2 (2 heads a block, 3 tiles)", make(2, 6, 2, 259, 64)},
      {"D=256", make(1, 4, 2, 333, 256)},
      {"GQA 32:1 (two tiles of 16 rows)", make(1, 32, 1, 129, 64)},
  };
  std::uint64_t seed = 1000;
  for (const Shape& shape : shapes) {
    for (DType dtype : {DType::bf16, DType::f16}) {
      const ProblemData data = make_problem_data(shape.problem, dtype, Layout::bhnd, ++seed);
      const StageRun cpu = run_stage(stage, Tier::cpu, data, RunSettings{});
      const oracle::Result exact = oracle::attention(data, false);
      for (std::int64_t block_size : {1, 16, 32}) {
        for (auto [variant, partition] : {std::pair{1, 512}, std::pair{2, 64}, std::pair{2, 512}})
        for (int tensor_cores : {1, 0}) {
          INFO(label(shape) << " " << dtype_name(dtype) << " block_size " << block_size << " variant " << variant
                            << " partition " << partition << " tensor_cores " << tensor_cores);
          RunSettings settings;
          settings.options.values = {{"block_size", block_size}, {"variant", variant}, {"partition", partition},
                                     {"tensor_cores", tensor_cores}};
          const StageRun gpu = run_stage(stage, Tier::gpu, data, settings);
          const Errors vs_cpu = compare_runs(gpu, cpu);
          CHECK(vs_cpu.o.bad_values == 0);
          CHECK(vs_cpu.o.rel_frobenius < output_tolerance(dtype));
          CHECK(vs_cpu.lse.rel_frobenius < kLseTolerance);
          const Errors vs_oracle = compare_with_oracle(gpu, exact);
          CHECK(vs_oracle.o.rel_frobenius < output_tolerance(dtype));
          CHECK(vs_oracle.lse.rel_frobenius < kLseTolerance);
        }
      }
    }
  }
}

namespace {

/// Host fp32 values rounded to dtype, uploaded in dtype.
DeviceBuffer<unsigned char> upload(std::span<float> values, DType dtype) {
  round_to_dtype(values, dtype);
  std::vector<unsigned char> staging(values.size() * dtype_size(dtype));
  encode(values, dtype, staging.data());
  DeviceBuffer<unsigned char> device(staging.size());
  ATTN_CUDA_CHECK(cudaMemcpy(device.data(), staging.data(), staging.size(), cudaMemcpyHostToDevice));
  return device;
}

std::vector<float> download(const DeviceBuffer<unsigned char>& device, DType dtype, std::size_t count) {
  std::vector<unsigned char> staging(device.size());
  ATTN_CUDA_CHECK(cudaMemcpy(staging.data(), device.data(), staging.size(), cudaMemcpyDeviceToHost));
  std::vector<float> values(count);
  decode(staging.data(), dtype, values);
  return values;
}

}  // namespace

TEST_CASE("paged/gpu decode: variable context lengths and forked prefixes in one batch match the CPU tier",
          "[paged][gpu][decode][small]") {
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (std::int64_t block_size : {8, 16}) {
      const CacheGeometry g{4096 / block_size + 64, block_size, 2, 128};
      const std::int64_t Hq = 8, D = g.head_dim;
      BlockManager manager(g.num_blocks, g.block_size, 17);
      HostKVCache cache(g);
      fill_normal({cache.k(), static_cast<std::size_t>(g.pool_elements())}, 5);
      fill_normal({cache.v(), static_cast<std::size_t>(g.pool_elements())}, 6);
      // The values in the pool are random already; the manager only decides which blocks each sequence reads.
      // Forks share the root's blocks; copy-on-write copies the shared last block before a child writes.
      std::vector<SequenceId> ids;
      const SequenceId root = manager.add_sequence();
      manager.append(root, 1000);
      ids.push_back(root);
      for (std::int64_t extra : {0, 5, 700}) {
        ids.push_back(manager.fork(root));
        copy_blocks_cpu(g, manager.append(ids.back(), extra).copies, cache.k(), cache.v());
      }
      for (std::int64_t length : {1, 0, 1999, 37}) {
        ids.push_back(manager.add_sequence());
        manager.append(ids.back(), length);
      }
      const DecodeBatch batch = make_decode_batch(manager, ids, g, Hq);
      const std::int64_t B = batch.sequences();
      HostBuffer<float> q(static_cast<std::size_t>(B * Hq * D));
      fill_normal(q.span(), 8);
      auto k_device = upload({cache.k(), static_cast<std::size_t>(g.pool_elements())}, dtype);  // rounds the host copy too
      auto v_device = upload({cache.v(), static_cast<std::size_t>(g.pool_elements())}, dtype);
      auto q_device = upload(q.span(), dtype);
      HostBuffer<float> o_cpu(q.size()), lse_cpu(static_cast<std::size_t>(B * Hq));
      const Strides strides{Hq * D, D, 0};
      decode_cpu(batch, DecodeTensors{DType::f32, strides, q.data(), cache.k(), cache.v(), o_cpu.data(), lse_cpu.data()});
      const DeviceDecodeBatch device_batch(batch);
      for (auto [variant, partition] : {std::pair{1, 512}, std::pair{2, 128}, std::pair{2, 512}})
      for (bool tensor_cores : {true, false}) {
        INFO(dtype_name(dtype) << " block_size " << block_size << " variant " << variant << " partition " << partition
                               << " tensor_cores " << tensor_cores);
        DeviceBuffer<unsigned char> o(q.size() * dtype_size(dtype));
        DeviceBuffer<float> lse(static_cast<std::size_t>(B * Hq));
        ATTN_CUDA_CHECK(cudaMemset(o.data(), 0xff, o.bytes()));  // NaN
        ATTN_CUDA_CHECK(cudaMemset(lse.data(), 0xff, lse.bytes()));
        decode_gpu(device_batch, DecodeTensors{dtype, strides, q_device.data(), k_device.data(), v_device.data(), o.data(), lse.data()},
                   DecodeOptions{variant, partition, tensor_cores});
        ATTN_CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> o_gpu = download(o, dtype, q.size());
        std::vector<float> lse_gpu(lse_cpu.size());
        ATTN_CUDA_CHECK(cudaMemcpy(lse_gpu.data(), lse.data(), lse.bytes(), cudaMemcpyDeviceToHost));
        const ErrorStats o_error = compare(o_gpu, o_cpu.span());
        CHECK(o_error.bad_values == 0);
        CHECK(o_error.rel_frobenius < output_tolerance(dtype));
        CHECK(compare(lse_gpu, lse_cpu.span()).rel_frobenius < kLseTolerance);  // -inf where the context is empty
      }
    }
  }
}

TEST_CASE("paged/gpu reshape-and-cache writes the same slots as the CPU step, skipping padding", "[paged][gpu][cache][small]") {
  const CacheGeometry g{12, 8, 2, 64};
  const std::int64_t tokens = 50, row = g.kv_heads * g.head_dim;
  BlockManager manager(g.num_blocks, g.block_size, 3);
  const SequenceId s = manager.add_sequence();
  std::vector<std::int64_t> slots = manager.append(s, tokens).slots;
  slots[7] = -1;  // a padding token
  HostBuffer<float> k(static_cast<std::size_t>(tokens * row)), v(k.size());
  fill_normal(k.span(), 1);
  fill_normal(v.span(), 2);
  HostKVCache cache(g);
  for (std::int64_t i = 0; i < g.pool_elements(); ++i) cache.k()[i] = cache.v()[i] = 0.5f;
  auto k_device = upload(k.span(), DType::bf16);
  auto v_device = upload(v.span(), DType::bf16);
  std::vector<float> pool_init(static_cast<std::size_t>(g.pool_elements()), 0.5f);
  auto k_pool = upload(pool_init, DType::bf16);
  auto v_pool = upload(pool_init, DType::bf16);
  const NewTokens host_tokens{tokens, k.data(), v.data(), row, g.head_dim};
  write_to_cache_cpu(g, host_tokens, slots, cache.k(), cache.v());
  write_to_cache_gpu(g, DType::bf16, NewTokens{tokens, k_device.data(), v_device.data(), row, g.head_dim}, slots,
                     k_pool.data(), v_pool.data());
  const std::size_t n = static_cast<std::size_t>(g.pool_elements());
  CHECK(compare(download(k_pool, DType::bf16, n), std::span<const float>(cache.k(), n)).max_abs == 0.0);
  CHECK(compare(download(v_pool, DType::bf16, n), std::span<const float>(cache.v(), n)).max_abs == 0.0);
}

TEST_CASE("paged/gpu rejects block sizes that are not powers of two, and bad block tables before any launch",
          "[paged][gpu][validate]") {
  AttentionProblem p;
  p.q_heads = p.kv_heads = 1;
  p.seq_q = 1;
  p.seq_k = 40;
  p.head_dim = 64;
  RunSettings settings;
  settings.options.values["block_size"] = 12;
  REQUIRE_THROWS_WITH(run_stage(paged::describe(), Tier::gpu, make_problem_data(p, DType::bf16), settings),
                      Catch::Matchers::StartsWith("block_size"));
  DecodeBatch batch;
  batch.cache = CacheGeometry{4, 16, 1, 64};
  batch.context_lens = {40};
  batch.max_blocks_per_sequence = 3;
  batch.block_tables = {0, 1, 4};
  REQUIRE_THROWS_WITH(DeviceDecodeBatch(batch), Catch::Matchers::StartsWith("block_tables[0][2]"));
  p.head_dim = 32;
  REQUIRE_THROWS_WITH(run_stage(paged::describe(), Tier::gpu, make_problem_data(p, DType::bf16), RunSettings{}),
                      Catch::Matchers::StartsWith("head_dim"));
}
