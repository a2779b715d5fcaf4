"""Shared fixtures of the Python tests: ONNX Runtime's quantizer as a function of a [N, K] matrix."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def ort_quantize():
    """ORT's quantize_matmul_{bits}bits on w [N, K] (fp32 or fp16), block-wise.

    Returns (codes [N, K*bits/8] uint8, scales [N, nb] in w's dtype, zero points [N, ceil(nb*bits/8)]
    or None). ORT takes the matrix transposed ([K, N]) and writes [N, nb, block*bits/8] bytes; the
    bytes past K in the last block are padding and are cut off here.
    """
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")

    def run(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
        n, k = w.shape
        pack = 8 // bits
        nb = -(-k // block_size)
        q = np.zeros((n, nb, block_size // pack), np.uint8)
        s = np.zeros((n, nb), w.dtype)
        z = np.zeros((n, -(-nb // pack)), np.uint8)
        fn = getattr(pybind, f"quantize_matmul_{bits}bits")
        fn(q, np.ascontiguousarray(w.T), s, z, block_size, n, k, symmetric)
        return q.reshape(n, -1)[:, : k // pack], s, None if symmetric else z

    return run
