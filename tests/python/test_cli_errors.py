"""Malformed inputs to `qmoe run` and the other subcommands: each must fail cleanly.

For every case the CLI must exit with status 1 (not a signal, not an abort, not a usage error), print
exactly one line on stderr of the form `qmoe: error: <message>` that names the offending thing (file,
tensor, attribute), never report an internal error, and leave no output file (nor a temporary one)
behind. Usage errors (CLI11) are checked separately: status 2.

A well-formed baseline run must succeed first, so the cases cannot pass by the binary failing for
some unrelated reason. QMOE_WRITE_ERRORS=1 writes the input -> message table to docs/ERRORS.md.

The second half covers `pack`, `inspect`, `quantize`, `export-onnx`, `bench` and `run` on packed
files: the same rules, and no file left behind anywhere in the case's directory.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_builders as ob  # noqa: E402
from onnx_builders import Cfg  # noqa: E402

# Baselines: block-wise with zero points and biases (most tensors present), and a row-wise one.
BASE = Cfg("base", E=4, k=2, H=32, I=48, block=16, zero_points=True, bias=True, act="silu", tokens=6)
ROW = Cfg("row", E=4, k=2, H=32, I=48, zero_points=True, act="relu", tokens=6)
SWIGLU = Cfg("swiglu", E=4, k=2, H=32, I=48, act="swiglu", fusion=1, tokens=6)


class Files:
    """A case's working directory: a valid model and inputs that the case then breaks."""

    def __init__(self, tmp: Path, cfg: Cfg = BASE):
        self.tmp = tmp
        self.L = ob.make_layer(cfg)
        self.model = tmp / "model.onnx"
        self.x = tmp / "x.npy"
        self.r = tmp / "r.npy"
        self.w = None
        self.out = tmp / "out" / "y.npy"
        self.out.parent.mkdir()
        self.write_model()
        np.save(self.x, self.L.x)
        np.save(self.r, self.L.logits)

    def write_model(self, **kw):
        ob.save_model(ob.build_model(self.L, **kw), self.model)

    def proto(self, **kw):
        return ob.build_model(self.L, **kw)

    def save(self, proto):
        ob.save_model(proto, self.model)

    def args(self):
        a = ["run", self.model, "--input", self.x, "--router-probs", self.r, "--output", self.out]
        if self.L.cfg.layout_arg:
            a += ["--weights-layout", self.L.cfg.layout_arg]
        if self.w is not None:
            a += ["--router-weights", self.w]
        return a


def _attrs(cfg: Cfg, **changes):
    a = ob.node_attributes(cfg)
    a.update(changes)
    return a


def _init(proto, name):
    for t in proto.graph.initializer:
        if t.name == name:
            return t
    raise KeyError(name)


def _truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _set_input_slot(proto, index: int, name: str):
    node = proto.graph.node[0]
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    return proto


@dataclass
class Case:
    name: str  # the malformed input, as the table shows it
    expect: tuple  # substrings the message must contain (each entry: str, or tuple = any of)
    setup: Callable[[Path], "Files"]
    extra: tuple = ()


def _c(name, expect, setup, extra=()):
    return Case(name, tuple(expect), setup, tuple(extra))


# ---- the cases ------------------------------------------------------------------------------


def not_onnx(tmp):
    f = Files(tmp)
    f.model.write_text("this is not an ONNX model\n")
    return f


def empty_model(tmp):
    f = Files(tmp)
    f.model.write_bytes(b"")
    return f


def truncated_model(tmp):
    f = Files(tmp)
    _truncate(f.model, 0.5)
    return f


def missing_model(tmp):
    f = Files(tmp)
    f.model.unlink()
    return f


def no_qmoe_node(tmp):
    from onnx import helper
    f = Files(tmp)
    p = f.proto()
    p.graph.node[0].CopyFrom(helper.make_node("Identity", ["input"], ["output"]))
    f.save(p)
    return f


def other_operator(tmp):
    from onnx import helper
    f = Files(tmp)
    p = f.proto()
    p.graph.node[0].output[0] = "moe_out"
    p.graph.node.append(helper.make_node("Relu", ["moe_out"], ["output"], name="after"))
    f.save(p)
    return f


def missing_initializer(tmp):
    f = Files(tmp)
    p = f.proto()
    keep = [t for t in p.graph.initializer if t.name != "fc2_scales"]
    del p.graph.initializer[:]
    p.graph.initializer.extend(keep)
    f.save(p)
    return f


def missing_required_slot(tmp):
    f = Files(tmp)
    f.save(_set_input_slot(f.proto(), 2, ""))  # fc1_experts_weights
    return f


def tensor_change(cfg=BASE, types=None, attrs=None, **tensors):
    def setup(tmp):
        f = Files(tmp, cfg)
        f.write_model(tensors={k: v(f.L) for k, v in tensors.items()}, tensor_types=types,
                      attrs=None if attrs is None else attrs(cfg))
        return f
    return setup


