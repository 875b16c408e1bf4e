// bench_paged: decode through block tables on prepared paged caches, v1 and v2, CPU and GPU, with the K+V
// bandwidth achieved, next to the machine's own ceilings (CPU: a read reduction; GPU: a device-to-device copy).
#include <benchmark/benchmark.h>

#include <omp.h>

#include <cmath>
#include <memory>
#include <vector>

#include "common/numeric.hpp"
#include "common/timer.hpp"
#include "paged/paged.hpp"
#ifdef ATTN_HAVE_CUDA
#include "common/cuda_utils.hpp"
#endif

using namespace attn;
using namespace attn::paged;

namespace {

// A decode batch of `sequences` sequences of `context` tokens each, paged with shuffled physical blocks.
struct PreparedBatch {
  CacheGeometry geometry;
  DecodeBatch batch;
  HostBuffer<float> q;
  PreparedBatch(std::int64_t sequences, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim,
                std::int64_t context, std::int64_t block_size)
      : geometry{sequences * ((context + block_size - 1) / block_size), block_size, kv_heads, head_dim} {
    BlockManager manager(geometry.num_blocks, block_size, 7);
    std::vector<SequenceId> ids;
    for (std::int64_t b = 0; b < sequences; ++b) {
      ids.push_back(manager.add_sequence());
      manager.append(ids.back(), context);
    }
    batch = make_decode_batch(manager, ids, geometry, q_heads);
    q = HostBuffer<float>(static_cast<std::size_t>(sequences * q_heads * head_dim));
    fill_normal(q.span(), 3);
  }
};

// CPU ceiling: sum a 1 GiB buffer with every core (bytes read per second).
void cpu_read_bandwidth(benchmark::State& state) {
  HostBuffer<float> buffer(std::size_t{1} << 28);
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = 1.0f;
  double total = 0;
  for (auto _ : state) {
    float sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::size_t i = 0; i < buffer.size(); ++i) sum += buffer[i];
    total += sum;
    benchmark::DoNotOptimize(total);
  }
  state.counters["GBps"] = benchmark::Counter(static_cast<double>(buffer.bytes()) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void cpu_decode(benchmark::State& state, std::int64_t sequences, std::int64_t kv_heads, std::int64_t context, int variant) {
  PreparedBatch prepared(sequences, 4 * kv_heads, kv_heads, 128, context, 16);
  const std::int64_t q_heads = 4 * kv_heads;
  HostKVCache cache(prepared.geometry);
  fill_normal({cache.k(), static_cast<std::size_t>(prepared.geometry.pool_elements())}, 4);
  fill_normal({cache.v(), static_cast<std::size_t>(prepared.geometry.pool_elements())}, 5);
  HostBuffer<float> o(prepared.q.size()), lse(static_cast<std::size_t>(sequences * q_heads));
  const DecodeTensors t{DType::f32, Strides{q_heads * 128, 128, 0}, prepared.q.data(), cache.k(), cache.v(), o.data(), lse.data()};
  for (auto _ : state) decode_cpu(prepared.batch, t, DecodeOptions{variant});
  state.counters["kv_GBps"] = benchmark::Counter(prepared.batch.kv_bytes(DType::f32) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

#ifdef ATTN_HAVE_CUDA
// GPU ceiling: a device-to-device copy of 2 GiB, counting bytes read plus bytes written.
void gpu_copy_bandwidth(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 31;
  DeviceBuffer<unsigned char> source(bytes), target(bytes);
  ATTN_CUDA_CHECK(cudaMemset(source.data(), 1, bytes));
  CudaEventTimer timer;
  for (auto _ : state) {
    timer.start();
    ATTN_CUDA_CHECK(cudaMemcpy(target.data(), source.data(), bytes, cudaMemcpyDeviceToDevice));
    state.SetIterationTime(timer.stop_ms() / 1e3);
  }
  state.counters["GBps"] = benchmark::Counter(2.0 * static_cast<double>(bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// The decode kernels alone on a prepared bf16 cache (random values, shuffled blocks), timed with CUDA events.
void gpu_decode(benchmark::State& state, std::int64_t sequences, std::int64_t context, DecodeOptions options) {
  try {
    PreparedBatch prepared(sequences, 32, 8, 128, context, 16);
    const std::size_t pool_bytes = static_cast<std::size_t>(prepared.geometry.pool_elements()) * 2;
    DeviceBuffer<unsigned char> k(pool_bytes), v(pool_bytes), q(prepared.q.size() * 2), o(prepared.q.size() * 2);
    DeviceBuffer<float> lse(static_cast<std::size_t>(sequences * 32));
    fill_random_gpu(k.data(), prepared.geometry.pool_elements(), DType::bf16, 1);
    fill_random_gpu(v.data(), prepared.geometry.pool_elements(), DType::bf16, 2);
    fill_random_gpu(q.data(), static_cast<std::int64_t>(prepared.q.size()), DType::bf16, 3);
    const DeviceDecodeBatch batch(prepared.batch);
    const DecodeTensors t{DType::bf16, Strides{32 * 128, 128, 0}, q.data(), k.data(), v.data(), o.data(), lse.data()};
    decode_gpu(batch, t, options);  // warm-up (and the partials' allocation)
    CudaEventTimer timer;
    for (auto _ : state) {
      timer.start();
      decode_gpu(batch, t, options);
      state.SetIterationTime(timer.stop_ms() / 1e3);
    }
    ATTN_CUDA_CHECK(cudaDeviceSynchronize());
    state.counters["kv_GBps"] = benchmark::Counter(prepared.batch.kv_bytes(DType::bf16) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("memory/cpu/read_reduction_1GiB", cpu_read_bandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();
  // Many work items (4 sequences x 8 KV heads) and a single one (1 sequence, MQA), where only v2 can split.
  struct CpuShape {
    std::int64_t sequences, kv_heads, context;
  };
  for (CpuShape shape : {CpuShape{4, 8, 1024}, CpuShape{4, 8, 8192}, CpuShape{1, 1, 32768}})
    for (int variant : {1, 2})
      benchmark::RegisterBenchmark(("paged/cpu/decode_v" + std::to_string(variant) + "/f32/B=" + std::to_string(shape.sequences) +
                                    "_Hq=" + std::to_string(4 * shape.kv_heads) + "_Hkv=" + std::to_string(shape.kv_heads) +
                                    "_D=128_ctx=" + std::to_string(shape.context)).c_str(),
                                   cpu_decode, shape.sequences, shape.kv_heads, shape.context, variant)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
#ifdef ATTN_HAVE_CUDA
  if (cuda::device_available()) {
    benchmark::RegisterBenchmark("memory/gpu/copy_2GiB", gpu_copy_bandwidth)->UseManualTime()->Unit(benchmark::kMillisecond);
    // The chapter's decode problem (B=16, 32 query heads, 8 KV heads, D=128, bf16) from short to long contexts, and a
    // wide batch of short contexts, where v1's single pass has enough work items of its own.
    struct Shape {
      std::int64_t sequences, context;
    };
    for (Shape shape : {Shape{16, 512}, Shape{16, 2048}, Shape{16, 8192}, Shape{16, 16384}, Shape{16, 32768}, Shape{256, 1024},
                        Shape{256, 4096}}) {
      for (DecodeOptions options : {DecodeOptions{1, 1024, true}, DecodeOptions{2, 512, true}, DecodeOptions{2, 1024, true},
                                    DecodeOptions{1, 1024, false}, DecodeOptions{2, 1024, false}}) {
        const std::string name = "paged/gpu/decode_v" + std::to_string(options.variant) +
                                 (options.variant == 2 ? "_partition" + std::to_string(options.partition_tokens) : std::string()) +
                                 (options.tensor_cores ? "_tensor_cores" : "_cuda_cores") + "/bf16/B=" +
                                 std::to_string(shape.sequences) + "_Hq=32_Hkv=8_D=128_ctx=" + std::to_string(shape.context);
        benchmark::RegisterBenchmark(name.c_str(), gpu_decode, shape.sequences, shape.context, options)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(0.1);
      }
    }
  }
#endif
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
