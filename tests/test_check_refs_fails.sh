#!/usr/bin/env bash
# The reference check must fail on tests/fixtures/refs_bad and name each broken reference there; otherwise a
# passing test_refs would prove nothing.  Usage: test_check_refs_fails.sh PYTHON CHECK_REFS FIXTURE_DIR
set -uo pipefail
python=$1 check_refs=$2 fixture=$3
output=$("$python" "$check_refs" --root "$fixture")
status=$?
echo "$output"
if [[ $status -ne 1 ]]; then
  echo "FAIL: check_refs exited with $status on the bad fixture (expected 1)"
  exit 1
fi
expected=(
  "README.md:5: link to missing/README.md: no such file"
  "README.md:6: kernel.cpp:40: out of range"
  "README.md:7: kernel is not within 3 lines of kernel.cpp:9"
  "README.md:8: 'FA1 Alg. 1 line 17': Algorithm 1 of docs/papers/flash_v1.md has no line 17"
  "README.md:9: 'FA1 Alg. 7 line 1': docs/papers/flash_v1.md has no Algorithm 7"
  "README.md:10: 'Alg. 1 line 2': say which paper"
  "README.md:11: line 5 of kernel.cpp is not \`void kernel\`"
  "check_refs: 7 problem(s)"
)
for line in "${expected[@]}"; do
  if ! grep -qF -- "$line" <<<"$output"; then
    echo "FAIL: missing from the output: $line"
    exit 1
  fi
done
echo "OK: the check fails on the bad fixture, with the seven expected messages and no others"