def attr_change(cfg=BASE, **changes):
    def setup(tmp):
        f = Files(tmp, cfg)
        f.write_model(attrs=_attrs(cfg, **changes))
        return f
    return setup


def truncated_tensor(tmp):
    f = Files(tmp)
    p = f.proto()
    t = _init(p, "fc1_experts_weights")
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    f.save(p)
    return f


def fc3_with_fusion1(tmp):
    f = Files(tmp, SWIGLU)
    L = f.L
    f.write_model(tensors={"fc3_experts_weights": L.tensors["fc2_experts_weights"],
                           "fc3_scales": L.tensors["fc2_scales"]})
    return f


def swiglu_fusion0_without_fc3(tmp):
    f = Files(tmp, SWIGLU)
    # fc1 holds I rows as fusion 0 wants, but no fc3 is given
    L = f.L
    half = {"fc1_experts_weights": L.tensors["fc1_experts_weights"][:, : SWIGLU.I],
            "fc1_scales": L.tensors["fc1_scales"][:, : SWIGLU.I]}
    f.write_model(tensors=half, attrs=_attrs(SWIGLU, swiglu_fusion=0))
    return f


def npy_change(which: str, make: Callable[[ob.Layer], np.ndarray], cfg=BASE):
    def setup(tmp):
        f = Files(tmp, cfg)
        np.save(getattr(f, which), make(f.L))
        return f
    return setup


def npy_bytes(which: str, edit: Callable[[bytes], bytes]):
    def setup(tmp):
        f = Files(tmp)
        p = getattr(f, which)
        p.write_bytes(edit(p.read_bytes()))
        return f
    return setup


def missing_input_file(tmp):
    f = Files(tmp)
    f.x.unlink()
    return f


def router_weights(make, cfg=BASE):
    def setup(tmp):
        f = Files(tmp, cfg)
        f.w = tmp / "w.npy"
        np.save(f.w, make(f.L))
        return f
    return setup


def output_to(path_fn):
    def setup(tmp):
        f = Files(tmp)
        f.out = path_fn(tmp)
        return f
    return setup


def fortran_order(tmp):
    f = Files(tmp)
    np.save(f.x, np.asfortranarray(f.L.x))
    return f


def ambiguous_layout(tmp):
    # H == I and no weights_prepacked attribute: raw [E, N, K/pack] and ORT CUDA [E, K, N/pack]
    # have the same shape, so the file does not say which it holds.
    cfg = Cfg("ambiguous", E=4, k=2, H=32, I=32, act="relu", prepacked_attr=None, tokens=6)
    return Files(tmp, cfg)


def bf16_into_fp32(tmp):
    f = Files(tmp)
    np.save(f.x, ob.f32_to_bf16_bits(f.L.x))
    return f


def external_data(edit):
    def setup(tmp):
        import onnx
        f = Files(tmp)
        ob.save_model(f.proto(), f.model, external=True)
        edit(f, onnx)
        return f
    return setup


def _drop_data_file(f, onnx):
    (f.tmp / "model.onnx.data").unlink()


def _truncate_data_file(f, onnx):
    _truncate(f.tmp / "model.onnx.data", 0.5)


