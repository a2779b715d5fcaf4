# Type stub of the C++ extension qmoe._qmoe (python/qmoe_ext.cpp). Users call the wrappers in
# qmoe/__init__.py; these signatures are what the wrappers pass (bfloat16 travels as uint16 bits).
from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

class Error(ValueError): ...

class Spec:
    num_experts: int
    hidden: int
    inter: int
    k: int
    bits: int
    block_size: int
    activation: str
    swiglu_fusion: int
    swiglu_limit: float
    activation_alpha: float
    activation_beta: float
    normalize_routing_weights: bool
    use_sparse_mixer: bool
    dtype: str
    scale_dtype: str
    fc1_bias: bool
    fc2_bias: bool
    fc3_bias: bool
    fc1_zero_points: bool
    fc2_zero_points: bool
    fc3_zero_points: bool
    def __init__(self) -> None: ...
    def validate(self) -> None: ...

class _Layer:
    @staticmethod
    def from_arrays(
        spec: Spec, arrays: dict[str, npt.ArrayLike], backend: str = "auto", prepack: bool = True, threads: int = 0
    ) -> _Layer: ...
    @staticmethod
    def from_onnx(
        path: str, backend: str = "auto", layout: str = "detect", prepack: bool = True, threads: int = 0
    ) -> _Layer: ...
    def run(
        self, x: npt.ArrayLike, router_logits: npt.ArrayLike, router_weights: Optional[npt.ArrayLike] = None
    ) -> np.ndarray: ...
    @property
    def spec(self) -> Spec: ...
    @property
    def backend(self) -> str: ...
    @property
    def layout(self) -> str: ...
    @property
    def resident_bytes(self) -> int: ...
    @property
    def source(self) -> str: ...

def quantize(
    w: npt.ArrayLike, w_dtype: str, bits: int, block_size: int, symmetric: bool, scale_dtype: str
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]: ...
def dequantize(
    weights: npt.ArrayLike,
    scales: npt.ArrayLike,
    scale_dtype: str,
    zero_points: Optional[npt.ArrayLike],
    bits: int,
    block_size: int,
) -> np.ndarray: ...
def available_backends() -> list[str]: ...
