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
