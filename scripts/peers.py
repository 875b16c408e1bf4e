#!/usr/bin/env python3
"""attnlab's GPU stages next to PyTorch's scaled_dot_product_attention backends, in one run on one GPU.

Runs on the GPU host. The project's figures come from its own benchmark programs (bench_<stage>
--benchmark_format=json, GPU tier only, FlashAttention's sweep of gpu_cases()); this script only drives them,
times PyTorch's backends (flash = FlashAttention-2, cuDNN, efficient, math) on the same shapes in the same run,
and prints one Markdown table: TFLOP/s of each, and flash_v2's (and flash_v1's) ratio to each peer.

Shapes (the FlashAttention papers' sweep): batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim),
N from 512 to 16k, head dim 64 and 128, causal and not, bf16; forward, forward + backward, and the backward
alone (attnlab: the benchmark's own backward time; PyTorch: forward + backward minus forward). --shapes adds
grouped-query shapes (B:Hq:N:D[:causal][:kv=Hkv]; PyTorch with enable_gqa); --extra-shapes adds such shapes to
the sweep.
FLOPs, for every column alike: 4 B Hq N^2 D for the forward (halved when causal), 2.5x that for the backward,
so forward + backward = 3.5x the forward's FLOPs over the sum of the two times.

    python3 scripts/peers.py --bin build/bin [--seqs 512,1024,...] [--math-max 2048] [--json-out peers.json]
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

STAGES = ["naive", "memory_efficient", "flash_v1", "flash_v2", "flash_v3"]
BACKENDS = ["flash", "cudnn", "efficient", "math"]


def model_flops(b, h, n, d, causal):
    flops = 4.0 * b * h * n * n * d
    return flops / 2 if causal else flops


def sweep(seqs, head_dims):
    for causal in (False, True):
        for d in head_dims:
            for n in seqs:
                yield (16384 // n, 2048 // d, n, d, causal, 2048 // d)


NAME = re.compile(r"^(?P<stage>\w+)/gpu/(?P<pass>fwd|bwd)/bf16/B=(?P<b>\d+)_Hq=(?P<h>\d+)_Hkv=(?P<hkv>\d+)_Nq=(?P<n>\d+)_Nk=\d+_D=(?P<d>\d+)(?P<causal>_causal)?")
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def run_stage_benchmarks(bin_dir, stage, wanted):
    """{(b, h, n, d, causal, pass): seconds} from bench_<stage>'s JSON, or an error string per shape."""
    exe = os.path.join(bin_dir, "bench_" + stage)
    if not os.path.exists(exe):
        print(f"# {stage}: {exe} not built, column left empty", file=sys.stderr)
        return {}
    # Only the shapes asked for: one regex alternative per (N, D, causal).
    parts = []
    for b, h, n, d, causal, hkv in wanted:
        parts.append(f"B={b}_Hq={h}_Hkv={hkv}_Nq={n}_Nk={n}_D={d}" + ("_causal" if causal else "") + "(/|$)")
    pattern = f"^{stage}/gpu/(fwd|bwd)/bf16/(" + "|".join(parts) + ")"
    command = [exe, "--benchmark_filter=" + pattern, "--benchmark_format=json"]
    print("# running " + " ".join(command[:1]) + " (" + str(len(wanted)) + " shapes)", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"# {stage}: exit status {done.returncode}: {done.stderr[-2000:]}", file=sys.stderr)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"# {stage}: no JSON: {done.stdout[-1000:]} {done.stderr[-1000:]}", file=sys.stderr)
        return {}
    times = {}
    for entry in report.get("benchmarks", []):
        match = NAME.match(entry["name"])
        if not match:
            continue
        key = (int(match["b"]), int(match["h"]), int(match["n"]), int(match["d"]), bool(match["causal"]), int(match["hkv"]),
               match["pass"])
        if entry.get("error_occurred"):
            times[key] = "error: " + entry.get("error_message", "")[:80]
        else:
            times[key] = entry["real_time"] * UNIT_SECONDS[entry.get("time_unit", "ns")]
    return times


