"""qmoe: quantized Mixture-of-Experts layers (ONNX Runtime's ``com.microsoft::QMoE`` operator).

All computation happens in the C++ library (``qmoe._qmoe``); this file only turns Python arguments
into the arrays and names the extension takes:

* ``quantize`` / ``dequantize``: the raw QMoE weight format, byte-identical to ONNX Runtime's
  ``quantize_matmul_{2,4,8}bits`` (contract §5-6).
* ``Layer``: a QMoE layer built from raw arrays, an ONNX file, a packed file or a Hugging Face
  checkpoint; ``run`` returns an array of the input's kind, dtype and device.
* ``available_backends()``: the backends usable here, best first ("cuda" only with a GPU).
* ``Error``: raised for every invalid argument (a ``ValueError``); the message names the tensor or
  attribute with the expected and actual values.

Weights may be NumPy arrays (float32, float16, ``ml_dtypes.bfloat16``) or torch tensors (copied to
host). ``Layer.run`` takes NumPy arrays or torch tensors zero-copy (docs/PYTHON.md): NumPy in,
NumPy out; torch in, torch out on the same device, CUDA tensors on the current CUDA stream.
bfloat16 NumPy arrays cross into C++ as uint16 bit patterns, because NumPy has no bfloat16 of its own.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _qmoe
from ._qmoe import Error, Spec, available_backends, built_with_cuda

__all__ = ["Error", "Layer", "Spec", "available_backends", "built_with_cuda", "dequantize", "quantize"]


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "detach")


def _to_numpy(a: Any) -> Tuple[np.ndarray, str]:
    """Returns (array for the extension, declared dtype name or '' when the array says it)."""
    if _is_torch(a):
        import torch

        t = a.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        return t.numpy(), ""
    arr = np.asarray(a)
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return arr.view(np.uint16), "bfloat16"
    return arr, ""


def _dtype_name(x: Any) -> str:
    """'float32', 'float16' or 'bfloat16' from a string, NumPy/ml_dtypes dtype or torch dtype."""
    if isinstance(x, str):
        return x
    s = str(x)
    if s.startswith("torch."):
        return s[len("torch."):]
    return np.dtype(x).name


def _bf16_view(a: np.ndarray) -> np.ndarray:
    """Shows uint16 bfloat16 bits as ml_dtypes.bfloat16 when ml_dtypes is installed."""
    try:
        import ml_dtypes
    except ImportError:
        return a
    return a.view(ml_dtypes.bfloat16)


def quantize(
    w: Any,
    bits: int = 4,
    block_size: int = 0,
    symmetric: bool = True,
    scale_dtype: Any = None,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Quantizes float weights [N, K] (PyTorch ``Linear.weight``) or [E, N, K] to the raw format.

    Returns ``(weights, scales, zero_points)``: uint8 codes [.., N, K*bits/8]; scales [.., N]
    (``block_size=0``, one per row) or [.., N, ceil(K/block_size)]; zero points (only when
    ``symmetric=False``) [.., ceil(N*bits/8)] row-wise or [.., N, ceil(nb*bits/8)] block-wise, else
    None. ``scale_dtype`` defaults to the weights' dtype, as in ONNX Runtime.
    """
    arr, declared = _to_numpy(w)
    sd = "" if scale_dtype is None else _dtype_name(scale_dtype)
    q, s, z = _qmoe.quantize(arr, declared, int(bits), int(block_size), bool(symmetric), sd)
    if (sd or declared or arr.dtype.name) == "bfloat16":
        s = _bf16_view(s)
    return q, s, z


def dequantize(
    weights: Any,
    scales: Any,
    zero_points: Any = None,
    *,
    bits: int = 4,
    block_size: int = 0,
    scale_dtype: Any = None,
) -> np.ndarray:
    """float32 [.., N, K] from raw weights: ``scale * (code - zero_point)`` (zero point 2^(bits-1)
    when ``zero_points`` is None). ``scale_dtype`` is needed only for uint16 bit-pattern scales."""
    s, declared = _to_numpy(scales)
    sd = _dtype_name(scale_dtype) if scale_dtype is not None else declared
    z = None if zero_points is None else _to_numpy(zero_points)[0]
    return _qmoe.dequantize(_to_numpy(weights)[0], s, sd, z, int(bits), int(block_size))


_ARRAY_NAMES = tuple(f"fc{i}_{part}" for i in (1, 2, 3) for part in ("weights", "scales", "zero_points", "bias"))


