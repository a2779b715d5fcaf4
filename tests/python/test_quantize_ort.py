"""qmoe.quantize against ONNX Runtime's quantize_matmul_{2,4,8}bits (contract §6): identical bytes.

Codes, scales (compared as bit patterns, so -0.0 != 0.0) and zero points must match exactly for bits
2/4/8, symmetric and asymmetric, blocks 16..256, fp32 and fp16 weights (ORT stores scales in the
weights' dtype), on random matrices with planted edge cases: an all-zero block, a block whose |max|
equals |min|, a block of values on a coarse grid (many exact round-half ties), K not a multiple of
the block. Row-wise quantization (block_size=0) is compared with ORT at block = K, with qmoe's
zero points packed along N (contract §5.3) unpacked first.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

# The module is built by `pip install .` or by CMake with -DQMOE_PYTHON=ON (then PYTHONPATH=<build>/python).
# Where it is absent these tests skip instead of stopping the collection of the CLI tests beside them;
# a module that is present but broken still fails loudly at the import below.
if importlib.util.find_spec("qmoe") is None:
    pytest.skip("the qmoe Python module is not built (pip install . or -DQMOE_PYTHON=ON)", allow_module_level=True)
import qmoe  # noqa: E402

BLOCKS = [16, 32, 64, 128, 256]


def make_matrix(seed: int, n: int, k: int, block: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 3.0, size=(n, 1))
    nb = -(-k // block)
    w[1 % n, :block] = 0.0                                    # all-zero block
    t0 = (nb - 1) * block                                     # tie |max| == |min| in the last block
    w[2 % n, t0:k] = rng.uniform(-0.5, 0.5, k - t0)
    w[2 % n, t0] = 0.75
    w[2 % n, min(t0 + 1, k - 1)] = -0.75
    w[3 % n, :] = rng.integers(-16, 17, k) / 8.0              # grid values: exact halves after scaling
    w[4 % n, block:] = np.abs(w[4 % n, block:])               # positive-only blocks: zero point 0
    return w.astype(dtype)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)


def bits_of(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


def assert_same(name: str, got: np.ndarray, want: np.ndarray, ctx: str) -> None:
    assert got.shape == want.shape, f"{ctx}: {name} shape {got.shape}, ORT {want.shape}"
    bad = np.argwhere(got != want)
    if bad.size:
        i = tuple(bad[0])
        raise AssertionError(f"{ctx}: {name} differs at {len(bad)} places; first {i}: qmoe {got[i]!r}, ORT {want[i]!r}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_block_wise_matches_ort(ort_quantize, bits, block, symmetric, dtype):
    for j, (n, k) in enumerate([(7, 3 * block), (6, 2 * block + 12), (5, 16 + (block // 2 if block > 16 else 0))]):
        seed = 1000 * bits + 10 * block + 2 * j + int(symmetric)
        ctx = f"seed={seed} bits={bits} block={block} {'sym' if symmetric else 'asym'} {np.dtype(dtype).name} N={n} K={k}"
        w = make_matrix(seed, n, k, block, dtype)
        q, s, z = qmoe.quantize(w, bits=bits, block_size=block, symmetric=symmetric)
        oq, os_, oz = ort_quantize(w, bits, block, symmetric)
        assert s.dtype == w.dtype, ctx
        assert_same("codes", q, oq, ctx)
        assert_same("scale bits", bits_of(s), bits_of(os_), ctx)
        if symmetric:
            assert z is None, ctx
        else:
            assert_same("zero points", z, oz, ctx)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_row_wise_matches_ort_at_block_k(ort_quantize, bits, symmetric, dtype):
    for k in (16, 64, 256):
        n = 11  # not a multiple of 2 or 4: the last row-wise zero-point byte is partly padding
        seed = 7 * k + bits
        ctx = f"seed={seed} bits={bits} row-wise {'sym' if symmetric else 'asym'} {np.dtype(dtype).name} N={n} K={k}"
        w = make_matrix(seed, n, k, k, dtype)
        q, s, z = qmoe.quantize(w, bits=bits, block_size=0, symmetric=symmetric)
        oq, os_, oz = ort_quantize(w, bits, k, symmetric)
        assert s.shape == (n,), ctx
        assert_same("codes", q, oq, ctx)
        assert_same("scale bits", bits_of(s), bits_of(os_[:, 0]), ctx)
        if not symmetric:
            pack = 8 // bits
            assert z.shape == (-(-n // pack),), ctx
            zu = unpack(z, bits)
            assert_same("zero points", zu[:n], oz[:, 0] & ((1 << bits) - 1), ctx)
            assert np.all(zu[n:] == 1 << (bits - 1)), f"{ctx}: padding slots {zu[n:]} should hold 2^(bits-1)"


def test_experts_match_ort_per_expert(ort_quantize):
    w = np.random.default_rng(5).standard_normal((3, 8, 96)).astype(np.float32)
    q, s, z = qmoe.quantize(w, bits=4, block_size=32, symmetric=False)
    assert q.shape == (3, 8, 48) and s.shape == (3, 8, 3) and z.shape == (3, 8, 2)
    for e in range(3):
        oq, os_, oz = ort_quantize(w[e], 4, 32, False)
        ctx = f"seed=5 expert {e}"
        assert_same("codes", q[e], oq, ctx)
        assert_same("scale bits", bits_of(s[e]), bits_of(os_), ctx)
        assert_same("zero points", z[e], oz, ctx)


def test_scale_dtype_and_dequantize_round_trip():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 80)).astype(np.float32)
    for sd in ("float32", "float16", np.float16):
        q, s, z = qmoe.quantize(w, bits=8, block_size=16, symmetric=False, scale_dtype=sd)
        assert s.dtype == np.dtype(sd), sd
        d = qmoe.dequantize(q, s, z, bits=8, block_size=16)
        assert d.dtype == np.float32 and d.shape == w.shape
        # unclamped codes are within half a scale; asymmetric clamping adds at most half a code plus the
        # fp16 rounding of the scale times 2^bits codes (see tests/cpp/quantize_test.cpp)
        step = np.repeat(np.abs(s.astype(np.float32)), 16, axis=1)[:, :80]
        eps = 2.0**-11 if np.dtype(sd) == np.float16 else 2.0**-24
        assert np.all(np.abs(d - w) <= step * (0.5 + 256 * eps) + 1e-6), sd


def test_bfloat16_via_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.random.default_rng(3).standard_normal((4, 32)).astype(ml_dtypes.bfloat16)
    q, s, z = qmoe.quantize(w, bits=4, block_size=16)
    assert s.dtype == ml_dtypes.bfloat16 and z is None
    # Same bytes as quantizing the exactly representable fp32 values with bf16 scales.
    q2, s2, _ = qmoe.quantize(w.astype(np.float32), bits=4, block_size=16, scale_dtype="bfloat16")
    assert np.array_equal(q, q2) and np.array_equal(s.view(np.uint16), s2.view(np.uint16))
    d = qmoe.dequantize(q, s, bits=4, block_size=16)
    assert np.all(np.abs(d - w.astype(np.float32)) <= np.repeat(np.abs(s.astype(np.float32)), 16, axis=1) * 1.01)


def test_errors_are_value_errors_naming_the_problem():
    w = np.ones((4, 16), np.float32)
    with pytest.raises(qmoe.Error, match="bits must be 2, 4 or 8, got 3"):
        qmoe.quantize(w, bits=3)
    with pytest.raises(ValueError, match="power of two >= 16, got 48"):
        qmoe.quantize(w, block_size=48)
    with pytest.raises(qmoe.Error, match="w: expected dtype float32, float16 or bfloat16, got int64"):
        qmoe.quantize(np.ones((4, 16), np.int64))
    with pytest.raises(qmoe.Error, match="multiple of 4"):
        qmoe.quantize(np.ones((4, 6), np.float32), bits=2)
    w[2, 3] = np.nan
    with pytest.raises(qmoe.Error, match="row 2, column 3"):
        qmoe.quantize(w)
    q, s, _ = qmoe.quantize(np.ones((4, 16), np.float32))
    with pytest.raises(qmoe.Error, match=r"dequantize_matrix: scales: expected shape \[4, 1\], got \[4\]"):
        qmoe.dequantize(q, s, bits=4, block_size=16)


def test_non_contiguous_input_is_copied_not_misread():
    w = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    q1, s1, _ = qmoe.quantize(w.T, bits=4)  # a transposed view
    q2, s2, _ = qmoe.quantize(np.ascontiguousarray(w.T), bits=4)
    assert np.array_equal(q1, q2) and np.array_equal(s1, s2)
