"""Reading logs that a kill, a resume, a disk or a hostile hand damaged:
nothing complete is lost, and nothing gives a traceback other than
ValueError (TruncatedLogError is one)."""
import gzip
import json
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchhealth
from torchhealth.report import Finding, Report
from torchhealth.sinks import JsonlSink, TruncatedLogError, read_jsonl


def small_reports(n: int, first_step: int = 0) -> list[Report]:
    """n small Reports (two tensors with histograms), one a step."""
    out = []
    for i in range(n):
        x = [torch.tensor([1.0, -2.0, 0.0, 3e-3 * (i + 1)]), torch.tensor([[0.5, float("nan")]])]
        out.append(Report.from_stats(first_step + i, torchhealth.tensor_stats(x), ["w", "b"], ["grad", "param"],
                                     [(4,), (1, 2)], [torch.float32, torch.float32], time=1000.0 + i,
                                     findings=[Finding("nonfinite", "error", "b holds NaN", ["b"], 1.0, 0.0)]))
    return out


def dicts(reports) -> list[dict]:
    return [r.to_dict() for r in reports]


def write(path, *openings, cut_last_write_at: float | None = None) -> list[int]:
    """Writes each list of Reports in its own opening of a JsonlSink; returns the
    file size after each record. With `cut_last_write_at`, every opening but the
    last is killed inside its last record's write (that fraction of it kept)."""
    sizes = []
    for k, reports in enumerate(openings):
        sink = JsonlSink(path)
        for r in reports:
            before = path.stat().st_size if path.exists() else 0
            sink(r)
            sizes.append(path.stat().st_size)
        if cut_last_write_at is not None and k < len(openings) - 1:
            sink._file.close()  # killed: no gzip trailer
            data = path.read_bytes()
            path.write_bytes(data[:before + int((len(data) - before) * cut_last_write_at)])
            sizes[-1] = None
        else:
            sink.close()
    return sizes


# -- a killed run, then resumed ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_log_cut_by_a_kill_then_resumed_keeps_every_complete_record(tmp_path, name):
    path = tmp_path / name
    reports = small_reports(5)
    write(path, reports[:3], reports[2:], cut_last_write_at=0.5)  # step 2 cut, then written again
    log = read_jsonl(path, truncated="keep")
    assert dicts(log) == dicts(reports[:2] + reports[2:])
    assert [d.kind for d in log.damage] == ["cut"] and log.damage[0].line == 4
    assert [[r.step for r in run.reports] for run in log.runs] == [[0, 1], [2, 3, 4]]
    with pytest.raises(TruncatedLogError, match="truncated at line 4 .*appended to after it") as e:
        read_jsonl(path)  # strict by default
    assert dicts(e.value.reports) == dicts(log) and e.value.line == 4
    assert dicts(read_jsonl(path, errors="skip")) == dicts(log)


def test_gzip_member_cut_at_every_position_then_resumed(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    first, second = small_reports(3), small_reports(2, first_step=10)
    sizes = write(path, first)
    member = path.read_bytes()
    with JsonlSink(path) as sink:
        for r in second:
            sink(r)
    tail = path.read_bytes()[len(member):]
    for cut in range(len(member)):
        path.write_bytes(member[:cut] + tail)
        log = read_jsonl(path, errors="skip")
        # Every record flushed before the cut is back, and all of the second member.
        done = sum(1 for s in sizes if s <= cut)
        assert dicts(log)[:done] == dicts(first[:done]), cut
        assert dicts(log)[-2:] == dicts(second), cut
        assert len(log) <= 5


def test_zlib_error_keeps_what_was_decoded_and_reads_later_members(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    reports = small_reports(8)
    sizes = write(path, reports[:6], reports[6:])
    data = bytearray(path.read_bytes())
    at = sizes[3] + 2  # inside the fifth record's compressed data
    data[at:at + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(data))
    with pytest.raises(ValueError, match="corrupt gzip data"):
        read_jsonl(path)
    log = read_jsonl(path, errors="skip")
    assert dicts(log)[:4] == dicts(reports[:4])  # decoded before the damage
    assert dicts(log)[-2:] == dicts(reports[6:])  # the next member
    assert any("corrupt gzip data" in d.reason for d in log.damage)


def test_bad_line_in_the_middle_of_a_plain_log(tmp_path):
    path = tmp_path / "run.jsonl"
    reports = small_reports(6)
    write(path, reports)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:3] + [b'{"step": 2, "oops'] + lines[3:]))
    with pytest.raises(ValueError, match="line 4 is not a torchhealth record"):
        read_jsonl(path, truncated="keep")  # not a cut: strict reading names the line
    log = read_jsonl(path, errors="skip")
    assert dicts(log) == dicts(reports)
    assert [(d.line, d.kind) for d in log.damage] == [(4, "invalid")]
    assert "line 4 (byte" in str(log.damage[0])


