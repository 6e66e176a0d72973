"""rnnops.interop: DLPack arrays in, the same kind of arrays out, without copies."""
import numpy as np
import pytest
import torch

import rnnops
from rnnops import interop


def test_numpy_in_numpy_out_matches_torch():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 9, 3, 8), dtype=np.float32), rng.standard_normal((2, 9, 3, 8), dtype=np.float32)
    v = rng.standard_normal((2, 9, 3, 4), dtype=np.float32)
    o, state = interop.linear_attn(q, k, v, output_final_state=True)
    assert isinstance(o, np.ndarray) and isinstance(state, np.ndarray) and o.dtype == np.float32
    expected, expected_state = rnnops.linear_attn(*(torch.from_numpy(x) for x in (q, k, v)), output_final_state=True)
    np.testing.assert_allclose(o, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state, expected_state.numpy(), rtol=1e-6)


def test_inputs_are_viewed_not_copied(monkeypatch):
    seen = []
    original = rnnops.selective_scan

    def spy(u, *args, **kwargs):
        seen.append(u.data_ptr())
        return original(u, *args, **kwargs)

    monkeypatch.setattr(rnnops, "selective_scan", spy)
    monkeypatch.setattr(interop, "selective_scan", interop._wrap("selective_scan"))
    u = np.random.default_rng(1).standard_normal((1, 5, 4))
    y = interop.selective_scan(u, u.copy(), -np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 2)))
    assert seen == [u.ctypes.data] and isinstance(y, np.ndarray) and y.shape == (1, 5, 4)


def test_integer_arrays_are_refused_by_name():
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        interop.linear_attn(np.ones((1, 2, 1, 4), dtype=np.int64), np.ones((1, 2, 1, 4)), np.ones((1, 2, 1, 4)))


def test_unsupported_devices_are_refused_by_name():
    class Elsewhere:
        def __dlpack__(self, stream=None):
            raise AssertionError("must not be read")

        def __dlpack_device__(self):
            return (8, 0)  # Metal

    with pytest.raises(ValueError, match="linear_attn: q lives on DLPack device type 8"):
        interop.linear_attn(Elsewhere(), np.ones((1, 2, 1, 4)), np.ones((1, 2, 1, 4)))


@pytest.mark.gpu
def test_cupy_round_trip():
    cupy = pytest.importorskip("cupy")
    q = cupy.random.standard_normal((1, 8, 2, 16), dtype=cupy.float32)
    o, _ = interop.linear_attn(q, q, q)
    assert isinstance(o, cupy.ndarray) and o.shape == (1, 8, 2, 16)


@pytest.mark.gpu
def test_jax_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    q = jnp.ones((1, 8, 2, 16), dtype=jnp.float32)
    o, _ = interop.linear_attn(q, q, q)
    assert type(o).__module__.startswith("jax") and o.shape == (1, 8, 2, 16)
