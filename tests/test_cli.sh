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

# Hostile inputs (issue 11). Size products that wrap 64 bits (these crashed flash_v1, flash_v2 and paged):
expect_usage_error "seq_k: 4611686018427387905 is too large" run --stage flash_v2 --seq-q 1 --seq-k 4611686018427387905 --heads 4 --kv-heads 4 --head-dim 1
expect_usage_error "seq_q: 7905747460161236407 is too large" run --stage flash_v2 --batch 7 --seq 7905747460161236407 --head-dim 1
expect_usage_error "block_size: 36028797018963968 must be in [1, 2^20]" run --stage paged --opt block_size=36028797018963968
# Huge sizes that do not wrap: the bytes needed (these ended as "error: std::bad_alloc", exit 1).
expect_usage_error "head_dim: 9223372036854775807 is too large" run --stage flash_v2 --head-dim 9223372036854775807
expect_usage_error "of extra memory" run --stage paged --opt block_size=1048576 --batch 64 --heads 8 --seq-k 1000
expect_usage_error "seq_k: batch x ceil(seq_k / block_size)" run --stage paged --batch 2 --seq-k 2000000000 --head-dim 1 --opt block_size=1
# Option values whose arithmetic wrapped (found while fixing the above).
expect_usage_error "variant: 9223372036854775807 must be 0 (choose), 1 or 2" run --stage paged --opt variant=9223372036854775807
expect_usage_error "blocks of 9223372036854775807 and" run --stage flash_v1 --opt block_rows=9223372036854775807 --sram-bytes 65536
# The stage asked for refuses in its own name (flash_v1, the previous stage, used to refuse D = 257).
expect_usage_error "head_dim: 257 exceeds the limit 256 of flash_v2/cpu" run --stage flash_v2 --head-dim 257
# Silent acceptance:
expect_usage_error "layout: 'foo' is not one of bhnd, bnhd" run --stage naive --layout foo
expect_usage_error "--q-std: nan must be finite" run --stage naive --q-std nan
expect_usage_error "--q-std: inf must be finite" run --stage naive --q-std inf
expect_usage_error "--q-std: 1e39 must be finite" run --stage naive --q-std 1e39
expect_usage_error "scale: 3.5e+38 overflows fp32" run --stage naive --scale 3.5e38
expect_usage_error "--repeats: 4294967297 is outside [1, 1000000]" run --stage naive --repeats 4294967297
expect_usage_error "option dq_accumulation: not an option of flash_v2/cpu (its options: block_rows, block_cols, split, dq_atomic)" run --stage flash_v2 --opt dq_accumulation=1
expect_usage_error "option count_io: not an option of naive/cpu" run --stage naive --io
expect_usage_error "dtype: 'f64' is not one of" ladder --tier cpu --dtype f64
expect_usage_error "--dtype: bf16 applies to the GPU tier" ladder --tier cpu --dtype bf16
expect_usage_error "--repeats: 0 is outside [1, 1000000]" ladder --repeats 0
expect_usage_error "--seq: given 2 times" run --stage naive --seq 8 --seq 9
expect_usage_error "--causal: given twice" run --stage naive --causal --causal
expect_usage_error "--seed: -1 is outside" run --stage naive --seed -1
expect_usage_error "outside the 64-bit integer range" run --stage naive --seq 99999999999999999999
# No GPU: "no CUDA device", exit 2 (was "problem too large ... 0 B available", and ladder exited 0).
if ! "$attn" list | grep -q "device present"; then
  expect_usage_error "no CUDA device" run --stage naive --tier gpu
  expect_usage_error "no CUDA device" ladder --tier gpu
fi
if "$attn" list | grep -q "^[0-9]* *flash_v3 "; then
  expect_usage_error "--bogus: unknown flag" fp8-error --bogus 1
  expect_usage_error "--seq: 'x' is not a non-negative integer" fp8-error --seq x
  expect_usage_error "head_dim: 96 must be a power of two" fp8-error --head-dim 96
