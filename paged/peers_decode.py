#!/usr/bin/env python3
"""Peers for paged decode: PyTorch's scaled_dot_product_attention on the same decode problem laid out
contiguously (B=16, 32 query heads, 8 KV heads, head dim 128, bf16, contexts 8k/16k/32k), every backend,
timed with torch.cuda events (median of 50 runs after 10 warm-ups). GQA is given to SDPA two ways:
enable_gqa=True (K and V read once), and K/V pre-expanded with repeat_interleave outside the timed region
(each KV head read by 4 query heads). Bandwidth is K+V bytes of the un-expanded cache over time, the figure
bench_paged reports as kv_GBps. Also prints a 2 GiB device-to-device copy (bytes read + written)."""
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warmup=10, repeats=50):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    n = 1 << 30  # 2 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    print(f"copy 2 GiB: {ms:.3f} ms, {2 * 2 * n / ms / 1e9:.0f} GB/s (read + write)")
    del src, dst

    B, Hq, Hkv, D = 16, 32, 8, 128
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    print(f"{'context':>8} {'backend':>10} {'gqa':>18} {'ms':>9} {'kv GB/s':>9}")
    for context in (8192, 16384, 32768):
        q = torch.randn(B, Hq, 1, D, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(B, Hkv, context, D, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(B, Hkv, context, D, dtype=torch.bfloat16, device="cuda")
        kv_bytes = 2 * k.numel() * k.element_size()
        reference = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(Hq // Hkv, 1),
                                                   v.float().repeat_interleave(Hq // Hkv, 1))
        k_expanded = k.repeat_interleave(Hq // Hkv, dim=1)
        v_expanded = v.repeat_interleave(Hq // Hkv, dim=1)
        for name, backend in backends:
            for mode in ("enable_gqa=True", "repeat_interleave"):
                if mode == "enable_gqa=True":
                    call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                else:
                    call = lambda: F.scaled_dot_product_attention(q, k_expanded, v_expanded)
                try:
                    with sdpa_kernel(backend):
                        out = call()
                        error = ((out.float() - reference).norm() / reference.norm()).item()
                        ms = median_ms(call)
                    print(f"{context:>8} {name:>10} {mode:>18} {ms:>9.3f} {kv_bytes / ms / 1e6:>9.0f}   (rel. error {error:.1e})")
                except Exception as e:  # a backend that does not take this problem
                    print(f"{context:>8} {name:>10} {mode:>18} {'-':>9} {'-':>9}   unsupported: {str(e).splitlines()[0][:80]}")
        del q, k, v, k_expanded, v_expanded, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