def _escape_location(f, onnx):
    m = onnx.load(str(f.model), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    f.model.write_bytes(m.SerializeToString())


def cuda_file_read_as_raw(tmp):
    cfg = Cfg("cuda", E=4, k=2, H=64, I=128, act="relu", cuda_layout=True, prepacked_attr=1, tokens=6,
              layout_arg="raw")
    return Files(tmp, cfg)


def cuda_layout_partial_tile(tmp):
    # Declared in ORT's CUDA layout [E, K, N/pack], but K = H = 32 is not a whole tile (64 for 4-bit).
    cfg = Cfg("tile", E=4, k=2, H=32, I=96, act="relu", prepacked_attr=1, tokens=6)
    f = Files(tmp, cfg)
    f.write_model(tensors={"fc1_experts_weights": np.zeros((4, 32, 48), np.uint8),
                           "fc2_experts_weights": np.zeros((4, 96, 16), np.uint8)})
    return f



CASES = [
    # the model file
    _c("model file is text, not ONNX", ["model.onnx"], not_onnx),
    _c("model file is empty", ["model.onnx"], empty_model),
    _c("model file truncated to half", ["model.onnx"], truncated_model),
    _c("model file does not exist", ["model.onnx"], missing_model),
    _c("graph without a QMoE node (Identity)", ["QMoE"], no_qmoe_node),
    _c("graph with another operator after QMoE (Relu)", [("Relu", "operator", "node")], other_operator),
    _c("initializer fc2_scales missing", ["fc2_scales"], missing_initializer),
    _c("required input fc1_experts_weights not given (empty slot)", ["fc1_experts_weights"], missing_required_slot),
    _c("fc1_experts_weights truncated raw_data", ["fc1_experts_weights"], truncated_tensor),
    _c("external data file missing", ["model.onnx.data"], external_data(_drop_data_file)),
    _c("external data file truncated to half", [("model.onnx.data", "external")], external_data(_truncate_data_file)),
    _c("external data location escapes the model's folder", ["../../etc/passwd"], external_data(_escape_location)),
    # tensor shapes and dtypes
    _c("fc1_experts_weights with one byte too many per row", ["fc1_experts_weights"],
       tensor_change(fc1_experts_weights=lambda L: np.zeros((4, 48, 17), np.uint8))),
    _c("fc1_experts_weights stored as float32", ["fc1_experts_weights"],
       tensor_change(types={"fc1_experts_weights": "float32"},
                     fc1_experts_weights=lambda L: np.zeros((4, 48, 16), np.float32))),
    _c("fc2_experts_weights with E+1 experts", ["fc2_experts_weights"],
       tensor_change(fc2_experts_weights=lambda L: np.zeros((5, 32, 24), np.uint8))),
    _c("fc2_scales with the wrong block count", ["fc2_scales"],
       tensor_change(fc2_scales=lambda L: L.tensors["fc2_scales"][:, :, :2])),
    _c("fc1_scales stored as uint8", ["fc1_scales"],
       tensor_change(types={"fc1_scales": "uint8"}, fc1_scales=lambda L: np.ones((4, 48, 2), np.uint8))),
    _c("fc1_experts_bias of the wrong length", ["fc1_experts_bias"],
       tensor_change(fc1_experts_bias=lambda L: np.zeros((4, 47), np.float32))),
    _c("fc2_experts_bias float16 in a float32 model", ["fc2_experts_bias"],
       tensor_change(types={"fc2_experts_bias": "float16"},
                     fc2_experts_bias=lambda L: L.tensors["fc2_experts_bias"].astype(np.float16))),
    _c("fc1_zero_points with a block count that does not match the scales", ["fc1_zero_points"],
       tensor_change(fc1_zero_points=lambda L: np.zeros((4, 48, 3), np.uint8))),
    _c("row-wise model given block-wise fc2_zero_points", ["fc2_zero_points"],
       tensor_change(ROW, fc2_zero_points=lambda L: np.zeros((4, 32, 2), np.uint8))),
    _c("fc3 given with swiglu_fusion = 1", ["fc3"], fc3_with_fusion1),
    _c("swiglu_fusion = 0 without fc3", ["fc3"], swiglu_fusion0_without_fc3),
    # attributes
    _c("k = 5 > E = 4", ["k"], attr_change(k=5)),
    _c("k = 0", ["k"], attr_change(k=0)),
    _c("expert_weight_bits = 3", ["expert_weight_bits"], attr_change(expert_weight_bits=3)),
    _c("block_size = 24 (not a power of two)", ["block_size", "24"], attr_change(block_size=24)),
    _c("block_size = 8 (below 16)", ["block_size", "8"], attr_change(block_size=8)),
    _c("activation_type = 'tanh'", ["activation_type", "tanh"], attr_change(activation_type="tanh")),
    _c("swiglu_fusion = 1 with activation relu", ["swiglu_fusion"], attr_change(ROW, swiglu_fusion=1)),
    _c("swiglu_fusion = 3", ["swiglu_fusion"], attr_change(SWIGLU, swiglu_fusion=3)),
    _c("quant_type = 'fp4'", ["quant_type"], attr_change(quant_type="fp4")),
    _c("use_sparse_mixer = 1 with k = 1", [("k", "sparse")], attr_change(use_sparse_mixer=1, k=1)),
    _c("swiglu_limit = -1", ["swiglu_limit"], attr_change(SWIGLU, swiglu_limit=-1.0)),
    _c("no weights_prepacked and H == I (layout ambiguous)", [("layout", "weights_prepacked")], ambiguous_layout),
    _c("ORT CUDA layout file run with --weights-layout raw", ["fc1_experts_weights"], cuda_file_read_as_raw),
    _c("ORT CUDA layout with K = 32, not a whole tile", [("fc1_experts_weights", "tile")], cuda_layout_partial_tile),
    # the .npy inputs
    _c("input .npy does not exist", ["x.npy"], missing_input_file),
    _c("input with last dimension H+1", ["input", "33"], npy_change("x", lambda L: np.zeros((6, 33), np.float32))),
    _c("input of rank 1", ["input"], npy_change("x", lambda L: np.zeros((32,), np.float32))),
    _c("input of rank 4", ["input"], npy_change("x", lambda L: np.zeros((1, 2, 3, 32), np.float32))),
    _c("router_probs with E+1 columns", ["router_probs"], npy_change("r", lambda L: np.zeros((6, 5), np.float32))),
    _c("router_probs with fewer rows than input", ["router_probs"],
       npy_change("r", lambda L: np.zeros((5, 4), np.float32))),
    _c("input float16 into a float32 model", ["float16", "float32"], npy_change("x", lambda L: L.x.astype(np.float16))),
    _c("input bfloat16 (--bf16) into a float32 model", ["bfloat16", "float32"], bf16_into_fp32, ["--bf16"]),
    _c("input float64", ["x.npy"], npy_change("x", lambda L: L.x.astype(np.float64))),
    _c("input int32", ["x.npy"], npy_change("x", lambda L: L.x.astype(np.int32))),
    _c("input .npy truncated (half the data)", ["x.npy"], npy_bytes("x", lambda b: b[: len(b) - 6 * 32 * 2])),
    _c("input .npy cut inside the header", ["x.npy"], npy_bytes("x", lambda b: b[:40])),
    _c("input file is not .npy (bad magic)", ["x.npy"], npy_bytes("x", lambda b: b"PK\x03\x04" + b[4:])),
    _c("input .npy in Fortran order", ["x.npy"], fortran_order),
    _c("router_weights with E-1 columns", ["router_weights"], router_weights(lambda L: np.ones((6, 3), np.float32))),
    _c("router_weights float16 in a float32 model", [("router_weights", "w.npy"), "float16"],
       router_weights(lambda L: np.ones((6, 4), np.float16))),
    # the output
    _c("output into a directory that does not exist", ["missing", "y.npy"],
       output_to(lambda tmp: tmp / "missing" / "y.npy")),
    _c("output path is a directory", ["--output"], output_to(lambda tmp: tmp / "out")),
    _c("output where no file can be created (/proc)", ["qmoe_test_y.npy"],
       output_to(lambda tmp: Path("/proc/qmoe_test_y.npy"))),
]

RESULTS: dict[str, str] = {}


def _run_case(case: Case, tmp: Path):
    f = case.setup(tmp)
    # Only a directory of our own is listed (/proc's entries change by themselves).
    out_dir = f.out.parent if f.out.parent.is_dir() and tmp in f.out.parents else None
    before = set(os.listdir(out_dir)) if out_dir else set()
    p = ob.run_qmoe_cli([*f.args(), *case.extra])
    return f, p, out_dir, before


def test_baseline_runs(tmp_path):
    """The unbroken files must work, or every case below would pass for the wrong reason."""
    for cfg in (BASE, ROW, SWIGLU):
        sub = tmp_path / cfg.name
        sub.mkdir()
        f = Files(sub, cfg)
        p = ob.run_qmoe_cli(f.args())
        assert p.returncode == 0, f"baseline {cfg.name} failed: {p.stderr}"
        assert f.out.exists()


def test_enough_cases():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    f, p, out_dir, before = _run_case(case, tmp_path)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    msg = lines[0] if lines else ""
    # The table shows messages without this run's temporary paths and file-name suffixes.
    RESULTS[case.name] = re.sub(r"\.tmp\.[0-9.]+", ".tmp.<unique>", msg.replace(str(tmp_path), "<dir>"))
    assert p.returncode >= 0, f"{case.name}: killed by signal {-p.returncode}; stderr: {p.stderr!r}"
    assert p.returncode == 1, f"{case.name}: exit code {p.returncode}, expected 1; stderr: {p.stderr!r}"
    assert len(lines) == 1, f"{case.name}: expected one line on stderr, got {lines!r}"
    assert msg.startswith("qmoe: error: "), f"{case.name}: message {msg!r}"
    assert "internal error" not in msg, f"{case.name}: reported as an internal error: {msg!r}"
    for want in case.expect:
        options = want if isinstance(want, tuple) else (want,)
        assert any(o.lower() in msg.lower() for o in options), f"{case.name}: message {msg!r} names none of {options}"
    assert not f.out.exists() or f.out.is_dir(), f"{case.name}: output {f.out} was written"
    if out_dir is not None:
        left = set(os.listdir(out_dir)) - before
        assert not left, f"{case.name}: files left behind in {out_dir}: {sorted(left)}"


def test_failed_run_keeps_existing_output(tmp_path):
    """A failing run must not touch an output file that already exists (atomic write: all or nothing)."""
    f = Files(tmp_path)
    f.out.write_bytes(b"previous contents")
    np.save(f.r, np.zeros((6, 5), np.float32))  # router_probs with E+1 columns
    p = ob.run_qmoe_cli(f.args())
    assert p.returncode == 1, p.stderr
    assert f.out.read_bytes() == b"previous contents"
    assert sorted(os.listdir(f.out.parent)) == ["y.npy"]


def test_successful_run_replaces_output(tmp_path):
    f = Files(tmp_path)
    f.out.write_bytes(b"previous contents")
    p = ob.run_qmoe_cli(f.args())
    assert p.returncode == 0, p.stderr
    y = np.load(f.out)
    assert y.shape == f.L.x.shape and y.dtype == f.L.x.dtype
    assert sorted(os.listdir(f.out.parent)) == ["y.npy"]


def _check_no_crash(p, what: str):
    assert p.returncode in (0, 1), f"{what}: exit code {p.returncode}; stderr {p.stderr[:500]!r}"
    if p.returncode == 1:
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("qmoe: error: "), f"{what}: {p.stderr[:500]!r}"
        assert "internal error" not in lines[0], f"{what}: {lines[0]!r}"


@pytest.mark.parametrize("mode", ["random bytes", "truncation", "header and tail bytes"])
def test_corrupt_model_never_crashes(mode, tmp_path):
    """Seeded random damage to a valid model: qmoe either runs (weights bytes are any bytes) or
    refuses with one line; never a signal, an abort or an internal error."""
    f = Files(tmp_path)
    good = f.model.read_bytes()
    rng = np.random.default_rng({"random bytes": 1, "truncation": 2, "header and tail bytes": 3}[mode])
    for i in range(60):
        b = bytearray(good)
        if mode == "random bytes":
            for _ in range(int(rng.integers(1, 8))):
                b[int(rng.integers(len(b)))] = int(rng.integers(256))
        elif mode == "truncation":
            b = b[: int(rng.integers(len(b)))]
        else:  # the graph structure sits around the initializer payloads
            for _ in range(int(rng.integers(1, 4))):
                j = int(rng.integers(400)) if rng.random() < 0.5 else len(b) - 1 - int(rng.integers(400))
                b[j] = int(rng.integers(256))
        f.model.write_bytes(bytes(b))
        if f.out.exists():
            f.out.unlink()
        p = ob.run_qmoe_cli(f.args())
        _check_no_crash(p, f"{mode} #{i}")
        assert (p.returncode == 0) == f.out.exists(), f"{mode} #{i}: output present = {f.out.exists()}"


def test_corrupt_npy_header_never_crashes(tmp_path):
    f = Files(tmp_path)
    good = f.x.read_bytes()
    header_len = 10 + int.from_bytes(good[8:10], "little")
    rng = np.random.default_rng(4)
    for i in range(80):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(header_len))] = int(rng.integers(32, 127) if rng.random() < 0.7 else rng.integers(256))
        f.x.write_bytes(bytes(b))
        p = ob.run_qmoe_cli(f.args())
        _check_no_crash(p, f"npy header #{i}: {bytes(b[:header_len])!r}")