# -- runs ---------------------------------------------------------------------------------------
def test_each_opening_is_a_run_unless_it_continues_one(tmp_path):
    path = tmp_path / "run.jsonl"
    write(path, small_reports(20), small_reports(5))
    log = read_jsonl(path)
    assert [r.step for r in log] == list(range(20)) + list(range(5))
    assert [len(run.reports) for run in log.runs] == [20, 5]
    assert log.runs[0].id != log.runs[1].id and all(run.id for run in log.runs)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["run"] == log.runs[0].id and "started" in first and "layout" in first
    # A resumed run names its id: its records continue that run.
    with JsonlSink(path, run_id=log.runs[1].id) as sink:
        for r in small_reports(3, first_step=5):
            sink(r)
    assert [[r.step for r in run.reports] for run in read_jsonl(path).runs] == [
        list(range(20)), list(range(8))]


def test_old_logs_without_run_ids_split_where_the_step_goes_back(tmp_path):
    path = tmp_path / "old.jsonl"
    write(path, small_reports(4), small_reports(3))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for d in lines:  # as torchhealth wrote them before run ids
        d.pop("run", None), d.pop("started", None)
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    log = read_jsonl(path)
    assert [[r.step for r in run.reports] for run in log.runs] == [[0, 1, 2, 3], [0, 1, 2]]
    assert [run.id for run in log.runs] == [None, None]


