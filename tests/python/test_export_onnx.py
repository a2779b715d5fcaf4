"""Hugging Face checkpoint -> `qmoe quantize` -> `qmoe export-onnx` -> ONNX Runtime's CPU kernel.

Small synthetic checkpoints with the real tensor names and layouts of each family are written here in
plain Python (an independent safetensors writer), so the test checks qmoe's import against the
families' definitions, not against itself. Two comparisons per case:

1. ORT on the exported model vs a float64 NumPy forward over the dequantized raw tensors of the
   intermediate file: only fp32 rounding separates them (tolerance 1e-4 of max |y|; H, I <= 64 terms
   per dot product, each with |a*b| <= ~1, so fp32 accumulation error is ~1e-6).
2. The same forward vs the family's own float forward on the source weights (transformers' math, e.g.
   gpt-oss' clamped SwiGLU with alpha 1.702 and up + 1): differs only by quantization error; at 8 bits
   row-wise the relative error is bounded by ~2^-7 per weight, so 3e-2 of max |y| is ample while a
   wrong layout (swapped gate/up, transposed gpt-oss matrices, wrong interleave) gives O(1).

The CLI subcommands are wired by the CLI engineer; until `qmoe quantize --help` works the test skips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_builders as ob  # noqa: E402

E, H, I, TOKENS = 4, 64, 32, 9


def _cli_has(sub: str) -> bool:
    try:
        r = subprocess.run([ob.QMOE_BIN, sub, "--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


pytestmark = pytest.mark.skipif(
    not (_cli_has("quantize") and _cli_has("export-onnx")),
    reason=f"{ob.QMOE_BIN} has no quantize/export-onnx subcommands yet",
)

# ---- safetensors, written and read independently of qmoe ----

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "BF16": np.uint16}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name -> (safetensors dtype, array already in storage form; BF16 as uint16 bits)."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def read_safetensors(path: Path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        a = np.frombuffer(data[base + b : base + end], _ST_DTYPES[e["dtype"]]).reshape(e["shape"])
        out[name] = ob.bf16_bits_to_f32(a) if e["dtype"] == "BF16" else a
    return out, meta


def bf16(a: np.ndarray):
    """(storage, values): bf16 bits and the float32 values they hold (what the model computes with)."""
    bits = ob.f32_to_bf16_bits(a.astype(np.float32))
    return ("BF16", bits), ob.bf16_bits_to_f32(bits).astype(np.float64)


# ---- the families' float forward (transformers' math) ----


def route(logits: np.ndarray, k: int):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, 1)
    return idx, w / w.sum(1, keepdims=True)  # every family tested here renormalises over the top-k


def silu(v):
    return v / (1 + np.exp(-v))


def forward(x, logits, k, expert_fn):
    idx, w = route(logits, k)
    y = np.zeros((x.shape[0], H))
    for t in range(x.shape[0]):
        for j in range(k):
            y[t] += w[t, j] * expert_fn(int(idx[t, j]), x[t])
    return y


# ---- dequantizing qmoe's raw file (contract §5), independently of qmoe ----


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    pack = 8 // bits
    parts = [(packed >> (j * bits)) & ((1 << bits) - 1) for j in range(pack)]
    return np.stack(parts, -1).reshape(*packed.shape[:-1], packed.shape[-1] * pack).astype(np.float64)


def dequant(t: dict, fc: str, meta: dict, K: int) -> np.ndarray:
    bits, block = int(meta["expert_weight_bits"]), int(meta["block_size"])
    q = unpack(t[f"{fc}_experts_weights"], bits)
    s = t[f"{fc}_scales"].astype(np.float64)
    Ex, N = q.shape[:2]
    nb = -(-K // block) if block else 1
    s = s.reshape(Ex, N, nb)
    zp = t.get(f"{fc}_zero_points")
    if zp is None:
        z = np.full((Ex, N, nb), float(1 << (bits - 1)))
    elif block:
        z = unpack(zp, bits)[:, :, :nb]
    else:
        z = unpack(zp, bits)[:, :N].reshape(Ex, N, 1)
    bs = block if block else K
    return (np.repeat(s, bs, 2)[:, :, :K]) * (q - np.repeat(z, bs, 2)[:, :, :K])


def raw_forward(raw_path: Path, x, logits):
    t, meta = read_safetensors(raw_path)
    assert meta["format"] == "qmoe.raw"
    assert meta["swiglu_fusion"] == "1", "SwiGLU families are exported interleaved for ORT's CPU kernel"
    k = int(meta["k"])
    W1 = dequant(t, "fc1", meta, H)  # [E, 2I, H], gate at even rows
    W2 = dequant(t, "fc2", meta, I)  # [E, H, I]
    b1 = t.get("fc1_experts_bias")
    b2 = t.get("fc2_experts_bias")
    limit = float(meta["swiglu_limit"])
    alpha, beta = float(meta["activation_alpha"]), float(meta["activation_beta"])

    def expert(e, xt):
        h = W1[e] @ xt + (b1[e] if b1 is not None else 0)
        g, u = np.minimum(h[0::2], limit), np.clip(h[1::2], -limit, limit)
        a = g / (1 + np.exp(-alpha * g)) * (u + beta)
        return W2[e] @ a + (b2[e] if b2 is not None else 0)

    return forward(x, logits, k, expert), meta


# ---- checkpoints ----


def mixtral_checkpoint(d: Path, rng) -> tuple[int, callable]:
    """Mixtral naming: w1 = gate, w3 = up, w2 = down, bf16. Returns (k, source expert forward)."""
    t, w = {}, {}
    for e in range(E):
        for name, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            st, v = bf16(rng.uniform(-1, 1, shape) / np.sqrt(shape[1]))
            t[f"model.layers.1.block_sparse_moe.experts.{e}.{name}.weight"] = st
            w[e, name] = v
    t["model.layers.1.block_sparse_moe.gate.weight"] = bf16(rng.uniform(-1, 1, (E, H)))[0]
    t["model.layers.1.input_layernorm.weight"] = bf16(np.ones(H))[0]
    write_safetensors(d / "model.safetensors", t)

    def expert(e, xt):
        return w[e, "w2"] @ (silu(w[e, "w1"] @ xt) * (w[e, "w3"] @ xt))

    return 2, expert


def qwen3_sharded_checkpoint(d: Path, rng):
    """Qwen3-MoE naming in fp16 over two shards with an index, config.json giving k and normalisation."""
    shards, w = [{}, {}], {}
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            v = (rng.uniform(-1, 1, shape) / np.sqrt(shape[1])).astype(np.float16)
            shards[e % 2][f"model.layers.1.mlp.experts.{e}.{name}.weight"] = ("F16", v)
            w[e, name] = v.astype(np.float64)
    shards[0]["model.layers.1.mlp.gate.weight"] = ("F16", rng.uniform(-1, 1, (E, H)).astype(np.float16))
    wm = {}
    for i, s in enumerate(shards):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(d / fn, s)
        wm.update({n: fn for n in s})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts_per_tok": 3, "norm_topk_prob": True}))

    def expert(e, xt):
        return w[e, "down_proj"] @ (silu(w[e, "gate_proj"] @ xt) * (w[e, "up_proj"] @ xt))

    return 3, expert


def gpt_oss_checkpoint(d: Path, rng):
    """gpt-oss: gate_up_proj [E, H, 2I] (x @ W layout, gate/up interleaved in columns) + biases."""
    st_gu, gu = bf16(rng.uniform(-1, 1, (E, H, 2 * I)) * 2 / np.sqrt(H))
    st_gub, gub = bf16(rng.uniform(-1, 1, (E, 2 * I)))
    st_dn, dn = bf16(rng.uniform(-1, 1, (E, I, H)) / np.sqrt(I))
    st_dnb, dnb = bf16(rng.uniform(-1, 1, (E, H)) * 0.1)
    p = "model.layers.1.mlp."
    write_safetensors(d / "model.safetensors", {
        p + "router.weight": bf16(rng.uniform(-1, 1, (E, H)))[0],
        p + "router.bias": bf16(rng.uniform(-1, 1, E))[0],
        p + "experts.gate_up_proj": st_gu,
        p + "experts.gate_up_proj_bias": st_gub,
        p + "experts.down_proj": st_dn,
        p + "experts.down_proj_bias": st_dnb,
    })
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "num_experts_per_tok": 2, "swiglu_limit": 7.0}))

    def expert(e, xt):  # transformers' GptOssExperts
        h = xt @ gu[e] + gub[e]
        gate, up = np.minimum(h[0::2], 7.0), np.clip(h[1::2], -7.0, 7.0)
        glu = gate / (1 + np.exp(-1.702 * gate))
        return ((up + 1) * glu) @ dn[e] + dnb[e]

    return 2, expert


FAMILIES = {"mixtral": mixtral_checkpoint, "qwen3_sharded": qwen3_sharded_checkpoint, "gpt_oss": gpt_oss_checkpoint}


@pytest.mark.parametrize("quant", [("8", "0"), ("4", "16")], ids=["int8-rowwise", "int4-block16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_to_ort(family: str, quant, tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(sorted(FAMILIES).index(family) * 10 + len(quant[1]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    k, source_expert = FAMILIES[family](ckpt, rng)
    bits, block = quant
    raw, model = tmp_path / "raw.safetensors", tmp_path / "layer.onnx"
    args = ["quantize", ckpt, "--layer", "1", "--bits", bits, "-o", raw]
    if block != "0":
        args += ["--block-size", block]
    r = ob.run_qmoe_cli(args)
    assert r.returncode == 0, r.stderr
    r = ob.run_qmoe_cli(["export-onnx", raw, "-o", model])
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"

    x = rng.uniform(-1, 1, (TOKENS, H))
    logits = ob.distinct_logits(rng, TOKENS, E)
    y_raw, meta = raw_forward(raw, x, logits)
    assert int(meta["k"]) == k
    assert meta["source_family"] == ("qwen3_moe" if family == "qwen3_sharded" else family)

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (y_ort,) = sess.run(None, {"input": x.astype(np.float32), "router_probs": logits.astype(np.float32)})
    scale = np.abs(y_raw).max()
    err = np.abs(y_ort - y_raw).max() / scale
    assert err < 1e-4, f"{family} {quant}: ORT vs dequantized raw file: max rel error {err:.3g}"

    if bits == "8":
        y_src = forward(x, logits, k, source_expert)
        err = np.abs(y_raw - y_src).max() / np.abs(y_src).max()
        assert err < 3e-2, f"{family}: quantized layer vs source checkpoint: max rel error {err:.3g}"
