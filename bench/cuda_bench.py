"""PyTorch peers for bench/cuda_bench.cu, on the same card in the same session (docs/performance.md).

Usage: python3 bench/cuda_bench.py [--tokens 1,8,64,512] [--iters 50]
Prints: device, measured device-to-device copy bandwidth (bytes read + written), bf16 8192^3 GEMM
rate, then for each model shape and T the bf16 MoE peer: routing (softmax, top-k, normalize), sort
(token, expert) pairs by expert, torch._grouped_mm for FC1 and FC2, SwiGLU, weighted index_add.
Timing: CUDA events, median of --iters after 5 warm-ups; at T=1 the 16 routing sets rotate so that
consecutive runs touch disjoint experts (as the qmoe bench does), so weights come from HBM.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

SHAPES = [  # name, H, I, E, k, swiglu limit, alpha, beta (interleaving does not change the cost)
    ("mixtral", 4096, 14336, 8, 2, None, 1.0, 0.0),
    ("qwen3-30b-a3b", 2048, 768, 128, 8, None, 1.0, 0.0),
    ("gpt-oss-20b", 2880, 2880, 32, 4, 7.0, 1.702, 1.0),
    ("deepseek-v3-like", 7168, 2048, 256, 8, None, 1.0, 0.0),
]


def timed(fn, iters, warm=5):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for i in range(warm + iters):
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        if i >= warm:
            ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(7)
    dst = torch.empty_like(src)
    us = timed(lambda i: dst.copy_(src), 20)
    print(f"copy bandwidth: {2 * n / (us * 1e-6) / 1e9:.0f} GB/s (read+write, 1 GiB copy)")
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    us = timed(lambda i: a @ b, 20)
    print(f"bf16 8192^3 GEMM: {2 * 8192**3 / (us * 1e-6) / 1e12:.0f} TFLOP/s")
    del a, b

    print(f"\n{'shape':17s} {'T':>5s} {'grouped_mm_us':>14s} {'TFLOP/s':>8s}")
    for name, H, I, E, k, limit, alpha, beta in SHAPES:
        if name not in args.shapes.split(","):
            continue
        torch.manual_seed(0)
        w1 = (torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H**-0.5)
        w2 = (torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I**-0.5)
        w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H] column-major views

        def moe(x, logits):
            T = x.shape[0]
            p = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(p, k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            flat = idx.flatten()
            order = torch.argsort(flat, stable=True)
            tok = order // k
            offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
            h = torch._grouped_mm(x[tok], w1t, offs=offs)
            g, u = h[:, :I].float(), h[:, I:].float()
            if limit is not None:
                g = g.clamp(max=limit)
                u = u.clamp(-limit, limit)
            act = (g * torch.sigmoid(alpha * g) * (u + beta)).to(torch.bfloat16)
            y = torch._grouped_mm(act, w2t, offs=offs)
            out = torch.zeros(T, H, device=dev, dtype=torch.float32)
            out.index_add_(0, tok, y.float() * w.flatten()[order, None])
            return out.to(torch.bfloat16)

        for T in tokens:
            R = 16
            xs, ls = [], []
            for r in range(R):
                xs.append(torch.randn(T, H, device=dev, dtype=torch.bfloat16))
                l = torch.randn(T, E, device=dev)
                if T == 1:
                    for j in range(k):
                        l[0, (r * k + j) % E] += 10.0
                ls.append(l.to(torch.bfloat16))
            try:
                us = timed(lambda i: moe(xs[i % R], ls[i % R]), args.iters)
                print(f"{name:17s} {T:5d} {us:14.1f} {6 * T * k * H * I / (us * 1e-6) / 1e12:8.1f}", flush=True)
            except Exception as e:  # report, do not hide
                print(f"{name:17s} {T:5d} FAILED: {type(e).__name__}: {e}", flush=True)
        del w1, w2, w1t, w2t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
