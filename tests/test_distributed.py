"""torchhealth across real gloo process groups (2 and 4 processes).

The processes start once per world size (a module-scoped fixture) and run
every scenario of tests/dist_scenarios.py; each test checks one scenario's
outcome on every rank.
"""
import pytest
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
