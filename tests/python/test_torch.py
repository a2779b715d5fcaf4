"""qmoe.Layer.run with torch tensors: CPU tensors on CPU layers, CUDA tensors on cuda layers.

What is checked, and against what:
- torch CPU: the output is a torch tensor of the input's dtype, device and shape, and bitwise equal to
  the NumPy path of the same layer (same kernels, same bytes: any difference is a binding bug), for
  every configuration of test_layer.py (fp32, fp16, bf16, all activations and fusions).
- CUDA (skipped without a GPU or a CUDA build): the device path (cuda_run_device on the current
  stream) is bitwise equal to the host path of the same cuda layer (Backend::run, the same kernels
  behind host copies), and close to test_layer's float64 model of the contract: relative L2 error
  <= 1.2 u_c + u_T, the bound tests/cuda/cuda_backend_test.cpp derives (u_c: unit roundoff of the
  compute type fc1's activation passes through, fp16 2^-11 or bf16 2^-8, doubled for fp32 inputs,
  which are rounded to bf16 too; u_T: the output type's). The run is ordered on the caller's stream
  without a host sync, and can be captured in a CUDA graph.
- Errors: dtype, device, contiguity and kind mismatches name the argument; nothing is copied.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("qmoe") is None:
    pytest.skip("the qmoe Python module is not built (pip install . or -DQMOE_PYTHON=ON)", allow_module_level=True)
import qmoe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layer import CONFIGS, Cfg, build, inputs, model_forward, rel_err  # noqa: E402

CPU_BACKENDS = [b for b in qmoe.available_backends() if b != "cuda"]
HAS_CUDA = "cuda" in qmoe.available_backends() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device, or qmoe built without CUDA")
IDS = [c.name for c in CONFIGS]


def to_torch(a, device="cpu"):
    """NumPy (incl. ml_dtypes.bfloat16) -> torch, through int16 bits for bfloat16."""
    if a is None:
        return None
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(a.copy()).to(device)


def bits(t) -> np.ndarray:
    """The output's bytes as an integer array (bitwise comparison, NaN-safe), from torch or NumPy."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return t.view(torch.int16).numpy() if t.element_size() == 2 else t.view(torch.int32).numpy()
    a = np.asarray(t)
    return a.view(np.int16) if a.itemsize == 2 else a.view(np.int32)


def torch_dtype(name: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------- CPU tensors
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpu_tensors_match_numpy_bitwise(cfg, backend):
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend=backend, **kwargs)
    x, logits, rw = inputs(cfg)
    want = layer.run(x, logits, rw)
    got = layer.run(to_torch(x), to_torch(logits), to_torch(rw))
    assert isinstance(got, torch.Tensor), type(got)
    assert got.device.type == "cpu" and got.dtype == torch_dtype(cfg.dtype) and tuple(got.shape) == x.shape
    diff = np.argwhere(bits(got) != bits(want))
    assert diff.size == 0, f"{cfg} backend={backend}: first differing index {diff[0].tolist()}"


def test_cpu_out_is_written_in_place():
    cfg = CONFIGS[10]  # bf16
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits, rw = (to_torch(a) for a in inputs(cfg))
    out = torch.full(tuple(x.shape), float("nan"), dtype=torch.bfloat16)
    ptr = out.data_ptr()
    got = layer.run(x, logits, rw, out=out)
    assert got is out and out.data_ptr() == ptr
    assert not torch.isnan(out).any(), f"unwritten elements at {torch.nonzero(torch.isnan(out))[:5].tolist()}"
    assert np.array_equal(bits(out), bits(layer.run(x, logits, rw)))


def test_cpu_three_d_and_requires_grad():
    cfg = CONFIGS[0]
    kwargs, W, B = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits, _ = inputs(cfg)
    x3 = torch.from_numpy(np.concatenate([x, x[:1]]).reshape(2, 4, cfg.H)).requires_grad_()
    l2 = np.concatenate([logits, logits[:1]])
    out = layer.run(x3, torch.from_numpy(l2))
    assert tuple(out.shape) == (2, 4, cfg.H) and not out.requires_grad  # inference only: no autograd
    want = model_forward(cfg, W, B, x3.detach().numpy().reshape(8, -1), l2)
    assert rel_err(out.numpy().reshape(8, -1), want) <= 1e-5


