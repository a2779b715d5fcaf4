"""The qmoe CLI on good input: help texts, `demo`'s report, `run`'s JSON summary and text output.

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


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["demo", "--help"]], ids=" ".join)
def test_help(args):
    p = ob.run_qmoe_cli(args)
    assert p.returncode == 0, p.stderr
    assert "Example" in p.stdout and "Usage" in p.stdout, p.stdout


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
