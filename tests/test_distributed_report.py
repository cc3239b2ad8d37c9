"""The wrapper's Reports under real gloo process groups (2 and 4 processes):
which rank produced a non-finite gradient, how many ranks a record covers (in
the JSONL log and the HTML report), distributed checkpoints, parameters with no
gradient on some ranks and ``check_every > 1``. Scenarios: tests/dist_report_scenarios.py."""
import os

import pytest
import torch.distributed as dist

from dist_report_scenarios import BAD_RANK, BAD_STEP, log_path
from dist_workers import run_scenarios

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TWO = ["ddp_report_names_rank", "ddp_report_names_rank_never", "compiled_ddp_report_names_rank",
       "fsdp_report_names_rank", "raise_names_rank",
       "explicit_tracker_with_hook", "jsonl_world_size", "ddp_unused_branch", "fsdp_unused_branch",
       "fsdp_check_every", "ddp_check_every", "fsdp_due_steps_only", "ddp_due_steps_only", "dcp_round_trip", "watched_local_nan_raises_nowhere",
       "ddp_watched_origin_on_every_rank", "fsdp_watched_origin_on_every_rank"]
FOUR = ["ddp_report_names_rank", "fsdp_report_names_rank", "ddp_unused_branch",
        "fsdp_unused_branch", "fsdp_check_every", "ddp_watched_origin_on_every_rank"]


@pytest.fixture(scope="module")
def results():
    try:
        yield {2: run_scenarios(2, "dist_report_scenarios", TWO),
               4: run_scenarios(4, "dist_report_scenarios", FOUR)}
    finally:
        if os.path.exists(log_path(os.getpid())):
            os.unlink(log_path(os.getpid()))


@pytest.mark.parametrize("world,scenario", [(2, n) for n in TWO] + [(4, n) for n in FOUR])
def test_scenario(results, world, scenario):
    failure = results[world][scenario]
    assert failure is None, failure


def test_log_of_a_two_process_run(results):
    """The JSONL that rank 0 wrote in `jsonl_world_size`, read back: every
    record covers 2 ranks, the poisoned step names the rank, and the HTML
    report says both (in the summary and beside the origin)."""
    from torchhealth.html_report import render
    from torchhealth.sinks import read_jsonl

    assert results[2]["jsonl_world_size"] is None, results[2]["jsonl_world_size"]
    log = read_jsonl(log_path(os.getpid()))
    assert [r.step for r in log] == [0, 1, 2, 3] and {r.world_size for r in log} == {2}
    assert [f.ranks for f in log[BAD_STEP].findings if f.ranks is not None] == [[BAD_RANK]]
    assert not any(f.ranks for r in log if r.step != BAD_STEP for f in r.findings)
    page = render(list(log))
    assert "Each record covers 2 ranks" in page
    assert f"non-finite gradients produced on rank(s) {BAD_RANK}" in page
    assert "<b>Which rank</b>" in page
    assert f"<td>{BAD_STEP}</td><td>{BAD_RANK}</td><td>2</td><td>first.weight, first.bias</td>" in page