fi
if "$attn" list | grep -q "^[0-9]* *paged "; then
  expect_usage_error "--requests: 1e19 is outside [1, 100000000]" paged-sim --requests 1e19
  expect_usage_error "--pool-tokens: 2147483647 tokens in blocks of 1 need" paged-sim --block-size 1 --pool-tokens 2147483647
  expect_usage_error "--bogus: unknown flag" paged-sim --bogus 1
fi

# Validate before work: a refusal comes before any input is generated (paged took 10 s and 3.2 GB to refuse
# Nq = 1000003, naive 12 s of input generation to refuse an oversized problem).
expect_quick_usage_error() {  # like expect_usage_error, and within 3 seconds
  local start=$SECONDS
  expect_usage_error "$@"
  if (( SECONDS - start > 3 )); then echo "FAIL: attn ${*:2} took $((SECONDS - start)) s to refuse"; failures=$((failures + 1)); fi
}
expect_quick_usage_error "seq_q: 1000003 exceeds the limit 1 of paged/cpu" run --stage paged --seq-q 1000003
expect_quick_usage_error "of extra memory" run --stage naive --heads 16 --seq 200000

# Help: each command's flags on stdout, exit 0.
for command in run ladder; do
  help=$("$attn" $command --help 2>&1); rc=$?
  if [[ $rc -ne 0 || "$help" != *"--repeats N"* || "$help" != *"--head-dim N"* ]]; then
    echo "FAIL: attn $command --help -> exit $rc: $help"; failures=$((failures + 1))
  else
    echo "ok: attn $command --help"
  fi
done
if "$attn" list | grep -q "^[0-9]* *paged "; then
  json=$("$attn" paged-sim --requests 50 --pool-tokens 4096 --max-len 1024 --json); rc=$?
  if [[ $rc -ne 0 || "$json" != *'"policy":"paged (vLLM)"'* ]]; then
    echo "FAIL: attn paged-sim --json (exit $rc): $json"; failures=$((failures + 1))
  fi
fi

# A comparison that cannot be made is marked, the run goes on: flash_v2/cpu at D = 256 is fine, and with a
# previous stage whose options differ the error columns still come from the same inputs.
json=$("$attn" run --stage flash_v2 --seq 16 --head-dim 16 --json --opt split=1); rc=$?
if [[ $rc -ne 0 || "$json" != *'"rel_err_prev":'[0-9]* ]]; then
  echo "FAIL: attn run --opt split=1 lost its comparison (exit $rc): $json"; failures=$((failures + 1))
fi

# Non-finite outputs are reported (stderr and JSON) and told apart from "not computed" (null): logits of
# 1e38 x 1e38 overflow fp32 in Q K^T.
out=$("$attn" run --stage naive --seq 8 --head-dim 8 --q-std 1e38 --scale 3e38 --json 2>/tmp/attn_cli_err.$$); rc=$?
err=$(cat /tmp/attn_cli_err.$$); rm -f /tmp/attn_cli_err.$$
if [[ $rc -ne 0 || "$out" != *'"rel_err_oracle":"Infinity"'* || "$out" != *'"rel_err_prev":null'* ||
      "$out" == *'"nonfinite_values":0,'* || "$err" != *"NaN or infinite"* ]]; then
  echo "FAIL: non-finite outputs not reported (exit $rc): $out / $err"; failures=$((failures + 1))
else
  echo "ok: non-finite outputs reported: $err"
fi

# The backward error means something when the exact dQ and dK cancel to ~0 (q-std 1e30 used to report 9.5e24).
json=$("$attn" run --stage flash_v2 --seq 64 --head-dim 64 --backward --q-std 1e30 --json); rc=$?
bwd=$(printf '%s' "$json" | sed -n 's/.*"bwd_rel_err_oracle":\([^,]*\).*/\1/p')
if [[ $rc -ne 0 ]] || ! awk -v e="$bwd" 'BEGIN { exit !(e + 0 < 1e-5) }'; then
  echo "FAIL: backward error at q-std 1e30 is '$bwd' (want < 1e-5; exit $rc)"; failures=$((failures + 1))