# -- crafted records ------------------------------------------------------------------------------
def _set(path: list, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return edit


CRAFTED = {
    "count 1e999": (lambda d: _set(["counts", 0, 1], "@INF@")(d), r"counts\[0\]\[1\]"),
    "step 1e999": (_set(["step"], "@INF@"), "step is inf"),
    "huge integer step": (_set(["step"], 10 ** 30), "at most 9223372036854775807"),
    "negative count": (_set(["counts", 1, 0], -3), r"counts\[1\]\[0\] \(nan of 'b'\) is -3"),
    "count above numel": (_set(["counts", 1, 0], 7), r"at most 2"),
    "histogram column out of range": (_set(["hist", 0, 0, 0], 600), r"hist\[0\]\[0\]\[0\] \(a histogram column\)"),
    "histogram run past the grid": (_set(["hist", 0, 0], [557, 1, 1]), r"a histogram column"),
    "wrong type": (_set(["counts"], "many"), "counts is 'many'; expected a list"),
    "wrong value": (_set(["values", 0, 0], "lots"), r"values\[0\]\[0\] is 'lots'"),
    "severity not a string": (_set(["findings", 0, "severity"], ["x"]), r"findings\[0\].severity"),
    "missing field": (lambda d: d.pop("skipped"), "has no field 'skipped'"),
    "deeply nested": (_set(["hist"], "@NEST@"), "nested too deeply"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_record_is_one_clear_error(tmp_path, case):
    path = tmp_path / "run.jsonl"
    write(path, small_reports(3))
    lines = path.read_text().splitlines()
    d = json.loads(lines[2])
    edit, match = CRAFTED[case]
    edit(d)
    lines[2] = json.dumps(d).replace('"@INF@"', "1e999").replace('"@NEST@"', "[" * 100_000 + "]" * 100_000)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3 is not a torchhealth record") as e:
        read_jsonl(path)
    if match:
        assert e.type is ValueError and __import__("re").search(match, str(e.value)), str(e.value)
    log = read_jsonl(path, errors="skip")  # the other records are kept
    assert [r.step for r in log] == [0, 2] and [x.line for x in log.damage] == [3]


def test_crafted_layout_is_one_clear_error(tmp_path):
    path = tmp_path / "run.jsonl"
    write(path, small_reports(2))
    lines = path.read_text().splitlines()
    d = json.loads(lines[0])
    d["layout"]["shapes"][0] = [-4]
    path.write_text("\n".join([json.dumps(d)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"line 1 is not a torchhealth record: layout.shapes\[0\]\[0\] is -4"):
        read_jsonl(path)
    log = read_jsonl(path, errors="skip")
    assert not log and [x.line for x in log.damage] == [1, 2, 3]
    assert "a record whose layout line (line 1) is damaged" in log.damage[1].reason


# -- properties ---------------------------------------------------------------------------------
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_any(path):
    """Reads strictly (only ValueError may escape, TruncatedLogError is one),
    then as leniently as possible (nothing may escape)."""
    try:
        read_jsonl(path)
    except ValueError:
        pass
    return read_jsonl(path, errors="skip")


@FAST
@given(where=st.floats(0.0, 1.0), gz=st.booleans())
def test_random_cuts_lose_nothing_complete(tmp_path, where, gz):
    path = tmp_path / ("cut.jsonl.gz" if gz else "cut.jsonl")
    path.unlink(missing_ok=True)
    reports = small_reports(4)
    sizes = write(path, reports)
    full = path.read_bytes()
    cut = round(where * len(full))  # the length varies with the run id and start time
    path.write_bytes(full[:cut])
    log = _read_any(path)
    done = sum(1 for s in sizes if s <= cut)
    assert dicts(log)[:done] == dicts(reports[:done])
    assert dicts(log) == dicts(reports[:len(log)])
    try:
        assert dicts(read_jsonl(path)) == dicts(reports[:len(log)])
    except TruncatedLogError as e:
        assert dicts(e.reports) == dicts(log)


@FAST
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                     min_size=1, max_size=3))
def test_random_byte_flips_lose_only_the_lines_they_touch(tmp_path, flips):
    path = tmp_path / "flip.jsonl"
    path.unlink(missing_ok=True)
    reports = small_reports(5)
    write(path, reports)
    original = path.read_bytes()
    damaged = bytearray(original)
    flips = [(int(where * len(original)), value) for where, value in flips]
    for at, value in flips:
        damaged[at] = value
    path.write_bytes(bytes(damaged))
    got = dicts(_read_any(path))  # never raises
    # Line k spans [start, newline]; a flip there or on the newline before it touches it.
    spans, start = [], 0
    for line in original.split(b"\n")[:-1]:
        spans.append((start - 1, start + len(line)))
        start += len(line) + 1
    touched = {k for k, (a, b) in enumerate(spans) for at, value in flips
               if a <= at <= b and original[at] != value}
    if 0 not in touched:  # the layout line (line 1) names the rows of every record
        intact = [r.to_dict() for k, r in enumerate(reports) if k + 1 not in touched]
        assert all(d in got for d in intact), (flips, touched)


@FAST
@given(parts=st.lists(st.integers(1, 3), min_size=1, max_size=4), gz=st.booleans(),
       cut=st.floats(0.0, 0.99))
def test_concatenated_runs_with_kills_between_them(tmp_path, parts, gz, cut):
    path = tmp_path / ("runs.jsonl.gz" if gz else "runs.jsonl")
    path.unlink(missing_ok=True)
    openings, step = [], 0
    for n in parts:
        openings.append(small_reports(n, first_step=step))
        step += n
    write(path, *openings, cut_last_write_at=cut)
    log = _read_any(path)
    # The last record of every opening but the last was cut; everything else is read.
    want = [r for k, o in enumerate(openings) for r in (o if k == len(openings) - 1 else o[:-1])]
    got = dicts(log)
    assert all(d in got for d in dicts(want))
    assert dicts(log.runs[-1].reports) == dicts(openings[-1])


@FAST
@given(junk=st.binary(max_size=300), at=st.floats(0.0, 1.0), gz=st.booleans())
def test_arbitrary_bytes_in_a_log_give_no_traceback(tmp_path, junk, at, gz):
    path = tmp_path / ("junk.jsonl.gz" if gz else "junk.jsonl")
    path.unlink(missing_ok=True)
    write(path, small_reports(2))
    full = path.read_bytes()
    k = round(at * len(full))
    path.write_bytes(full[:k] + junk + full[k:])
    _read_any(path)