def _options(backend: str, prepack: bool, threads: int, chunk_rows: int, cuda_gemm: str, cpu_compute: str) -> Any:
    """How a layer is built (qmoe/layer.h LayerOptions): ``threads``, ``chunk_rows`` (tokens per
    chunk of a run, bounding its scratch memory; 0 = as many as fit 256 MiB) and ``cpu_compute``
    ("exact"; "bf16": activations rounded to bf16; "int8": activations quantized to int8 per row;
    the last two are accuracy options for prefill, docs/DESIGN.md "Numerics"; "int8x3": activations as
    three or four int8 digits on AMX tile multiplies, fp32-level accuracy) apply to
    the CPU backend, ``cuda_gemm`` ("auto", "sm80" or "sm90") to the CUDA backend's FC kernels."""
    o = _qmoe._LayerOptions()
    o.backend = str(backend)
    o.prepack = bool(prepack)
    o.threads = int(threads)
    o.chunk_rows = int(chunk_rows)
    o.cuda_gemm = str(cuda_gemm)
    o.cpu_compute = str(cpu_compute)
    return o


class Layer:
    """A QMoE layer ready to run.

    ``Layer(fc1_weights=..., fc1_scales=..., fc2_weights=..., fc2_scales=..., **attributes)`` builds one
    from raw arrays (contract §5; optional ``fc3_*`` for SwiGLU with ``swiglu_fusion=0``,
    ``fc*_bias`` and ``fc*_zero_points``). Attributes are the ONNX node's: ``k``, ``activation``,
    ``bits``, ``block_size``, ``swiglu_fusion``, ``swiglu_limit``, ``activation_alpha``,
    ``activation_beta``, ``normalize_routing_weights``, ``use_sparse_mixer``; ``dtype`` is T (input,
    router logits, biases, output; default float32) and ``scale_dtype`` is T2 (default: fc1_scales'
    dtype). E, H and I follow from the weight shapes unless given as ``num_experts``, ``hidden``,
    ``inter``. ``backend`` is "auto", "cpu", "cuda" or "reference".
    """

    _impl: Any  # qmoe._qmoe._Layer

    def __init__(
        self,
        *,
        k: int = 1,
        activation: str = "relu",
        bits: int = 4,
        block_size: int = 0,
        swiglu_fusion: int = 0,
        swiglu_limit: float = math.inf,
        activation_alpha: float = 1.0,
        activation_beta: float = 0.0,
        normalize_routing_weights: bool = False,
        use_sparse_mixer: bool = False,
        dtype: Any = "float32",
        scale_dtype: Any = None,
        num_experts: Optional[int] = None,
        hidden: Optional[int] = None,
        inter: Optional[int] = None,
        backend: str = "auto",
        prepack: bool = True,
        threads: int = 0,
        chunk_rows: int = 0,
        cuda_gemm: str = "auto",
        cpu_compute: str = "exact",
        **arrays: Any,
    ) -> None:
        unknown = sorted(set(arrays) - set(_ARRAY_NAMES))
        if unknown:
            raise TypeError(f"Layer: unexpected keyword argument(s) {unknown}")
        for name in ("fc1_weights", "fc1_scales", "fc2_weights", "fc2_scales"):
            if arrays.get(name) is None:
                raise TypeError(f"Layer: missing required array {name}")
        conv = {name: _to_numpy(a) for name, a in arrays.items() if a is not None}
        spec = Spec()
        pack = 8 // bits if bits in (2, 4, 8) else 1  # a bad value is reported by spec.validate()
        w1, w2 = conv["fc1_weights"][0], conv["fc2_weights"][0]
        spec.num_experts = int(num_experts if num_experts is not None else w1.shape[0])
        spec.hidden = int(hidden if hidden is not None else w1.shape[-1] * pack)
        spec.inter = int(inter if inter is not None else w2.shape[-1] * pack)
        spec.k = int(k)
        spec.bits = int(bits)
        spec.block_size = int(block_size)
        spec.activation = activation
        spec.swiglu_fusion = int(swiglu_fusion)
        spec.swiglu_limit = float(swiglu_limit)
        spec.activation_alpha = float(activation_alpha)
        spec.activation_beta = float(activation_beta)
        spec.normalize_routing_weights = bool(normalize_routing_weights)
        spec.use_sparse_mixer = bool(use_sparse_mixer)
        spec.dtype = _dtype_name(dtype)
        s1, s1_declared = conv["fc1_scales"]
        spec.scale_dtype = _dtype_name(scale_dtype) if scale_dtype is not None else (s1_declared or s1.dtype.name)
        for i in (1, 2, 3):
            setattr(spec, f"fc{i}_bias", f"fc{i}_bias" in conv)
            setattr(spec, f"fc{i}_zero_points", f"fc{i}_zero_points" in conv)
        self._impl = _qmoe._Layer.from_arrays(
            spec, {name: a for name, (a, _) in conv.items()},
            _options(backend, prepack, threads, chunk_rows, cuda_gemm, cpu_compute))

    @classmethod
    def from_onnx(
        cls, path: Any, backend: str = "auto", layout: str = "detect", prepack: bool = True, threads: int = 0,
        chunk_rows: int = 0, cuda_gemm: str = "auto", cpu_compute: str = "exact",
    ) -> "Layer":
        """Loads the single com.microsoft::QMoE node of an ONNX file (external data allowed).
        ``layout`` is "detect", "raw" or "ort_cuda" (contract §7)."""
        return cls._wrap(_qmoe._Layer.from_onnx(
            str(path), layout, _options(backend, prepack, threads, chunk_rows, cuda_gemm, cpu_compute)))

    @classmethod
    def from_packed(
        cls, path: Any, backend: str = "auto", threads: int = 0, chunk_rows: int = 0, cuda_gemm: str = "auto",
        cpu_compute: str = "exact",
    ) -> "Layer":
        """Loads a packed file written by ``qmoe pack`` without repacking. The file's layout must be
        the one ``backend`` packs on this machine ("auto": the best backend present, as in ``qmoe
        run``); otherwise the error names both layouts and the ``qmoe pack --target`` to use."""
        return cls._wrap(_qmoe._Layer.from_packed(str(path), _options(backend, True, threads, chunk_rows, cuda_gemm, cpu_compute)))

    @classmethod
    def from_checkpoint(
        cls,
        path: Any,
        layer: int,
        bits: int = 4,
        block_size: int = 128,
        symmetric: bool = True,
        backend: str = "auto",
        *,
        dtype: Any = "float32",
        scale_dtype: Any = None,
        swiglu_fusion: int = 1,
        k: Optional[int] = None,
        normalize_routing_weights: Optional[bool] = None,
        prepack: bool = True,
        threads: int = 0,
        chunk_rows: int = 0,
        cuda_gemm: str = "auto",
        cpu_compute: str = "exact",
    ) -> "Layer":
        """Quantizes the routed experts of decoder layer ``layer`` of a Hugging Face checkpoint (a
        folder, a ``.safetensors`` file or a ``model.safetensors.index.json``; the model families of
        docs/CHECKPOINTS.md), as ``qmoe quantize`` does, and packs them for ``backend``.

        ``dtype`` is the layer's T (input, output, biases); ``scale_dtype`` its T2 (default: ``dtype``).
        SwiGLU experts are stored with ``swiglu_fusion`` 1 (interleaved, ONNX Runtime CPU's mode), 2
        (concatenated) or 0 (separate fc3). ``k`` and ``normalize_routing_weights`` come from the
        folder's config.json; pass them when it has none (qmoe never guesses them). ``metadata``
        holds the source facts (family, tensor names, notes on routing QMoE does not compute)."""
        sd = "" if scale_dtype is None else _dtype_name(scale_dtype)
        impl = _qmoe._Layer.from_checkpoint(
            str(path), int(layer), int(bits), int(block_size), bool(symmetric), _dtype_name(dtype), sd,
            int(swiglu_fusion), None if k is None else int(k),
            None if normalize_routing_weights is None else bool(normalize_routing_weights),
            _options(backend, prepack, threads, chunk_rows, cuda_gemm, cpu_compute))
        return cls._wrap(impl)

    @classmethod
    def _wrap(cls, impl: Any) -> "Layer":
        self = cls.__new__(cls)
        self._impl = impl
        return self

    @property
    def spec(self) -> Spec:
        return self._impl.spec

    @property
    def backend(self) -> str:
        return self._impl.backend

    @property
    def device(self) -> str:
        """Where the packed weights live and where torch tensors for ``run`` must be: "cpu" or
        "cuda:0" (a cuda layer also takes NumPy arrays, through host copies)."""
        return "cuda:0" if self._impl.backend == "cuda" else "cpu"

    @property
    def layout(self) -> str:
        return self._impl.layout

    @property
    def resident_bytes(self) -> int:
        return self._impl.resident_bytes

    @property
    def source(self) -> str:
        return self._impl.source

    @property
    def metadata(self) -> Dict[str, str]:
        return dict(self._impl.metadata)

    def save_packed(self, path: Any) -> None:
        """Writes the packed weights to ``path`` (as ``qmoe pack`` does; atomically, no partial file on
        failure) for ``Layer.from_packed`` on a machine with the same backend and layout."""
        self._impl.save_packed(str(path))

    def reserve(self, rows: int) -> int:
        """Grows a cuda layer's device workspace for runs of up to ``rows`` tokens and returns its
        size in bytes (0 on other backends). Call it before capturing ``run`` in a CUDA graph: no
        allocation may happen during capture."""
        return self._impl.reserve(int(rows))

    def run(self, x: Any, router_logits: Any, router_weights: Any = None, *, out: Any = None) -> Any:
        """Output of the layer for ``x`` [rows, H] or [B, S, H] and router logits [rows, E] (and
        optional ``router_weights`` [rows, E], contract input 14), all of dtype T, C-contiguous.

        NumPy arrays give a NumPy array (on a cuda layer through host copies, synchronously).
        torch tensors give a torch tensor on the same device: CPU tensors on a CPU layer, CUDA
        tensors on a cuda layer, run on ``torch.cuda.current_stream()`` without a host sync.
        Nothing is copied or converted: a wrong dtype, device or layout is an ``Error``. ``out``
        (same kind, device, dtype and shape as ``x``) receives the result instead of a new array.
        """
        if _is_torch(x):
            return self._run_torch(x, router_logits, router_weights, out)
        return self._run_numpy(x, router_logits, router_weights, out)

    def _run_numpy(self, x: Any, router_logits: Any, router_weights: Any, out: Any) -> np.ndarray:
        for name, a in (("router_logits", router_logits), ("router_weights", router_weights), ("out", out)):
            if _is_torch(a):
                raise TypeError(f"{name}: a torch tensor, but input is a NumPy array (pass all of one kind)")
        xa = _run_array(x)
        ra = _run_array(router_logits)
        wa = None if router_weights is None else _run_array(router_weights)
        if out is None:
            oa = np.empty(xa.shape, xa.dtype)
        else:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out: expected a NumPy array like input, got {type(out).__name__}")
            if not out.flags.writeable:
                raise Error("out: the array is read-only")
            oa = _run_array(out)
        self._impl.run(xa, ra, wa, oa, 0)
        if out is not None:
            return out
        return _bf16_view(oa) if self.spec.dtype == "bfloat16" else oa

    def _run_torch(self, x: Any, router_logits: Any, router_weights: Any, out: Any) -> Any:
        import torch

        named = (("router_logits", router_logits), ("router_weights", router_weights), ("out", out))
        for name, a in named:
            if a is None:
                continue
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{name}: expected a torch tensor like input, got {type(a).__name__}")
            if a.device != x.device:  # checked here: torch refuses to export a tensor of another GPU
                raise Error(f"{name}: on {a.device}, but input is on {x.device} (all arrays of one run share a device)")
        if x.device.type == "cpu" and self.backend == "cuda":
            # The binding could copy host tensors through (as it does NumPy arrays), but a CPU tensor
            # given to a GPU layer is almost always a forgotten .cuda(): refuse it rather than copy.
            raise Error("input: a CPU tensor was given to a layer on the cuda backend; move it with "
                        ".to('cuda') (or build the layer with backend='cpu')")
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        args = [x, router_logits, router_weights, out]
        if x.device.type != "cuda":
            self._impl.run(*[None if a is None else a.detach() for a in args], 0)
            return out
        with torch.cuda.device(x.device):
            # stream=-1: no synchronization with the legacy default stream (torch's default for
            # stream=None), which would also be illegal while a CUDA graph is being captured. The
            # run itself is ordered on the current stream, like any torch operation.
            caps = [None if a is None else a.detach().__dlpack__(stream=-1) for a in args]
            self._impl.run(*caps, torch.cuda.current_stream().cuda_stream)
        return out

    def __repr__(self) -> str:
        return f"qmoe.Layer({self.spec!r}, backend={self.backend!r}, layout={self.layout!r})"


def _run_array(a: Any) -> np.ndarray:
    """A host array for Layer.run as it is (no copy); ml_dtypes.bfloat16 viewed as uint16 bits."""
    arr = np.asarray(a)
    return arr.view(np.uint16) if arr.dtype.name == "bfloat16" else arr
