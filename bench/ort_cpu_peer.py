#!/usr/bin/env python3
"""ONNX Runtime's CPU QMoE on the shapes and inputs of bench/cpu_bench.cpp: the peer for docs/PERF.md.

Builds one com.microsoft::QMoE node per (shape, quantization) with random raw weights (fp32 input and
fp32 scales: ORT's CPU kernel wants T2 == T), swiglu_fusion = 1 (the only fusion ORT's CPU accepts),
normalize_routing_weights = 1, and times session creation (ORT's load, which includes its prepack)
and the median of session.run per token count (and the process CPU time per run: on a shared machine,
wall time includes waiting for a core), with intra_op_num_threads = --threads (same as qmoe).

Usage: python3 bench/ort_cpu_peer.py [--shapes mixtral,qwen3] [--quants int4b32,int4b128,int8]
                                     [--tokens 1,8,64,512] [--threads 2] [--min-time 1.0]
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"mixtral": dict(E=8, k=2, H=4096, I=14336), "qwen3": dict(E=128, k=8, H=2048, I=768)}
QUANTS = {"int4b32": (4, 32), "int4b128": (4, 128), "int8": (8, 0)}


def build_model(path, E, k, H, I, bits, block, rng):
    pack = 8 // bits
    n1 = 2 * I

    def scales(N, K):
        nb = (K + block - 1) // block if block else 1
        mag = 0.5 / np.sqrt(K) / (1 << (bits - 1))
        shape = (E, N, nb) if block else (E, N)
        return (rng.uniform(0.5, 1.5, size=shape) * mag).astype(np.float32)

    inits = [
        numpy_helper.from_array(rng.integers(0, 256, size=(E, n1, H // pack), dtype=np.uint8), "fc1_w"),
        numpy_helper.from_array(scales(n1, H), "fc1_s"),
        numpy_helper.from_array(rng.integers(0, 256, size=(E, H, I // pack), dtype=np.uint8), "fc2_w"),
        numpy_helper.from_array(scales(H, I), "fc2_s"),
    ]
    attrs = dict(k=k, activation_type="swiglu", normalize_routing_weights=1, expert_weight_bits=bits,
                 swiglu_fusion=1, weights_prepacked=0)
    if block:
        attrs["block_size"] = block
    node = helper.make_node("QMoE", ["input", "router_probs", "fc1_w", "fc1_s", "", "fc2_w", "fc2_s"], ["output"],
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "qmoe_peer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    # External data: an int8 mixtral layer is ~1.4 GB, close to protobuf's 2 GB limit.
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--quants", default="int4b32,int4b128,int8")
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads")
    print(f"{'shape':8s} {'quant':9s} {'T':>5s} {'ort_us':>12s} {'ort_cpu_us':>12s}")
    rng = np.random.default_rng(0)
    for sname in args.shapes.split(","):
        sh = SHAPES[sname]
        for qname in args.quants.split(","):
            bits, block = QUANTS[qname]
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "qmoe.onnx")
                build_model(path, sh["E"], sh["k"], sh["H"], sh["I"], bits, block, rng)
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
                t0 = time.perf_counter()
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                load_s = time.perf_counter() - t0
                print(f"# {sname} {qname}: session creation (load + ORT prepack) {load_s:.2f} s")
                for T in [int(t) for t in args.tokens.split(",")]:
                    x = rng.uniform(-1, 1, size=(T, sh["H"])).astype(np.float32)
                    logit_sets = [rng.uniform(-3, 3, size=(T, sh["E"])).astype(np.float32) for _ in range(8)]
                    times, cpu, total = [], [], 0.0
                    for rep in range(200):
                        t1, c1 = time.perf_counter(), time.process_time()
                        sess.run(None, {"input": x, "router_probs": logit_sets[rep % 8]})
                        dt = time.perf_counter() - t1
                        total += dt
                        if rep > 0:  # rep 0 warms up
                            times.append(dt)
                            cpu.append(time.process_time() - c1)
                        if len(times) >= 3 and (total >= args.min_time or dt > 2.0):
                            break
                    print(f"{sname:8s} {qname:9s} {T:5d} {statistics.median(times) * 1e6:12.1f} "
                          f"{statistics.mean(cpu) * 1e6:12.1f}", flush=True)
                del sess


if __name__ == "__main__":
    main()
