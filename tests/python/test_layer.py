"""qmoe.Layer built from quantized arrays against a float64 NumPy model of the contract (§4).

The model below is written from the contract alone: it unpacks codes and zero points itself
(§5.1, §5.3), dequantizes in float64, routes (softmax over all E, top-k with ties to the lower index,
optional normalization, optional router_weights) and runs each expert's FFN with every activation
and SwiGLU fusion 0/1/2. It never calls qmoe.dequantize, so a shared bug cannot cancel out.

Tolerance (relative max error, max|qmoe - model| / max|model|):
- fp32: 1e-5. qmoe accumulates at most H or I <= 256 products in fp32; the rounding error is
  ~K * 2^-24 * max|a*b| / max|out| ~ 1e-6 even with cancellation, while one wrong code, scale, zero
  point or route moves the output by >= 1e-3.
- fp16: 2e-3. The output is rounded once to fp16 (2^-11 relative), inputs are fp16 on both sides.
- bf16: 4e-3. The output is rounded once to bf16: at most 2^-8 = 3.9e-3 of the element, hence of
  max|model|; inputs, biases and scales are the same bf16 values on both sides.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

# The module is built by `pip install .` or by CMake with -DQMOE_PYTHON=ON (then PYTHONPATH=<build>/python).
# Where it is absent these tests skip instead of stopping the collection of the CLI tests beside them;
# a module that is present but broken still fails loudly at the import below.
if importlib.util.find_spec("qmoe") is None:
    pytest.skip("the qmoe Python module is not built (pip install . or -DQMOE_PYTHON=ON)", allow_module_level=True)
import qmoe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_builders as ob  # noqa: E402

BACKENDS = [b for b in qmoe.available_backends() if b != "cuda"]


# ---------------------------------------------------------------- the float64 model of the contract
def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1).astype(np.int64)


def model_dequantize(q, s, z, bits, block, K) -> np.ndarray:
    """[E, N, K] float64 from raw arrays: W = s * (code - zero point)."""
    codes = unpack_codes(q, bits)[..., :K]
    E, N = codes.shape[:2]
    s = np.asarray(s, np.float64).reshape(E, N, -1)
    nb = s.shape[2]
    bs = block if block > 0 else K
    col_block = np.arange(K) // bs
    scale = s[:, :, col_block]
    if z is None:
        zero = np.full((E, N, K), 1 << (bits - 1))
    elif block > 0:
        zero = unpack_codes(z, bits)[:, :, :nb][:, :, col_block]
    else:
        zero = np.broadcast_to(unpack_codes(z, bits)[:, :N, None], (E, N, K))
    return scale * (codes - zero)


def activate(name, h, alpha=1.0, beta=0.0, limit=math.inf, fusion=0, h3=None):
    if name == "relu":
        return np.maximum(h, 0)
    if name == "gelu":
        return 0.5 * h * (1 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))
    if name == "silu":
        return h / (1 + np.exp(-h))
    if name == "identity":
        return h
    assert name == "swiglu"
    if fusion == 0:
        g, u = h, h3
    elif fusion == 1:
        g, u = h[..., 0::2], h[..., 1::2]
    else:
        I = h.shape[-1] // 2
        g, u = h[..., :I], h[..., I:]
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g / (1 + np.exp(-alpha * g)) * (u + beta)


def model_forward(cfg, W, B, x, logits, router_weights=None):
    """W/B: dicts fc1/fc2/fc3 -> float64 [E, N, K] / [E, N] or None; x [rows, H]."""
    x = np.asarray(x, np.float64)
    logits = np.asarray(logits, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        order = np.argsort(-logits[t], kind="stable")[: cfg.k]  # ties: lower index first
        if router_weights is None:
            p = np.exp(logits[t] - logits[t].max())
            w = (p / p.sum())[order]
        else:
            w = np.asarray(router_weights, np.float64)[t, order]
        if cfg.normalize:
            w = w / w.sum()
        for e, we in zip(order, w):
            h = W["fc1"][e] @ x[t] + (B["fc1"][e] if B["fc1"] is not None else 0)
            h3 = None
            if W.get("fc3") is not None:
                h3 = W["fc3"][e] @ x[t] + (B["fc3"][e] if B["fc3"] is not None else 0)
            a = activate(cfg.act, h, cfg.alpha, cfg.beta, cfg.limit, cfg.fusion, h3)
            y = W["fc2"][e] @ a + (B["fc2"][e] if B["fc2"] is not None else 0)
            out[t] += we * y
    return out


# ---------------------------------------------------------------- configurations
@dataclasses.dataclass
class Cfg:
    name: str
    E: int = 4
    k: int = 2
    H: int = 32
    I: int = 24
    bits: int = 4
    block: int = 0
    symmetric: bool = True
    act: str = "silu"
    fusion: int = 0
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf
    normalize: bool = True
    bias: bool = False
    router_weights: bool = False
    dtype: str = "float32"
    scale_dtype: str = "float32"
    rows: int = 7
    seed: int = 0

    @property
    def N1(self) -> int:
        return 2 * self.I if self.act == "swiglu" and self.fusion != 0 else self.I


CONFIGS = [
    Cfg("relu b4 row-wise", act="relu", seed=1),
    Cfg("gelu b8 block16 asym bias", act="gelu", bits=8, block=16, symmetric=False, bias=True, seed=2),
    Cfg("silu b2 block32 H=64 no-normalize", act="silu", bits=2, block=32, H=64, normalize=False, seed=3),
    Cfg("identity b4 block16 asym k=E", act="identity", block=16, symmetric=False, E=3, k=3, seed=4),
    Cfg("swiglu fusion0 (fc3) b4 bias", act="swiglu", fusion=0, bias=True, seed=5),
    Cfg("swiglu fusion1 gpt-oss alpha/beta/limit", act="swiglu", fusion=1, alpha=1.702, beta=1.0, limit=0.9,
        block=16, seed=6),
    Cfg("swiglu fusion2 b8 asym router_weights", act="swiglu", fusion=2, bits=8, symmetric=False,
        router_weights=True, seed=7),
    Cfg("relu b4 E=8 k=1 router_weights no-normalize", act="relu", E=8, k=1, router_weights=True,
        normalize=False, H=48, I=40, block=16, seed=8),
    Cfg("silu b4 block16 K%block!=0", act="silu", H=40, I=24, block=16, symmetric=False, bias=True, seed=9),
    Cfg("gelu fp16 T2=fp16", act="gelu", dtype="float16", scale_dtype="float16", block=16, bias=True, seed=10),
    Cfg("swiglu fusion1 bf16 T2=bf16 router_weights", act="swiglu", fusion=1, dtype="bfloat16",
        scale_dtype="bfloat16", bias=True, router_weights=True, seed=11),
]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 4e-3}


def np_type(dtype: str):
    if dtype == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(dtype).type


def build(cfg: Cfg):
    """Random float weights quantized by qmoe.quantize; returns (Layer kwargs, model W, model B)."""
    rng = np.random.default_rng(cfg.seed)
    np_t = np_type(cfg.dtype)
    shapes = {"fc1": (cfg.N1, cfg.H), "fc2": (cfg.H, cfg.I)}
    if cfg.act == "swiglu" and cfg.fusion == 0:
        shapes["fc3"] = (cfg.I, cfg.H)
    arrays, W, B = {}, {"fc3": None}, {"fc1": None, "fc2": None, "fc3": None}
    for fc, (N, K) in shapes.items():
        w = (rng.standard_normal((cfg.E, N, K)) / math.sqrt(K)).astype(np.float32)
        q, s, z = qmoe.quantize(w, bits=cfg.bits, block_size=cfg.block, symmetric=cfg.symmetric,
                                scale_dtype=cfg.scale_dtype)
        arrays[f"{fc}_weights"], arrays[f"{fc}_scales"] = q, s
        if z is not None:
            arrays[f"{fc}_zero_points"] = z
        W[fc] = model_dequantize(q, s, z, cfg.bits, cfg.block, K)
        if cfg.bias:
            b = (0.1 * rng.standard_normal((cfg.E, N))).astype(np_t)
            arrays[f"{fc}_bias"] = b
            B[fc] = b.astype(np.float64)
    kwargs = dict(k=cfg.k, activation=cfg.act, bits=cfg.bits, block_size=cfg.block, swiglu_fusion=cfg.fusion,
                  swiglu_limit=cfg.limit, activation_alpha=cfg.alpha, activation_beta=cfg.beta,
                  normalize_routing_weights=cfg.normalize, dtype=cfg.dtype, **arrays)
    return kwargs, W, B


def inputs(cfg: Cfg):
    rng = np.random.default_rng(cfg.seed + 100)
    np_t = np_type(cfg.dtype)
    x = rng.standard_normal((cfg.rows, cfg.H)).astype(np_t)
    logits = rng.standard_normal((cfg.rows, cfg.E)).astype(np_t)  # continuous: no ties
    rw = rng.uniform(0.1, 1.0, (cfg.rows, cfg.E)).astype(np_t) if cfg.router_weights else None
    return x, logits, rw


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_layer_matches_float64_model(cfg, backend):
    kwargs, W, B = build(cfg)
    layer = qmoe.Layer(backend=backend, **kwargs)
    x, logits, rw = inputs(cfg)
    out = layer.run(x, logits, rw)
    assert out.dtype == x.dtype and out.shape == x.shape, f"{cfg}"
    want = model_forward(cfg, W, B, x, logits, rw)
    tol = TOL[cfg.dtype]
    err = rel_err(out, want)
    assert err <= tol, f"{cfg} backend={backend}: relative max error {err:.3g} > {tol}"


def test_three_d_input_keeps_its_shape():
    cfg = CONFIGS[0]
    kwargs, W, B = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)  # fp32 tolerance: not the cuda backend
    x, logits, _ = inputs(cfg)
    x3 = np.concatenate([x, x[:1]]).reshape(2, 4, cfg.H)
    l2 = np.concatenate([logits, logits[:1]])
    out = layer.run(x3, l2)
    assert out.shape == (2, 4, cfg.H)
    assert rel_err(out.reshape(8, -1), model_forward(cfg, W, B, x3.reshape(8, -1), l2)) <= 1e-5


def test_chunk_rows_gives_bitwise_the_same_output_and_bad_options_are_refused():
    # The CPU backend runs tokens in chunks of chunk_rows (bounding its scratch); every chunk size
    # must give exactly the unchunked output. cuda_gemm is checked whatever the backend.
    cfg = dataclasses.replace(CONFIGS[5], rows=37)
    kwargs, _, _ = build(cfg)
    x, lg, rw = inputs(cfg)
    whole = qmoe.Layer(backend="cpu", **kwargs).run(x, lg, rw)
    for rows in (1, 5, 64):
        out = qmoe.Layer(backend="cpu", chunk_rows=rows, **kwargs).run(x, lg, rw)
        assert np.array_equal(out, whole), f"chunk_rows={rows}"
    with pytest.raises(qmoe.Error, match="cuda_gemm: expected auto, sm80 or sm90, got 'sm99'"):
        qmoe.Layer(backend="cpu", cuda_gemm="sm99", **kwargs)
    with pytest.raises(qmoe.Error, match="max_chunk_rows"):
        qmoe.Layer(backend="cpu", chunk_rows=-1, **kwargs)


# The CPU accuracy options (docs/DESIGN.md, Numerics): value, the CPU flag it needs besides AVX-512
# F/BW/VL, the name the backend's error gives it, and the C++ layer test's relative L2 tolerance
# (tests/cpp/cpu_compute_layer_test.cpp says why).
CPU_COMPUTE_MODES = [("bf16", "avx512_bf16", "AVX512_BF16", 8e-3), ("int8", "avx512_vnni", "AVX512_VNNI", 4e-2),
                     ("int8x3", "amx_int8", "AMX-TILE, AMX-INT8", 4e-6)]


@pytest.mark.parametrize("mode,flag,feature,tol", CPU_COMPUTE_MODES)
def test_cpu_compute_is_close_deterministic_and_checked(mode, flag, feature, tol):
    # cpu_compute=mode: activations rounded (bf16) or quantized per row (int8; int8x3: three or four int8 digits)
    # before the FC kernels;
    # held to the C++ layer test's tolerance against the exact mode, bitwise the same for every chunk
    # size and thread count, and refused with a clear error on a CPU without the instruction.
    supported = {"avx512f", "avx512bw", "avx512vl", flag} <= ob.cpu_flags()
    for cfg in (dataclasses.replace(CONFIGS[5], rows=37), dataclasses.replace(CONFIGS[6], rows=19)):
        kwargs, _, _ = build(cfg)
        x, lg, rw = inputs(cfg)
        if not supported:
            with pytest.raises(qmoe.Error, match="lacks " + feature):
                qmoe.Layer(backend="cpu", cpu_compute=mode, **kwargs)
            continue
        exact = qmoe.Layer(backend="cpu", **kwargs).run(x, lg, rw)
        fast = qmoe.Layer(backend="cpu", cpu_compute=mode, **kwargs).run(x, lg, rw)
        err = rel_err(fast, exact)
        assert 0 < err <= tol, f"{cfg.name}: cpu_compute {mode} vs exact relative L2 {err}"
        for rows in (1, 5, 64):
            out = qmoe.Layer(backend="cpu", cpu_compute=mode, chunk_rows=rows, threads=1 + rows % 2, **kwargs).run(
                x, lg, rw)
            assert np.array_equal(out, fast), f"{cfg.name}: cpu_compute {mode}, chunk_rows={rows}"


def test_cpu_compute_rejects_unknown_values():
    # Checked whatever the backend, like cuda_gemm.
    kwargs, _, _ = build(CONFIGS[5])
    for backend, value in (("reference", "fp8"), ("cpu", "INT8")):
        with pytest.raises(qmoe.Error, match=f"cpu_compute: expected exact, bf16, int8 or int8x3, got '{value}'"):
            qmoe.Layer(backend=backend, cpu_compute=value, **kwargs)


def test_concurrent_runs_on_one_layer_agree():
    # run() releases the GIL; calls on one layer from several threads must give the serial answers.
    import concurrent.futures

    cfg = CONFIGS[5]
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(**kwargs)
    batches = [inputs(dataclasses.replace(cfg, seed=s, rows=33)) for s in range(8)]
    serial = [layer.run(x, lg, rw) for x, lg, rw in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: layer.run(*b), batches * 4))
    for i, out in enumerate(parallel):
        assert np.array_equal(out, serial[i % 8]), f"batch {i % 8}"


def test_model_detects_a_wrong_route():
    # Guards the guard: swapping two experts' weights must break agreement by far more than the tolerance.
    cfg = CONFIGS[0]
    kwargs, W, B = build(cfg)
    x, logits, _ = inputs(cfg)
    out = qmoe.Layer(**kwargs).run(x, logits)
    W2 = dict(W, fc2=W["fc2"][[1, 0, 2, 3]])
    assert rel_err(out, model_forward(cfg, W2, B, x, logits)) > 1e-2


def test_errors_name_the_tensor():
    kwargs, _, _ = build(CONFIGS[1])
    bad = dict(kwargs, fc2_scales=kwargs["fc2_scales"][:, :, :1])
    with pytest.raises(qmoe.Error, match=r"fc2_scales: expected shape \[4, 32, 2\], got \[4, 32, 1\]"):
        qmoe.Layer(**bad)
    with pytest.raises(ValueError, match="fc1_bias: expected dtype float32"):
        qmoe.Layer(**dict(kwargs, fc1_bias=kwargs["fc1_bias"].astype(np.float64)))
    with pytest.raises(qmoe.Error, match="activation_type"):
        qmoe.Layer(**dict(kwargs, activation="tanh"))
    layer = qmoe.Layer(**kwargs)
    x, logits, _ = inputs(CONFIGS[1])
    with pytest.raises(qmoe.Error, match="input"):
        layer.run(x[:, :-1], logits)
    with pytest.raises(qmoe.Error, match="router_logits: expected dtype float32"):
        layer.run(x, logits.astype(np.float16))


def test_from_onnx_matches_ort(tmp_path):
    """A one-node QMoE model written with onnx, loaded by qmoe.Layer.from_onnx, run by both qmoe and
    ORT's CPU kernel (normalize = 1, symmetric row-wise: shapes free of ORT's quirks, contract §8)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    cfg = Cfg("onnx relu", act="relu", seed=21)
    kwargs, _, _ = build(cfg)
    inits = [numpy_helper.from_array(kwargs[n], name=n)
             for n in ("fc1_weights", "fc1_scales", "fc2_weights", "fc2_scales")]
    node = helper.make_node(
        "QMoE", ["input", "router_probs", "fc1_weights", "fc1_scales", "", "fc2_weights", "fc2_scales"],
        ["output"], domain="com.microsoft", k=cfg.k, activation_type=cfg.act, normalize_routing_weights=1,
        expert_weight_bits=cfg.bits, weights_prepacked=0)
    graph = helper.make_graph(
        [node], "qmoe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, cfg.H]),
                         helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, [None, cfg.E])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, cfg.H])], initializer=inits)
    # IR version 9: the newest onnx writes a version older ORT releases refuse (1.30 on the GPU machine).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    path = tmp_path / "qmoe.onnx"
    onnx.save(model, str(path))

    layer = qmoe.Layer.from_onnx(path, backend="cpu")  # 1e-5 against ORT: a CPU backend
    assert layer.spec.num_experts == cfg.E and layer.spec.hidden == cfg.H and layer.spec.inter == cfg.I
    x, logits, _ = inputs(cfg)
    got = layer.run(x, logits)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x, "router_probs": logits})[0]
    assert rel_err(got, want.astype(np.float64)) <= 1e-5


