#!/usr/bin/env bash
# scripts/gpu_host_check runs compute-sanitizer on the GPU test cases tagged [small]: every GPU test file must
# have some (with none, the sanitizer step would check nothing), and every tagged case must be in a GPU file.
set -u
tests=$1
failures=0
for file in "$tests"/test_*_gpu.cpp; do
  count=$(grep -c '\[small\]"' "$file")
  if [[ $count -lt 1 ]]; then
    echo "FAIL: $(basename "$file") has no test case tagged [small] (the sanitizer step would run nothing)"
    failures=$((failures + 1))
  else
    echo "ok: $(basename "$file"): $count test cases tagged [small]"
  fi
done
exit $((failures > 0))
