"""Shared helpers for the Python tests: a NumPy quantizer and float64 model of the QMoE contract,
one-node ONNX model builders, runners for ONNX Runtime and the `qmoe` CLI, and this CPU's flags.

This file is the tests' single, independent statement of the contract
(/work/shared/docs/qmoe-contract.md): it never imports qmoe, so a bug in qmoe cannot hide by being
shared with the oracle. Section numbers below refer to that contract.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
QMOE_BIN = os.environ.get("QMOE_BIN", str(REPO / "build" / "tools" / "qmoe" / "qmoe"))

# ---------------------------------------------------------------------------------------------
# dtypes. NumPy has no bfloat16: bf16 arrays are uint16 bit patterns throughout these tests.


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Rounds fp32 to bf16 (nearest even; NaN stays NaN) and returns the uint16 bit patterns."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """fp32/fp64 values -> the array stored for dtype T ('float32', 'float16', 'bfloat16')."""
    if dtype == "float32":
        return np.asarray(a, dtype=np.float32)
    if dtype == "float16":
        return np.asarray(a, dtype=np.float16)
    if dtype == "bfloat16":
        return f32_to_bf16_bits(np.asarray(a, dtype=np.float32))
    raise ValueError(dtype)


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float64 values."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(a).astype(np.float64)
    return np.asarray(a).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The quantizer of contract §6 (ORT's quantize_matmul_{2,4,8}bits rules), in fp32 like ORT.


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero. The +0.5 is done in float64, where it is exact for any fp32."""
    x = x.astype(np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_matrix(w: np.ndarray, bits: int, block: int, symmetric: bool, scale_dtype: str):
    """Quantizes one float matrix [N, K] (PyTorch Linear layout).

    Returns (codes uint8 [N, K], stored scales [N, nb] in scale_dtype's storage, zero points
    uint8 [N, nb] or None). Row-wise quantization is one block of width K.
    """
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    bs = block if block > 0 else K
    nb = -(-K // bs)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    codes = np.zeros((N, K), dtype=np.uint8)
    scales = np.zeros((N, nb), dtype=np.float32)
    zps = None if symmetric else np.zeros((N, nb), dtype=np.uint8)
    for b in range(nb):
        blk = w[:, b * bs:min((b + 1) * bs, K)]
        if symmetric:
            mx, mn = blk.max(axis=1), blk.min(axis=1)
            # the signed extreme; on |max| == |min| the negative one wins
            vstar = np.where(np.abs(mx) > np.abs(mn), mx, mn).astype(np.float32)
            scale = (-vstar / np.float32(mid)).astype(np.float32)
            stored = from_storage(to_storage(scale, scale_dtype), scale_dtype).astype(np.float32)
            with np.errstate(divide="ignore"):
                recip = np.where(stored != 0, np.float32(1) / np.where(stored != 0, stored, 1), 0).astype(np.float32)
            v = (blk * recip[:, None]).astype(np.float32) + np.float32(mid)
            q = np.clip(_roundf(v), 0, qmax)
        else:
            mn = np.minimum(blk.min(axis=1), 0).astype(np.float32)
            mx = np.maximum(blk.max(axis=1), 0).astype(np.float32)
            scale = ((mx - mn) / np.float32(qmax)).astype(np.float32)
            safe = np.where(scale != 0, scale, 1).astype(np.float32)
            zp = np.where(scale != 0, np.clip(_roundf((-mn / safe).astype(np.float32)), 0, qmax), 0)
            v = (blk / safe[:, None]).astype(np.float32) + zp[:, None].astype(np.float32)
            q = np.where(scale[:, None] != 0, np.clip(_roundf(v), 0, qmax), zp[:, None])
            stored = scale
            zps[:, b] = zp
        codes[:, b * bs:min((b + 1) * bs, K)] = q.astype(np.uint8)
        scales[:, b] = stored
    return codes, to_storage(scales, scale_dtype), zps


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., K] codes -> [..., K/pack] bytes; the lowest K index in the lowest bits (§5.1)."""
    pack = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // pack, pack)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(pack):
        out |= (c[..., i] << (i * bits)).astype(np.uint8)
    return out


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    pack = 8 // bits
    parts = [(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(pack)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * pack)


def pack_zero_points(zp: np.ndarray, bits: int, block_wise: bool) -> np.ndarray:
    """Zero points [E, N, nb] -> the packed uint8 layout of §5.3.

    Block-wise: [E, N, ceil(nb/zpack)], packed along the blocks. Row-wise (nb = 1): [E, ceil(N/zpack)],
    packed along the rows. Padding nibbles are zero.
    """
    zpack = 8 // bits
    if block_wise:
        E, N, nb = zp.shape
        padded = np.zeros((E, N, -(-nb // zpack) * zpack), dtype=np.uint8)
        padded[..., :nb] = zp
        return pack_codes(padded, bits)
    E, N, _ = zp.shape
    padded = np.zeros((E, -(-N // zpack) * zpack), dtype=np.uint8)
    padded[:, :N] = zp[:, :, 0]
    return pack_codes(padded, bits)


# ---------------------------------------------------------------------------------------------
# Configurations and the layers built from them.

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu", "identity")


@dataclass
class Cfg:
    """One QMoE problem. `name` is what tables and failures print."""

    name: str
    E: int = 4
    k: int = 2
    H: int = 32
    I: int = 48
    bits: int = 4
    block: int = 0  # 0 = row-wise
    act: str = "silu"
    fusion: int = 1  # swiglu only
    limit: Optional[float] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    zero_points: bool = False  # asymmetric quantization with explicit zero points
    bias: bool = False
    dtype: str = "float32"  # T
    scale_dtype: Optional[str] = None  # T2; defaults to T
    tokens: int = 8
    batch: int = 0  # > 0: input is [batch, tokens / batch, H]
    router_weights: bool = False
    normalize: int = 1
    sparse_mixer: int = 0
    prepacked_attr: Optional[int] = 0  # weights_prepacked; None = attribute absent
    raw_data: bool = True  # initializers in raw_data (False: typed repeated fields)
    cuda_layout: bool = False  # fc1/fc2 stored in ORT's CUDA prepacked layout (§7)
    layout_arg: Optional[str] = None  # qmoe run --weights-layout
    external_data: bool = False  # initializers in an ONNX external-data file
    seed: int = 0

    @property
    def T2(self) -> str:
        return self.scale_dtype or self.dtype

    @property
    def swiglu(self) -> bool:
        return self.act == "swiglu"

    @property
    def has_fc3(self) -> bool:
        return self.swiglu and self.fusion == 0

    @property
    def N1(self) -> int:
        return 2 * self.I if self.swiglu and self.fusion != 0 else self.I

    def replace(self, **kw) -> "Cfg":
        return dataclasses.replace(self, **kw)


@dataclass
class Layer:
    cfg: Cfg
    # float weights as quantized and dequantized (float64), for the model
    tensors: dict = field(default_factory=dict)  # ONNX initializer name -> stored numpy array
    x: np.ndarray = None
    logits: np.ndarray = None
    rw: Optional[np.ndarray] = None


def _quantize_experts(w: np.ndarray, cfg: Cfg):
    """Float [E, N, K] -> (packed weights, scales, packed zero points or None) per §5."""
    E = w.shape[0]
    qs, ss, zs = [], [], []
    for e in range(E):
        c, s, z = quantize_matrix(w[e], cfg.bits, cfg.block, not cfg.zero_points, cfg.T2)
        qs.append(c), ss.append(s), zs.append(z)
    codes = np.stack(qs)
    scales = np.stack(ss)
    if cfg.block == 0:
        scales = scales[:, :, 0]
    zp = None
    if cfg.zero_points:
        zp = pack_zero_points(np.stack(zs), cfg.bits, cfg.block > 0)
    return pack_codes(codes, cfg.bits), scales, zp


def distinct_logits(rng, rows: int, E: int) -> np.ndarray:
    """Router logits in about [-2, 2] whose values within a row differ by at least 3/E, so they stay
    distinct after rounding to fp16 or bf16 (ulp <= 1/64 there, for E <= 64). Ties would make
    qmoe (lower index first) and ORT's CPU (higher index first) pick different experts (§4.1)."""
    step = 4.0 / max(E, 1)
    base = np.stack([rng.permutation(E) for _ in range(rows)]).astype(np.float64) if rows else np.zeros((0, E))
    return (base - (E - 1) / 2) * step + rng.uniform(0, 0.25 * step, (rows, E))


def make_layer(cfg: Cfg) -> Layer:
    """Seeded random weights (N(0, 1/K)), quantized per the config, and random inputs in T."""
    rng = np.random.default_rng(cfg.seed)
    L = Layer(cfg)
    mats = [("fc1", cfg.N1, cfg.H), ("fc2", cfg.H, cfg.I)]
    if cfg.has_fc3:
        mats.append(("fc3", cfg.I, cfg.H))
    for name, N, K in mats:
        w = rng.standard_normal((cfg.E, N, K)).astype(np.float32) / np.sqrt(K)
        q, s, z = _quantize_experts(w, cfg)
        L.tensors[f"{name}_experts_weights"] = q
        L.tensors[f"{name}_scales"] = s
        if z is not None:
            L.tensors[f"{name}_zero_points"] = z
        if cfg.bias:
            L.tensors[f"{name}_experts_bias"] = to_storage(0.1 * rng.standard_normal((cfg.E, N)), cfg.dtype)
    shape = (cfg.batch, cfg.tokens // cfg.batch, cfg.H) if cfg.batch else (cfg.tokens, cfg.H)
    L.x = to_storage(rng.standard_normal(shape), cfg.dtype)
    L.logits = to_storage(distinct_logits(rng, cfg.tokens, cfg.E), cfg.dtype)
    if cfg.router_weights:
        L.rw = to_storage(rng.uniform(0.05, 1.0, (cfg.tokens, cfg.E)), cfg.dtype)
    return L


# ---------------------------------------------------------------------------------------------
# The float64 model of the contract (§4), written from the contract text only.


def dequantize(L: Layer, name: str, N: int, K: int) -> np.ndarray:
    """W[e, n, c] = s(n, c) * (q[n][c] - z(n, c)) in float64 (§4.2)."""
    cfg = L.cfg
    q = unpack_codes(L.tensors[f"{name}_experts_weights"], cfg.bits).astype(np.float64)
    s = from_storage(L.tensors[f"{name}_scales"], cfg.T2)
    E = cfg.E
    bs = cfg.block if cfg.block > 0 else K
    col_block = np.arange(K) // bs
    s = s.reshape(E, N, -1)[:, :, col_block]
    zname = f"{name}_zero_points"
    if zname in L.tensors:
        zpack = 8 // cfg.bits
        zbytes = L.tensors[zname]
        if cfg.block > 0:
            nb = -(-K // cfg.block)
            z = unpack_codes(zbytes, cfg.bits)[:, :, :nb].astype(np.float64)[:, :, col_block]
        else:
            z = unpack_codes(zbytes, cfg.bits)[:, :N].astype(np.float64)[:, :, None]
        del zpack
    else:
        z = float(1 << (cfg.bits - 1))
    return s * (q - z)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _activate(cfg: Cfg, h: np.ndarray, h3: Optional[np.ndarray]) -> np.ndarray:
    if cfg.act == "relu":
        return np.maximum(h, 0)
    if cfg.act == "silu":
        return h * _sigmoid(h)
    if cfg.act == "gelu":
        return 0.5 * h * (1 + np.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))
    if cfg.act == "identity":
        return h
    if cfg.fusion == 0:
        g, u = h, h3
    elif cfg.fusion == 1:
        g, u = h[..., 0::2], h[..., 1::2]
    else:
        g, u = h[..., :cfg.I], h[..., cfg.I:]
    limit = np.inf if cfg.limit is None else cfg.limit
    alpha = 1.0 if cfg.alpha is None else cfg.alpha
    beta = 0.0 if cfg.beta is None else cfg.beta
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g * _sigmoid(alpha * g) * (u + beta)


def _sparse_mixer_route(l: np.ndarray, eps: float = 0.01):
    """Phi-3.5-MoE's inference-time sparsemixer for one token (k = 2), as stated in docs/DESIGN.md."""
    E = len(l)

    def choice(scores):
        m = int(np.argmax(scores))  # argmax takes the first (lowest index) maximum
        mx = scores[m]
        keep = np.array([np.isfinite(scores[e]) and (mx - l[e]) / max(abs(l[e]), mx) <= 2 * eps for e in range(E)])
        z = np.where(keep, np.exp(np.where(keep, scores - mx, 0)), 0)
        return m, z[m] / z.sum()

    e1, w1 = choice(l.copy())
    masked = l.copy()
    masked[e1] = -np.inf
    e2, w2 = choice(masked)
    return [e1, e2], [w1, w2]


def route(cfg: Cfg, logits: np.ndarray, rw: Optional[np.ndarray]):
    """(experts [rows, k], weights [rows, k]) per §4.1, in float64."""
    rows = logits.shape[0]
    experts = np.zeros((rows, cfg.k), dtype=np.int64)
    weights = np.zeros((rows, cfg.k))
    for t in range(rows):
        l = logits[t]
        if cfg.sparse_mixer:
            ex, w = _sparse_mixer_route(l)
            experts[t], weights[t] = ex, w
            continue
        order = np.argsort(-l, kind="stable")[:cfg.k]  # stable: ties go to the lower index
        experts[t] = order
        if rw is not None:
            w = rw[t, order]
        else:
            p = np.exp(l - l.max())
            p /= p.sum()
            w = p[order]
        if cfg.normalize:
            w = w / w.sum()
        weights[t] = w
    return experts, weights


def model_forward(L: Layer) -> np.ndarray:
    """The whole layer in float64; returns float64 with the input's shape (not rounded to T)."""
    cfg = L.cfg
    x = from_storage(L.x, cfg.dtype).reshape(-1, cfg.H)
    logits = from_storage(L.logits, cfg.dtype)
    rw = from_storage(L.rw, cfg.dtype) if L.rw is not None else None
    W1 = dequantize(L, "fc1", cfg.N1, cfg.H)
    W2 = dequantize(L, "fc2", cfg.H, cfg.I)
    W3 = dequantize(L, "fc3", cfg.I, cfg.H) if cfg.has_fc3 else None
    bias = {n: from_storage(L.tensors[f"{n}_experts_bias"], cfg.dtype) for n in ("fc1", "fc2", "fc3")
            if f"{n}_experts_bias" in L.tensors}
    experts, weights = route(cfg, logits, rw)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(cfg.k):
            e = experts[t, j]
            h = W1[e] @ x[t] + (bias["fc1"][e] if "fc1" in bias else 0)
            h3 = None
            if W3 is not None:
                h3 = W3[e] @ x[t] + (bias["fc3"][e] if "fc3" in bias else 0)
            a = _activate(cfg, h, h3)
            y = W2[e] @ a + (bias["fc2"][e] if "fc2" in bias else 0)
            out[t] += weights[t, j] * y
    return out.reshape(L.x.shape)


# ---------------------------------------------------------------------------------------------
# ONNX models.

INPUT_ORDER = [
    "input", "router_probs",
    "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
    "fc1_zero_points", "fc2_zero_points", "fc3_zero_points",
    "router_weights",
]


def onnx_elem_type(dtype: str):
    from onnx import TensorProto
    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
            "uint8": TensorProto.UINT8}[dtype]


def make_initializer(name: str, arr: np.ndarray, dtype: str, raw: bool = True):
    """A TensorProto of ONNX type `dtype` from its stored numpy array (bf16 as uint16 bits)."""
    from onnx import helper
    arr = np.ascontiguousarray(arr)
    if raw:
        return helper.make_tensor(name, onnx_elem_type(dtype), arr.shape, arr.tobytes(), raw=True)
    from onnx import TensorProto
    t = TensorProto()
    t.name = name
    t.data_type = onnx_elem_type(dtype)
    t.dims.extend(arr.shape)
    if dtype in ("float16", "bfloat16"):
        t.int32_data.extend(arr.view(np.uint16).flatten().astype(np.int32).tolist())  # bit patterns
    elif dtype == "uint8":
        t.int32_data.extend(arr.flatten().astype(np.int32).tolist())
    else:
        t.float_data.extend(arr.flatten().tolist())
    return t


def node_attributes(cfg: Cfg) -> dict:
    attrs = dict(k=cfg.k, activation_type=cfg.act, normalize_routing_weights=cfg.normalize,
                 expert_weight_bits=cfg.bits, use_sparse_mixer=cfg.sparse_mixer)
    if cfg.block > 0:
        attrs["block_size"] = cfg.block
    if cfg.swiglu:
        attrs["swiglu_fusion"] = cfg.fusion
    if cfg.limit is not None:
        attrs["swiglu_limit"] = float(cfg.limit)
    if cfg.alpha is not None:
        attrs["activation_alpha"] = float(cfg.alpha)
    if cfg.beta is not None:
        attrs["activation_beta"] = float(cfg.beta)
    if cfg.prepacked_attr is not None:
        attrs["weights_prepacked"] = cfg.prepacked_attr
    return attrs


def build_model(L: Layer, attrs: Optional[dict] = None, tensors: Optional[dict] = None,
                tensor_types: Optional[dict] = None, extra_nodes=(), cuda_layout: Optional[bool] = None):
    """One-node com.microsoft::QMoE model. `attrs`/`tensors` override the layer's (a value of None
    in `tensors` drops that initializer but keeps the input slot named, so the node points at a
    missing tensor); `tensor_types` overrides the ONNX dtype of an initializer. fc1/fc2 are written
    in ORT's CUDA layout when `cuda_layout` (default: the config's) is set."""
    from onnx import helper
    cfg = L.cfg
    base = dict(L.tensors)
    if cfg.cuda_layout if cuda_layout is None else cuda_layout:
        for name in ("fc1_experts_weights", "fc2_experts_weights"):
            base[name] = to_ort_cuda_layout(base[name], cfg.bits)
    tensors = {**base, **(tensors or {})}
    tensor_types = tensor_types or {}
    attrs = node_attributes(cfg) if attrs is None else attrs
    graph_inputs = [helper.make_tensor_value_info("input", onnx_elem_type(cfg.dtype), list(L.x.shape)),
                    helper.make_tensor_value_info("router_probs", onnx_elem_type(cfg.dtype), list(L.logits.shape))]
    if L.rw is not None:
        graph_inputs.append(helper.make_tensor_value_info("router_weights", onnx_elem_type(cfg.dtype), list(L.rw.shape)))
    names = []
    inits = []
    for name in INPUT_ORDER:
        if name in ("input", "router_probs"):
            names.append(name)
        elif name == "router_weights":
            names.append(name if L.rw is not None else "")
        elif name in tensors:
            names.append(name)
            if tensors[name] is not None:
                if name in tensor_types:
                    dt = tensor_types[name]
                elif "weights" in name or "zero_points" in name:
                    dt = "uint8"
                elif "scales" in name:
                    dt = cfg.T2
                else:
                    dt = cfg.dtype
                inits.append(make_initializer(name, tensors[name], dt, cfg.raw_data))
        else:
            names.append("")
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("QMoE", names, ["output"], name="moe", domain="com.microsoft", **attrs)
    out = helper.make_tensor_value_info("output", onnx_elem_type(cfg.dtype), list(L.x.shape))
    graph = helper.make_graph([node, *extra_nodes], "qmoe_test", graph_inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def save_model(model, path: Path, external: bool = False) -> Path:
    """Writes the model; `external` puts every initializer in one ONNX external-data file next to it
    (how layers over protobuf's 2 GB limit are stored)."""
    if external:
        import onnx
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------------------------
# Runners.


def run_ort(model_path: Path, L: Layer) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    feeds = {"input": L.x, "router_probs": L.logits}
    if L.rw is not None:
        feeds["router_weights"] = L.rw
    return sess.run(None, feeds)[0]


def run_qmoe_cli(args, timeout=120) -> subprocess.CompletedProcess:
    # errors="replace": a message may quote bytes of a corrupt file that are not UTF-8
    return subprocess.run([QMOE_BIN, *map(str, args)], capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def run_qmoe(model_path: Path, L: Layer, workdir: Path, extra=()) -> np.ndarray:
    """Runs `qmoe run` on the layer's inputs; returns the output array (bf16 as uint16 bits)."""
    x = workdir / "x.npy"
    r = workdir / "r.npy"
    y = workdir / "y.npy"
    np.save(x, L.x)
    np.save(r, L.logits)
    args = ["run", model_path, "--input", x, "--router-probs", r, "--output", y, *extra]
    if L.rw is not None:
        np.save(workdir / "w.npy", L.rw)
        args += ["--router-weights", workdir / "w.npy"]
    if L.cfg.dtype == "bfloat16":
        args.append("--bf16")
    if L.cfg.layout_arg:
        args += ["--weights-layout", L.cfg.layout_arg]
    p = run_qmoe_cli(args)
    if p.returncode != 0:
        raise AssertionError(f"qmoe run failed ({p.returncode}) for {L.cfg.name}: {p.stderr.strip()}")
    return np.load(y)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


def first_bad(a: np.ndarray, b: np.ndarray) -> str:
    """Where two arrays differ most, for failure messages."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    i = np.unravel_index(np.argmax(np.abs(a - b)), a.shape)
    return f"largest difference at {tuple(int(v) for v in i)}: qmoe {a[i]!r} vs expected {b[i]!r}"


def write_table(path: Path, header: str, columns, rows) -> None:
    """Writes a Markdown table (docs/AGREEMENT.md, docs/ERRORS.md)."""
    lines = [header.rstrip(), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    path.write_text("\n".join(lines) + "\n")


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qmoe_test_"))


# ---------------------------------------------------------------------------------------------
# ORT's CUDA prepacked layout (contract §7), forward direction only: raw codes -> the bytes a file
# made for ORT's CUDA EP holds. Written from the contract's five steps, independently of qmoe's
# importer, so a CLI run on such a file checks that importer end to end.

_P8 = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
_P4 = [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27, 4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23,
       30, 31]


def ort_cuda_pack_expert(codes: np.ndarray, bits: int) -> np.ndarray:
    """One expert's unsigned codes [N, K] -> ORT CUDA layout bytes [K, N/pack] (4- or 8-bit)."""
    N, K = codes.shape
    R, CI, perm, ew = (32, 4, _P4, 8) if bits == 4 else (16, 2, _P8, 4)
    VT = 64 // ew
    assert K % R == 0 and K % (ew * VT) == 0 and N % CI == 0, f"shape [{N}, {K}] not in whole tiles"
    # 1. transpose to [K][N]. Codes stay unsigned here: subtracting 2^(b-1) in step 1 and adding it
    #    back in step 5 cancel, and steps 2-4 only move elements.
    t = codes.T.copy()
    # 2. row permutation inside each group of R k-rows
    t = t.reshape(K // R, R, N)[:, perm, :].reshape(K, N)
    # 3. column-major: element (k, n) at linear position n*K + k
    lin = t.T.reshape(-1)
    # 4. column interleave on 32-bit words (ew elements each): word (n, v) -> new index
    words = lin.reshape(N, K // ew, ew)
    out = np.zeros((N * K // ew, ew), dtype=np.uint8)
    n = np.arange(N)[:, None]
    v = np.arange(K // ew)[None, :]
    dst = (n // CI) * (CI * K // ew) + CI * (v - v % VT) + VT * (n % CI) + (v % VT)
    out[dst.reshape(-1)] = words.reshape(-1, ew)
    # 5. reorder inside each word, then pack slots low bits first
    slot_src = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    out = out[:, slot_src]
    return pack_codes(out.reshape(-1), bits).reshape(K, N * bits // 8)


def to_ort_cuda_layout(packed_raw: np.ndarray, bits: int) -> np.ndarray:
    """Raw weights [E, N, K/pack] -> ORT CUDA layout [E, K, N/pack]."""
    codes = unpack_codes(packed_raw, bits)
    return np.stack([ort_cuda_pack_expert(codes[e], bits) for e in range(codes.shape[0])])


def cpu_flags() -> set:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read): which of the
    CPU backend's instruction-set paths and compute options the tests can run here."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()