# ---------------------------------------------------------------- run(): arrays as they are, out=
def test_run_writes_every_element_of_out():
    # Canary: a NaN-poisoned out array must come back fully overwritten, and be the array returned.
    cfg = CONFIGS[4]
    kwargs, W, B = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits, _ = inputs(cfg)
    out = np.full_like(x, np.nan)
    got = layer.run(x, logits, out=out)
    assert got is out
    assert not np.isnan(out).any(), f"unwritten elements at {np.argwhere(np.isnan(out))[:5].tolist()}"
    assert np.array_equal(out, layer.run(x, logits))


def test_run_takes_arrays_as_they_are():
    # Zero-copy: a non-contiguous view is refused (naming the argument and its strides), not copied.
    cfg = CONFIGS[0]
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits, _ = inputs(cfg)
    with pytest.raises(qmoe.Error, match=r"input: expected a C-contiguous array, got shape \[7, 32\] with strides \[1, 7\]"):
        layer.run(np.asfortranarray(x), logits)
    wide = np.zeros((cfg.rows, 2 * cfg.E), np.float32)
    with pytest.raises(qmoe.Error, match="router_logits: expected a C-contiguous array"):
        layer.run(x, wide[:, ::2])
    with pytest.raises(qmoe.Error, match=r"out: expected shape \[7, 32\] \(the input's\), got \[7, 31\]"):
        layer.run(x, logits, out=np.empty((cfg.rows, cfg.H - 1), np.float32))
    with pytest.raises(qmoe.Error, match="out: expected dtype float32, got float16"):
        layer.run(x, logits, out=np.empty_like(x, np.float16))
    with pytest.raises(qmoe.Error, match="router_logits: expected dtype float32, got float64"):
        layer.run(x, logits.astype(np.float64))
    # A row slice is contiguous and runs in place of the whole.
    assert np.array_equal(layer.run(x[2:5], logits[2:5]), layer.run(x, logits)[2:5])
    # Zero rows: an empty result, no error.
    assert layer.run(x[:0], logits[:0]).shape == (0, cfg.H)


