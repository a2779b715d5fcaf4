"""qmoe: quantized Mixture-of-Experts layers (ONNX Runtime's ``com.microsoft::QMoE`` operator).

All computation happens in the C++ library (``qmoe._qmoe``); this file only turns Python arguments
into the arrays and names the extension takes:

* ``quantize`` / ``dequantize``: the raw QMoE weight format, byte-identical to ONNX Runtime's
  ``quantize_matmul_{2,4,8}bits`` (contract §5-6).
* ``Layer``: a QMoE layer built from raw arrays or loaded from an ONNX file; ``run`` returns an array
  of the input's dtype.
* ``Error``: raised for every invalid argument (a ``ValueError``); the message names the tensor or
  attribute with the expected and actual values.

Arrays may be NumPy arrays (float32, float16, ``ml_dtypes.bfloat16``) or torch tensors (moved to
host). bfloat16 crosses into C++ as uint16 bit patterns, because NumPy has no bfloat16 of its own.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from . import _qmoe
from ._qmoe import Error, Spec, available_backends

__all__ = ["Error", "Layer", "Spec", "available_backends", "dequantize", "quantize"]


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
            spec, {name: a for name, (a, _) in conv.items()}, backend, bool(prepack), int(threads))

    @classmethod
    def from_onnx(
        cls, path: str, backend: str = "auto", layout: str = "detect", prepack: bool = True, threads: int = 0
    ) -> "Layer":
        """Loads the single com.microsoft::QMoE node of an ONNX file (external data allowed).
        ``layout`` is "detect", "raw" or "ort_cuda" (contract §7)."""
        self = cls.__new__(cls)
        self._impl = _qmoe._Layer.from_onnx(str(path), backend, layout, bool(prepack), int(threads))
        return self

    @property
    def spec(self) -> Spec:
        return self._impl.spec

    @property
    def backend(self) -> str:
        return self._impl.backend

    @property
    def layout(self) -> str:
        return self._impl.layout

    def run(self, x: Any, router_logits: Any, router_weights: Any = None) -> Any:
        """Output of the layer for ``x`` [rows, H] or [B, S, H] and router logits [rows, E]; the
        result has x's shape and dtype (a torch tensor when x is one)."""
        xa, _ = _to_numpy(x)
        ra, _ = _to_numpy(router_logits)
        wa = None if router_weights is None else _to_numpy(router_weights)[0]
        out = self._impl.run(xa, ra, wa)
        if _is_torch(x):
            import torch

            t = torch.from_numpy(out)
            return t.view(torch.bfloat16) if self.spec.dtype == "bfloat16" else t
        if self.spec.dtype == "bfloat16":
            return _bf16_view(out)
        return out

    def __repr__(self) -> str:
        return f"qmoe.Layer({self.spec!r}, backend={self.backend!r}, layout={self.layout!r})"
