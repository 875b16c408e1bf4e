// Benchmarks of flash_v3 (placeholder while the tiers are written).
#include <benchmark/benchmark.h>

#include "common/bench_support.hpp"

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
