"""torchhealth across real gloo process groups (2 and 4 processes).

The processes start once per world size (a module-scoped fixture) and run
every scenario of tests/dist_scenarios.py; each test checks one scenario's
outcome on every rank.
"""
import pytest
import torch
import torch.distributed as dist

from dist_workers import run_scenarios

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TWO = ["dtensor_1d", "fsdp2", "errors", "combine_plain", "dtensor_collectives", "ddp_origin",
       "fsdp_origin", "fsdp_skip_everywhere", "rank0_reports_and_raise_together"]
FOUR = ["dtensor_1d", "dtensor_2d", "fsdp2", "hsdp", "fsdp_tp", "combine_plain", "ddp_origin",
        "fsdp_origin", "hsdp_origin", "mixed_meshes"]


@pytest.fixture(scope="module")
def results():
    return {2: run_scenarios(2, "dist_scenarios", TWO), 4: run_scenarios(4, "dist_scenarios", FOUR)}


@pytest.mark.parametrize("world,scenario", [(2, n) for n in TWO] + [(4, n) for n in FOUR])
def test_scenario(results, world, scenario):
    failure = results[world][scenario]
    assert failure is None, failure


def test_origin_flags_count_each_tensor_holding_a_nan_or_inf_of_any_float_or_complex_dtype():
    from torchhealth.distributed._origin import _nonfinite

    fine, nan, inf = torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64):
        flags = _nonfinite([t.to(dtype) for t in (fine, nan, torch.empty(0), inf)])
        assert flags.dtype == torch.int32 and flags.tolist() == [0, 1, 0, 1], dtype


def test_a_bucket_whose_sum_is_finite_is_not_read_again_and_any_other_is_read_exactly(monkeypatch):
    """On the CPU the communication hooks test a bucket's buffer by its sum first:
    a finite sum clears the whole bucket without the per-tensor statistics; a
    non-finite one (a NaN, an Inf, or finite values whose sum overflows) sends it
    to the exact per-tensor test, so an overflowing sum names no tensor."""
    from torchhealth.distributed import _origin

    calls = []
    exact = _origin._nonfinite
    monkeypatch.setattr(_origin, "_nonfinite", lambda ts: calls.append(len(ts)) or exact(ts))

    class Tracker:
        _flags = torch.zeros(3, dtype=torch.int32)

    slots = torch.tensor([2, 0, 1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        big = torch.finfo(dtype).max
        cases = [([1.0, -2.0, 3.0], [0, 0, 0], 0),
                 ([1.0, float("nan"), 3.0], [1, 0, 0], 1),  # tensor 1 is slot 0
                 ([float("inf"), 1.0, float("-inf")], [0, 1, 1], 1),
                 ([big, big, 1.0], [0, 0, 0], 1)]  # the sum overflows; no value is non-finite
        for values, flags, reads in cases:
            Tracker._flags.zero_()
            calls.clear()
            flat = torch.tensor(values, dtype=dtype)
            _origin._record(Tracker, flat, lambda: (slots, list(flat.split(1))))
            assert Tracker._flags.tolist() == flags, (dtype, values)
            assert len(calls) == reads, (dtype, values)