USAGE = [
    ("--output missing", lambda f: [a for a in f.args()[:-2]]),
    ("unknown option --frobnicate", lambda f: [*f.args(), "--frobnicate"]),
    ("--backend bogus", lambda f: [*f.args(), "--backend", "bogus"]),
    ("--threads -1", lambda f: [*f.args(), "--threads", "-1"]),
    ("--cpu-compute fp8", lambda f: [*f.args(), "--cpu-compute", "fp8"]),
    ("--weights-layout sideways", lambda f: [*f.args(), "--weights-layout", "sideways"]),
    ("no subcommand", lambda f: []),
]


@pytest.mark.parametrize("name,make", USAGE, ids=[u[0] for u in USAGE])
def test_usage_error(name, make, tmp_path):
    f = Files(tmp_path)
    p = ob.run_qmoe_cli(make(f))
    RESULTS["usage: " + name] = (p.stderr.strip().splitlines() or [""])[0]
    assert p.returncode == 2, f"{name}: exit code {p.returncode}, expected 2 (usage); stderr {p.stderr!r}"
    assert p.stderr.strip(), f"{name}: no message"
    assert not f.out.exists()


# ---- the other subcommands ---------------------------------------------------------------------


def _write_st(path: Path, tensors: dict, metadata: dict | None = None):
    """Minimal safetensors writer (name -> float32 array), independent of qmoe."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def _edit_st_metadata(path: Path, **changes):
    """Rewrites a safetensors file's __metadata__ in place (tensor bytes and offsets unchanged)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update({k: str(v) for k, v in changes.items()})
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n :])