def test_available_backends():
    names = qmoe.available_backends()
    assert names[-2:] == ["cpu", "reference"], names
    assert ("cuda" in names) <= qmoe.built_with_cuda
    for b in names:
        if b != "cuda":
            assert qmoe.Layer(backend=b, **build(CONFIGS[0])[0]).backend == b
    with pytest.raises(qmoe.Error, match="backend: expected auto or one of"):
        qmoe.Layer(backend="tpu", **build(CONFIGS[0])[0])


# ---------------------------------------------------------------- from_packed
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_packed_round_trip(tmp_path, backend):
    cfg = CONFIGS[5]
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend=backend, **kwargs)
    path = tmp_path / "layer.qmoepk"
    layer.save_packed(path)
    loaded = qmoe.Layer.from_packed(path, backend=backend)
    assert loaded.layout == layer.layout and loaded.backend == backend and loaded.source == str(path)
    assert repr(loaded.spec) == repr(layer.spec)
    x, logits, rw = inputs(cfg)
    assert np.array_equal(loaded.run(x, logits, rw), layer.run(x, logits, rw))


def test_from_packed_errors(tmp_path):
    kwargs, _, _ = build(CONFIGS[0])
    path = tmp_path / "cpu.qmoepk"
    qmoe.Layer(backend="cpu", **kwargs).save_packed(path)
    # Another backend's layout is refused, naming both layouts.
    with pytest.raises(qmoe.Error, match=r"packed file holds layout cpu-.*but backend 'reference' runs layout raw"):
        qmoe.Layer.from_packed(path, backend="reference")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(4, np.float32))
    with pytest.raises(qmoe.Error, match="NumPy"):
        qmoe.Layer.from_packed(npy)
    with pytest.raises(qmoe.Error, match="missing.qmoepk"):
        qmoe.Layer.from_packed(tmp_path / "missing.qmoepk")
    bad = tmp_path / "truncated.qmoepk"
    bad.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(qmoe.Error, match="truncated"):
        qmoe.Layer.from_packed(bad, backend="cpu")