else
  echo "ok: backward error at q-std 1e30: $bwd"
fi

# Progress: lines on stderr for long work (ATTN_PROGRESS_SECONDS shortens "long" from 3 s for the test),
# none under --json unless --progress asks; stdout keeps only the result.
progress_run() { ATTN_PROGRESS_SECONDS=0.2 "$attn" run --stage naive --seq 3000 --heads 4 --repeats 1 "$@"; }
err=$(progress_run 2>&1 >/dev/null)
quiet=$(progress_run --json 2>&1 >/dev/null)
asked=$(progress_run --json --progress 2>&1 >/dev/null)
if [[ "$err" != *"attn: naive/cpu forward"*"% after "*"left"* || -n "$quiet" || "$asked" != *"attn: "* ]]; then
  echo "FAIL: progress lines: plain '$err', --json '$quiet', --json --progress '$asked'"; failures=$((failures + 1))
else
  echo "ok: progress: $(printf '%s\n' "$err" | head -1)"
fi

# The up-front memory plan counts what the run allocates: inputs, oracle, the previous stage, this stage's
# outputs and scratch. Held to the measured peak (resident set) within 10%, beyond the process's own baseline
# (the peak of a tiny run: ~5 MB, ~160 MB with the CUDA runtime loaded).
field() { printf '%s' "$1" | sed -n "s/.*\"$2\":\([^,]*\).*/\1/p"; }
baseline=$(field "$("$attn" run --stage flash_v2 --seq 8 --head-dim 8 --repeats 1 --json)" host_peak_bytes)
json=$("$attn" run --stage flash_v2 --backward --heads 4 --seq-q 100000 --seq-k 1 --causal --repeats 1 --json); rc=$?
estimate=$(field "$json" host_estimate_bytes)
peak=$(field "$json" host_peak_bytes)
if [[ $rc -ne 0 ]] || ! awk -v e="$estimate" -v p="$peak" -v b="$baseline" 'BEGIN { exit !(e > 0 && p - b <= 1.1 * e && e <= 1.1 * (p - b) + 8e6) }'; then
  echo "FAIL: memory estimate '$estimate' vs peak '$peak' (baseline '$baseline', exit $rc)"; failures=$((failures + 1))
else
  echo "ok: memory estimate $estimate B, peak $peak B, baseline $baseline B"
fi

# sparse: an option out of range is refused by name; a run's errors are against the masked oracle and, with
# nothing dropped, against flash_v2 (both small: a wrong mask or comparison gives errors near 1).
if "$attn" list | grep -q "^[0-9]* *sparse "; then
  expect_usage_error "buckets: must be 1 or even" run --stage sparse --opt mode=1 --opt buckets=3
  expect_usage_error "drop_q_permille: must be a drop rate" run --stage sparse --opt drop_q_permille=1000
  json=$("$attn" run --stage sparse --seq 70 --head-dim 16 --causal --backward --json --opt mode=1 --opt buckets=4); rc=$?
  if [[ $rc -ne 0 ]] || ! awk -v o="$(field "$json" rel_err_oracle)" -v p="$(field "$json" rel_err_prev)" \
      'BEGIN { exit !(o >= 0 && o < 1e-5 && p >= 0 && p < 1e-5) }'; then
    echo "FAIL: attn run --stage sparse errors (exit $rc): $json"; failures=$((failures + 1))
  else
    echo "ok: attn run --stage sparse: $json"
  fi
fi

json=$("$attn" run --stage naive --seq-q 17 --seq-k 29 --head-dim 16 --causal --backward --json); rc=$?
for field in stage tier dtype time_ms tflops extra_bytes rel_err_prev rel_err_oracle; do
  if [[ $rc -ne 0 || "$json" != *"\"$field\":"* ]]; then
    echo "FAIL: attn run --json lacks \"$field\" (exit $rc): $json"; failures=$((failures + 1))
  fi
done
echo "json: $json"
exit $((failures > 0))
