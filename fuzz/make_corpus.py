#!/usr/bin/env python3
"""Writes the checked-in seed corpora under fuzz/corpus/<fuzzer>/.

Small valid files and near-valid ones (one field wrong), so libFuzzer starts from inputs that reach
deep into each parser instead of failing at the magic bytes. Deterministic (fixed seeds): re-running
gives the same files. Seeds that need qmoe's own writers (packed files, raw QMoE safetensors) come
from build-fuzz/make_seeds, run at the end when it has been built (scripts/fuzz.sh builds it).

    python3 fuzz/make_corpus.py [--make-seeds build-fuzz/make_seeds]
"""
import argparse
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
rng = np.random.default_rng(1234)


def put(fuzzer, name, data):
    d = os.path.join(CORPUS, fuzzer)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("latin1")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- .npy
def npy_bytes(a):
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def npy_manual(descr, shape, data=b"", fortran=False, version=(1, 0), pad_to=64, extra=""):
    hdr = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, %s}" % (
        descr, "True" if fortran else "False", shape, extra)
    pre = 10 if version[0] == 1 else 12
    total = pre + len(hdr) + 1
    hdr += " " * ((-total) % pad_to) + "\n"
    lenfield = struct.pack("<H", len(hdr)) if version[0] == 1 else struct.pack("<I", len(hdr))
    return b"\x93NUMPY" + bytes(version) + lenfield + hdr.encode("latin1") + data