# ---------------------------------------------------------------- from_checkpoint
def write_safetensors(path, tensors: dict) -> None:
    """A safetensors file written from the format's description (8-byte header length, JSON, data)."""
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dt = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[a.dtype.name]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def mixtral_checkpoint(folder, E=4, H=64, I=32, layer=1, dtype=np.float32, seed=31, config=True):
    """Decoder layer `layer` of a tiny Mixtral: experts w1 (gate) [I, H], w3 (up) [I, H], w2 (down) [H, I]."""
    import json

    rng = np.random.default_rng(seed)
    p = f"model.layers.{layer}.block_sparse_moe."
    t, W = {}, {}
    for e in range(E):
        for name, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            W[e, name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype)
            t[f"{p}experts.{e}.{name}.weight"] = W[e, name]
    t[f"{p}gate.weight"] = rng.standard_normal((E, H)).astype(dtype)
    folder.mkdir(exist_ok=True)
    write_safetensors(folder / "model.safetensors", t)
    if config:
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "mixtral", "num_local_experts": E, "num_experts_per_tok": 2, "hidden_size": H,
             "intermediate_size": I}))
    return W


def test_from_checkpoint_matches_layer_from_quantize(tmp_path):
    """from_checkpoint == qmoe.quantize of the same weights in the exported arrangement (fc1 = gate
    and up interleaved by row, swiglu_fusion 1; fc2 = w2), bitwise on the same backend."""
    E, H, I, block = 4, 64, 32, 32
    W = mixtral_checkpoint(tmp_path / "ckpt", E, H, I)
    layer = qmoe.Layer.from_checkpoint(tmp_path / "ckpt", 1, bits=4, block_size=block, backend="cpu")
    s = layer.spec
    assert (s.num_experts, s.hidden, s.inter, s.k, s.activation, s.swiglu_fusion) == (E, H, I, 2, "swiglu", 1)
    assert s.normalize_routing_weights and s.block_size == block and s.dtype == "float32"
    assert layer.metadata.get("source_family") == "mixtral", layer.metadata
    assert layer.source == str(tmp_path / "ckpt")

    fc1 = np.empty((E, 2 * I, H), np.float32)
    fc1[:, 0::2] = np.stack([W[e, "w1"] for e in range(E)])
    fc1[:, 1::2] = np.stack([W[e, "w3"] for e in range(E)])
    fc2 = np.stack([W[e, "w2"] for e in range(E)])
    arrays = {}
    for fc, w in (("fc1", fc1), ("fc2", fc2)):
        arrays[f"{fc}_weights"], arrays[f"{fc}_scales"], _ = qmoe.quantize(w, bits=4, block_size=block)
    want = qmoe.Layer(k=2, activation="swiglu", swiglu_fusion=1, bits=4, block_size=block,
                      normalize_routing_weights=True, backend="cpu", **arrays)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, H)).astype(np.float32)
    logits = rng.standard_normal((9, E)).astype(np.float32)
    assert np.array_equal(layer.run(x, logits), want.run(x, logits))


