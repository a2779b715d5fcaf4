"""The qmoe CLI on good input: help texts, `demo`'s report, `run`'s JSON summary and text output,
`pack` -> `inspect` -> `run` on packed files (bitwise equal to running the ONNX model), `quantize` ->
`export-onnx` -> `pack` chains, and `bench`'s report.

(Bad input is test_cli_errors.py; numerical agreement is test_ort_agreement.py.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_builders as ob  # noqa: E402
from onnx_builders import Cfg  # noqa: E402

# A small demo shape so these tests take well under a second each.
SMALL_DEMO = ["--hidden", "64", "--inter", "128", "--tokens", "8"]


SUBCOMMANDS = ["quantize", "export-onnx", "pack", "inspect", "run", "bench", "demo"]


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in SUBCOMMANDS], ids=" ".join)
def test_help(args):
    p = ob.run_qmoe_cli(args)
    assert p.returncode == 0, p.stderr
    assert "Example" in p.stdout and "Usage" in p.stdout, p.stdout
    if args == ["--help"]:
        for c in SUBCOMMANDS:
            assert c in p.stdout, f"{c} missing from the top-level help"


def demo_json(*extra):
    p = ob.run_qmoe_cli(["demo", "--json", *SMALL_DEMO, *extra])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_demo_text_report():
    p = ob.run_qmoe_cli(["demo", *SMALL_DEMO])
    assert p.returncode == 0, p.stderr
    for want in ("E=8 k=2 H=64 I=128", "int4", "int8", "rel. error vs fp32", "fp32 weights"):
        assert want in p.stdout, f"{want!r} missing from:\n{p.stdout}"


def test_demo_json_report_is_plausible():
    j = demo_json()
    assert j["spec"]["num_experts"] == 8 and j["spec"]["activation"] == "swiglu"
    v4, v8 = j["variants"]
    assert (v4["bits"], v8["bits"]) == (4, 8)
    # int4 stores ~1/8 and int8 ~1/4 of the fp32 bytes, plus one fp32 scale per 32 weights
    assert v4["weight_bytes"] < j["fp32_weight_bytes"] / 6 and v8["weight_bytes"] < j["fp32_weight_bytes"] / 3
    # Each bit halves the quantization step: four more bits should cut the error ~16x (>= 8x here).
    assert 0 < v8["rel_error_vs_fp32"] * 8 < v4["rel_error_vs_fp32"] < v4["max_rel_error"]
    assert v4["run_ms"] >= 0 and v4["prepack_ms"] >= 0


def test_demo_is_deterministic_and_backends_agree():
    a = demo_json("--seed", "3", "--backend", "reference")
    b = demo_json("--seed", "3", "--backend", "reference")
    c = demo_json("--seed", "3", "--backend", "cpu")
    d = demo_json("--seed", "4", "--backend", "reference")
    for i in range(2):
        assert a["variants"][i]["rel_error_vs_fp32"] == b["variants"][i]["rel_error_vs_fp32"]
        # Same quantized layer, different kernels: the errors vs fp32 agree to fp32 rounding.
        assert c["variants"][i]["rel_error_vs_fp32"] == pytest.approx(a["variants"][i]["rel_error_vs_fp32"], rel=1e-4)
    assert d["variants"][0]["rel_error_vs_fp32"] != a["variants"][0]["rel_error_vs_fp32"]


def test_cpu_compute_flag_rejects_bad_value():
    p = ob.run_qmoe_cli(["demo", "--seed", "3", "--backend", "cpu", "--cpu-compute", "fp8"])
    assert p.returncode != 0 and "--cpu-compute" in p.stderr, p.stderr


@pytest.mark.parametrize("mode,flag,tol", [("bf16", "avx512_bf16", 8e-3), ("int8", "avx512_vnni", 4e-2),
                                           ("int8x3", "amx_int8", 4e-6)])
def test_cpu_compute_flag(mode, flag, tol):
    # --cpu-compute (an accuracy option): the demo's error against the fp32 layer moves by at most the
    # mode's tested layer tolerance (tests/cpp/cpu_compute_layer_test.cpp; docs/DESIGN.md, Numerics),
    # far below int4's own error, and it does move (the mode is on).
    if flag not in ob.cpu_flags():
        pytest.skip(f"this CPU lacks {flag}")
    a = demo_json("--seed", "3", "--backend", "cpu")
    b = demo_json("--seed", "3", "--backend", "cpu", "--cpu-compute", mode)
    for i in range(2):
        ea, eb = a["variants"][i]["rel_error_vs_fp32"], b["variants"][i]["rel_error_vs_fp32"]
        assert ea != eb and abs(eb - ea) <= tol, (ea, eb)


def test_demo_rejects_bad_shape():
    p = ob.run_qmoe_cli(["demo", "--k", "9"])
    assert p.returncode == 1 and p.stderr.startswith("qmoe: error: k"), p.stderr


@pytest.fixture
def layer_files(tmp_path):
    L = ob.make_layer(Cfg("cli", E=4, k=2, H=32, I=48, block=16, act="swiglu", batch=2, tokens=6))
    model = ob.save_model(ob.build_model(L), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", L.x)
    np.save(tmp_path / "r.npy", L.logits)
    args = ["run", model, "--input", tmp_path / "x.npy", "--router-probs", tmp_path / "r.npy",
            "--output", tmp_path / "y.npy"]
    return L, model, args, tmp_path / "y.npy"


def test_run_json(layer_files):
    L, model, args, out = layer_files
    p = ob.run_qmoe_cli([*args, "--json", "--backend", "reference"])
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["backend"] == "reference"
    assert j["output"]["shape"] == [2, 3, 32] and j["output"]["dtype"] == "float32"
    assert j["rows"] == 6 and j["spec"]["swiglu_fusion"] == 1
    assert set(j["time_ms"]) == {"load", "prepack", "run"}
    y = np.load(out)
    assert ob.rel_error(y, ob.model_forward(L)) < 1e-5


def test_run_text_and_options(layer_files):
    L, model, args, out = layer_files
    p = ob.run_qmoe_cli([*args, "--threads", "1", "--no-prepack", "--backend", "cpu"])
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "[2, 3, 32]" in p.stdout, p.stdout
    assert ob.rel_error(np.load(out), ob.model_forward(L)) < 1e-5


def test_bf16_model_implies_bf16_inputs(tmp_path):
    """A bf16 model's uint16 .npy inputs are read as bf16 bits without --bf16; output is uint16 bits."""
    L = ob.make_layer(Cfg("bf16", dtype="bfloat16", act="relu", tokens=5))
    model = ob.save_model(ob.build_model(L), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", L.x)
    np.save(tmp_path / "r.npy", L.logits)
    p = ob.run_qmoe_cli(["run", model, "--input", tmp_path / "x.npy", "--router-probs", tmp_path / "r.npy",
                         "--output", tmp_path / "y.npy"])
    assert p.returncode == 0, p.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.uint16
    assert ob.rel_error(ob.from_storage(y, "bfloat16"), ob.model_forward(L)) < 4e-3


# ---- pack / inspect / run on packed files ----------------------------------------------------


def cli_json(args):
    p = ob.run_qmoe_cli([*args, "--json"])
    assert p.returncode == 0, p.stderr
    # Progress is drawn only on a terminal: a successful command leaves stderr empty.
    assert p.stderr == "", p.stderr
    return json.loads(p.stdout)


def run_args(model, d: Path, out: str):
    return ["run", model, "--input", d / "x.npy", "--router-probs", d / "r.npy", "--output", d / out]


# Layers whose packed CPU layout differs in kind: block-wise int4 SwiGLU with 3-D input; row-wise int8
# with zero points and biases.
PACK_CFGS = [
    Cfg("packb", E=4, k=2, H=32, I=48, block=16, act="swiglu", batch=2, tokens=6),
    Cfg("packr", E=5, k=2, H=48, I=32, bits=8, zero_points=True, bias=True, act="silu", tokens=7),
]


@pytest.fixture(params=PACK_CFGS, ids=lambda c: c.name)
def model_dir(request, tmp_path):
    L = ob.make_layer(request.param)
    ob.save_model(ob.build_model(L), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", L.x)
    np.save(tmp_path / "r.npy", L.logits)
    return L, tmp_path


# "any" is the reference layout's target as load_packed's "repack for target X" hint spells it.
@pytest.mark.parametrize("target,backend,layout",
                         [("cpu", "cpu", "cpu-t16-w"), ("reference", "reference", "raw"), ("any", "reference", "raw")])
def test_pack_run_bitwise_equals_onnx_run(model_dir, target, backend, layout):
    """A packed file holds exactly what prepack computes at load: the outputs are bitwise equal."""
    L, d = model_dir
    packed = d / f"m.{target}.qmoe"
    j = cli_json(["pack", d / "m.onnx", "--target", target, "-o", packed])
    assert j["backend"] == backend and j["layout"]["name"].startswith(layout), j
    assert packed.stat().st_size == j["file_bytes"]
    assert sorted(p.name for p in d.iterdir()) == sorted(["m.onnx", "x.npy", "r.npy", packed.name]), "stray files"

    info = cli_json(["inspect", packed])
    assert info["ok"] and info["header_ok"] and info["payload_ok"], info
    assert info["kind"] == "packed" and info["layout"]["name"] == j["layout"]["name"]
    assert info["spec"]["num_experts"] == L.cfg.E and info["spec"]["bits"] == L.cfg.bits
    assert sum(b["bytes"] for b in info["blobs"]) <= info["payload_bytes"]

    r_onnx = cli_json([*run_args(d / "m.onnx", d, "y_onnx.npy"), "--backend", backend])
    r_packed = cli_json([*run_args(packed, d, "y_packed.npy"), "--backend", backend])
    assert r_packed["model_kind"] == "packed" and r_onnx["model_kind"] == "onnx"
    assert r_packed["layout"] == r_onnx["layout"]
    assert r_packed["spec"] == r_onnx["spec"]
    y_onnx, y_packed = np.load(d / "y_onnx.npy"), np.load(d / "y_packed.npy")
    assert y_packed.shape == L.x.shape and y_packed.dtype == L.x.dtype
    assert y_onnx.tobytes() == y_packed.tobytes(), "packed file and ONNX model give different bits"
    assert ob.rel_error(y_packed, ob.model_forward(L)) < 1e-5


def test_pack_text_report(model_dir):
    L, d = model_dir
    p = ob.run_qmoe_cli(["pack", d / "m.onnx", "--target", "cpu", "-o", d / "m.qmoe"])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for want in ("layout cpu-t16-w", "raw", "prepack", "wrote"):
        assert want in p.stdout, f"{want!r} missing from:\n{p.stdout}"
    p = ob.run_qmoe_cli(["inspect", d / "m.qmoe"])
    assert p.returncode == 0, p.stderr
    assert "status: OK" in p.stdout and "checksum" in p.stdout, p.stdout


def test_run_packed_for_another_backend_is_refused(model_dir):
    L, d = model_dir
    assert ob.run_qmoe_cli(["pack", d / "m.onnx", "--target", "reference", "-o", d / "m.qmoe"]).returncode == 0
    p = ob.run_qmoe_cli([*run_args(d / "m.qmoe", d, "y.npy"), "--backend", "cpu"])
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmoe: error: "), p.stderr
    # The library's error names both layouts and how to repack.
    assert "raw v1" in lines[0] and "cpu-t16-w" in lines[0] and "qmoe pack --target" in lines[0], lines[0]
    assert not (d / "y.npy").exists()


def test_corrupted_packed_file_is_refused(model_dir):
    L, d = model_dir
    good, bad = d / "m.qmoe", d / "bad.qmoe"
    assert ob.run_qmoe_cli(["pack", d / "m.onnx", "--target", "cpu", "-o", good]).returncode == 0
    info = cli_json(["inspect", good])
    b = bytearray(good.read_bytes())
    b[info["blobs"][0]["offset"] + 3] ^= 0x10  # one bit of the payload
    bad.write_bytes(bytes(b))

    p = ob.run_qmoe_cli([*run_args(bad, d, "y.npy"), "--backend", "cpu"])
    assert p.returncode == 1 and "corrupted" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert not (d / "y.npy").exists()

    p = ob.run_qmoe_cli(["inspect", bad])  # the report still comes, then exit 1
    assert p.returncode == 1 and "corrupted" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert "status: DAMAGED" in p.stdout and "BAD" in p.stdout, p.stdout
    p = ob.run_qmoe_cli(["inspect", bad, "--json"])
    assert p.returncode == 1, p.stderr
    j = json.loads(p.stdout)
    assert j["header_ok"] and not j["payload_ok"] and not j["ok"] and "corrupted" in j["problem"], j


def test_inspect_onnx_json(model_dir):
    L, d = model_dir
    j = cli_json(["inspect", d / "m.onnx"])
    assert j["kind"] == "onnx" and j["ok"]
    assert j["spec"]["num_experts"] == L.cfg.E and j["spec"]["hidden"] == L.cfg.H
    t = j["tensors"]["fc1_experts_weights"]
    assert t["dtype"] == "uint8" and t["shape"][0] == L.cfg.E
    assert j["weight_bytes"] == sum(v["bytes"] for v in j["tensors"].values())


# ---- quantize -> export-onnx / pack / run --------------------------------------------------------


def write_safetensors(path: Path, tensors: dict):
    """Minimal safetensors writer (name -> float32 array), independent of qmoe."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def mixtral_checkpoint(d: Path, E=4, H=64, I=32, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir()
    t = {}
    for e in range(E):
        for name, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            t[f"model.layers.2.block_sparse_moe.experts.{e}.{name}.weight"] = rng.uniform(-1, 1, shape) / np.sqrt(shape[1])
    t["model.layers.2.block_sparse_moe.gate.weight"] = rng.uniform(-1, 1, (E, H))
    write_safetensors(d / "model.safetensors", t)
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_experts_per_tok": 2}))
    return d


def test_quantize_export_pack_run_agree(tmp_path):
    """One quantized layer run four ways on the cpu backend -- raw .safetensors, exported ONNX, and a
    packed file made from each -- gives the same bits."""
    ckpt = mixtral_checkpoint(tmp_path / "ckpt")
    raw, onnx_path = tmp_path / "raw.safetensors", tmp_path / "layer.onnx"
    q = cli_json(["quantize", ckpt, "--layer", "2", "--bits", "4", "--block-size", "16", "-o", raw])
    assert q["family"] == "mixtral" and q["spec"]["k"] == 2 and q["spec"]["block_size"] == 16
    e = cli_json(["export-onnx", raw, "-o", onnx_path])
    assert e["spec"] == q["spec"] and onnx_path.stat().st_size == e["model_bytes"]

    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.uniform(-1, 1, (5, 64)).astype(np.float32))
    np.save(tmp_path / "r.npy", rng.uniform(-2, 2, (5, 4)).astype(np.float32))
    outs = {}
    for name, model in (("raw", raw), ("onnx", onnx_path)):
        packed = tmp_path / f"{name}.qmoe"
        cli_json(["pack", model, "--target", "cpu", "-o", packed])
        for kind, m in ((name, model), (name + "-packed", packed)):
            cli_json([*run_args(m, tmp_path, f"y_{kind}.npy"), "--backend", "cpu"])
            outs[kind] = np.load(tmp_path / f"y_{kind}.npy")
    ref = outs["onnx"]
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    for kind, y in outs.items():
        assert y.tobytes() == ref.tobytes(), f"{kind} differs from the exported ONNX model's output"
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_inspect_raw_and_checkpoint(tmp_path):
    ckpt = mixtral_checkpoint(tmp_path / "ckpt")
    j = cli_json(["inspect", ckpt])
    assert j["kind"] == "checkpoint" and j["moe_layers"] == [2], j
    assert j["layer"]["family"] == "mixtral" and j["layer"]["num_experts"] == 4 and j["layer"]["k"] == 2
    raw = tmp_path / "raw.safetensors"
    cli_json(["quantize", ckpt, "--layer", "2", "--bits", "8", "--asym", "-o", raw])
    j = cli_json(["inspect", raw])
    assert j["kind"] == "raw-safetensors" and j["metadata"]["source_family"] == "mixtral"
    assert j["spec"]["bits"] == 8 and "fc1_zero_points" in j["tensors"], j
    p = ob.run_qmoe_cli(["inspect", ckpt])
    assert p.returncode == 0 and "MoE layers (1): 2" in p.stdout and "qmoe quantize" in p.stdout, p.stdout


def test_quantize_text_report(tmp_path):
    ckpt = mixtral_checkpoint(tmp_path / "ckpt")
    p = ob.run_qmoe_cli(["quantize", ckpt, "--layer", "2", "-o", tmp_path / "raw.safetensors"])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for want in ("mixtral layer 2", "int4 row-wise", "4 experts", "wrote"):
        assert want in p.stdout, f"{want!r} missing from:\n{p.stdout}"


# ---- bench -----------------------------------------------------------------------------------


def test_bench_json_report():
    j = cli_json(["bench", "--shape", "small", "--tokens", "1,4", "--repeat", "2", "--bandwidth-mib", "16",
                  "--backend", "cpu"])
    assert j["shape"]["name"] == "small" and j["backend"] == "cpu"
    assert j["spec"]["bits"] == 4 and j["spec"]["block_size"] == 32 and j["repeat"] == 2
    assert j["read_bandwidth_gbs"] > 0 and j["prepack_ms"] >= 0
    c1, c4 = j["cases"]
    assert (c1["tokens"], c4["tokens"]) == (1, 4)
    # T=1 touches exactly k experts; the floor is those experts' bytes plus the activations.
    assert c1["touched_experts"] == j["spec"]["k"]
    assert c1["floor_bytes"] == pytest.approx(2 * j["expert_bytes"] + 2 * 1 * j["spec"]["hidden"] * 4)
    assert 2 <= c4["touched_experts"] <= 8
    for c in (c1, c4):
        assert c["median_us"] >= c["min_us"] > 0 and c["gbs"] > 0 and c["fraction_of_read_bandwidth"] > 0


def test_bench_text_report():
    p = ob.run_qmoe_cli(["bench", "--tokens", "1", "--repeat", "1", "--bandwidth-mib", "0", "--bits", "8",
                         "--block-size", "0", "--backend", "reference"])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for want in ("int8 row-wise", "median_us", "GB/s", "prepack"):
        assert want in p.stdout, f"{want!r} missing from:\n{p.stdout}"