def run_attn_cli(bin_dir, stage, wanted):
    """The same dictionary from `attn run --json` (for stages whose bench program lacks the sweep's shapes)."""
    exe = os.path.join(bin_dir, "attn")
    times = {}
    for b, h, n, d, causal, hkv in wanted:
        command = [exe, "run", "--stage", stage, "--tier", "gpu", "--dtype", "bf16", "--batch", str(b), "--heads", str(h),
                   "--kv-heads", str(hkv),
                   "--seq", str(n), "--head-dim", str(d), "--backward", "--json", "--repeats", "3"] + (["--causal"] if causal else [])
        print("# running " + " ".join(command[1:]), file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            times[(b, h, n, d, causal, hkv, "fwd")] = times[(b, h, n, d, causal, hkv, "bwd")] = "error"
            print(f"# {stage}: {done.stderr[-500:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1])
        for key, name in (("fwd", "time_ms"), ("bwd", "bwd_time_ms")):
            value = row.get(name)
            times[(b, h, n, d, causal, hkv, key)] = value * 1e-3 if isinstance(value, (int, float)) else "error"
    return times


def time_torch(fn, torch, warmup=3, repeats=10, reduce=statistics.median):
    """Median seconds of fn() by CUDA events, after warm-up (or `reduce` of the list of timed seconds)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3)
    return reduce(samples)


def run_torch(wanted, math_max):
    """{(b, h, n, d, causal, backend, pass): seconds or 'OOM' / 'unsupported' / 'skipped'}, pass in fwd, fwdbwd."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend_of = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    results = {}
    for b, h, n, d, causal, hkv in wanted:
        generator = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
        make = lambda heads: torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=generator)
        q, k, v, grad = make(h).requires_grad_(), make(hkv).requires_grad_(), make(hkv).requires_grad_(), make(h)
        for name in BACKENDS:
            key = (b, h, n, d, causal, hkv, name)
            if name == "math" and n > math_max:
                results[key + ("fwd",)] = results[key + ("fwdbwd",)] = "skipped"
                continue

            def forward():
                if hkv == h:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

            def forward_backward():
                q.grad = k.grad = v.grad = None
                forward().backward(grad)

            for label, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
                try:
                    with sdpa_kernel([backend_of[name]]):
                        results[key + (label,)] = time_torch(fn, torch)
                except torch.OutOfMemoryError:
                    results[key + (label,)] = "OOM"
                except RuntimeError as error:
                    results[key + (label,)] = "OOM" if "out of memory" in str(error) else "unsupported"
                torch.cuda.empty_cache()
        del q, k, v, grad
        torch.cuda.empty_cache()
    return results


def tflops(flops, seconds):
    return flops / seconds / 1e12 if isinstance(seconds, float) and seconds > 0 else None


def cell(value):
    if value is None:
        return ""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b is not None else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default="build/bin", help="folder with the bench_<stage> programs")
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--math-max", type=int, default=2048,
                        help="largest N for PyTorch's math backend (it materialises N x N; slow and large beyond)")
    parser.add_argument("--cli-stages", default="naive,memory_efficient",
                        help="stages timed through `attn run --json` (their bench programs use other shapes)")
    parser.add_argument("--cli-seqs", default="2048,8192", help="N for the --cli-stages (each shape is a process)")
    parser.add_argument("--shapes", default="",
                        help="explicit shapes B:H:N:D[:causal] separated by commas, instead of the sweep (e.g. 4:16:8448:128)")
    parser.add_argument("--extra-shapes", default="", help="shapes as in --shapes, timed after the sweep's")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="PyTorch SDPA backends to time")
    parser.add_argument("--json-out", help="also write every time measured here")
    args = parser.parse_args()
    BACKENDS[:] = [b for b in args.backends.split(",") if b]

    def parse_shapes(text):
        shapes = []
        for item in filter(None, text.split(",")):
            fields = item.split(":")
            kv = [int(f[3:]) for f in fields[4:] if f.startswith("kv=")]
            shapes.append(tuple(int(x) for x in fields[:4]) + ("causal" in fields[4:], kv[0] if kv else int(fields[1])))
        return shapes

    if args.shapes:
        wanted = parse_shapes(args.shapes)
    else:
        wanted = list(sweep([int(s) for s in args.seqs.split(",")], [int(d) for d in args.head_dims.split(",")]))
    wanted += parse_shapes(args.extra_shapes)
    stages = [s for s in args.stages.split(",") if s]
    cli_stages = [s for s in args.cli_stages.split(",") if s]
    cli_seqs = {int(n) for n in args.cli_seqs.split(",") if n}
    ours = {}
    for stage in stages:
        if stage in cli_stages:
            ours[stage] = run_attn_cli(args.bin, stage, [w for w in wanted if w[2] in cli_seqs])
        else:
            ours[stage] = run_stage_benchmarks(args.bin, stage, wanted)
    print("# running PyTorch scaled_dot_product_attention", file=sys.stderr, flush=True)
    theirs = run_torch(wanted, args.math_max)

    import torch
    gpu = torch.cuda.get_device_name()
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"attnlab GPU stages and PyTorch {torch.__version__} scaled_dot_product_attention, bf16, {gpu}, {today}")
    print("TFLOP/s (4 B Hq N^2 D forward, halved when causal; forward + backward counts 3.5x that, the backward alone "
          "2.5x, PyTorch's backward time taken as its forward + backward time minus its forward time), "
          "batch x N = 16k tokens, hidden 2048. Ratios: flash_v2 (v2), flash_v1 (v1) and flash_v3 (v3, forward only) over peers. "
          f"attnlab: bench_<stage> JSON (mean over Google Benchmark's timed iterations); {', '.join(cli_stages) or 'none'} "
          f"through `attn run --json` (median of 3) at N = {args.cli_seqs} only. PyTorch: median of 10 after 3 "
          f"warm-ups; math only up to N = {args.math_max}; empty cell = not run.")
    print()
    header = ["pass", "D", "causal", "N"] + stages + ["torch " + b for b in BACKENDS] + \
             ["v2/" + b for b in BACKENDS] + ["v1/flash", "v3/flash", "v3/cudnn", "v3/v2"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for pass_name in ("fwd", "fwdbwd", "bwd"):
        for b, h, n, d, causal, hkv in wanted:
            flops = model_flops(b, h, n, d, causal) * {"fwd": 1.0, "fwdbwd": 3.5, "bwd": 2.5}[pass_name]
            mine = {}
            for stage in stages:
                forward = ours[stage].get((b, h, n, d, causal, hkv, "fwd"))
                backward = ours[stage].get((b, h, n, d, causal, hkv, "bwd"))
                if pass_name == "fwd":
                    mine[stage] = tflops(flops, forward)
                elif pass_name == "bwd":
                    mine[stage] = tflops(flops, backward)
                else:
                    both = forward + backward if isinstance(forward, float) and isinstance(backward, float) else None
                    mine[stage] = tflops(flops, both)
            if pass_name == "bwd":  # PyTorch's backward alone: forward + backward minus forward
                peers = {}
                for name in BACKENDS:
                    both = theirs.get((b, h, n, d, causal, hkv, name, "fwdbwd"))
                    forward = theirs.get((b, h, n, d, causal, hkv, name, "fwd"))
                    peers[name] = both - forward if isinstance(both, float) and isinstance(forward, float) else both
            else:
                peers = {name: theirs.get((b, h, n, d, causal, hkv, name, pass_name)) for name in BACKENDS}
            peer_rates = {name: tflops(flops, value) for name, value in peers.items()}
            line = [pass_name.replace("fwdbwd", "fwd+bwd"), str(d) + ("" if hkv == h else f" (Hq={h}, Hkv={hkv})"),
                    "yes" if causal else "no", str(n)]
            line += [cell(mine[s]) for s in stages]
            line += [cell(peer_rates[name]) if peer_rates[name] is not None else (peers[name] or "") for name in BACKENDS]
            line += [ratio(mine.get("flash_v2"), peer_rates[name]) for name in BACKENDS]
            line += [ratio(mine.get("flash_v1"), peer_rates.get("flash"))]
            line += [ratio(mine.get("flash_v3"), peer_rates.get("flash")), ratio(mine.get("flash_v3"), peer_rates.get("cudnn")),
                     ratio(mine.get("flash_v3"), mine.get("flash_v2"))]
            print("| " + " | ".join(line) + " |")
            rows.append({"pass": pass_name, "b": b, "h": h, "hkv": hkv, "n": n, "d": d, "causal": causal,
                         "attnlab_tflops": mine, "torch_tflops": peer_rates,
                         "torch_notes": {k: v for k, v in peers.items() if isinstance(v, str)}})
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"gpu": gpu, "date": today, "torch": torch.__version__, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
