"""PyTorch peers for bench/cuda_bench.cu, on the same card in the same session (docs/performance.md).

Usage: python3 bench/cuda_bench.py [--tokens 1,8,64,512] [--iters 50] [--shapes ...] [--int4 128,32]
Prints: device, measured device-to-device copy bandwidth (bytes read + written), bf16 8192^3 GEMM
rate, then for each model shape and T the bf16 MoE peer: routing (softmax, top-k, normalize), sort
(token, expert) pairs by expert, torch._grouped_mm for FC1 and FC2, SwiGLU, weighted index_add; then
the int4 peer for each group size of --int4 ("" for none): the same routing and combine with FC1 and
FC2 as torch._weight_int4pack_mm per expert that has tokens (PyTorch's int4 weight-only matmul; random
codes, bf16 scales and zeros per group; the expert loop reads the token counts on the host, as a
per-expert loop must). A case PyTorch refuses (K not a multiple of the group) prints FAILED and why.
Timing: CUDA events, median of --iters after 5 warm-ups, launched from Python; the bf16 peer also as
CUDA-graph replays ("grouped_mm_graph_us"; the int4 peer's host read of the counts cannot be captured).
At T=1 the 16 routing sets rotate so that consecutive runs touch disjoint experts (as the qmoe bench
does), so weights come from HBM.
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


def report(name, T, label, measure):
    """Prints `name T label µs` from measure(), or why it failed (report, do not hide)."""
    try:
        print(f"{name:17s} {T:5d} {label} {measure():10.1f}", flush=True)
    except Exception as e:
        print(f"{name:17s} {T:5d} {label} FAILED: {type(e).__name__}: {e}", flush=True)


def graph_timed(fn, sets, iters):
    """Median µs of replaying fn(*sets[i % len(sets)]) captured in one CUDA graph per input set (what launching
    from Python costs is then out of the time, as it is out of qmoe's graph column)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for args in sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append(g)
    return timed(lambda i: graphs[i % len(graphs)].replay(), iters)


def int4pack_weights(E, N, K, gs, dev):
    """Per expert: random 4-bit codes of an [N, K] weight in torch._weight_int4pack_mm's packed layout, and its
    [K / gs, N, 2] bf16 scales and zeros (values do not change the kernel's cost)."""
    if K % gs:
        raise ValueError(f"K = {K} is not a multiple of the group size {gs}")
    tiles = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if tiles is None:
        raise ValueError(f"K = {K} is not a multiple of 32, which the packed layout needs")
    packed = [torch._convert_weight_to_int4pack(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev), tiles)
              for _ in range(E)]
    sz = torch.empty(E, K // gs, N, 2, device=dev, dtype=torch.bfloat16)
    sz[..., 0].uniform_(0.005, 0.02)
    sz[..., 1].zero_()
    return packed, sz


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--int4", default="128,32", help="group sizes of the int4 peer ('' for none)")
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

        def route(logits):  # (token of each sorted pair, its expert weight, tokens per expert)
            p = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(p, k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            flat = idx.flatten()
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
            return order // k, w.flatten()[order], counts  # (bincount would read its size on the host)

        def swiglu(h):
            g, u = h[:, :I].float(), h[:, I:].float()
            if limit is not None:
                g = g.clamp(max=limit)
                u = u.clamp(-limit, limit)
            return (g * torch.sigmoid(alpha * g) * (u + beta)).to(torch.bfloat16)

        def combine(T, tok, wts, y):
            out = torch.zeros(T, H, device=dev, dtype=torch.float32)
            out.index_add_(0, tok, y.float() * wts[:, None])
            return out.to(torch.bfloat16)

        def moe(x, logits):
            tok, wts, counts = route(logits)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            h = torch._grouped_mm(x[tok], w1t, offs=offs)
            y = torch._grouped_mm(swiglu(h), w2t, offs=offs)
            return combine(x.shape[0], tok, wts, y)

        def inputs(T, r):  # routing set r of 16: at T = 1 each touches its own experts
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            l = torch.randn(T, E, device=dev)
            if T == 1:
                for j in range(k):
                    l[0, (r * k + j) % E] += 10.0
            return x, l.to(torch.bfloat16)

        sets = {T: [inputs(T, r) for r in range(16)] for T in tokens}  # the same inputs for every peer
        for T in tokens:
            try:
                us = timed(lambda i: moe(*sets[T][i % 16]), args.iters)
                print(f"{name:17s} {T:5d} {us:14.1f} {6 * T * k * H * I / (us * 1e-6) / 1e12:8.1f}", flush=True)
            except Exception as e:  # report, do not hide
                print(f"{name:17s} {T:5d} FAILED: {type(e).__name__}: {e}", flush=True)
            report(name, T, "grouped_mm_graph_us", lambda: graph_timed(moe, sets[T], args.iters))
        del w1, w2, w1t, w2t
        torch.cuda.empty_cache()

        for gs in [int(g) for g in args.int4.split(",") if g]:
            try:
                W1, S1 = int4pack_weights(E, 2 * I, H, gs, dev)
                W2, S2 = int4pack_weights(E, H, I, gs, dev)
            except Exception as e:
                print(f"{name:17s} int4pack b{gs} FAILED: {type(e).__name__}: {e}", flush=True)
                continue

            def moe_int4(x, logits):
                tok, wts, counts = route(logits)
                xs, ys, start = x[tok], [], 0
                for e, c in enumerate(counts.tolist()):
                    if c:
                        h = torch._weight_int4pack_mm(xs[start:start + c], W1[e], gs, S1[e])
                        ys.append(torch._weight_int4pack_mm(swiglu(h), W2[e], gs, S2[e]))
                        start += c
                return combine(x.shape[0], tok, wts, torch.cat(ys))

            for T in tokens:
                report(name, T, f"int4pack_b{gs}_us", lambda: timed(lambda i: moe_int4(*sets[T][i % 16]), args.iters))
            del W1, S1, W2, S2
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