def test_from_checkpoint_options_and_errors(tmp_path):
    mixtral_checkpoint(tmp_path / "fp16", dtype=np.float16)
    layer = qmoe.Layer.from_checkpoint(tmp_path / "fp16", 1, bits=8, block_size=0, symmetric=False,
                                       backend="reference", dtype="float16", swiglu_fusion=2)
    s = layer.spec
    assert (s.bits, s.block_size, s.swiglu_fusion, s.dtype, s.scale_dtype) == (8, 0, 2, "float16", "float16")
    assert s.fc1_zero_points and s.fc2_zero_points
    x = np.ones((3, s.hidden), np.float16)
    assert layer.run(x, np.zeros((3, s.num_experts), np.float16)).dtype == np.float16

    # Without config.json the names still say Mixtral, so k = 2 and normalization are known ...
    mixtral_checkpoint(tmp_path / "noconf", config=False)
    assert qmoe.Layer.from_checkpoint(tmp_path / "noconf", 1, k=1).spec.k == 1
    # ... but a layer without experts is an error naming the layers that have them.
    with pytest.raises(qmoe.Error, match="layer 0 has no MoE experts .*layers with experts: 1"):
        qmoe.Layer.from_checkpoint(tmp_path / "noconf", 0)
    with pytest.raises(qmoe.Error, match="block_size: expected a power of two >= 16"):
        qmoe.Layer.from_checkpoint(tmp_path / "fp16", 1, block_size=24)
    with pytest.raises(qmoe.Error, match="swiglu_fusion"):
        qmoe.Layer.from_checkpoint(tmp_path / "fp16", 1, swiglu_fusion=3)
    with pytest.raises(qmoe.Error):
        qmoe.Layer.from_checkpoint(tmp_path / "missing", 1)


def test_from_checkpoint_needs_routing_facts(tmp_path):
    # Qwen-style names without config.json: the family (and so k) is unknown; qmoe never guesses.
    rng = np.random.default_rng(3)
    t = {}
    for e in range(4):
        for name, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            t[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
    (tmp_path / "q").mkdir()
    write_safetensors(tmp_path / "q" / "model.safetensors", t)
    with pytest.raises(qmoe.Error, match=r"\bk\b|experts per token"):
        qmoe.Layer.from_checkpoint(tmp_path / "q", 0)
    layer = qmoe.Layer.from_checkpoint(tmp_path / "q", 0, k=2, normalize_routing_weights=False, backend="cpu")
    assert layer.spec.k == 2 and not layer.spec.normalize_routing_weights
