#!/usr/bin/env bash
# The attn program's contract: bad flags and invalid problems give a one-line error and exit status 2 (never
# a crash); a problem too large for a stage's memory names the bytes it would need; good runs exit 0 and
# --json prints one object per row with the documented fields.
set -u
attn=$1
failures=0

expect_usage_error() {  # expect_usage_error "what the message must contain" args...
  local want=$1; shift
  local err; err=$("$attn" "$@" 2>&1 >/dev/null); local rc=$?
  local lines; lines=$(printf '%s\n' "$err" | grep -c .)
  if [[ $rc -ne 2 || $lines -ne 1 || "$err" != *"$want"* ]]; then
    echo "FAIL: attn $* -> exit $rc, stderr: $err (want exit 2, one line containing '$want')"; failures=$((failures + 1))
  else
    echo "ok: attn $* -> $err"
  fi
}

expect_usage_error "unknown command" frobnicate
expect_usage_error "--stage: required" run
expect_usage_error "is not one of" run --stage nonsense
expect_usage_error "--seq-q: 'abc' is not an integer" run --stage naive --seq-q abc
expect_usage_error "tier: 'tpu' is not one of" run --stage naive --tier tpu
expect_usage_error "dtype" run --stage naive --dtype f64
expect_usage_error "unknown or misplaced argument '--bogus'" run --stage naive --bogus
expect_usage_error "q_heads" run --stage naive --heads 3 --kv-heads 2
expect_usage_error "seq_q" run --stage naive --seq-q 0
expect_usage_error "head_dim" run --stage naive --head-dim 512
expect_usage_error "--opt" run --stage naive --opt novalue
expect_usage_error "problem too large" run --stage naive --heads 64 --seq 10000000
# naive's N x N matrices S and P at N = 65536 with 8 heads need 275 GB (34 GB per head).
expect_usage_error "of extra memory" run --stage naive --heads 8 --seq 65536

json=$("$attn" run --stage naive --seq-q 17 --seq-k 29 --head-dim 16 --causal --backward --json); rc=$?
for field in stage tier dtype time_ms tflops extra_bytes rel_err_prev rel_err_oracle; do
  if [[ $rc -ne 0 || "$json" != *"\"$field\":"* ]]; then
    echo "FAIL: attn run --json lacks \"$field\" (exit $rc): $json"; failures=$((failures + 1))
  fi
done
echo "json: $json"
exit $((failures > 0))