class Work:
    """A case's directory with a valid model, inputs, a Mixtral-named checkpoint (layer 2, with
    config.json), and the raw .safetensors and packed files made from them by the CLI itself."""

    E, H, I = 4, 64, 32

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.f = Files(tmp)  # model.onnx, x.npy, r.npy, out/
        self.ckpt = tmp / "ckpt"
        self.ckpt.mkdir()
        rng = np.random.default_rng(0)
        t = {}
        for e in range(self.E):
            for name, shape in (("w1", (self.I, self.H)), ("w3", (self.I, self.H)), ("w2", (self.H, self.I))):
                t[f"model.layers.2.block_sparse_moe.experts.{e}.{name}.weight"] = rng.uniform(-1, 1, shape) / 8
        self.ckpt_tensors = t
        self.write_ckpt()
        (self.ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_experts_per_tok": 2}))

    def write_ckpt(self):
        _write_st(self.ckpt / "model.safetensors", self.ckpt_tensors)

    def cli(self, *args):
        p = ob.run_qmoe_cli(list(args))
        assert p.returncode == 0, f"setup step {args[0]} failed: {p.stderr}"

    def raw(self) -> Path:
        path = self.tmp / "raw.safetensors"
        self.cli("quantize", self.ckpt, "--layer", "2", "--bits", "4", "--block-size", "16", "-o", path)
        return path

    def packed(self, target="cpu") -> Path:
        path = self.tmp / f"m.{target}.qmoe"
        self.cli("pack", self.f.model, "--target", target, "-o", path)
        return path

    def run(self, model: Path, *extra):
        return ["run", model, "--input", self.f.x, "--router-probs", self.f.r, "--output", self.f.out, *extra]


@dataclass
class CmdCase:
    name: str
    expect: tuple
    make: Callable[["Work"], list]  # -> the argument list; may break files first


def _flip(path: Path, offset_fn):
    b = bytearray(path.read_bytes())
    b[offset_fn(b)] ^= 0x01
    path.write_bytes(bytes(b))
    return path


def _payload_corrupted(w):
    p = w.packed()
    return _flip(p, lambda b: len(b) - 100)  # inside the last blob (the payload is written back to back)


def _header_corrupted(w):
    p = w.packed()
    return _flip(p, lambda b: 100)  # inside the header's strings and spec


def _version_changed(w):
    p = w.packed()
    b = bytearray(p.read_bytes())
    b[8] = 2  # format version, little-endian u32 after the 8-byte magic
    p.write_bytes(bytes(b))
    return p


def _truncated(w):
    p = w.packed()
    _truncate(p, 0.6)
    return p


def _ckpt_with_nan(w):
    w.ckpt_tensors["model.layers.2.block_sparse_moe.experts.3.w2.weight"][5, 7] = np.nan
    w.write_ckpt()
    return w.ckpt


def _ckpt_without_config(w):
    """Qwen-style names (mlp.experts.{e}.gate_proj...) and no config.json: the names do not say which
    model family it is, so k and the renormalisation are unknown (Mixtral's names would imply k = 2)."""
    (w.ckpt / "config.json").unlink()
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    w.ckpt_tensors = {n.replace("block_sparse_moe", "mlp").replace(n.split(".")[-2], names[n.split(".")[-2]]): a
                      for n, a in w.ckpt_tensors.items()}
    w.write_ckpt()
    return w.ckpt


def _text_file(w):
    p = w.tmp / "notes.txt"
    p.write_text("hello\n")
    return p


def _raw_with_bits(w, bits):
    p = w.raw()
    _edit_st_metadata(p, expert_weight_bits=bits)
    return p


def _raw_truncated(w):
    p = w.raw()
    _truncate(p, 0.5)
    return p


def _model_without_scales(w):
    p = w.f.proto()
    keep = [t for t in p.graph.initializer if t.name != "fc2_scales"]
    del p.graph.initializer[:]
    p.graph.initializer.extend(keep)
    w.f.save(p)
    return w.f.model


def _cuda_or_skip_reason():
    p = ob.run_qmoe_cli(["run", "--help"])
    return "cuda" in p.stdout.split("--backend", 1)[-1].split("\n", 1)[0]


CMD_CASES = [
    # pack
    CmdCase("pack: MODEL is already a packed file", ["already a qmoe packed"],
            lambda w: ["pack", w.packed(), "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: MODEL is a Hugging Face checkpoint", ["checkpoint", "qmoe quantize"],
            lambda w: ["pack", w.ckpt / "model.safetensors", "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: MODEL does not exist", ["nope.onnx", "no such file"],
            lambda w: ["pack", w.tmp / "nope.onnx", "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: ONNX model without fc2_scales", ["fc2_scales"],
            lambda w: ["pack", _model_without_scales(w), "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: raw .safetensors truncated to half", ["raw.safetensors"],
            lambda w: ["pack", _raw_truncated(w), "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: --weights-layout ort-cuda with a raw .safetensors", ["--weights-layout", "ONNX"],
            lambda w: ["pack", w.raw(), "--weights-layout", "ort-cuda", "-o", w.tmp / "out" / "p.qmoe"]),
    CmdCase("pack: -o is the input file", ["-o", "input file"], lambda w: ["pack", w.f.model, "-o", w.f.model]),
    CmdCase("pack: -o into a directory that does not exist", ["missing"],
            lambda w: ["pack", w.f.model, "-o", w.tmp / "missing" / "p.qmoe"]),
    CmdCase("pack: --target cuda on a machine without a CUDA device", ["cuda"],
            lambda w: pytest.skip("a CUDA device is present") if _cuda_or_skip_reason()
            else ["pack", w.f.model, "--target", "cuda", "-o", w.tmp / "out" / "p.qmoe"]),
    # run on packed files
    CmdCase("run: file packed for reference, run on cpu", ["raw v1", "cpu-t16", "qmoe pack --target cpu"],
            lambda w: w.run(w.packed("reference"), "--backend", "cpu")),
    CmdCase("run: packed file, one payload bit flipped", ["corrupted", "checksum"],
            lambda w: w.run(_payload_corrupted(w), "--backend", "cpu")),
    CmdCase("run: packed file, one header bit flipped", ["header", ("corrupted", "checksum")],
            lambda w: w.run(_header_corrupted(w), "--backend", "cpu")),
    CmdCase("run: packed file of format version 2", ["version"], lambda w: w.run(_version_changed(w), "--backend", "cpu")),
    CmdCase("run: packed file truncated to 60%", ["truncated"], lambda w: w.run(_truncated(w), "--backend", "cpu")),
    CmdCase("run: packed file with --no-prepack", ["--no-prepack", "packed"],
            lambda w: w.run(w.packed(), "--backend", "cpu", "--no-prepack")),
    CmdCase("run: packed file with --weights-layout raw", ["--weights-layout"],
            lambda w: w.run(w.packed(), "--weights-layout", "raw")),
    # inspect
    CmdCase("inspect: packed file, one payload bit flipped", ["corrupted"], lambda w: ["inspect", _payload_corrupted(w)]),
    CmdCase("inspect: packed file truncated to 60%", ["truncated"], lambda w: ["inspect", _truncated(w)]),
    CmdCase("inspect: FILE does not exist", ["nope.qmoe"], lambda w: ["inspect", w.tmp / "nope.qmoe"]),
    CmdCase("inspect: text file", [("ONNX", "protobuf")], lambda w: ["inspect", _text_file(w)]),
    CmdCase("inspect: --layer on a packed file", ["--layer"], lambda w: ["inspect", w.packed(), "--layer", "1"]),
    CmdCase("inspect: checkpoint layer without experts", ["layer", "2"], lambda w: ["inspect", w.ckpt, "--layer", "5"]),
    # quantize
    CmdCase("quantize: layer without experts", ["layer", "2"],
            lambda w: ["quantize", w.ckpt, "--layer", "0", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: --block-size 24", ["block_size", "24"],
            lambda w: ["quantize", w.ckpt, "--layer", "2", "--block-size", "24", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: CHECKPOINT is an ONNX model", ["not a Hugging Face checkpoint"],
            lambda w: ["quantize", w.f.model, "--layer", "2", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: no config.json and no --k", ["--k"],
            lambda w: ["quantize", _ckpt_without_config(w), "--layer", "2", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: a NaN in one expert's weights", [("finite", "nan")],
            lambda w: ["quantize", _ckpt_with_nan(w), "--layer", "2", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: CHECKPOINT does not exist", ["nope"],
            lambda w: ["quantize", w.tmp / "nope", "--layer", "2", "-o", w.tmp / "out" / "raw.safetensors"]),
    CmdCase("quantize: -o into a directory that does not exist", ["missing"],
            lambda w: ["quantize", w.ckpt, "--layer", "2", "-o", w.tmp / "missing" / "raw.safetensors"]),
    # export-onnx
    CmdCase("export-onnx: RAW is an ONNX model", ["safetensors"], lambda w: ["export-onnx", w.f.model, "-o", w.tmp / "out" / "l.onnx"]),
    CmdCase("export-onnx: RAW is a checkpoint", ["qmoe quantize"],
            lambda w: ["export-onnx", w.ckpt / "model.safetensors", "-o", w.tmp / "out" / "l.onnx"]),
    CmdCase("export-onnx: RAW is a packed file", ["packed"], lambda w: ["export-onnx", w.packed(), "-o", w.tmp / "out" / "l.onnx"]),
    CmdCase("export-onnx: raw metadata says expert_weight_bits = 3", ["expert_weight_bits"],
            lambda w: ["export-onnx", _raw_with_bits(w, 3), "-o", w.tmp / "out" / "l.onnx"]),
    CmdCase("export-onnx: raw metadata says 8 bits for 4-bit tensors", ["fc1_experts_weights"],
            lambda w: ["export-onnx", _raw_with_bits(w, 8), "-o", w.tmp / "out" / "l.onnx"]),
    # bench
    CmdCase("bench: --block-size 24", ["block_size", "24"], lambda w: ["bench", "--block-size", "24", "--bandwidth-mib", "0"]),
    CmdCase("bench: --bits 2 --block-size 8", ["block_size", "8"],
            lambda w: ["bench", "--bits", "2", "--block-size", "8", "--bandwidth-mib", "0"]),
]


def _listing(root: Path):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CMD_CASES, ids=[c.name for c in CMD_CASES])
def test_subcommand_bad_input(case: CmdCase, tmp_path: Path):
    w = Work(tmp_path)
    args = case.make(w)
    before = _listing(tmp_path)
    p = ob.run_qmoe_cli(args)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    msg = lines[0] if lines else ""
    RESULTS["cmd: " + case.name] = re.sub(r"\.tmp[-.][0-9.-]+", ".tmp.<unique>", msg.replace(str(tmp_path), "<dir>"))
    assert p.returncode >= 0, f"{case.name}: killed by signal {-p.returncode}; stderr: {p.stderr!r}"
    assert p.returncode == 1, f"{case.name}: exit code {p.returncode}, expected 1; stderr: {p.stderr!r}"
    assert len(lines) == 1, f"{case.name}: expected one line on stderr, got {lines!r}"
    assert msg.startswith("qmoe: error: "), f"{case.name}: message {msg!r}"
    assert "internal error" not in msg, f"{case.name}: reported as an internal error: {msg!r}"
    for want in case.expect:
        options = want if isinstance(want, tuple) else (want,)
        assert any(o.lower() in msg.lower() for o in options), f"{case.name}: message {msg!r} names none of {options}"
    left = _listing(tmp_path) - before
    assert not left, f"{case.name}: files left behind: {sorted(left)}"


def test_failed_pack_keeps_existing_output(tmp_path):
    """pack over an existing file fails without touching it (save_packed renames only when complete)."""
    w = Work(tmp_path)
    out = tmp_path / "out" / "p.qmoe"
    out.write_bytes(b"previous contents")
    p = ob.run_qmoe_cli(["pack", _model_without_scales(w), "--target", "cpu", "-o", out])
    assert p.returncode == 1, p.stderr
    assert out.read_bytes() == b"previous contents"
    assert sorted(os.listdir(out.parent)) == ["p.qmoe"]


CMD_USAGE = [
    ("pack without -o", lambda w: ["pack", w.f.model]),
    ("pack --target tpu", lambda w: ["pack", w.f.model, "--target", "tpu", "-o", w.tmp / "p.qmoe"]),
    ("inspect without FILE", lambda w: ["inspect"]),
    ("quantize without --layer", lambda w: ["quantize", w.ckpt, "-o", w.tmp / "raw.safetensors"]),
    ("quantize --bits 3", lambda w: ["quantize", w.ckpt, "--layer", "2", "--bits", "3", "-o", w.tmp / "raw.safetensors"]),
    ("quantize --scale-dtype float64",
     lambda w: ["quantize", w.ckpt, "--layer", "2", "--scale-dtype", "float64", "-o", w.tmp / "raw.safetensors"]),
    ("export-onnx without -o", lambda w: ["export-onnx", w.tmp / "raw.safetensors"]),
    ("bench --shape llama", lambda w: ["bench", "--shape", "llama"]),
    ("bench --tokens 0", lambda w: ["bench", "--tokens", "1,0"]),
    ("bench --repeat 0", lambda w: ["bench", "--repeat", "0"]),
]


@pytest.mark.parametrize("name,make", CMD_USAGE, ids=[u[0] for u in CMD_USAGE])
def test_subcommand_usage_error(name, make, tmp_path):
    w = Work(tmp_path)
    before = _listing(tmp_path)
    p = ob.run_qmoe_cli(make(w))
    RESULTS["usage: " + name] = (p.stderr.strip().splitlines() or [""])[0]
    assert p.returncode == 2, f"{name}: exit code {p.returncode}, expected 2 (usage); stderr {p.stderr!r}"
    assert p.stderr.strip(), f"{name}: no message"
    assert _listing(tmp_path) == before


@pytest.fixture(scope="module", autouse=True)
def errors_table():
    yield
    if os.environ.get("QMOE_WRITE_ERRORS") != "1" or not RESULTS:
        return
    rows = [[c.name, "1", f"`{RESULTS[c.name]}`"] for c in CASES if c.name in RESULTS]
    rows += [[c.name, "1", f"`{RESULTS['cmd: ' + c.name]}`"] for c in CMD_CASES if "cmd: " + c.name in RESULTS]
    rows += [[n, "2", f"`{m}`"] for n, m in RESULTS.items() if n.startswith("usage: ")]
    header = (
        "# Errors of the qmoe CLI on malformed input\n\n"
        "Generated by `QMOE_WRITE_ERRORS=1 pytest tests/python/test_cli_errors.py` (do not edit by hand).\n"
        "Each row breaks one thing in an otherwise valid model, input, checkpoint or packed file; the suite checks\n"
        "the exit code, that stderr is this one line, that it names the broken thing, and that no output file\n"
        "(nor a temporary one) is left behind. Rows without a subcommand prefix are `qmoe run` on an ONNX model.\n"
        "Exit code 1 = bad input, 2 = usage error (CLI11's message, first line shown).\n"
    )
    ob.write_table(ob.REPO / "docs" / "ERRORS.md", header, ["malformed input", "exit", "message"], rows)
