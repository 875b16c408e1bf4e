#!/usr/bin/env python3
"""cuDNN's FP8 attention forward beside its bf16 one, on the GPU host, at FA3's protocol shape.

PyTorch 2.11's scaled_dot_product_attention has no FP8 path there, so this script calls cuDNN's fused FP8 SDPA
through the cuDNN frontend's Python graph API (the `nvidia-cudnn-frontend` wheel; the GPU host reaches no package
registry, so the wheel is downloaded elsewhere and unpacked there, its directory given as --frontend). cuDNN itself
is the library PyTorch loads. Per-tensor scales (amax / 448 for Q, K and V; P scaled by 448), O in e4m3 (cuDNN's
FP8 forward on Hopper writes O in FP8), inference mode (no softmax statistics). bf16: PyTorch's SDPA on its cuDNN
backend, same inputs. Each figure is the median of 20 timed calls (CUDA events) after one untimed call; the FP8
inputs are quantized once, outside the timing, so the figure compares with flash_v3's FP8 kernel alone
(`attn run ... --opt fp8=1`: attention_tflops), not with its whole call. FLOPs: 4 B H N^2 D (non-causal).

    python3 scripts/peers_fp8.py [--frontend DIR]    (one JSON line per shape, then one with all of them)
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import time_torch  # noqa: E402  (the CUDA-event median of scripts/peers.py)


def time_ms(fn):
    """Median milliseconds of 20 timed calls after one untimed call."""
    return time_torch(fn, torch, warmup=1, repeats=20) * 1e3


def quantize(x):
    """e4m3 codes of x / descale and the descale (a 1x1x1x1 fp32 tensor), one scale for the whole tensor."""
    scale = 448.0 / x.abs().max().float()
    return (x.float() * scale).to(torch.float8_e4m3fn), (1.0 / scale).reshape(1, 1, 1, 1).float()


def fp8_forward(cudnn, q, k, v):
    """A callable running cuDNN's FP8 SDPA forward on q, k, v (bf16, B x H x N x D), and its output tensor."""
    b, h, n, d = q.shape
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    scale_s = torch.full((1, 1, 1, 1), 448.0, device="cuda")
    descale_s, scale_o = 1.0 / scale_s, torch.ones(1, 1, 1, 1, device="cuda")
    o8 = torch.empty(b, h, n, d, device="cuda", dtype=torch.float8_e4m3fn)
    amax_s, amax_o = torch.empty(1, 1, 1, 1, device="cuda"), torch.empty(1, 1, 1, 1, device="cuda")
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32)
    tq, tk, tv = [graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=e4m3)
                  for name, x in (("q", q8), ("k", k8), ("v", v8))]
    scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    tdq, tdk, tdv, tds, tss, tso = [graph.tensor(name=name, **scalar) for name in ("dq", "dk", "dv", "ds", "ss", "so")]
    o, _, t_amax_s, t_amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=tdq, descale_k=tdk, descale_v=tdv,
                                              descale_s=tds, scale_s=tss, scale_o=tso, is_inference=True,
                                              attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa")
    o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
    for t in (t_amax_s, t_amax_o):
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
    pack = {tq: q8, tk: k8, tv: v8, tdq: dq, tdk: dk, tdv: dv, tds: descale_s, tss: scale_s, tso: scale_o,
            o: o8, t_amax_s: amax_s, t_amax_o: amax_o}
    return (lambda: graph.execute(pack, workspace)), o8


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontend", help="directory holding the unpacked nvidia-cudnn-frontend wheel")
    args = parser.parse_args()
    if args.frontend:
        sys.path.insert(0, args.frontend)
    torch.backends.cudnn.version()  # loads PyTorch's libcudnn, which the frontend then finds by its soname
    import cudnn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    for d, n in ((128, 16384), (128, 8192), (256, 16384)):
        b, h = 16384 // n, 2048 // d
        torch.manual_seed(1)
        q, k, v = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        flops = 4.0 * b * h * n * n * d
        row = {"d": d, "N": n, "B": b, "H": h}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            row["bf16_cudnn_ms"] = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        row["bf16_cudnn_tflops"] = flops / row["bf16_cudnn_ms"] / 1e9
        try:
            run, o8 = fp8_forward(cudnn, q, k, v)
            row["fp8_cudnn_ms"] = time_ms(run)
            row["fp8_cudnn_tflops"] = flops / row["fp8_cudnn_ms"] / 1e9
            row["fp8_over_bf16_cudnn"] = row["fp8_cudnn_tflops"] / row["bf16_cudnn_tflops"]
            row["fp8_rel_err_vs_bf16"] = float((o8.float() - reference.float()).norm() / reference.float().norm())
        except Exception as error:  # a shape cuDNN does not take: say so in the row
            row["fp8_error"] = str(error)[:400]
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cudnn_backend_version": cudnn.backend_version(), "results": results}))


if __name__ == "__main__":
    main()
