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


def _round_trip(to_array, to_numpy, device: str):
    """interop.linear_attn on arrays made by ``to_array`` (from NumPy) against rnnops.linear_attn
    on torch tensors of the same random values: the arrays come back as the same kind, with the
    same values (float32: 1e-6 on the CPU, where both run the same kernels; 1e-4 on a GPU)."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 40, 2, 16), dtype=np.float32) for _ in range(3))
    arrays = [to_array(x) for x in (q, k, v)]
    o, state = interop.linear_attn(*arrays, output_final_state=True)
    assert type(o) is type(arrays[0]) and type(state) is type(arrays[0])
    expected, expected_state = rnnops.linear_attn(*(torch.from_numpy(x).to(device) for x in (q, k, v)),
                                                  output_final_state=True)
    bound = 1e-6 if device == "cpu" else 1e-4
    np.testing.assert_allclose(to_numpy(o), expected.cpu().numpy(), rtol=bound, atol=bound)
    np.testing.assert_allclose(to_numpy(state), expected_state.cpu().numpy(), rtol=bound, atol=bound)


@pytest.mark.gpu
def test_cupy_round_trip():
    cupy = pytest.importorskip("cupy")
    _round_trip(cupy.asarray, cupy.asnumpy, "cuda")


def _jax_on(platform: str):
    jax = pytest.importorskip("jax")
    try:
        return jax, jax.devices(platform)[0]
    except RuntimeError:
        pytest.skip(f"jax has no {platform} device")


def test_jax_round_trip_on_the_cpu():
    jax, cpu = _jax_on("cpu")
    _round_trip(lambda x: jax.device_put(x, cpu), np.asarray, "cpu")


@pytest.mark.gpu
def test_jax_round_trip_on_the_gpu():
    jax, gpu = _jax_on("gpu")
    _round_trip(lambda x: jax.device_put(x, gpu), np.asarray, "cuda")
