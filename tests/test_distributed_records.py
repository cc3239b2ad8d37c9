"""The distributed fields of a Report (``world_size``, a finding's ``ranks``)
through ``to_dict``, the JSON Lines log (old logs without them still read) and
the HTML report. One process: the fields are written as a real run writes them
(tests/test_distributed_report.py checks that run end to end)."""
import json
import math

import pytest
import torch

import torchhealth
from torchhealth.html_report import render
from torchhealth.report import Finding, Report
from torchhealth.sinks import JsonlSink, read_jsonl


def _report(step=2, world_size=2, ranks=(1,)):
    stats = torchhealth.tensor_stats([torch.tensor([1.0, math.nan, 2.0])], histogram=False)
    found = [Finding("nonfinite", "error", "non-finite gradients: w; produced on rank 1", ["w"],
                     value=1.0, threshold=0.0, primary=True, ranks=None if ranks is None else list(ranks))]
    return Report.from_stats(step, stats, ["w"], ["grad"], [(3,)], [torch.float32], findings=found,
                             skipped=True, world_size=world_size)


def test_to_dict_round_trip_and_text():
    r = _report(world_size=4, ranks=(1, 3))
    back = Report.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.world_size == 4 and back.findings[0].ranks == [1, 3]
    assert str(r).startswith("torchhealth step 2 (4 ranks): UNHEALTHY")
    assert str(_report(world_size=1)).startswith("torchhealth step 2: UNHEALTHY")


def _write(path, reports):
    with JsonlSink(path) as sink:
        for r in reports:
            sink(r)


def test_jsonl_keeps_world_size_and_ranks(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(path, [_report(step=1, ranks=()), _report(step=2)])
    log = read_jsonl(path)
    assert [r.world_size for r in log] == [2, 2]
    assert [r.findings[0].ranks for r in log] == [[], [1]]


def test_a_local_finding_keeps_its_flag_and_never_raises(tmp_path):
    """``local`` (one rank's own activations) through to_dict and the log; the
    policy warns for it where it would raise a global finding."""
    local = Finding("nonfinite", "error", "first non-finite output (rank 1's activations)", ["log"],
                    value=1.0, threshold=0.0, ranks=[1], local=True)
    r = _report()
    r.findings.append(local)
    assert Report.from_dict(json.loads(json.dumps(r.to_dict()))).findings[1].local
    path = tmp_path / "run.jsonl"
    _write(path, [r])
    (back,) = read_jsonl(path)
    assert [f.local for f in back.findings] == [False, True]
    back.findings.pop(0)
    with pytest.warns(torchhealth.HealthWarning, match="rank 1's activations"):
        torchhealth.policy.dispatch(back, {"nonfinite": "raise"}, warn=False)
    with pytest.raises(torchhealth.HealthCheckError):
        torchhealth.policy.dispatch(_report(), {"nonfinite": "raise"}, warn=False)


def test_old_logs_without_the_fields_read(tmp_path):
    path = tmp_path / "old.jsonl"
    _write(path, [_report()])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    del lines[1]["world_size"], lines[1]["findings"][0]["ranks"]
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    (r,) = read_jsonl(path)
    assert r.world_size == 1 and r.findings[0].ranks is None


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(world_size=0), "world_size is 0"),
    (lambda d: d.update(world_size="2"), "world_size is '2'"),
    (lambda d: d["findings"][0].update(ranks=[-1]), r"findings\[0\].ranks\[0\] is -1"),
    (lambda d: d["findings"][0].update(ranks=1), r"findings\[0\].ranks is 1"),
])
def test_bad_fields_name_the_field(tmp_path, edit, match):
    path = tmp_path / "bad.jsonl"
    _write(path, [_report()])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    edit(lines[1])
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    with pytest.raises(ValueError, match=match):
        read_jsonl(path)


def test_html_says_how_many_ranks_and_which_one():
    page = render([_report(step=1, ranks=None), _report(step=2)])
    assert "Each record covers 2 ranks" in page
    assert "non-finite gradients produced on rank(s) 1" in page
    assert "<b>Which rank</b>" in page and "<td>2</td><td>1</td><td>2</td><td>w</td>" in page
    single = render([_report(world_size=1, ranks=None)])
    assert "Each record covers" not in single and "Which rank" not in single