def make_npy():
    put("npy", "f32_2d", npy_bytes(rng.standard_normal((3, 4)).astype(np.float32)))
    put("npy", "f16_1d", npy_bytes(rng.standard_normal(5).astype(np.float16)))
    put("npy", "u8_3d", npy_bytes(rng.integers(0, 255, (2, 3, 4), dtype=np.uint8)))
    put("npy", "u16_bf16", npy_bytes(np.array([0x3F80, 0xC000, 0x7FC0], dtype=np.uint16)))
    put("npy", "scalar", npy_bytes(np.float32(1.5)))
    put("npy", "empty_0", npy_bytes(np.zeros((0,), np.float32)))
    put("npy", "empty_3x0", npy_bytes(np.zeros((3, 0), np.float32)))
    put("npy", "nan_inf", npy_bytes(np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)))
    put("npy", "v2", npy_manual("<f4", "(2,)", struct.pack("<2f", 1, 2), version=(2, 0)))
    put("npy", "v3", npy_manual("<f4", "(2,)", struct.pack("<2f", 1, 2), version=(3, 0)))
    # near-valid
    put("npy", "fortran", npy_manual("<f4", "(2, 2)", b"\0" * 16, fortran=True))
    put("npy", "big_endian", npy_manual(">f4", "(2,)", b"\0" * 8))
    put("npy", "f64", npy_manual("<f8", "(2,)", b"\0" * 16))
    put("npy", "truncated", npy_manual("<f4", "(4,)", b"\0" * 7))
    put("npy", "trailing", npy_manual("<f4", "(1,)", b"\0" * 9))
    put("npy", "huge_shape", npy_manual("<f4", "(1099511627776, 1024)", b"\0" * 16))
    put("npy", "overflow_shape", npy_manual("<f4", "(4294967296, 4294967296, 16)", b""))
    put("npy", "neg_dim", npy_manual("<f4", "(-1,)", b""))
    put("npy", "trailing_comma", npy_manual("<u1", "(3,)", b"abc"))
    put("npy", "extra_key", npy_manual("<u1", "(3,)", b"abc", extra="'x': 1, "))
    put("npy", "bad_magic", b"\x93NUMPX\x01\x00" + npy_bytes(np.zeros(2, np.float32))[8:])
    put("npy", "version9", b"\x93NUMPY\x09\x00" + npy_bytes(np.zeros(2, np.float32))[8:])
    put("npy", "hdr_len_huge", b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{'descr'")


# ---------------------------------------------------------------- ONNX
def make_onnx():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def qmoe_model(E=2, H=16, I=32, bits=4, act="relu", fusion=0, block=0, k=1, T=TensorProto.FLOAT,
                   T2=np.float32, bias=False, zp=False, layout="raw", typed=False, external=None,
                   prepacked=0, extra_attrs=None, drop_type=False):
        pack = 8 // bits
        swiglu = act == "swiglu"
        N1 = 2 * I if swiglu and fusion != 0 else I
        inits, names = [], [""] * 14

        def add(idx, name, arr):
            names[idx] = name
            if typed and arr.dtype == np.float32:
                t = helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.flatten().tolist())
            elif typed and arr.dtype == np.uint8:
                t = helper.make_tensor(name, TensorProto.UINT8, arr.shape, arr.flatten().tolist())
            else:
                t = numpy_helper.from_array(arr, name)
            inits.append(t)

        def mat(idx_w, idx_s, idx_b, idx_z, N, K, tag):
            if layout == "raw":
                w = rng.integers(0, 256, (E, N, K // pack), dtype=np.uint8)
            else:
                w = rng.integers(0, 256, (E, K, N // pack), dtype=np.uint8)
            nb = (K + block - 1) // block if block else 0
            sshape = (E, N, nb) if block else (E, N)
            s = (rng.random(sshape) * 0.1 + 0.01).astype(T2)
            add(idx_w, tag + "_w", w)
            add(idx_s, tag + "_s", s)
            if bias:
                add(idx_b, tag + "_b", (rng.standard_normal((E, N)) * 0.1).astype(
                    np.float16 if T == TensorProto.FLOAT16 else np.float32))
            if zp:
                zshape = (E, N, (nb + pack - 1) // pack) if block else (E, (N + pack - 1) // pack)
                add(idx_z, tag + "_z", rng.integers(0, 256, zshape, dtype=np.uint8))

        mat(2, 3, 4, 11, N1, H, "fc1")
        mat(5, 6, 7, 12, H, I, "fc2")
        if swiglu and fusion == 0:
            mat(8, 9, 10, 13, I, H, "fc3")
        names[0], names[1] = "input", "router_probs"
        while names and names[-1] == "":
            names.pop()
        attrs = dict(k=k, activation_type=act, expert_weight_bits=bits, normalize_routing_weights=0)
        if block:
            attrs["block_size"] = block
        if swiglu:
            attrs["swiglu_fusion"] = fusion
        if prepacked is not None:
            attrs["weights_prepacked"] = prepacked
        attrs.update(extra_attrs or {})
        node = helper.make_node("QMoE", names, ["output"], domain="com.microsoft", name="moe", **attrs)
        tt = 0 if drop_type else T
        g = helper.make_graph(
            [node], "qmoe",
            [helper.make_tensor_value_info("input", tt, ["T", H]),
             helper.make_tensor_value_info("router_probs", tt, ["T", E])],
            [helper.make_tensor_value_info("output", tt, ["T", H])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid("com.microsoft", 1)])
        if external:
            # Point the first initializers at the harness's fixed weights.bin (64 KiB) / short.bin.
            for t, (loc, off) in zip(inits, external):
                raw = t.raw_data
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, val in (("location", loc), ("offset", str(off)), ("length", str(len(raw)))):
                    e = t.external_data.add()
                    e.key, e.value = key, val
        return m.SerializeToString()

    put("onnx", "relu_int4", qmoe_model())
    put("onnx", "swiglu_fused_int8_block", qmoe_model(act="swiglu", fusion=1, bits=8, block=16, k=2, H=64,
                                                       bias=True, zp=True))
    put("onnx", "swiglu_fc3_int2_fp16", qmoe_model(act="swiglu", fusion=0, bits=2, T=TensorProto.FLOAT16,
                                                     T2=np.float16, bias=True, E=3, k=2))
    put("onnx", "concat_gelu_zp", qmoe_model(act="swiglu", fusion=2, zp=True, H=32, I=16))
    put("onnx", "typed_fields", qmoe_model(typed=True, E=1, H=8, I=16))
    put("onnx", "ort_cuda_layout", qmoe_model(layout="cuda", prepacked=1, H=128, I=64))
    put("onnx", "ort_cuda_ambiguous", qmoe_model(layout="cuda", prepacked=-1, H=32, I=32))
    put("onnx", "external_ok", qmoe_model(external=[("weights.bin", 0), ("weights.bin", 128)]))
    put("onnx", "external_escape", qmoe_model(external=[("../weights.bin", 0)]))
    put("onnx", "external_absolute", qmoe_model(external=[("/etc/hostname", 0)]))
    put("onnx", "external_short", qmoe_model(external=[("short.bin", 64)]))
    put("onnx", "external_offset_huge", qmoe_model(external=[("weights.bin", 18446744073709551000)]))
    put("onnx", "no_type", qmoe_model(drop_type=True))
    put("onnx", "unknown_attr", qmoe_model(extra_attrs={"foo": 1}))
    put("onnx", "quant_fp4", qmoe_model(extra_attrs={"quant_type": "fp4"}))
    put("onnx", "k_too_big", qmoe_model(k=5))
    # Not QMoE at all.
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", 1, [2])],
                               [onnx.helper.make_tensor_value_info("y", 1, [2])])
    put("onnx", "relu_model", onnx.helper.make_model(g).SerializeToString())
    put("onnx", "empty", b"")


# ---------------------------------------------------------------- safetensors
def st_bytes(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype_str, shape, bytes)."""
    header, data = {}, b""
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def make_safetensors():
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32).tobytes()
    bf16 = lambda *s: (rng.standard_normal(s).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    put("safetensors", "simple", st_bytes([("a", "F32", (2, 3), f32(2, 3)), ("b", "BF16", (4,), bf16(4))],
                                          {"format": "pt"}))
    put("safetensors", "dtypes", st_bytes([("i64", "I64", (2,), b"\0" * 16), ("u8", "U8", (3,), b"abc"),
                                           ("f16", "F16", (1,), b"\0<"), ("e4", "F8_E4M3", (2,), b"\1\2"),
                                           ("bool", "BOOL", (1,), b"\1")]))
    put("safetensors", "empty_tensor", st_bytes([("z", "F32", (0, 4), b"")]))
    put("safetensors", "scalar", st_bytes([("s", "F32", (), f32(1))]))
    put("safetensors", "unaligned", st_bytes([("u", "U8", (1,), b"x"), ("f", "F32", (2,), f32(2))], pad=False))
    put("safetensors", "header_only", struct.pack("<Q", 2) + b"{}")
    # near-valid
    put("safetensors", "overlap", st_bytes([("a", "F32", (2,), f32(2))])[:-4])
    hdr = b'{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}'
    put("safetensors", "huge_shape", struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}}'
    put("safetensors", "huge_offset", struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    put("safetensors", "huge_header_len", struct.pack("<Q", 1 << 62) + b"{}")
    put("safetensors", "deep_json", struct.pack("<Q", 4001) + b"[" * 2000 + b"]" * 2000 + b"\n")
    # Mixtral-like layer 0 (E=2, H=8, I=16), BF16, with router.
    E, H, I = 2, 8, 16
    ts = [("model.layers.0.block_sparse_moe.gate.weight", "BF16", (E, H), bf16(E, H))]
    for e in range(E):
        p = "model.layers.0.block_sparse_moe.experts.%d." % e
        ts += [(p + "w1.weight", "BF16", (I, H), bf16(I, H)), (p + "w3.weight", "BF16", (I, H), bf16(I, H)),
               (p + "w2.weight", "BF16", (H, I), bf16(H, I))]
    put("safetensors", "hf_mixtral", st_bytes(ts, {"format": "pt"}))
    ts = []
    for e in range(E):
        p = "model.layers.1.mlp.experts.%d." % e
        ts += [(p + "gate_proj.weight", "F32", (I, H), f32(I, H)), (p + "up_proj.weight", "F32", (I, H), f32(I, H)),
               (p + "down_proj.weight", "F32", (H, I), f32(H, I))]
    ts.append(("model.layers.1.mlp.gate.weight", "F32", (E, H), f32(E, H)))
    put("safetensors", "hf_qwen_layer1", st_bytes(ts))
    p = "model.layers.0.mlp.experts."
    ts = [(p + "gate_up_proj", "BF16", (E, H, 2 * I), bf16(E, H, 2 * I)), (p + "gate_up_proj_bias", "BF16", (E, 2 * I), bf16(E, 2 * I)),
          (p + "down_proj", "BF16", (E, I, H), bf16(E, I, H)), (p + "down_proj_bias", "BF16", (E, H), bf16(E, H)),
          ("model.layers.0.mlp.router.weight", "BF16", (E, H), bf16(E, H))]
    put("safetensors", "hf_gpt_oss", st_bytes(ts))


def make_index():
    shard = st_bytes([("a.weight", "F32", (2, 2), np.arange(4, dtype=np.float32).tobytes())])
    def idx(wm, meta=True):
        d = {"weight_map": wm}
        if meta:
            d["metadata"] = {"total_size": 36}
        return json.dumps(d).encode()
    put("safetensors_index", "two_shards", idx({"a.weight": "model-00001.safetensors",
                                                "b.weight": "model-00002.safetensors",
                                                "b.bias": "model-00002.safetensors"}) + b"\n@@\n" + shard)
    put("safetensors_index", "one_shard_no_file", idx({"b.weight": "model-00002.safetensors"}))
    put("safetensors_index", "subdir", idx({"b.weight": "sub/model-00002.safetensors"}))
    put("safetensors_index", "missing_name", idx({"zzz": "model-00002.safetensors"}))
    put("safetensors_index", "escape_dotdot", idx({"b.weight": "../outside.safetensors"}))
    put("safetensors_index", "escape_abs", idx({"b.weight": "/etc/hostname"}))
    put("safetensors_index", "dot_dot_inside", idx({"b.weight": "sub/../model-00002.safetensors"}))
    put("safetensors_index", "folder", idx({"b.weight": "sub"}))
    put("safetensors_index", "not_st", idx({"b.weight": "notes.txt"}))
    put("safetensors_index", "missing_shard", idx({"a.weight": "model-00001.safetensors"}))
    put("safetensors_index", "not_string", b'{"weight_map": {"a": 3}}')
    put("safetensors_index", "no_map", b'{"metadata": {}}')
    put("safetensors_index", "deep", b'{"weight_map":' + b"[" * 1000 + b"]" * 1000 + b"}")
    put("safetensors_index", "bad_shard", idx({"a.weight": "model-00001.safetensors"}) + b"\n@@\n" + shard[:20])


# ---------------------------------------------------------------- spec (attribute-like text)
def make_spec():
    def spec(**kw):
        return "\n".join("%s=%s" % kv for kv in kw.items())
    blob = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    put("spec", "relu_int4", spec(num_experts=2, hidden_size=16, inter_size=32, k=1, expert_weight_bits=4))
    put("spec", "swiglu_fused_block", spec(num_experts=4, hidden_size=32, inter_size=16, k=2, expert_weight_bits=8,
                                           block_size=16, activation_type="swiglu", swiglu_fusion=1,
                                           fc1_bias=1, fc2_bias=1, fc1_zero_points=1, tokens=3, cpu=1))
    put("spec", "swiglu_fc3_int2", spec(num_experts=3, hidden_size=16, inter_size=16, k=2, expert_weight_bits=2,
                                        activation_type="swiglu", swiglu_fusion=0, fc3_bias=1, fc3_zero_points=1,
                                        act_dtype="bf16", scale_dtype="fp16", use_sparse_mixer=1))
    put("spec", "k_eq_E", spec(num_experts=4, hidden_size=8, inter_size=8, k=4, normalize_routing_weights=1,
                               activation_type="silu", tokens=5, router_weights=1, cpu=1))
    put("spec", "E1", spec(num_experts=1, hidden_size=32, inter_size=64, k=1, activation_type="gelu",
                           block_size=32, act_dtype="f16", tokens=1))
    put("spec", "T0", spec(num_experts=2, hidden_size=16, inter_size=16, k=1, tokens=0, cpu=1))
    put("spec", "three_d", spec(num_experts=2, hidden_size=16, inter_size=16, tokens=4, three_d=1))
    put("spec", "nan_blob", spec(num_experts=2, hidden_size=16, inter_size=16, scale_dtype="f32", tokens=2,
                                 cpu=1) + "\n--\n" + "\xff" * 8 + blob.decode("latin1"))
    put("spec", "limit_alpha", spec(num_experts=2, hidden_size=16, inter_size=16, activation_type="swiglu",
                                    swiglu_fusion=2, swiglu_limit="7.0", activation_alpha="1.702",
                                    activation_beta="1.0"))
    put("spec", "perturb", spec(num_experts=2, hidden_size=16, inter_size=16, perturb=2))
    put("spec", "huge_K", spec(num_experts=2, hidden_size=9223372036854775800, inter_size=16))
    put("spec", "bad_block", spec(num_experts=2, hidden_size=16, inter_size=16, block_size=24))
    put("spec", "swiglu_limit_nan", spec(num_experts=2, hidden_size=16, inter_size=16, activation_type="swiglu",
                                         swiglu_limit="nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-seeds", default=os.path.join(ROOT, "..", "build-fuzz", "make_seeds"))
    a = ap.parse_args()
    make_npy()
    make_onnx()
    make_safetensors()
    make_index()
    make_spec()
    if os.path.exists(a.make_seeds):
        subprocess.run([a.make_seeds, CORPUS], check=True)
    else:
        print("make_corpus: %s not built; packed-file and raw-safetensors seeds skipped" % a.make_seeds,
              file=sys.stderr)


if __name__ == "__main__":
    main()
