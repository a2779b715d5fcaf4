# Type stub of the C++ extension qmoe._qmoe (python/qmoe_ext.cpp). Users call the wrappers in
# qmoe/__init__.py; these signatures are what the wrappers pass (bfloat16 NumPy arrays travel as
# uint16 bits). `run` takes NumPy arrays, DLPack producers or DLPack capsules as they are.
from typing import Any, Optional, Tuple

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

class _LayerOptions:
    backend: str
    prepack: bool
    threads: int
    chunk_rows: int
    cuda_gemm: str
    cpu_compute: str
    def __init__(self) -> None: ...

class _Layer:
    @staticmethod
    def from_arrays(spec: Spec, arrays: dict[str, npt.ArrayLike], options: _LayerOptions) -> _Layer: ...
    @staticmethod
    def from_onnx(path: str, layout: str, options: _LayerOptions) -> _Layer: ...
    @staticmethod
    def from_packed(path: str, options: _LayerOptions) -> _Layer: ...
    @staticmethod
    def from_checkpoint(
        path: str,
        layer: int,
        bits: int,
        block_size: int,
        symmetric: bool,
        dtype: str,
        scale_dtype: str,
        swiglu_fusion: int,
        k: Optional[int],
        normalize_routing_weights: Optional[bool],
        options: _LayerOptions,
    ) -> _Layer: ...
    def run(self, x: Any, router_logits: Any, router_weights: Optional[Any], out: Any, stream: int = 0) -> None: ...
    def reserve(self, rows: int) -> int: ...
    def save_packed(self, path: str) -> None: ...
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
    @property
    def metadata(self) -> dict[str, str]: ...

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

built_with_cuda: bool
