"""The CPU benchmark's models and baselines (torchhealth/bench.py) for dtypes
torch's own reductions refuse: float8 models are drawn in range, their floor
reads their bytes, and the pure-Python checks read them as float32."""
import pytest
import torch

from torchhealth import bench

F8 = ["float8_e4m3fn", "float8_e5m2"]


@pytest.mark.parametrize("dtype", F8)
def test_float8_models_hold_values_in_the_formats_range(dtype):
    model = bench.make_models(quick=True, dtypes=[dtype])[0]
    assert model.flat.dtype == getattr(torch, dtype) and dtype in model.name
    x = model.flat.float()
    assert x.isfinite().all()
    assert (x == 0).double().mean() < 0.01  # gradients at 1e-4 would all be 0 in e4m3fn
    assert 0.5 < x.std() < 2


def test_the_floor_sums_float8_bytes_as_int64():
    b = torch.randint(0, 256, (8 * 1000 + 5,), dtype=torch.uint8)
    got = bench.floor_sum(b.view(torch.float8_e4m3fn))
    assert got.dtype == torch.int64 and got.item() == b[:8000].view(torch.int64).sum().item()
    f = torch.randn(1000)
    assert torch.equal(bench.floor_sum(f), f.sum())


@pytest.mark.parametrize("dtype", F8)
def test_python_checks_read_float8_as_float32(dtype):
    x = (torch.randn(1000) * 4).to(getattr(torch, dtype))
    assert bench.pure_python_checks([x]) == bench.pure_python_checks([x.float()])
    assert bench.isfinite_loop([x]) is True
    assert bench.foreach_norm_and_unscale([x]) == bench.foreach_norm_and_unscale([x.float()])