def test_cpu_errors_name_the_argument():
    cfg = CONFIGS[0]
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits = (torch.from_numpy(a) for a in inputs(cfg)[:2])
    with pytest.raises(qmoe.Error, match="input: expected dtype float32, got float64"):
        layer.run(x.double(), logits)
    with pytest.raises(qmoe.Error, match="router_logits: expected dtype float32, got bfloat16"):
        layer.run(x, logits.bfloat16())
    with pytest.raises(qmoe.Error, match=r"input: expected a C-contiguous array, got shape \[7, 32\] with strides \[1, 7\]"):
        layer.run(x.t().contiguous().t(), logits)
    with pytest.raises(qmoe.Error, match="router_logits: expected a C-contiguous array"):
        layer.run(x, torch.zeros(cfg.rows, 2 * cfg.E)[:, ::2])
    with pytest.raises(qmoe.Error, match=r"out: expected shape \[7, 32\] \(the input's\), got \[7, 8\]"):
        layer.run(x, logits, out=torch.empty(cfg.rows, 8))
    with pytest.raises(qmoe.Error, match="out: expected dtype float32, got float16"):
        layer.run(x, logits, out=torch.empty(tuple(x.shape), dtype=torch.float16))
    with pytest.raises(qmoe.Error, match=r"router_probs: expected shape \[7, 4\], got \[7, 3\]"):
        layer.run(x, logits[:, :3].contiguous())
    with pytest.raises(TypeError, match="router_logits: expected a torch tensor like input, got ndarray"):
        layer.run(x, logits.numpy())
    with pytest.raises(TypeError, match="router_logits: a torch tensor, but input is a NumPy array"):
        layer.run(x.numpy(), logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_on_a_cpu_layer_is_an_error():
    cfg = CONFIGS[0]
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cpu", **kwargs)
    x, logits = (torch.from_numpy(a).cuda() for a in inputs(cfg)[:2])
    want = "was given to a layer on the 'cpu' backend" if qmoe.built_with_cuda else "built without CUDA"
    with pytest.raises(qmoe.Error, match=want):
        layer.run(x, logits)
    with pytest.raises(qmoe.Error, match="router_logits: on cpu, but input is on cuda:0"):
        layer.run(x, logits.cpu())


# ---------------------------------------------------------------- CUDA tensors
def l2_tol(dtype: str) -> float:
    uc = 2.0**-11 if dtype == "float16" else 2.0**-8
    if dtype == "float32":
        uc *= 2
    ut = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    return 1.2 * uc + ut


def rel_l2(got, want) -> float:
    d = np.asarray(got, np.float64) - want
    return float(np.linalg.norm(d) / max(np.linalg.norm(want), 1e-30))


def as_numpy(t, like: np.ndarray) -> np.ndarray:
    """A torch tensor's values as NumPy of `like`'s dtype (bfloat16 through its bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(like.dtype)
    return t.numpy()


@needs_cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_tensors_match_host_path_and_model(cfg):
    kwargs, W, B = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    assert layer.device == "cuda:0"
    x, logits, rw = inputs(cfg)
    host = layer.run(x, logits, rw)  # NumPy on a cuda layer: host copies, same kernels
    got = layer.run(to_torch(x, "cuda"), to_torch(logits, "cuda"), to_torch(rw, "cuda"))
    assert got.device.type == "cuda" and got.dtype == torch_dtype(cfg.dtype) and tuple(got.shape) == x.shape
    torch.cuda.synchronize()
    diff = np.argwhere(bits(got) != bits(host))
    assert diff.size == 0, f"{cfg}: device path differs from host path first at {diff[0].tolist()}"
    err, tol = rel_l2(as_numpy(got, x), model_forward(cfg, W, B, x, logits, rw)), l2_tol(cfg.dtype)
    assert err <= tol, f"{cfg}: relative L2 error {err:.3g} > {tol:.3g}"


def big_cfg() -> Cfg:
    return Cfg("cuda stream bf16", act="swiglu", fusion=1, dtype="bfloat16", scale_dtype="bfloat16", E=8, k=2,
               H=256, I=128, block=32, rows=64, seed=41)


@needs_cuda
def test_cuda_runs_on_the_current_stream_without_host_sync():
    cfg = big_cfg()
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    assert layer.reserve(cfg.rows) > 0  # growing the workspace synchronizes; do it up front
    x, logits, _ = inputs(cfg)
    want = bits(layer.run(x, logits))
    tx, tl = to_torch(x, "cuda"), to_torch(logits, "cuda")
    xs = torch.full_like(tx, float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spinning on s
        xs.copy_(tx)  # the input is ready only after the sleep, and only in s's order
        out = layer.run(xs, tl)
        returned_while_busy = not s.query()
    s.synchronize()
    assert returned_while_busy, "run() waited for the stream (host sync)"
    diff = np.argwhere(bits(out) != want)
    assert diff.size == 0, f"output differs at {diff[0].tolist()} (not ordered on the current stream?)"


@needs_cuda
def test_cuda_runs_on_two_streams_share_the_workspace_in_order():
    cfg = big_cfg()
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    batches = [inputs(dataclasses.replace(cfg, seed=s)) for s in range(6)]
    want = [bits(layer.run(x, lg)) for x, lg, _ in batches]
    dev = [(to_torch(x, "cuda"), to_torch(lg, "cuda")) for x, lg, _ in batches]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    outs = []
    for rep in range(4):
        for i, (x, lg) in enumerate(dev):
            with torch.cuda.stream(streams[i % 2]):
                if i == 0:
                    torch.cuda._sleep(20_000_000)
                outs.append((i, layer.run(x, lg)))
    torch.cuda.synchronize()
    for i, out in outs:
        diff = np.argwhere(bits(out) != want[i])
        assert diff.size == 0, f"batch {i}: differs at {diff[0].tolist()}"


@needs_cuda
def test_cuda_graph_capture_and_replay():
    cfg = big_cfg()
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    layer.reserve(cfg.rows)
    (x0, l0, _), (x1, l1, _) = inputs(cfg), inputs(dataclasses.replace(cfg, seed=77))
    sx, sl = to_torch(x0, "cuda"), to_torch(l0, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer.run(sx, sl)  # warm-up outside capture, as torch.cuda.graph expects
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sout = layer.run(sx, sl)
    for x, lg in ((x1, l1), (x0, l0)):
        sx.copy_(to_torch(x, "cuda"))
        sl.copy_(to_torch(lg, "cuda"))
        g.replay()
        torch.cuda.synchronize()
        want = bits(layer.run(x, lg))
        diff = np.argwhere(bits(sout) != want)
        assert diff.size == 0, f"replay differs at {diff[0].tolist()}"


@needs_cuda
def test_cuda_graph_capture_needs_a_reserved_workspace():
    cfg = big_cfg()
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    x, lg = (to_torch(a, "cuda") for a in inputs(cfg)[:2])
    g = torch.cuda.CUDAGraph()
    with pytest.raises(qmoe.Error, match=r"larger workspace.*layer.reserve\(64\)"):
        with torch.cuda.graph(g):
            layer.run(x, lg)


@needs_cuda
def test_cuda_out_and_errors():
    cfg = CONFIGS[10]  # bf16
    kwargs, _, _ = build(cfg)
    layer = qmoe.Layer(backend="cuda", **kwargs)
    x, logits, rw = (to_torch(a, "cuda") for a in inputs(cfg))
    out = torch.full(tuple(x.shape), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = layer.run(x, logits, rw, out=out)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(out).any()

    with pytest.raises(qmoe.Error, match="input: a CPU tensor was given to a layer on the cuda backend"):
        layer.run(x.cpu(), logits.cpu(), rw.cpu())
    with pytest.raises(qmoe.Error, match="router_weights: on cpu, but input is on cuda:0"):
        layer.run(x, logits, rw.cpu())
    with pytest.raises(qmoe.Error, match="out: on cpu, but input is on cuda:0"):
        layer.run(x, logits, rw, out=torch.empty(tuple(x.shape), dtype=torch.bfloat16))
    with pytest.raises(qmoe.Error, match=r"input: expected dtype bfloat16 .*got float32"):
        layer.run(x.float(), logits, rw)
    with pytest.raises(qmoe.Error, match="input: expected a C-contiguous array"):
        layer.run(torch.empty(cfg.H, cfg.rows, dtype=torch.bfloat16, device="cuda").t(), logits, rw)
    flat = torch.zeros(cfg.rows * cfg.H + 1, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(qmoe.Error, match="input: device address is not 16-byte aligned"):
        layer.run(flat[1:].view(cfg.rows, cfg.H), logits, rw)
    # Zero rows: an empty tensor back, nothing launched.
    assert tuple(layer.run(x[:0], logits[:0], rw[:0]).shape) == (0, cfg.H)
